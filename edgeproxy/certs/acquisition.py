"""The order path: a certificate for a name that has none, or needs a new one.

Owns: the single-flight acquisition a handshake starts (bounded in flight), the allow-check and
order rate limit in front of a new order, the admin API's ``issue_now`` with its limits, and
``obtain``: under the name's storage lease re-read storage, honour a backoff shared through
storage and the CA account's pause after a rateLimited (``issuers/account_pause.py``: one gate,
``_account_paused``; a held name waits in state ``account_paused`` with a next-action entry at
the pause's end), issue, store key and chain as one record, then record the outcome (status,
history, events, metrics) and install it.
Must not know: how issuers talk to CAs, sockets, when renewals are due.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import cast

import trio
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from .. import metrics
from ..errors import LockUnavailable, OrderLimited, StorageError
from ..issuers.base import IssuanceError, IssueRequest
from ..names import InvalidName, validate_hostname
from ..reasons import Failure, Reason
from ..storage.locks import LockLost, hold_lock
from ..timefmt import iso_utc
from ..tls.contexts import generate_private_key
from . import history
from .budget_store import Admitted
from .budgets import HOUR, OrderKind, Wait, prune
from .manager_state import cert_data, task_failed
from .record import Backoff, CertRecord, RecordError, backoff_key, cert_key, lock_name
from .renewal import backoff_delay
from .schedule import RenewalSchedule
from .status import DomainStatus, State, hint_for, order_failure

log = logging.getLogger("edgeproxy.certs")


class Acquisition(RenewalSchedule):
    """The order layer of ``CertificateManager`` (layers: ``certs/manager_state.py``)."""

    def start_issue(self, name: str) -> None:
        """Acquire ``name`` in the background now (the registry API's "issue at once")."""
        if self._start_acquire(name) is None:
            log.warning(
                "hostname %s: not issued now (%d acquisitions in flight); its first visitor "
                "will start it",
                name,
                self._max_inflight,
            )

    def _start_acquire(self, name: str) -> trio.Event | None:
        """The event set when ``name``'s acquisition ends; None when too many are in flight."""
        ev = self._inflight.get(name)
        if ev is not None:
            return ev
        if len(self._inflight) >= self._max_inflight:
            return None
        ev = self._inflight[name] = trio.Event()
        if self._nursery is None:
            raise RuntimeError("CertificateManager.run() is not running")
        self._nursery.start_soon(self._acquire_task, name, ev)
        return ev

    async def _acquire_task(self, name: str, ev: trio.Event) -> None:
        try:
            await self._acquire(name)
        except Exception:
            task_failed("acquire", name)
        finally:
            del self._inflight[name]
            ev.set()

    async def _acquire(self, name: str) -> None:
        try:
            validate_hostname(name)
        except InvalidName as exc:
            self._fail(name, Failure(Reason.INVALID_NAME, str(exc)), state="denied", backoff=False)
            return
        now = self.clock()
        try:
            rec = await self._load(name)
        except StorageError as exc:
            self._fail(name, Failure(Reason.STORAGE, str(exc)), backoff=False, ordered=False)
            return
        if rec is not None and rec.not_after > now:
            self._install(rec)
            return
        st = self._status.get(name)
        waiting = st is not None and st.state in ("failing", "account_paused", "rate_limited")
        if st is not None and waiting and st.next_attempt and st.next_attempt > now:
            # In backoff, its account paused, or queued for a CA budget: the status already
            # holds the error the handshake will report, and no storage or CA is asked.
            return
        decision = await self.policy.check(name)
        if not decision.allowed:
            self._fail(name, decision.refusal, state="denied", backoff=False)
            return
        if not self._orders.take():
            self._fail(
                name,
                Failure(Reason.ORDER_RATE_LIMITED, "on_demand.max_orders_per_minute reached"),
                backoff=False,
                ordered=False,
            )
            return
        await self.obtain(name, old=rec)

    async def issue_now(self, name: str, *, force: bool = False) -> CertRecord | None:
        """Order ``name`` now (the admin API's issue), within the limits a handshake's order
        has: the per-name backoff after failures, the CA account's pause after a rateLimited
        and ``max_orders_per_minute``, forced orders included. The allow-check is the
        caller's. Without ``force`` a valid stored certificate is returned without any order
        (and without spending an order token).

        Raises OrderLimited when a limit says not now; returns None when the order failed
        (the status says why).
        """
        now = self.clock()
        if not force:
            try:
                rec = await self._load(name)
            except StorageError as exc:
                self._fail(name, Failure(Reason.STORAGE, str(exc)), backoff=False, ordered=False)
                return None
            if rec is not None and rec.not_after > now:
                self._install(rec)
                return rec
        st = self._status.get(name)
        if st is not None and st.failures and st.next_attempt and st.next_attempt > now:
            raise OrderLimited(
                name,
                "backoff",
                st.next_attempt - now,
                f"{st.failures} failed attempt(s), the last {st.last_error_type}: "
                f"{st.last_error}; next attempt at {iso_utc(st.next_attempt)}",
            )
        pause = await self.account_pauses.blocking() if self.account_pauses else None
        if pause is not None:
            raise OrderLimited(name, "acme_account_paused", pause.until - now, pause.describe())
        if (limited := self._budget_limited(name, now)) is not None:
            raise limited
        if not self._orders.take():
            raise OrderLimited(
                name,
                "on_demand.max_orders_per_minute",
                self._orders.wait_time(),
                "the order rate limit is reached (forced orders count too)",
            )
        rec = await self.obtain(name, force=force)
        if rec is None and (limited := self._budget_limited(name, self.clock())) is not None:
            raise limited  # the budgets in storage said wait (another replica spent them)
        return rec

    def _budget_limited(self, name: str, now: float) -> OrderLimited | None:
        """The name waits for an [acme.limits] budget: as the admin API's 429."""
        st = self._status.get(name)
        if st is None or st.reason is not Reason.BUDGET_EXHAUSTED or not st.next_attempt:
            return None
        if st.next_attempt <= now:
            return None
        limit = st.extra.get("limit", "acme.limits")
        return OrderLimited(name, limit, st.next_attempt - now, st.last_error or limit)

    async def obtain(
        self,
        name: str,
        *,
        old: CertRecord | None = None,
        force: bool = False,
        ari_timed: bool = False,
    ) -> CertRecord | None:
        """Issue (or renew) ``name`` under the storage lease; return the stored record.

        Policy is the caller's business (the data path checks it before calling; the CLI and
        admin API check it themselves). Returns None and records the failure on error, or
        the wait when a CA budget is used up. ``ari_timed``: a renewal at the time the CA's
        ARI window asked for (exempt from the budgets, as Let's Encrypt exempts it).
        """
        renewing = old is not None
        state: State = "renewing" if renewing else "issuing"
        self._set_status(name, state=state, extra={})
        try:
            with trio.fail_after(self.issue_timeout):
                t0 = time.monotonic()
                # A fresh owner per attempt: a lease is re-entrant for its owner, so sharing
                # one id across tasks would let one task extend or release another's lease.
                async with hold_lock(
                    self.storage,
                    lock_name(name),
                    owner=f"{self.owner}:{secrets.token_hex(4)}",
                    ttl=self.lock_ttl,
                    wait=self.issue_timeout,
                ):
                    metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - t0)
                    current = await self._load(name)
                    if current is not None and not force and self._still_good(current, old):
                        self._install(current)
                        return current
                    shared = await self._stored_backoff(name)
                    if shared is not None and shared.next_attempt > self.clock():
                        # Another worker or replica (or this process before a restart) failed
                        # for this name: wait as it does (forced orders too).
                        self._adopt_backoff(name, shared, renewing)
                        return None
                    if await self._account_paused(name, old):
                        return None
                    # The one "may a new order go now?" gate of [acme.limits].
                    admitted = await self._admit(name, renewing, ari_timed, shared)
                    if isinstance(admitted, Wait):
                        await self._wait_for_budget(name, admitted, renewing)
                        return None
                    replacing = None
                    if old is not None and await self._replaces_allowed(old):
                        replacing = old.chain_pem.encode()
                    key = cast(
                        CertificateIssuerPrivateKeyTypes,
                        generate_private_key(self.key_type),  # type: ignore[arg-type]
                    )
                    # The challenge type that worked last time goes first (a CDN in front
                    # may break TLS-ALPN-01 for good; no need to learn that on every renewal).
                    prefer = old.challenge_type if old is not None else None
                    try:
                        issued = await self.issuer.issue(
                            IssueRequest((name,), key, replacing=replacing, prefer=prefer)
                        )
                    except IssuanceError as exc:
                        if admitted is not None and self.budgets is not None:
                            # No certificate: its certificate units go back to the budgets.
                            await self.budgets.refund([name], admitted.at)
                        if exc.failure.reason is Reason.ACCOUNT_PAUSED:
                            # The account's wait, not this name's failure: no backoff step.
                            until = self.clock() + (exc.failure.retry_after or 0.0)
                            await self._hold_for_pause(name, old, exc.failure.detail, until)
                            return None
                        # Recorded before the lease is released: whoever takes it next sees it.
                        await self._store_backoff(
                            name,
                            shared,
                            exc.failure.retry_after,
                            validation=exc.failure.challenge_type is not None,
                        )
                        raise
                    rec = CertRecord.build(
                        name,
                        issued.issuer_id,
                        issued.chain_pem,
                        key,
                        self.clock(),
                        challenge_type=issued.challenge_type,
                    )
                    await self.storage.put(cert_key(name), rec.to_json(), secret=True)
        except (IssuanceError, trio.TooSlowError, LockUnavailable, LockLost, StorageError) as exc:
            # A renewal that fails says so in its hint, with how long the old one still serves.
            serving_until = old.not_after if old and old.not_after > self.clock() else None
            self._fail(name, order_failure(exc, self.issue_timeout), serving_until=serving_until)
            if isinstance(exc, IssuanceError):
                metrics.ACME_ORDERS.labels("failed").inc()
                if renewing:
                    metrics.RENEWALS.labels("failed").inc()
            st = self._status.get(name)
            if st is not None and st.last_error_type:
                self._emit("certificate.failed", name, {"type": st.last_error_type,
                           "detail": st.last_error, "hint": st.hint})  # fmt: skip
            await self._remember(name, renewing, st)
            return None
        try:
            await self.storage.delete(backoff_key(name))
            # Into the next-action index: the next pass plans it (and asks for its ARI window).
            await self.storage.set_due(name, self.clock())
        except StorageError as exc:
            log.warning("could not schedule %s (the next reconciliation will): %s", name, exc)
        metrics.ACME_ORDERS.labels("valid").inc()
        if renewing:
            metrics.RENEWALS.labels("renewed").inc()
        await self._remember(name, renewing, None)
        self._emit("certificate.renewed" if renewing else "certificate.issued", name,
                   cert_data(rec))  # fmt: skip
        log.info(
            "certificate %s for %s (issuer %s, valid until %s)",
            "renewed" if renewing else "issued",
            name,
            rec.issuer_id,
            iso_utc(rec.not_after),
        )
        self._install(rec)
        return rec

    async def _account_paused(self, name: str, old: CertRecord | None) -> bool:
        """The gate before a new order: is every CA account this name could go to paused
        after a rateLimited (read fresh: an order costs far more than one storage read)?"""
        if self.account_pauses is None:
            return False
        pause = await self.account_pauses.blocking(fresh=True)
        if pause is None:
            return False
        await self._hold_for_pause(name, old, pause.describe(), pause.until)
        return True

    async def _hold_for_pause(
        self, name: str, old: CertRecord | None, detail: str, until: float
    ) -> None:
        """``name`` waits for its CA account's pause to end: status ``account_paused`` until
        then, and a next-action entry at that time so it is ordered then by whichever process
        takes it (``Maintenance._maintain``), with no visitor needed."""
        until = max(until, self.clock() + 1.0)
        serving_until = old.not_after if old and old.not_after > self.clock() else None
        self._set_status(
            name,
            state="account_paused",
            next_attempt=until,
            last_error=detail,
            last_error_type=Reason.ACCOUNT_PAUSED.value,
            reason=Reason.ACCOUNT_PAUSED,
            hint=hint_for(Reason.ACCOUNT_PAUSED, detail, serving_until=serving_until),
        )
        log.info("certificate for %s waits: %s", name, detail)
        try:
            await self.storage.set_due(name, until)
        except StorageError as exc:
            log.warning("could not schedule %s after the account pause: %s", name, exc)

    async def _stored_backoff(self, name: str) -> Backoff | None:
        raw = await self.storage.get(backoff_key(name))
        if raw is None:
            return None
        try:
            return Backoff.from_json(raw)
        except RecordError:
            return None  # unreadable: as if none (the next failure rewrites it)

    async def _store_backoff(
        self,
        name: str,
        previous: Backoff | None,
        retry_after: float | None,
        *,
        validation: bool = False,
    ) -> None:
        failures = (previous.failures if previous is not None else 0) + 1
        delay = backoff_delay(failures - 1, base=self.backoff_base, cap=self.backoff_max)
        if retry_after is not None:
            delay = max(delay, retry_after)
        now = self.clock()
        # The failed validations of the last hour ride along ([acme.limits]).
        validations = prune(previous.validations if previous else (), now, HOUR)
        if validation:
            validations = (*validations, now)
        try:
            await self.storage.put(
                backoff_key(name), Backoff(failures, now + delay, validations).to_json()
            )
        except StorageError as exc:
            log.warning("could not record the backoff for %s: %s", name, exc)

    async def _admit(
        self, name: str, renewing: bool, ari_timed: bool, shared: Backoff | None
    ) -> Admitted | Wait | None:
        """[acme.limits]: may this order go now (and if so it is counted)? None: no budgets."""
        if self.budgets is None:
            return None
        kind: OrderKind = "ari" if renewing and ari_timed else "renewal" if renewing else "new"
        failures = shared.validations if shared is not None else ()
        return await self.budgets.admit([name], kind, failures)

    async def _wait_for_budget(self, name: str, wait: Wait, renewing: bool) -> None:
        """Queue the name until the budget has room: its status says which limit and until
        when, and the next-action index brings it back to maintenance then."""
        changes = wait.status_changes(iso_utc(wait.until), renewing=renewing)
        self._set_status(name, **changes)
        log.warning("certificate for %s: %s", name, changes["last_error"])
        await self.storage.set_due(name, wait.until)

    def _adopt_backoff(self, name: str, shared: Backoff, renewing: bool) -> None:
        st = self._status.get(name)
        if st is not None and st.next_attempt == shared.next_attempt:
            return
        self._set_status(
            name,
            state="renewing" if renewing else "failing",
            failures=shared.failures,
            next_attempt=shared.next_attempt,
            last_error=(st.last_error if st is not None and st.last_error else
                        f"{shared.failures} failed attempt(s) recorded in storage"),
            last_error_type=(st.last_error_type if st is not None and st.last_error_type
                             else Reason.BACKOFF.value),
            reason=(st.reason if st is not None and st.last_error_type else Reason.BACKOFF),
        )  # fmt: skip

    async def _remember(self, name: str, renewing: bool, failed: DomainStatus | None) -> None:
        """Append this attempt to the name's bounded history (the status page shows it)."""
        if failed is None:
            outcome = "renewed" if renewing else "issued"
            attempt = history.Attempt(self.clock(), "renew" if renewing else "issue", outcome)
        else:
            attempt = history.Attempt(
                self.clock(),
                "renew" if renewing else "issue",
                "failed",
                failed.last_error_type,
                failed.last_error,
                failed.hint,
            )
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(self.lock_ttl):
                await history.record(self.storage, name, attempt)
        except StorageError as exc:
            log.debug("could not record the attempt for %s in its history: %s", name, exc)

    def _still_good(self, current: CertRecord, old: CertRecord | None) -> bool:
        """After taking the lease: did someone else already do the work?"""
        if current.not_after <= self.clock():
            return False
        if old is None:
            return True  # a valid certificate appeared while we waited for the lease
        return current.serial != old.serial  # another process renewed it
