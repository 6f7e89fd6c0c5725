"""``AcmeIssuer``: certificates from any RFC 8555 CA, with the ACME account kept in storage.

Owns the account (key created once, under a storage lock so replicas share one account, and
registered or found again by key) and the translation of ACME failures into ``IssuanceError``
types the certificate manager understands, and the order of challenge types: each solver it is
given (TLS-ALPN-01 answered by the data path, HTTP-01 by the port-80 listener) is tried in
``acme.challenges`` order, the next one at once when one fails validation.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Sequence
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import metrics
from ..acme import ari
from ..acme.client import AcmeClient, CertificateChain, ChallengeSolver
from ..acme.errors import (
    AcmeError,
    AcmeProblem,
    AcmeTransportError,
    ChallengeUnavailable,
    OrderInvalid,
    SolverError,
    Subproblem,
)
from ..acme.jws import b64url_decode
from ..config import AcmeIssuerConfig
from ..errors import StorageError, reading_record
from ..reasons import ACME_ERROR_PREFIX, Failure, Reason
from ..storage.base import Storage
from ..storage.locks import hold_lock, make_owner_id
from .account_pause import (
    ACCOUNT_PAUSED,
    AccountPause,
    AccountPauses,
    account_stem,
    pauses_account,
)
from .base import (
    IssuanceError,
    IssuedCertificate,
    IssueRequest,
    RenewalInfoError,
    RenewalWindow,
    private_key_pem,
)

log = logging.getLogger("edgeproxy.acme")


def account_key_name(directory: str) -> str:
    return f"acme/accounts/{account_stem(directory)}.json"


class AcmeIssuer:
    def __init__(
        self,
        *,
        directory: str,
        storage: Storage,
        solvers: Sequence[ChallengeSolver],
        email: str | None = None,
        trust: str = "",
        eab: tuple[str, bytes] | None = None,
        profile: str | None = None,
        preferred_chain: str | None = None,
        lock_ttl: float = 30.0,
        label: str | None = None,
        pauses: AccountPauses | None = None,
    ) -> None:
        self.directory = directory
        # Short name for metrics and logs (bounded: one per configured CA).
        self.label = label or (urlsplit(directory).hostname or "ca").lower()
        self._lock_ttl = lock_ttl
        self._storage = storage
        if not solvers:
            raise ValueError("AcmeIssuer needs at least one challenge solver")
        # In order of preference (acme.challenges); a validation failure moves to the next.
        self._solvers = tuple(solvers)
        self._email = email
        self._verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=trust) if trust else True
        )
        self._eab = eab
        self._profile = profile
        self._preferred_chain = preferred_chain
        self._client: AcmeClient | None = None
        self._client_lock = trio.Lock()
        self._reported: dict[str, int] = {}
        # The account-wide pause after the CA said rateLimited (shared with the manager).
        self._pauses = pauses
        if pauses is not None:
            pauses.watch(directory, self.label)

    @classmethod
    def from_config(
        cls,
        cfg: AcmeIssuerConfig,
        storage: Storage,
        solvers: Sequence[ChallengeSolver],
        *,
        hmac_key: str | None = None,
        lock_ttl: float = 30.0,
        pauses: AccountPauses | None = None,
    ) -> AcmeIssuer:
        """One CA of ``acme.issuer_configs()``; ``solvers`` in ``acme.challenges`` order;
        ``hmac_key`` its external account binding key (``secret_env.eab_hmac_key``)."""
        eab = None
        if cfg.eab_kid and hmac_key:
            eab = (cfg.eab_kid, b64url_decode(hmac_key))
        return cls(
            directory=cfg.directory,
            storage=storage,
            solvers=solvers,
            email=cfg.email,
            trust=cfg.trust,
            eab=eab,
            profile=cfg.profile,
            preferred_chain=cfg.preferred_chain,
            lock_ttl=lock_ttl,
            label=cfg.label,
            pauses=pauses,
        )

    @property
    def id(self) -> str:
        return self.directory

    async def _get_client(self) -> AcmeClient:
        async with self._client_lock:
            if self._client is not None:
                return self._client
            key, account_url = await self._load_or_create_account()
            client = AcmeClient(
                self.directory,
                key,
                verify=self._verify,
                account_url=account_url,
                on_response=_count_acme_response,
            )
            if account_url is None:
                account = await client.find_account()
                if account is None:
                    contact = [f"mailto:{self._email}"] if self._email else []
                    account = await client.register(contact=contact, agree_tos=True, eab=self._eab)
                    log.info("registered ACME account %s at %s", account.url, self.directory)
                await self._save_account(key, account.url)
            self._client = client
            return client

    async def _load_or_create_account(self) -> tuple[ec.EllipticCurvePrivateKey, str | None]:
        name = account_key_name(self.directory)
        loaded = await self._read_account(name)
        if loaded is not None:
            return loaded
        # The lease is short (storage.lock_ttl, kept alive while held): a process killed while
        # creating the account must not block every other one for long.
        async with hold_lock(
            self._storage, "acme-account", owner=make_owner_id(), ttl=self._lock_ttl, wait=60
        ):
            loaded = await self._read_account(name)
            if loaded is not None:
                return loaded
            key = ec.generate_private_key(ec.SECP256R1())
            await self._save_account(key, None)
            return key, None

    async def _read_account(
        self, name: str
    ) -> tuple[ec.EllipticCurvePrivateKey, str | None] | None:
        raw = await self._storage.get(name)
        if raw is None:
            return None
        what = f"ACME account record {name}"
        with reading_record(what, "restore it or delete it to create a new account"):
            d = json.loads(raw)
            key = serialization.load_pem_private_key(d["key_pem"].encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise StorageError(f"{what} holds an unsupported key type")
        return key, d.get("url")

    async def _save_account(self, key: ec.EllipticCurvePrivateKey, url: str | None) -> None:
        record = {"directory": self.directory, "url": url, "key_pem": private_key_pem(key)}
        await self._storage.put(
            account_key_name(self.directory), json.dumps(record).encode(), secret=True
        )

    async def issue(self, request: IssueRequest) -> IssuedCertificate:
        """Order with each challenge type in turn until one validates.

        ``request.prefer`` (the type that worked for these names last time) goes first. When
        a type fails validation, or the CA does not offer it, a new order with the next type
        follows at once; any other failure (rate limit, CA down) ends the attempt.
        """
        name = request.name
        if self._pauses is not None:
            pause = await self._pauses.current(self.directory)
            if pause is not None:
                raise self._paused(pause)
        solvers = sorted(self._solvers, key=lambda s: s.challenge_type != request.prefer)
        failed: list[str] = []
        for i, solver in enumerate(solvers):
            try:
                chain = await self._issue_with(request, solver)
            except (OrderInvalid, ChallengeUnavailable) as exc:
                validation = isinstance(exc, ChallengeUnavailable) or exc.challenge_type
                if not validation or i + 1 == len(solvers):
                    raise self._translate(exc, name, failed) from None
                following = solvers[i + 1].challenge_type
                log.warning(
                    "%s did not validate for %s (%s); ordering again with %s",
                    solver.challenge_type,
                    name,
                    exc,
                    following,
                )
                metrics.CHALLENGE_FALLBACKS.labels(solver.challenge_type, following).inc()
                failed.append(f"{solver.challenge_type}: {_problem_text(exc, name)}")
            except AcmeError as exc:
                if (
                    self._pauses is not None
                    and isinstance(exc, AcmeProblem)
                    and pauses_account(exc.type, exc.status, exc.retry_after)
                ):
                    # A 503 from a proxy in front of the CA has no problem type worth showing.
                    reason = exc.type if exc.type != "about:blank" else f"HTTP {exc.status}"
                    pause = await self._pauses.record(
                        self.directory, reason=reason, detail=exc.detail,
                        retry_after=exc.retry_after,
                    )  # fmt: skip
                    raise self._paused(pause) from None
                raise self._translate(exc, name, failed) from None
            else:
                return IssuedCertificate(
                    chain_pem=chain.pem, issuer_id=self.id, challenge_type=solver.challenge_type
                )
        raise AssertionError("unreachable: the last solver's failure is raised above")

    async def _issue_with(self, request: IssueRequest, solver: ChallengeSolver) -> CertificateChain:
        client = await self._get_client()
        replaces = None
        if request.replacing is not None:
            try:
                replaces = ari.cert_id(x509.load_pem_x509_certificates(request.replacing)[0])
            except (ValueError, AcmeError):
                replaces = None
        try:
            return await client.issue(
                request.names,
                request.private_key,
                solver,
                profile=self._profile,
                replaces=replaces,
                preferred_chain=self._preferred_chain,
            )
        finally:
            self._report_stats(client)

    def _paused(self, pause: AccountPause) -> IssuanceError:
        wait = max(0.0, pause.until - time.time())
        return IssuanceError(Failure(ACCOUNT_PAUSED, pause.describe(), retry_after=wait))

    def _translate(self, exc: AcmeError, name: str, earlier: list[str]) -> IssuanceError:
        """The ``IssuanceError`` for the manager; ``earlier`` are the challenge types that
        failed before this one (shown in the status, not used for the hint)."""
        before = tuple(earlier)
        if isinstance(exc, OrderInvalid):
            problem = _most_specific(exc.problem, name)
            if problem is None:
                failure = Failure(
                    Reason.ORDER_INVALID,
                    str(exc),
                    ACME_ERROR_PREFIX + Reason.ORDER_INVALID,
                    challenge_type=exc.challenge_type,
                    earlier=before,
                )
            else:
                failure = Failure.problem(
                    problem.type, problem.detail, challenge_type=exc.challenge_type, earlier=before
                )
            return IssuanceError(failure)
        if isinstance(exc, ChallengeUnavailable):
            return IssuanceError(Failure(Reason.CHALLENGE_UNAVAILABLE, str(exc), earlier=before))
        if isinstance(exc, AcmeProblem):
            said = _most_specific(exc, name) or exc
            return IssuanceError(
                Failure.problem(said.type, said.detail, retry_after=exc.retry_after, earlier=before)
            )
        if isinstance(exc, SolverError):
            # Our side of the challenge failed (e.g. the DNS update): typed for the hint.
            return IssuanceError(Failure(exc.reason, str(exc), earlier=before))
        if isinstance(exc, AcmeTransportError):
            detail = f"{self.directory}: {exc}"
            return IssuanceError(Failure(Reason.UNREACHABLE, detail, earlier=before))
        return IssuanceError(Failure(Reason.ACME, str(exc), earlier=before))

    async def renewal_window(self, chain_pem: bytes) -> RenewalWindow | None:
        try:
            client = await self._get_client()
        except AcmeTransportError as exc:
            raise IssuanceError(Failure(Reason.UNREACHABLE, str(exc))) from None
        except AcmeError as exc:
            raise IssuanceError(Failure(Reason.ACME, str(exc))) from None
        try:
            info = await client.renewal_info(x509.load_pem_x509_certificates(chain_pem)[0])
        except AcmeProblem as exc:
            raise RenewalInfoError(
                Failure.problem(exc.type, exc.detail, retry_after=exc.retry_after),
                long_term=ari.is_long_term_error(exc.status),
                status=exc.status,
            ) from None
        except AcmeTransportError as exc:
            failure = Failure(Reason.UNREACHABLE, str(exc))
            raise RenewalInfoError(failure, long_term=False) from None
        except AcmeError as exc:
            # The CA's answer cannot be read, or the certificate cannot be named as a CertID
            # (no Authority Key Identifier): asking again soon would get the same.
            raise RenewalInfoError(Failure(Reason.ACME, str(exc)), long_term=True) from None
        if info is None:
            return None
        return RenewalWindow(
            start=info.start.astimezone(UTC),
            end=info.end.astimezone(UTC),
            explanation_url=info.explanation_url,
            retry_after=info.retry_after,
        )

    def _report_stats(self, client: AcmeClient) -> None:
        """Mirror the client's counters into Prometheus (acme/ knows nothing of metrics)."""
        stats: dict[str, Any] = getattr(client, "stats", {})
        dropped = int(stats.get("replaces_dropped", 0))
        prev = self._reported.get("replaces_dropped", 0)
        if dropped > prev:
            metrics.ACME_REPLACES_DROPPED.inc(dropped - prev)
            self._reported["replaces_dropped"] = dropped

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _most_specific(problem: AcmeProblem | None, name: str) -> Subproblem | AcmeProblem | None:
    """The subproblem about ``name`` when the CA sent one (RFC 8555 s6.7.1: a ``compound``
    or ``malformed`` top-level problem says little), else the problem itself."""
    if problem is None:
        return None
    for sub in problem.subproblems:
        if sub.identifier is None or sub.identifier.lower() == name.lower():
            return sub
    return problem


def _problem_text(exc: OrderInvalid | ChallengeUnavailable, name: str) -> str:
    if isinstance(exc, OrderInvalid):
        problem = _most_specific(exc.problem, name)
        if problem is not None:
            return f"{problem.acme_type or problem.type}: {problem.detail}"
    return str(exc)


def _count_acme_response(endpoint: str, status: int) -> None:
    metrics.ACME_REQUESTS.labels(endpoint, str(status) if status else "error").inc()
