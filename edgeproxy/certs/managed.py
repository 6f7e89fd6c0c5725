"""Managed certificates (``[[acme.managed]]``): one certificate for listed names, wildcards too.

Owns: issuing each entry at start-up through DNS-01 (the only challenge a CA accepts for a
wildcard), renewing it once two thirds of its lifetime have passed, keeping it in storage
(``managed/<first name>.json``, secret) so replicas and restarts share it, and answering
``match(name)`` for the data path, where a managed certificate is matched like a
``[[certificates]]`` file (exact names first, then one-label wildcards).

Must not know: how DNS records are written (the issuer's solver) or on-demand policy: these
names are the operator's own, listed in the config, so nobody else is asked.

One entry's issuance is held under a storage lease: the replica that takes it issues, the
others find the new record when they get the lease (or at their next pass).

Orders go through the same CA account as on-demand names, so they are counted in the same
``[acme.limits]`` budgets (``budget_store``) and wait like them: an entry over a budget is not
ordered, its status says ``rate_limited`` (or ``renewing``, while a certificate is served) with
the limit and the time it may go, and the entry is tried again at its next pass. An order that
brings no certificate gives its certificate units back.

Each entry's status (state, expiry, renewal time, last typed error and its hint) is written
where on-demand names keep theirs (``status/<first name>.json``), so ``edgeproxy certs
status '*.example.net'`` and ``GET /v1/domains/*.example.net`` answer for it too. A failure
that is the setup's (a TSIG rejection, a zone not configured, the CA's validation) is counted
as a failed order, never as a background-task error: those are for bugs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, cast

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from OpenSSL import SSL

from .. import metrics
from ..errors import LockUnavailable, StorageError
from ..issuers.base import IssuanceError, IssuedCertificate, IssueRequest, private_key_pem
from ..storage.base import Storage
from ..storage.locks import LockLost, hold_lock, make_owner_id
from ..timefmt import iso_utc
from ..tls.contexts import build_server_context, generate_private_key
from . import status_store
from .budget_store import Admitted, CaBudgets
from .budgets import Wait
from .static import StaticCertificates
from .status import DomainStatus, State, hint_for, order_failure

log = logging.getLogger("edgeproxy.managed")

RETRY_PAUSE = 60.0  # a failed entry is tried again this soon, not a whole interval later


class NamesIssuer(Protocol):
    async def issue(self, request: IssueRequest) -> IssuedCertificate: ...


class BudgetWait(Exception):
    """An entry's order held back by ``[acme.limits]`` (no order was sent)."""

    def __init__(self, wait: Wait) -> None:
        super().__init__(wait.explain())
        self.wait = wait


def storage_key(names: Sequence[str]) -> str:
    return f"managed/{names[0]}.json"


RENEWAL_SOURCE = "two-thirds"  # the status's renewal_source for a managed certificate


def renew_at(cert: x509.Certificate) -> float:
    """Renew once two thirds of the lifetime have passed (a 90-day certificate at day 60)."""
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    return start + (end - start) * 2 / 3


def due(cert: x509.Certificate, now: float) -> bool:
    return now >= renew_at(cert)


