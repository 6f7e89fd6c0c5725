"""The maintenance pass: whatever the next-action index says is due, in bounded batches.

Owns: reconciling the index with the stored certificates, due work in batches (a renewal asks
the on-demand policy again first), the ``certificate.expiring`` notice, the storage sweep, the
purge of removed hostnames once their grace is over, and the gauges a pass sets.
Must not know: sockets, ACME.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import get_args

from .. import metrics
from ..errors import StorageError
from ..reasons import Reason
from ..timefmt import iso_utc
from . import history, status_store
from .acquisition import Acquisition
from .manager_state import cert_data, task_failed
from .record import CertRecord, ari_key, backoff_key, cert_key, lock_name
from .status import State
from .status_store import status_key

log = logging.getLogger("edgeproxy.certs")

# How often a process sweeps storage for debris of crashed writers (old temp files, expired
# leases and challenges): frequent enough that `storage check` stays clean, rare enough to be
# free.
CLEAN_INTERVAL = 600.0
# Names read from the next-action index per storage call; a pass drains everything due.
DUE_BATCH = 500
# Renewals started per pass; more due ones are put off by 1-5 intervals at random, so a fleet
# renews in small randomised batches (Let's Encrypt's ask above 10,000 names).
RENEWALS_PER_PASS = 20
# How often stored certificates are compared with the index (keys only, no reads): repairs
# an index entry lost to a crash; the first pass after start does it too.
RECONCILE_INTERVAL = 6 * 3600.0
# Stored certificates compared with the index per step: one short storage call for the keys
# and one for which of them lack a time, with the event loop free between steps.
RECONCILE_PAGE = 500
CERTS = "certs/"
# Policy answers that say "could not ask", not "no": a renewal waits and asks again.
TRANSIENT_REFUSALS = frozenset({Reason.ASK_UNAVAILABLE, Reason.ASK_RATE_LIMITED})
# A wanted certificate this close to expiry, not yet renewed, makes a certificate.expiring event.
EXPIRING_NOTICE = 7 * 86400.0


class Maintenance(Acquisition):
    """The maintenance layer of ``CertificateManager`` (layers: ``certs/manager_state.py``)."""

    async def maintenance_once(self) -> None:
        """One renewal pass over every stored certificate (and, now and then, a storage sweep)."""
        t0 = time.monotonic()
        try:
            await self._maintenance_pass()
        finally:
            metrics.MAINTENANCE_PASS_SECONDS.observe(time.monotonic() - t0)

    async def _maintenance_pass(self) -> None:
        now = self.clock()
        if self.account_pauses is not None:
            # Every replica's gauge follows storage; first, so a pause that ended shows at
            # once, not after the names it held back have been ordered.
            await self.account_pauses.active()
        if now >= self._next_clean:
            self._next_clean = now + CLEAN_INTERVAL
            await self._sweep_storage()
        try:
            if now >= self._next_reconcile:
                await self._reconcile(now)
                self._next_reconcile = now + RECONCILE_INTERVAL
            await self._due_work(now)
        except StorageError as exc:
            log.warning("maintenance: storage unavailable, retrying next pass: %s", exc)
            return
        self._recheck_cached(now)
        # 0 when nothing is managed: the expiry alert ignores 0, a stale date would lie.
        expiries = [c.not_after for n, c in self._cache.items() if not self._unwanted(n)]
        expiries.extend(self._overdue.values())
        metrics.CERTIFICATE_EARLIEST_EXPIRY.set(min(expiries) if expiries else 0)
        metrics.RENEWALS_DUE.set(len(self._overdue))
        counts: dict[str, int] = {}
        for st in self._status.values():
            counts[st.state] = counts.get(st.state, 0) + 1
        for state in get_args(State):
            metrics.CERTIFICATES.labels(state).set(counts.get(state, 0))
        if self.budgets is not None:
            self.budgets.update_metrics()  # windows empty with time, orders or not
        await self._purge_removed(now)

    async def _reconcile(self, now: float) -> None:
        """Give every stored certificate without a next-action time one (now): stores written
        before the index existed, or by a writer that died between its two writes. Lists keys
        only, reads no certificate, and goes a page at a time (``RECONCILE_PAGE``): a listing
        of the whole fleet at once held the interpreter, and fed the collector 100,000
        objects, while the first handshakes after a restart waited."""
        added = 0
        async with contextlib.aclosing(self.storage.key_pages(CERTS, RECONCILE_PAGE)) as pages:
            async for keys in pages:
                names = [k[len(CERTS) : -len(".json")] for k in keys if k.endswith(".json")]
                for name in await self.storage.unscheduled(names) if names else ():
                    await self.storage.set_due(name, now)
                    added += 1
        if added:
            log.info("maintenance: %d stored certificate(s) added to the schedule", added)

    async def _due_work(self, now: float) -> None:
        """Every name whose next-action time has come, in batches; then its next time."""
        renewals = 0
        while True:
            entries = await self.storage.due_names(now, DUE_BATCH)
            if not entries:
                return
            # Replicas and workers read the same index: each takes the batch in its own order,
            # so they spread over different names instead of queueing on one lease.
            random.shuffle(entries)
            for entry in entries:
                name = entry.name
                metrics.MAINTENANCE_NAMES_EXAMINED.inc()
                try:
                    if renewals >= RENEWALS_PER_PASS and self._renewal_due(name, now):
                        # Small randomised batches (Let's Encrypt's ask for large fleets).
                        nxt: float | None = now + random.uniform(1, 5) * self.renew_interval
                    else:
                        nxt, renewed = await self._maintain(name, now)
                        renewals += renewed
                except StorageError as exc:
                    log.warning("maintenance: %s skipped this pass: %s", name, exc)
                    nxt = now + self.renew_interval
                except Exception:
                    # One name's surprise must not stop the pass: the names after it still renew.
                    task_failed("renew", name)
                    nxt = now + self.renew_interval
                if nxt is None:
                    self._overdue.pop(name, None)
                    await self.storage.clear_due(name)
                else:
                    # Never "now" again within this pass: the loop ends when nothing is due.
                    await self.storage.set_due(name, max(nxt, now + 1.0))
            if len(entries) < DUE_BATCH:
                return

    def _renewal_due(self, name: str, now: float) -> bool:
        st = self._status.get(name)
        return st is not None and st.renew_at is not None and st.renew_at <= now

    async def _maintain(self, name: str, now: float) -> tuple[float | None, bool]:
        """Plan (and if due, renew) one stored certificate whose time has come: (its next
        action time, or None when it is no longer managed; whether a renewal was tried)."""
        rec = await self._load(name)
        cached = self._cache.get(name)
        if rec is not None and cached is not None and cached.serial != rec.serial:
            log.info("picked up new certificate for %s stored by another process", name)
            self._install(rec)
        if rec is None:
            return await self._order_waiting(name, now), False
        if self.registry is not None and self.registry.is_removed(name):
            return None, False  # offboarded: not renewed, not watched (purged after the grace)
        st = self._status.get(name)
        if st is not None and st.state == "denied" and rec.not_after <= now:
            self.invalidate(name)  # served until it expired; now dropped
            return None, False
        plan, ari_next = await self._plan(rec, now)
        if plan.at > now:
            self._overdue.pop(name, None)
            return min(plan.at, ari_next if ari_next is not None else plan.at), False
        st = self._status.get(name)
        tried = False
        if st is None or not st.next_attempt or st.next_attempt <= now:
            tried = True
            renewed = await self._renew(rec, ari_timed=plan.source == "ari")
            if renewed is not None:
                self._overdue.pop(name, None)
                return now, True  # the next pass plans the new certificate (and asks ARI)
        if not self._unwanted(name):
            self._overdue[name] = rec.not_after
            if await self._current_serial(name) == rec.serial:
                await self._expiring(rec, now)  # due and still not replaced
        else:
            self._overdue.pop(name, None)
        st = self._status.get(name)
        retry = st.next_attempt if st is not None and st.next_attempt else None
        nxt = retry if retry and retry > now else now + self.renew_interval
        # Back at its expiry at the latest: a refused name is dropped then.
        return (min(nxt, rec.not_after) if rec.not_after > now else nxt), tried

    async def _order_waiting(self, name: str, now: float) -> float | None:
        """A name with no certificate whose time came: one some process held back for its
        account's pause, or queued for an [acme.limits] budget (its status says so, in memory
        or as stored by that process or a previous run), is ordered now, as its first
        handshake would. Its next time, or None when it is done with the index."""
        st = self._status.get(name)
        if st is None:
            try:
                st = await status_store.read(self.storage, name)
            except status_store.UnreadableStatus:
                st = None
        if st is None:
            return None
        waiting = ("rate_limited", "account_paused")
        if st.state == "account_paused" and st.next_attempt and st.next_attempt > now:
            return st.next_attempt  # the account's pause was made longer meanwhile
        if st.state not in waiting:
            return None
        if self.registry is not None and self.registry.is_removed(name):
            return None
        ev = self._start_acquire(name)
        if ev is None:
            return now + self.renew_interval  # too many in flight: next pass
        await ev.wait()
        if await self.storage.get(cert_key(name)) is not None:
            return now  # issued: the next pass plans it
        st = self._status.get(name)
        if st is not None and st.state in waiting and st.next_attempt:
            # Still over a budget (another replica spent it), or the account paused again.
            return st.next_attempt
        return None  # failed or refused: as any new name, its next visitor tries again

    async def _renew(self, rec: CertRecord, *, ari_timed: bool = False) -> CertRecord | None:
        """Renew ``rec`` unless someone is at it or the policy refuses: the new record, or
        None when there is none (yet). ``ari_timed``: at the CA's ARI moment."""
        # Someone (here or elsewhere) may be renewing right now: don't queue behind them;
        # the next pass sees their result.
        if rec.name in self._inflight:
            return None
        try:
            held = await self.storage.lock_info(lock_name(rec.name))
        except StorageError:
            return None
        if held is not None and held.expires_at > self.clock():
            return None
        decision = await self.policy.check(rec.name, fresh=True)
        if not decision.allowed:
            refusal = decision.refusal
            if decision.reason in TRANSIENT_REFUSALS:
                # "Could not ask" is not "no": keep the certificate and ask again later.
                self._fail(rec.name, refusal)
                return None
            log.info("not renewing %s: %s (%s)", rec.name, decision.reason, refusal.detail)
            self._drop_expiry_series(rec.name)
            self._fail(rec.name, refusal, state="denied")
            return None
        log.info("renewing %s (not after %s)", rec.name, iso_utc(rec.not_after))
        return await self.obtain(rec.name, old=rec, ari_timed=ari_timed)

    async def _expiring(self, rec: CertRecord, now: float) -> None:
        """Tell once per certificate (across replicas: a stored marker) that a wanted
        certificate has under ``EXPIRING_NOTICE`` left and no renewal has replaced it."""
        if self.events is None or not self.events.enabled:
            return
        # Short-lived certificates (days) would be "expiring" from birth: for them the notice
        # comes once a quarter of the lifetime is left, i.e. well after renewal was due.
        notice = min(EXPIRING_NOTICE, (rec.not_after - rec.not_before) / 4)
        if rec.not_after - now > notice or rec.not_after <= now:
            return
        # A stored marker says "told" to every replica and across restarts (two replicas
        # passing at the same instant may both tell: events are at least once anyway). One
        # per name, holding the serial told about: the next certificate's notice overwrites
        # it, and the name's purge deletes it (one per serial would pile up forever).
        marker = expiring_key(rec.name)
        try:
            if await self.storage.get(marker) == rec.serial.encode():
                return
            await self.storage.put(marker, rec.serial.encode())
        except StorageError:
            return
        self._emit("certificate.expiring", rec.name, cert_data(rec))

    async def _sweep_storage(self) -> None:
        upkeep = self.storage.capabilities.upkeep
        if upkeep is None:
            return
        try:
            removed = await upkeep.clean()
        except StorageError as exc:
            log.warning("storage sweep failed: %s", exc)
            return
        for item in removed:
            log.info("storage sweep: %s", item)

    async def _purge_removed(self, now: float) -> None:
        """Delete what removed hostnames left once their grace is over (any replica may)."""
        if self.registry is None:
            return
        cutoff = now - self.removal_grace
        for entry in self.registry.removed():
            if entry.removed_at is None or entry.removed_at > cutoff:
                continue
            name = entry.hostname
            try:
                for key in (cert_key(name), status_key(name), ari_key(name), backoff_key(name),
                            history.history_key(name), expiring_key(name)):  # fmt: skip
                    await self.storage.delete(key)
                await self.storage.clear_due(name)
                if await self.storage.purge_hostname(name, cutoff):
                    log.info("hostname %s purged (removed %s)", name, iso_utc(entry.removed_at))
            except StorageError as exc:
                log.warning("could not purge removed hostname %s: %s", name, exc)
                return
            self.registry.apply(name, None)


def expiring_key(name: str) -> str:
    """Where the serial last told about in a certificate.expiring event is kept."""
    return f"expiring/{name}"
