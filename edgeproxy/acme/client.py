"""An exact, small, async ACME client (RFC 8555, RFC 8737 TLS-ALPN-01, RFC 9773 ARI).

Owns: the conversation with one CA on behalf of one account key: the directory (cached), a
nonce pool fed by every ``Replay-Nonce``, signed requests (``jwk`` only where s6.2 allows,
``kid`` otherwise; POST-as-GET for reads, s6.3), retries, polling, and the whole issuance
flow from newOrder to the downloaded chain.

Must not know: the proxy, storage, metrics libraries, or how challenges are served. A
``ChallengeSolver`` is handed the key authorization and makes it reachable; ``stats`` is a
plain dict the caller may export.

Theory of operation
-------------------
Every HTTP exchange goes through ``_exchange``, the one place httpx failures become
``AcmeTransportError``. Above it:

* ``_get`` (directory, newNonce, renewalInfo) and POST-as-GET reads retry transport errors a
  bounded number of times with exponential backoff and jitter. Writes only retry when the
  connection never came up (the CA cannot have seen them).
* ``_post`` signs with a nonce from the pool (or a fresh one from newNonce) and, on
  ``badNonce`` (s6.5), signs again with the nonce the error response carried, up to
  ``BAD_NONCE_RETRIES`` times. Every other problem is raised as its ``AcmeProblem``
  subclass, with Retry-After in ``retry_after``.
* Polling starts short and grows: the first look at an authorization comes ``POLL_FIRST``
  seconds after the challenge response, then the pause doubles up to ``POLL_CAP``. A CA that
  validates in ten milliseconds is seen in twenty; a slow one costs few requests. An order
  is looked at at once after finalize (most CAs sign within milliseconds), then on the same
  schedule. A Retry-After from the CA is honoured (we never poll sooner than asked), clamped
  to ``POLL_MAX_WAIT``. A deadline bounds every wait; ``issue`` wraps the whole flow in one.

Concurrency: one client may run several issuances at once (authorizations of one order are
solved in parallel too); the nonce pool and the stats are only touched between awaits.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import urljoin

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from edgeproxy import __version__
from edgeproxy.acme import ari, jws
from edgeproxy.acme.errors import (
    AccountDoesNotExist,
    AcmeError,
    AcmeProtocolError,
    AcmeTimeout,
    AcmeTransportError,
    BadNonce,
    ChallengeUnavailable,
    OrderInvalid,
    OrderNotReady,
)
from edgeproxy.acme.jws import AccountKey
from edgeproxy.acme.messages import (
    PEM_CHAIN,
    PENDING_STATES,
    Account,
    Authorization,
    CertificateChain,
    Challenge,
    Directory,
    Order,
    build_csr,
    finalize_payload,
    header,
    new_account_payload,
    new_order_payload,
    parse_account,
    parse_authorization,
    parse_challenge,
    parse_directory,
    parse_json,
    parse_links,
    parse_order,
    parse_retry_after,
    poll_wait,
    problem_from_response,
    revoke_payload,
    select_chain,
    split_pem_chain,
)

__all__ = [
    "Account",
    "AcmeClient",
    "Authorization",
    "CertificateChain",
    "Challenge",
    "ChallengeSolver",
    "Directory",
    "Order",
]

log = logging.getLogger(__name__)

USER_AGENT = f"edgeproxy/{__version__} (acme)"  # RFC 8555 s6.1: clients MUST send one
JOSE_JSON = "application/jose+json"

# A badNonce costs one round trip and proves nothing is wrong with the request; at a 50 %
# rejection rate (pebble chaos) 5 retries fail ~1 request in 64, i.e. ~17 % of issuances.
BAD_NONCE_RETRIES = 15
TRANSPORT_RETRIES = 3
TRANSPORT_BACKOFF = 0.1  # seconds before the first retry; doubles, with +-50 % jitter
TRANSPORT_BACKOFF_CAP = 2.0
POLL_FIRST = 0.02
POLL_CAP = 1.0
POLL_MAX_WAIT = 10.0  # the most we let a Retry-After stretch one poll interval
CLEANUP_TIMEOUT = 10.0
NONCE_POOL_SIZE = 32  # nonces expire server-side; hoarding more buys nothing


_Polled = TypeVar("_Polled", Order, Authorization)


class ChallengeSolver(Protocol):
    """Makes a challenge answerable; the data path (or a test) implements it.

    ``present`` returns once the CA can validate (for TLS-ALPN-01: the RFC 8737 certificate
    is being served for SNI ``identifier``); ``cleanup`` undoes it and must be idempotent,
    since it is called even when ``present`` failed halfway.
    """

    challenge_type: str

    async def present(self, identifier: str, token: str, key_authorization: str) -> None: ...

    async def cleanup(self, identifier: str, token: str) -> None: ...


def _ssl_context(verify: ssl.SSLContext | str | bool) -> ssl.SSLContext | bool:
    # httpx 0.28 deprecates verify=<path>; a CA bundle path is how config and tests speak.
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


def _may_blame_replaces(error: AcmeError) -> bool:
    """Could this newOrder failure be the CA refusing ``replaces`` (RFC 9773 s5)?

    Any answer from the CA counts, whatever its type, status or text: CAs that predate
    ``alreadyReplaced`` say ``conflict``, ``malformed`` or 404 "Certificate not found for
    certID ...", and no reading of problem text can know every wording. Retrying once without
    the field costs one request; not retrying fails every renewal at such a CA (the
    certificate then expires). Only a request that never reached the CA is excluded.
    """
    return not (isinstance(error, AcmeTransportError) and not error.request_sent)


class AcmeClient:
    """An ACME client for one directory and one account key.

    ``account_key`` is an EC (P-256 -> ES256, P-384 -> ES384) or RSA (RS256) private key.
    ``verify`` is the trust for the CA's HTTPS: True (system), False, an ``SSLContext`` or a
    CA bundle path. Pass ``account_url`` when the account is known (saves a lookup); pass
    ``http`` to share a connection pool (it is then not closed by ``aclose``).
    ``bad_nonce_retries`` bounds how often one request is re-signed after ``badNonce``.
    """

    def __init__(
        self,
        directory_url: str,
        account_key: AccountKey,
        *,
        verify: ssl.SSLContext | str | bool = True,
        account_url: str | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        bad_nonce_retries: int = BAD_NONCE_RETRIES,
        on_response: Callable[[str, int], None] | None = None,
    ) -> None:
        jws.algorithm(account_key)  # fail now on an unsupported key, not at first request
        self._directory_url = directory_url
        self._key: AccountKey = account_key
        self._account_url = account_url
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            verify=_ssl_context(verify),
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )
        self._directory: Directory | None = None
        self._directory_lock = trio.Lock()
        self._nonces: deque[str] = deque(maxlen=NONCE_POOL_SIZE)
        self._rng = random.Random()
        self._bad_nonce_retries = bad_nonce_retries
        # (endpoint, HTTP status) of every response: the caller's metrics hook; acme/ itself
        # knows nothing of Prometheus. Status 0 means no response (transport error).
        self._on_response = on_response
        self.stats: dict[str, int] = {}
        """Counters: ``http_requests``, ``http_requests.<endpoint>``, ``bad_nonce_retries``,
        ``transport_retries``, ``replaces_dropped``, ``profile_dropped``, ``polls``,
        ``issuances``."""

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool if this client created it."""
        if self._owns_http:
            await self._http.aclose()

    @property
    def account_url(self) -> str | None:
        """The account URL (JWS ``kid``) once registered or found, else None."""
        return self._account_url

    @property
    def account_key(self) -> AccountKey:
        """The current account key (changes after ``key_rollover``)."""
        return self._key

    # --- transport ----------------------------------------------------------------------

    def _report(self, endpoint: str, status: int) -> None:
        if self._on_response is not None:
            self._on_response(endpoint, status)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    async def _exchange(
        self,
        method: str,
        url: str,
        endpoint: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One HTTP exchange; the only place httpx errors become ``AcmeTransportError``."""
        self._count("http_requests")
        self._count(f"http_requests.{endpoint}")
        try:
            response = await self._http.request(method, url, content=content, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            self._report(endpoint, 0)
            raise AcmeTransportError(
                f"{method} {url}: cannot connect: {exc!r}", request_sent=False
            ) from exc
        except httpx.TimeoutException as exc:
            self._report(endpoint, 0)
            raise AcmeTransportError(f"{method} {url}: timed out: {exc!r}") from exc
        except (httpx.TransportError, ssl.SSLError, OSError) as exc:
            self._report(endpoint, 0)
            raise AcmeTransportError(f"{method} {url}: {exc!r}") from exc
        self._report(endpoint, response.status_code)
        nonce = response.headers.get("replay-nonce")
        if nonce:
            self._nonces.append(nonce)
        return response

    async def _backoff(self, attempt: int, error: AcmeTransportError) -> None:
        delay = min(TRANSPORT_BACKOFF * 2 ** (attempt - 1), TRANSPORT_BACKOFF_CAP)
        delay *= self._rng.uniform(0.5, 1.5)
        log.info("ACME transport error, retry %d in %.2fs: %s", attempt, delay, error)
        self._count("transport_retries")
        await trio.sleep(delay)

    async def _get(
        self, url: str, endpoint: str, *, method: str = "GET", ok: tuple[int, ...] = (200,)
    ) -> httpx.Response:
        """An unsigned GET/HEAD (directory, newNonce, renewalInfo), retried on transport errors."""
        attempt = 0
        while True:
            try:
                response = await self._exchange(method, url, endpoint)
            except AcmeTransportError as exc:
                attempt += 1
                if attempt > TRANSPORT_RETRIES:
                    raise
                await self._backoff(attempt, exc)
                continue
            if response.status_code not in ok:
                raise problem_from_response(
                    response.status_code, response.headers, response.content
                )
            return response

    async def _nonce(self) -> str:
        while not self._nonces:
            directory = await self.directory()
            # _exchange pools the Replay-Nonce of every response, this one included.
            response = await self._get(
                directory.new_nonce, "newNonce", method="HEAD", ok=(200, 204)
            )
            if not response.headers.get("replay-nonce"):
                raise AcmeProtocolError(f"newNonce {directory.new_nonce} sent no Replay-Nonce")
        nonce: str = self._nonces.pop()  # newest first: the least likely to have expired
        return nonce

    async def _post(
        self,
        url: str,
        payload: dict[str, Any] | None,
        endpoint: str,
        *,
        use_jwk: bool = False,
        signing_key: AccountKey | None = None,
        accept: str | None = None,
    ) -> httpx.Response:
        """A signed POST (``payload=None``: POST-as-GET, s6.3); returns only 2xx responses.

        ``use_jwk`` puts the public key in the header instead of ``kid`` (newAccount and
        revocation by certificate key, s6.2); ``signing_key`` signs with a key other than
        the account's (revocation by certificate key, s7.6).
        """
        key = signing_key or self._key
        kid = None
        if not use_jwk:
            if self._account_url is None:
                await self._lookup_account()
            kid = self._account_url
        headers = {"Content-Type": JOSE_JSON}
        if accept:
            headers["Accept"] = accept
        bad_nonces = transport_failures = 0
        while True:
            body = jws.sign(key, payload, url=url, nonce=await self._nonce(), kid=kid)
            try:
                response = await self._exchange(
                    "POST", url, endpoint, content=json.dumps(body).encode(), headers=headers
                )
            except AcmeTransportError as exc:
                # A read may be repeated; a write only if it never left this host.
                transport_failures += 1
                if (payload is not None and exc.request_sent) or (
                    transport_failures > TRANSPORT_RETRIES
                ):
                    raise
                await self._backoff(transport_failures, exc)
                continue
            if response.status_code < 400:
                return response
            problem = problem_from_response(
                response.status_code, response.headers, response.content
            )
            if isinstance(problem, BadNonce) and bad_nonces < self._bad_nonce_retries:
                bad_nonces += 1
                self._count("bad_nonce_retries")
                continue
            raise problem

    def _location(self, response: httpx.Response, what: str) -> str:
        location: str | None = response.headers.get("location")
        if not location:
            raise AcmeProtocolError(f"{what}: response has no Location header")
        return urljoin(str(response.url), location)

    # --- directory and account ----------------------------------------------------------

    async def directory(self) -> Directory:
        """The directory (RFC 8555 s7.1.1), fetched once and cached."""
        if self._directory is None:
            async with self._directory_lock:
                if self._directory is None:
                    response = await self._get(self._directory_url, "directory")
                    self._directory = parse_directory(self._directory_url, response.content)
        return self._directory

    async def register(
        self,
        *,
        contact: Sequence[str] = (),
        agree_tos: bool = True,
        eab: tuple[str, bytes] | None = None,
    ) -> Account:
        """Create the account for this key, or return the existing one (RFC 8555 s7.3).

        ``eab`` is ``(kid, raw HMAC key)`` for CAs that require External Account Binding
        (s7.3.4); decode the CA's base64url key with ``jws.decode_eab_hmac_key``.
        """
        directory = await self.directory()
        binding = None
        if eab is not None:
            eab_kid, hmac_key = eab
            binding = jws.external_account_binding(
                self._key, kid=eab_kid, hmac_key=hmac_key, url=directory.new_account
            )
        payload = new_account_payload(contact=contact, agree_tos=agree_tos, eab=binding)
        response = await self._post(directory.new_account, payload, "newAccount", use_jwk=True)
        return self._account_from(response)

    def _account_from(self, response: httpx.Response) -> Account:
        if response.status_code not in (200, 201):
            raise AcmeProtocolError(f"newAccount answered HTTP {response.status_code}")
        account = parse_account(self._location(response, "newAccount"), response.content)
        self._account_url = account.url
        return account

    async def _lookup_account(self) -> Account:
        directory = await self.directory()
        payload = new_account_payload(only_return_existing=True)
        response = await self._post(directory.new_account, payload, "newAccount", use_jwk=True)
        return self._account_from(response)

    async def find_account(self) -> Account | None:
        """The existing account for this key, or None (``onlyReturnExisting``, s7.3.1)."""
        try:
            return await self._lookup_account()
        except AccountDoesNotExist:
            return None

    async def key_rollover(self, new_key: AccountKey) -> None:
        """Move the account to ``new_key`` (RFC 8555 s7.3.5); later requests use it."""
        jws.algorithm(new_key)
        directory = await self.directory()
        if not directory.key_change:
            raise AcmeProtocolError("the CA's directory has no keyChange URL")
        if self._account_url is None:
            await self._lookup_account()
        assert self._account_url is not None
        inner = jws.key_change_inner(
            new_key, self._key, account_url=self._account_url, url=directory.key_change
        )
        await self._post(directory.key_change, inner, "keyChange")
        self._key = new_key

    # --- orders, authorizations, challenges ---------------------------------------------

    async def new_order(
        self,
        identifiers: Sequence[str],
        *,
        profile: str | None = None,
        replaces: str | None = None,
    ) -> Order:
        """Create an order (RFC 8555 s7.4).

        ``profile`` is sent only if the directory advertises it; ``replaces`` (an ARI CertID,
        RFC 9773 s5) only if the CA offers ARI. When a newOrder carrying ``replaces`` fails in
        any way the CA answered (any problem type, status or text), the order is retried once
        without it: a renewal must not fail because the old certificate's bookkeeping did.
        """
        directory = await self.directory()
        if profile is not None and profile not in directory.profiles:
            log.warning(
                "ACME profile %r is not advertised by %s (offered: %s); ordering without it",
                profile,
                directory.url,
                ", ".join(directory.profiles) or "none",
            )
            self._count("profile_dropped")
            profile = None
        if replaces is not None and directory.renewal_info is None:
            replaces = None  # without ARI the field is unknown to the CA (RFC 9773 s5)
        payload = new_order_payload(identifiers, profile=profile, replaces=replaces)
        try:
            response = await self._post(directory.new_order, payload, "newOrder")
        except AcmeError as error:
            if replaces is None or not _may_blame_replaces(error):
                raise
            log.warning(
                "newOrder with replaces=%s for %s failed (%s); ordering once more without it",
                replaces,
                ", ".join(identifiers),
                error,
            )
            self._count("replaces_dropped")
            payload = new_order_payload(identifiers, profile=profile)
            response = await self._post(directory.new_order, payload, "newOrder")
        return parse_order(self._location(response, "newOrder"), response.content)

    async def _fetch_order(self, url: str) -> tuple[Order, float | None]:
        response = await self._post(url, None, "order")
        return parse_order(url, response.content), self._retry_after(response)

    async def _fetch_authorization(self, url: str) -> tuple[Authorization, float | None]:
        response = await self._post(url, None, "authz")
        return parse_authorization(url, response.content), self._retry_after(response)

    async def get_authorization(self, url: str) -> Authorization:
        """The authorization at ``url`` (POST-as-GET, RFC 8555 s7.5)."""
        authorization, _ = await self._fetch_authorization(url)
        return authorization

    async def respond_challenge(self, url: str) -> Challenge:
        """Tell the CA the challenge is ready to validate: POST ``{}`` (RFC 8555 s7.5.1)."""
        response = await self._post(url, {}, "challenge")
        return parse_challenge(parse_json(response.content, f"challenge {url}"))

    async def deactivate_authorization(self, url: str) -> None:
        """Give up an authorization (RFC 8555 s7.5.2)."""
        await self._post(url, {"status": "deactivated"}, "authz")

    async def finalize(self, order: Order, csr_der: bytes) -> Order:
        """Send the CSR (RFC 8555 s7.4); the returned order is usually ``processing``."""
        response = await self._post(order.finalize, finalize_payload(csr_der), "finalize")
        return parse_order(order.url, response.content)

    async def poll_order(self, order_url: str, deadline: float) -> Order:
        """Poll until the order is neither ``pending`` nor ``processing``.

        ``deadline`` is in seconds from now. Returns a ``ready`` or ``valid`` order; raises
        ``OrderInvalid`` for an ``invalid`` one and ``AcmeTimeout`` when time runs out.
        """
        return await self._poll_order(order_url, trio.current_time() + deadline)

    async def _poll_order(self, order_url: str, end: float) -> Order:
        async def fetch() -> tuple[Order, float | None]:
            return await self._fetch_order(order_url)

        order = await self._poll(fetch, end, f"order {order_url}")
        if order.status == "invalid":
            raise OrderInvalid(order.url, order.error)
        return order

    async def _poll(
        self,
        fetch: Callable[[], Awaitable[tuple[_Polled, float | None]]],
        end: float,
        what: str,
        *,
        first_wait: float = 0.0,
    ) -> _Polled:
        """Fetch until the resource leaves ``pending``/``processing``; see module docstring.

        ``first_wait`` is the pause before the first fetch: ``POLL_FIRST`` when we know the
        CA has only just started (a challenge response), 0 when it may already be done.
        """
        wait, delay = first_wait, POLL_FIRST
        while True:
            if wait > 0:
                await trio.sleep(min(wait, max(0.0, end - trio.current_time())))
                self._count("polls")
            resource, retry_after = await fetch()
            if resource.status not in PENDING_STATES:
                return resource
            if trio.current_time() >= end:
                raise AcmeTimeout(f"{what} still {resource.status} at the deadline")
            wait = poll_wait(delay, retry_after, POLL_MAX_WAIT)
            delay = min(delay * 2, POLL_CAP)

    def _retry_after(self, response: httpx.Response) -> float | None:
        return parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC))

    # --- certificates -------------------------------------------------------------------

    async def download(self, url: str, preferred_chain: str | None = None) -> CertificateChain:
        """Download the chain and its alternates (RFC 8555 s7.4.2) and pick one.

        ``preferred_chain`` is the issuer CN of the topmost certificate of the chain to
        prefer (see ``messages.select_chain``); without a match the CA's default wins.
        """
        default, alternate_urls = await self._download_one(url)
        alternates = []
        for alternate_url in alternate_urls:
            pem, _ = await self._download_one(alternate_url)
            alternates.append(pem)
        return select_chain(default, alternates, preferred_chain)

    async def _download_one(self, url: str) -> tuple[bytes, list[str]]:
        response = await self._post(url, None, "certificate", accept=PEM_CHAIN)
        pem = response.content
        if not split_pem_chain(pem):
            raise AcmeProtocolError(f"certificate {url}: response holds no PEM certificate")
        links = parse_links(response.headers.get_list("link"), str(response.url))
        return pem, [target for target, rel in links if rel == "alternate"]

    async def revoke(
        self,
        cert: x509.Certificate,
        reason: int = 0,
        *,
        cert_key: AccountKey | None = None,
    ) -> None:
        """Revoke ``cert`` (RFC 8555 s7.6), signed by the account or by ``cert_key``.

        ``reason`` is an RFC 5280 s5.3.1 CRLReason code. A second revocation raises
        ``AlreadyRevoked``.
        """
        directory = await self.directory()
        if not directory.revoke_cert:
            raise AcmeProtocolError("the CA's directory has no revokeCert URL")
        payload = revoke_payload(cert.public_bytes(serialization.Encoding.DER), reason)
        await self._post(
            directory.revoke_cert,
            payload,
            "revokeCert",
            use_jwk=cert_key is not None,
            signing_key=cert_key,
        )

    async def renewal_info(self, cert: x509.Certificate) -> ari.RenewalInfo | None:
        """The CA's renewal window for ``cert`` (RFC 9773 s4), None if it has no ARI.

        An unauthenticated GET of ``{renewalInfo}/{certID}``; errors from the CA raise their
        ``AcmeProblem``, a malformed answer ``AcmeProtocolError``.
        """
        directory = await self.directory()
        if directory.renewal_info is None:
            return None
        url = f"{directory.renewal_info.rstrip('/')}/{ari.cert_id(cert)}"
        response = await self._get(url, "renewalInfo")
        return ari.parse_renewal_info(
            response.content, header(response.headers, "retry-after"), datetime.now(UTC)
        )

    # --- the whole flow -----------------------------------------------------------------

    async def issue(
        self,
        identifiers: Sequence[str],
        private_key: CertificateIssuerPrivateKeyTypes,
        solver: ChallengeSolver,
        *,
        profile: str | None = None,
        replaces: str | None = None,
        preferred_chain: str | None = None,
        deadline: float = 90.0,
    ) -> CertificateChain:
        """Obtain a certificate for ``identifiers`` whose key is ``private_key``.

        newOrder, then every pending authorization in parallel (present, respond, poll,
        cleanup), finalize with a CSR, poll the order, download the chain and alternates,
        pick ``preferred_chain``. ``deadline`` (seconds) bounds everything; past it,
        ``AcmeTimeout``. A failed validation raises ``OrderInvalid`` whose ``problem`` is
        the challenge's typed error. The account must exist (``register`` or
        ``find_account`` first); without one, ``AccountDoesNotExist`` is raised.
        """
        if not identifiers:
            raise ValueError("issue() needs at least one identifier")
        end = trio.current_time() + deadline
        try:
            with trio.fail_at(end):
                chain = await self._issue(
                    identifiers, private_key, solver, profile, replaces, preferred_chain, end
                )
        except trio.TooSlowError:
            raise AcmeTimeout(
                f"issuance for {', '.join(identifiers)} did not finish within {deadline:.0f}s"
            ) from None
        self._count("issuances")
        return chain

    async def _issue(
        self,
        identifiers: Sequence[str],
        private_key: CertificateIssuerPrivateKeyTypes,
        solver: ChallengeSolver,
        profile: str | None,
        replaces: str | None,
        preferred_chain: str | None,
        end: float,
    ) -> CertificateChain:
        order = await self.new_order(identifiers, profile=profile, replaces=replaces)
        if order.status == "invalid":
            raise OrderInvalid(order.url, order.error)
        if order.status == "pending":
            await self._authorize_all(order, solver, end)
        if order.status != "valid":
            csr = build_csr(identifiers, private_key)
            try:
                order = await self.finalize(order, csr)
            except OrderNotReady:
                # The CA has not yet folded the last valid authorization into the order.
                order = await self._poll_order(order.url, end)
                if order.status == "ready":
                    order = await self.finalize(order, csr)
            if order.status in PENDING_STATES:
                # No pause first: many CAs (pebble, Boulder) sign within milliseconds of
                # finalize, so an immediate look usually finds the certificate.
                order = await self._poll_order(order.url, end)
            elif order.status == "invalid":
                raise OrderInvalid(order.url, order.error)
        if order.status != "valid" or order.certificate is None:
            raise AcmeProtocolError(
                f"order {order.url} is {order.status!r} without a certificate URL"
            )
        return await self.download(order.certificate, preferred_chain)

    async def _authorize_all(self, order: Order, solver: ChallengeSolver, end: float) -> None:
        failures: list[Exception] = []

        async def guarded(url: str, cancel: trio.CancelScope) -> None:
            try:
                await self._authorize(order.url, url, solver, end)
            except Exception as exc:
                # First failure wins and stops the siblings; re-raised below as itself
                # rather than wrapped in an ExceptionGroup the caller would have to unpack.
                failures.append(exc)
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for url in order.authorizations:
                nursery.start_soon(guarded, url, nursery.cancel_scope)
        if failures:
            raise failures[0]

    async def _authorize(
        self, order_url: str, authz_url: str, solver: ChallengeSolver, end: float
    ) -> None:
        authz = await self.get_authorization(authz_url)
        if authz.status == "valid":
            return  # reused from an earlier order (RFC 8555 s7.1.3)
        if authz.status != "pending":
            failed = authz.failed_challenge()
            raise OrderInvalid(
                order_url,
                failed.error if failed else None,
                identifier=authz.identifier.value,
                challenge_type=failed.type if failed else None,
            )
        challenge = authz.challenge(solver.challenge_type)
        if challenge is None or challenge.token is None:
            raise ChallengeUnavailable(
                authz.identifier.value,
                solver.challenge_type,
                tuple(c.type for c in authz.challenges),
            )
        identifier, token = authz.identifier.value, challenge.token
        key_authorization = jws.key_authorization(token, self._key)
        try:
            await solver.present(identifier, token, key_authorization)
            if challenge.status == "pending":
                await self.respond_challenge(challenge.url)

            async def fetch() -> tuple[Authorization, float | None]:
                return await self._fetch_authorization(authz_url)

            # Validation has only just begun: a first look now would be a wasted request.
            authz = await self._poll(
                fetch, end, f"authorization {authz_url}", first_wait=POLL_FIRST
            )
        finally:
            await self._cleanup(solver, identifier, token)
        if authz.status != "valid":
            failed = authz.failed_challenge()
            raise OrderInvalid(
                order_url,
                failed.error if failed else None,
                identifier=identifier,
                challenge_type=failed.type if failed else solver.challenge_type,
            )

    async def _cleanup(self, solver: ChallengeSolver, identifier: str, token: str) -> None:
        # Shielded: a cancelled or timed-out issuance must still withdraw its challenge,
        # but a hung solver must not hold the caller forever either.
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                await solver.cleanup(identifier, token)
            except Exception:
                log.exception("challenge cleanup failed for %s", identifier)
