"""The certificate manager: the one place that decides which certificate a name gets.

Theory of operation
-------------------
The data path asks ``ready_context(name)`` first: a cached name is answered from an LRU of
``ServerIdentity`` objects (the leaf and key, served from a context shared by every name with
the same intermediate chain: ``tls/identities.py``), a static or managed one from its index,
with no await at all. Only on a miss does it ask ``context_for(name)``, where anything else
becomes a background *acquire* task (single-flight per name, in the manager's own nursery so a
client hanging up does not abort an issuance half way): load the record from storage; if absent
or expired, ask the on-demand policy, take the storage lease for the name, re-read storage
(another process or replica may have finished meanwhile), issue, store the key and chain as one
atomic record, install the new identity. Handshakes wait for that task at most ``wait`` seconds.

A maintenance loop renews: it takes the names whose next-action time has come from the index
in storage (a pass with nothing due reads no record), refreshes ARI windows (RFC 9773) when the
issuer offers them, and renews due certificates under the same lease, so one process acts and
the others notice the new record on their next pass (or sooner via ``invalidate``).

Every renewal asks the on-demand policy again first (without its cache): a name nobody wants
any more is not renewed; its status turns ``denied`` with the reason, it is served until it
expires and then dropped, and it leaves the expiry gauges meanwhile, so the expiry alert speaks
only of names someone still wants. A name removed from the hostname registry is refused at
once (its context dropped, handshakes get ``unrecognized_name``); its stored certificate is kept
for ``removal_grace`` so re-adding it serves it again without a new order, then purged.

Failures never crash anything: they are recorded in the per-domain status with a typed reason
and a hint, and retried with exponential backoff and jitter. What nobody foresaw (a bug, an
input a validator let through) is caught at the edge of each background task: logged with its
traceback, counted in ``edgeproxy_background_task_errors_total{task}``, and dropped. The
manager's nursery is shared by every name, so one name's exception must never cancel it (and
with it the process).

The manager is built in layers, one module each (``certs/manager_state.py`` lists them);
this module holds the data path's questions, the run loop and a hostname's removal.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from OpenSSL import SSL

from .. import metrics
from ..errors import CertificateUnavailable
from ..names import InvalidName, validate_hostname
from ..tls.contexts import ServerIdentity
from .maintenance import Maintenance

if TYPE_CHECKING:
    from ..storage.base import HostnameEntry

log = logging.getLogger("edgeproxy.certs")


class CertificateManager(Maintenance):
    async def context_for(self, name: str | None) -> SSL.Context | ServerIdentity:
        """An SSL context for ``name`` (normalised SNI; None = no SNI sent).

        Raises CertificateUnavailable with a reason token when none can be had in time.
        """
        ready = self.ready_context(name)
        if ready is not None:
            return ready
        if name is None:
            if self.default_sni is None:
                raise CertificateUnavailable(
                    None, "no_sni", "client sent no SNI and tls.default_sni is unset"
                )
            name = self.default_sni
        if self.registry is not None and self.registry.is_removed(name):
            raise CertificateUnavailable(name, "removed", "removed from the hostname registry")
        try:
            validate_hostname(name)
        except InvalidName as exc:
            # Refused before any task, status or storage key exists for it: an SNI is only
            # printable ASCII, and "a+b" or "x/../y" would not even be a valid storage key.
            raise CertificateUnavailable(name, "invalid_name", str(exc)) from None
        ev = self._start_acquire(name)
        if ev is None:
            raise CertificateUnavailable(
                name, "busy", f"{self._max_inflight} certificate acquisitions already in flight"
            )
        with trio.move_on_after(self.wait):
            await ev.wait()
        hit = self._cache.get(name)
        if hit is not None:
            return hit.ctx
        st = self.status(name)
        if not ev.is_set():
            raise CertificateUnavailable(
                name, "timeout", f"not issued within on_demand.wait={self.wait}s"
            )
        if st is not None and st.reason is not None:
            raise CertificateUnavailable(name, st.reason, st.last_error or "")
        raise CertificateUnavailable(name, "unavailable")

    def ready_context(self, name: str | None) -> SSL.Context | ServerIdentity | None:
        """What ``context_for`` answers without waiting (cached, static or managed), else None.

        The data path asks this first: one lookup and no await for every name it serves.
        """
        if name is None:
            name = self.default_sni
            if name is None:
                return None
        cached = self.cached_context(name)
        if cached is not None:
            return cached
        static = self.static.match(name)
        if static is not None:
            return static
        return self.managed.match(name) if self.managed is not None else None

    def may_serve(self, name: str) -> bool:
        """Does this process hold, or may it get without asking anyone, a certificate for
        ``name``? In memory only: the plain-HTTP listener asks it for every request."""
        if name in self._cache or self.static.match(name) is not None:
            return True
        if self.managed is not None and self.managed.match(name) is not None:
            return True
        st = self._status.get(name)
        if st is not None and st.state in ("valid", "renewing", "issuing"):
            return True
        registry = self.policy.registry
        if registry is not None and registry.is_removed(name):
            return False
        if self.policy.registry_allows and registry is not None and registry.is_registered(name):
            return True
        return self.policy.static_allows(name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background tasks (issuance, renewal); runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                if self.registry is not None:
                    # A pass before the registry is known could renew a removed name.
                    await self.registry.wait_loaded()
                while True:
                    try:
                        await self.maintenance_once()
                    except Exception:
                        metrics.BACKGROUND_TASK_ERRORS.labels("maintenance").inc()
                        log.exception("certificate maintenance pass failed; retrying later")
                    await trio.sleep(self.renew_interval)
            finally:
                self._nursery = None

    def _on_hostname_change(
        self, name: str, before: HostnameEntry | None, after: HostnameEntry | None
    ) -> None:
        if after is not None and after.live:
            st = self._status.get(name)
            if st is not None and st.state == "removed":
                # Re-added: what it holds is decided afresh (its stored certificate, if kept).
                self._status.pop(name, None)
            return
        if before is None or not before.live:
            return
        self.invalidate(name)
        self._drop_expiry_series(name)
        if after is not None:
            self._set_status(name, state="removed", last_error=None, last_error_type=None,
                             reason=None, hint=None, next_attempt=None)  # fmt: skip
        else:
            self._status.pop(name, None)
        log.info("hostname %s removed: no longer served or renewed", name)
