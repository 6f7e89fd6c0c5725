"""Served identities: the LRU of names to ``ServerIdentity``, filled from storage.

Owns: loading a stored record (a corrupt one is quarantined), installing it (the identity, its
recheck time, the per-name expiry gauge, the status it implies), reloading a name another
process or replica changed, and the recheck heap that notices renewals done elsewhere.
Must not know: how certificates are ordered, the maintenance pass.
"""

from __future__ import annotations

import heapq
import logging

from OpenSSL import SSL

from .. import metrics
from ..errors import StorageError
from ..tls.contexts import ServerIdentity
from . import status_store
from .manager_state import CachedIdentity
from .record import CertRecord, RecordError, cert_key
from .renewal import plan_renewal
from .status_book import StatusBook

log = logging.getLogger("edgeproxy.certs")

# A cached name past its renewal time is reloaded this often until a new one appears.
RECHECK_INTERVAL = 600.0


class CertificateCache(StatusBook):
    """The cache layer of ``CertificateManager`` (layers: ``certs/manager_state.py``)."""

    def cached_context(self, name: str) -> SSL.Context | ServerIdentity | None:
        hit = self._cache.get(name)
        if hit is None:
            return None
        self._cache.move_to_end(name)
        return hit.ctx

    def cached_count(self) -> int:
        return len(self._cache)

    def invalidate(self, name: str) -> None:
        """Forget the cached context (another replica stored a new certificate)."""
        self._cache.pop(name, None)
        metrics.CERTIFICATES_CACHED.set(len(self._cache))

    def on_storage_change(self, key: str) -> None:
        """Another process or replica changed ``key`` (PostgreSQL LISTEN/NOTIFY): if it is a
        certificate we serve, load the new one now instead of at the next maintenance pass."""
        if not (key.startswith("certs/") and key.endswith(".json")) or self._nursery is None:
            return
        name = key[len("certs/") : -len(".json")]
        if name in self._cache:
            self._spawn("reload", name, self._reload, name)

    async def _reload(self, name: str) -> None:
        try:
            rec = await self._load(name)
        except StorageError as exc:
            log.warning("could not reload %s after a change notification: %s", name, exc)
            self.invalidate(name)
            return
        if rec is None:
            self.invalidate(name)
            return
        cached = self._cache.get(name)
        if cached is None or cached.serial != rec.serial:
            log.info("loaded new certificate for %s stored by another replica", name)
            self._install(rec)

    async def _load(self, name: str) -> CertRecord | None:
        key = cert_key(name)
        raw = await self.storage.get(key)
        if raw is None:
            return None
        try:
            rec = CertRecord.from_json(raw)
        except RecordError as exc:
            log.error(
                "certificate record %s is corrupt (%s): quarantined; it will be re-issued", key, exc
            )
            await self.storage.quarantine(key, str(exc))
            metrics.STORAGE_ERRORS.labels("corrupt_record").inc()
            return None
        if rec.name not in self._status:
            await self._adopt_stored_status(rec)
        return rec

    async def _adopt_stored_status(self, rec: CertRecord) -> None:
        """Take the stored status of a name this process has none for (a restart, an evicted
        status) when it speaks of this very certificate. Installing would otherwise write a
        fresh "valid" over it: losing an ARI renewal time or a denial, and costing a write (two
        fsyncs on the file backend) on every cold load after a restart."""
        try:
            stored = await status_store.read(self.storage, rec.name)
        except (StorageError, ValueError):  # ValueError: an unreadable record
            return  # installing writes a fresh one
        if (
            stored is not None
            and stored.state in ("valid", "denied")
            and stored.not_after == rec.not_after
            and rec.name not in self._status
        ):
            self._status[rec.name] = stored
            while len(self._status) > self._status_size:
                self._status.popitem(last=False)

    def _install(self, rec: CertRecord) -> None:
        if self.registry is not None and self.registry.is_removed(rec.name):
            return  # removed while its certificate was being loaded or issued
        st = self._status.get(rec.name)
        # A denied name's own certificate reloaded (cache eviction, a restart's first visitor)
        # stays denied: served until it expires, out of the expiry gauges. A newer one means
        # someone renewed it, so the policy allowed it again. (A "removed" status is stale
        # here: the registry says the name is back.)
        denied = st is not None and st.state == "denied" and st.not_after == rec.not_after
        current = self._cache.get(rec.name)
        if current is not None and current.serial == rec.serial:
            self._cache.move_to_end(rec.name)
        else:
            ident = self._identities.identity(rec.chain(), rec.private_key())
            recheck = plan_renewal(rec.not_before, rec.not_after, self.clock()).at
            self._cache[rec.name] = CachedIdentity(
                ident, rec.serial, rec.not_after, recheck_at=recheck
            )
            self._push_recheck(recheck, rec.name)
            if self.per_domain_metrics and not denied:
                metrics.CERTIFICATE_EXPIRY.labels(rec.name).set(rec.not_after)
            self._cache.move_to_end(rec.name)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            metrics.CERTIFICATES_CACHED.set(len(self._cache))
        plan = plan_renewal(rec.not_before, rec.not_after, self.clock())
        if not denied and (st is None or st.state != "valid" or st.not_after != rec.not_after):
            self._set_status(
                rec.name,
                state="valid",
                not_after=rec.not_after,
                issuer=rec.issuer_id,
                challenge_type=rec.challenge_type,
                failures=0,
                last_error=None,
                last_error_type=None,
                reason=None,
                hint=None,
                next_attempt=None,
                renew_at=(st.renew_at if st and st.not_after == rec.not_after else plan.at),
                renewal_source=(
                    st.renewal_source if st and st.not_after == rec.not_after else plan.source
                ),
                renewal_reason=(
                    st.renewal_reason if st and st.not_after == rec.not_after else None
                ),
            )

    def _push_recheck(self, at: float, name: str) -> None:
        heapq.heappush(self._recheck, (at, name))
        if len(self._recheck) > 2 * self._cache_size + 1024:
            # Evictions leave stale entries behind: keep the heap about the cache's size.
            self._recheck = [(c.recheck_at, n) for n, c in self._cache.items()]
            heapq.heapify(self._recheck)

    def _recheck_cached(self, now: float) -> None:
        """Cached names whose renewal time has come: another process may have renewed them
        (the one that took the due entry). Reload those, not every cached name."""
        while self._recheck and self._recheck[0][0] <= now:
            at, name = heapq.heappop(self._recheck)
            cached = self._cache.get(name)
            if cached is None or cached.recheck_at != at:
                continue  # evicted, or a newer certificate brought its own time
            cached.recheck_at = now + RECHECK_INTERVAL
            self._push_recheck(cached.recheck_at, name)
            if self._nursery is not None:
                self._spawn("reload", name, self._reload, name)

    async def _current_serial(self, name: str) -> str | None:
        cached = self._cache.get(name)
        if cached is not None:
            return cached.serial
        current = await self._load(name)
        return current.serial if current is not None else None

    def _drop_expiry_series(self, name: str) -> None:
        if not self.per_domain_metrics:
            return
        if metrics.multiprocess_mode():
            # Worker processes share values through files whose series cannot be removed:
            # 0 says "not watched" (the gauge's readers ignore 0, as for the earliest one).
            metrics.CERTIFICATE_EXPIRY.labels(name).set(0)
        else:
            metrics.CERTIFICATE_EXPIRY.remove(name)