class ManagedCertificates:
    def __init__(
        self,
        entries: Sequence[Sequence[str]],
        *,
        storage: Storage,
        issuer: NamesIssuer,
        key_type: str = "ec256",
        renew_interval: float = 3600.0,
        lock_ttl: float = 60.0,
        issue_timeout: float = 300.0,
        session_tickets: bool = True,
        budgets: CaBudgets | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.entries = [tuple(e) for e in entries]
        self._budgets = budgets
        self._storage = storage
        self._issuer = issuer
        self._key_type = key_type
        self._renew_interval = renew_interval
        self._lock_ttl = lock_ttl
        self._issue_timeout = issue_timeout
        self._session_tickets = session_tickets
        self._clock = clock
        self._owner = make_owner_id()
        self._loaded: dict[tuple[str, ...], tuple[bytes, SSL.Context]] = {}
        self._index = StaticCertificates()
        self.errors: dict[tuple[str, ...], str] = {}
        self._issuer_ids: dict[tuple[str, ...], str] = {}
        self._status: dict[tuple[str, ...], DomainStatus] = {}

    def match(self, name: str) -> SSL.Context | None:
        return self._index.match(name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            failed = await self.maintain_once()
            await trio.sleep(
                min(RETRY_PAUSE, self._renew_interval) if failed else self._renew_interval
            )

    async def maintain_once(self) -> bool:
        """Load, issue or renew every entry; True when one failed (it is retried sooner)."""
        failed = False
        for names in self.entries:
            if not await self._maintain(names):
                failed = True
        return failed

    def status(self, names: Sequence[str]) -> DomainStatus | None:
        return self._status.get(tuple(names))

    async def _maintain(self, names: tuple[str, ...]) -> bool:
        try:
            chain, ordered = await self._ensure(names)
        except BudgetWait as exc:
            await self._held_back(names, exc.wait)
            return False
        except (IssuanceError, trio.TooSlowError, LockUnavailable, LockLost, StorageError) as exc:
            await self._failed(names, exc)
            return False
        except Exception as exc:  # a bug: counted as one, and the other entries still run
            self.errors[names] = str(exc)
            metrics.BACKGROUND_TASK_ERRORS.labels("managed").inc()
            log.exception("managed certificate for %s: %s", ", ".join(names), exc)
            return False
        self.errors.pop(names, None)
        if ordered:
            metrics.ACME_ORDERS.labels("valid").inc()
            if ordered == "renewed":
                metrics.RENEWALS.labels("renewed").inc()
        await self._set_status(names, "valid", **self._served(names, chain))
        return True

    def _served(
        self, names: tuple[str, ...], chain: list[x509.Certificate] | None
    ) -> dict[str, object]:
        """The status fields that describe the certificate now served (none yet: empty)."""
        if chain is None:
            return {}
        return {
            "not_after": chain[0].not_valid_after_utc.timestamp(),
            "renew_at": renew_at(chain[0]),
            "renewal_source": RENEWAL_SOURCE,
            "issuer": self._issuer_ids.get(names),
            "challenge_type": "dns-01",
        }

    async def _failed(self, names: tuple[str, ...], exc: Exception) -> None:
        failure = order_failure(exc, self._issue_timeout)
        error_type, detail = failure.type, failure.detail
        self.errors[names] = f"{error_type}: {detail}"
        # Counted like an on-demand order: a failed ACME order, and a failed renewal when a
        # certificate is held; neither is a bug (background-task errors are for those).
        renewing = names in self._loaded
        if isinstance(exc, IssuanceError):
            metrics.ACME_ORDERS.labels("failed").inc()
            if renewing:
                metrics.RENEWALS.labels("failed").inc()
        log.error("managed certificate for %s: %s: %s", ", ".join(names), error_type, detail)
        now = self._clock()
        held = self._status.get(names)
        serving = held is not None and held.not_after is not None and held.not_after > now
        await self._set_status(
            names,
            "failing",
            failures=(held.failures if held is not None else 0) + 1,
            last_error=detail,
            last_error_type=error_type,
            reason=failure.reason,
            hint=hint_for(
                failure.reason,
                detail,
                challenge_type=failure.challenge_type or "dns-01",
                serving_until=held.not_after if serving and held is not None else None,
            ),
            next_attempt=now + min(RETRY_PAUSE, self._renew_interval),
        )

    async def _held_back(self, names: tuple[str, ...], wait: Wait) -> None:
        """Over an ``[acme.limits]`` budget: nothing was ordered; say which limit and until
        when (the next pass asks the budgets again)."""
        held = self._status.get(names)
        renewing = held is not None and held.not_after is not None
        changes = wait.status_changes(iso_utc(wait.until), renewing=renewing)
        log.warning("managed certificate for %s: %s", ", ".join(names), changes["last_error"])
        await self._set_status(names, **changes)  # type: ignore[arg-type]

    async def _set_status(self, names: tuple[str, ...], state: State, **changes: object) -> None:
        """Update the entry's status and store it when anything but the time changed."""
        held = self._status.get(names)
        if held is None or state == "valid":
            st = DomainStatus(name=names[0], state=state, names=list(names))
        else:
            # An attempt or a failure keeps the certificate still served and the error count.
            st = dataclasses.replace(held, state=state)
        for key, value in changes.items():
            setattr(st, key, value)
        if held is not None:
            st.updated_at = held.updated_at
            if st == held:
                return
        st.updated_at = self._clock()
        self._status[names] = st
        try:
            await status_store.write(self._storage, st)
        except StorageError as exc:
            log.debug("could not persist status for %s: %s", names[0], exc)

    async def _ensure(
        self, names: tuple[str, ...]
    ) -> tuple[list[x509.Certificate], Literal["", "issued", "renewed"]]:
        """The entry's current chain, and whether this call ordered it (and renewed one)."""
        chain = await self._read(names)
        if chain is not None and not due(chain[0], self._clock()):
            return chain, ""
        async with hold_lock(
            self._storage, f"managed-{names[0]}", owner=self._owner, ttl=self._lock_ttl, wait=60
        ):
            chain = await self._read(names)  # another replica may have just renewed it
            if chain is not None and not due(chain[0], self._clock()):
                return chain, ""
            admitted: Admitted | None = None
            if self._budgets is not None:
                decision = await self._budgets.admit(
                    names, "renewal" if chain is not None else "new"
                )
                if isinstance(decision, Wait):
                    raise BudgetWait(decision)
                admitted = decision
            await self._set_status(
                names, "issuing" if chain is None else "renewing", **self._served(names, chain)
            )
            key = cast(
                CertificateIssuerPrivateKeyTypes,
                generate_private_key(self._key_type),  # type: ignore[arg-type]
            )
            replacing = self._loaded.get(names, (None,))[0]
            try:
                with trio.fail_after(self._issue_timeout):
                    issued = await self._issuer.issue(
                        IssueRequest(names, key, replacing=replacing, prefer="dns-01")
                    )
            except BaseException:
                if admitted is not None and self._budgets is not None:
                    # No certificate: its certificate units go back (the order unit stays
                    # spent, as at the CA).
                    with trio.CancelScope(shield=True):
                        await self._budgets.refund(names, admitted.at)
                raise
            record = {
                "names": list(names),
                "chain_pem": issued.chain_pem.decode(),
                "key_pem": private_key_pem(key),
                "issuer": issued.issuer_id,
            }
            await self._storage.put(storage_key(names), json.dumps(record).encode(), secret=True)
            log.info("managed certificate issued for %s", ", ".join(names))
        ordered: Literal["issued", "renewed"] = "renewed" if chain is not None else "issued"
        chain = await self._read(names)
        if chain is None:
            raise StorageError(f"{storage_key(names)} vanished right after it was written")
        return chain, ordered

    async def _read(self, names: tuple[str, ...]) -> list[x509.Certificate] | None:
        """The stored chain for ``names``, loaded for serving when it changed."""
        raw = await self._storage.get(storage_key(names))
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            chain_pem = d["chain_pem"].encode()
            chain = x509.load_pem_x509_certificates(chain_pem)
            if tuple(d["names"]) != names:
                return None  # the entry's names changed in the config: issue anew
            self._issuer_ids[names] = str(d.get("issuer") or "")
            held = self._loaded.get(names)
            if held is None or held[0] != chain_pem:
                key = serialization.load_pem_private_key(d["key_pem"].encode(), password=None)
                ctx = build_server_context(chain, key, session_tickets=self._session_tickets)
                self._loaded[names] = (chain_pem, ctx)
                self._index = StaticCertificates([(n, ctx) for n, (_, ctx) in self._loaded.items()])
        except (ValueError, KeyError, TypeError, SSL.Error) as exc:
            raise StorageError(f"{storage_key(names)} is unreadable ({exc})") from None
        return chain
