"""Per-name statuses as the operator reads them (admin API, ``status`` command, status page).

Owns: setting a name's status and persisting it (the only writer of its stored status),
recording a failure with its typed reason, hint and backoff, and the two bounded tables: names
that reached an order or hold a certificate, and names refused before any order (memory only).
Must not know: how a certificate is ordered or served.
"""

from __future__ import annotations

import logging

from ..errors import StorageError
from ..reasons import Failure
from . import status_store
from .manager_state import ManagerState
from .renewal import backoff_delay
from .status import DomainStatus, State, hint_for

log = logging.getLogger("edgeproxy.certs")


class StatusBook(ManagerState):
    """The status layer of ``CertificateManager`` (layers: ``certs/manager_state.py``)."""

    def _set_status(self, name: str, **changes: object) -> DomainStatus:
        """Update the status of a name that reached an order or holds a certificate, and
        persist it (the only path that writes a status to storage)."""
        self._unordered.pop(name, None)
        st = self._status.get(name)
        if st is None:
            st = self._status[name] = DomainStatus(name=name, state="allowed")
        else:
            self._status.move_to_end(name)
        for k, v in changes.items():
            setattr(st, k, v)
        st.updated_at = self.clock()
        while len(self._status) > self._status_size:
            self._status.popitem(last=False)
        if self._nursery is not None:
            # One writer per name, always writing the newest encoding: a task per change
            # (each put a thread of its own) could land an older state after a newer one and
            # leave it stored for good.
            self._status_unwritten[name] = status_store.encode(st)
            if name not in self._status_writers:
                self._status_writers.add(name)
                self._spawn("persist_status", name, self._persist_status, name)
        return st

    async def _persist_status(self, name: str) -> None:
        try:
            while (raw := self._status_unwritten.pop(name, None)) is not None:
                try:
                    await self.storage.put(status_store.status_key(name), raw)
                except StorageError as exc:
                    log.debug("could not persist status for %s: %s", name, exc)
        finally:
            self._status_writers.discard(name)

    def _fail(
        self,
        name: str,
        failure: Failure,
        *,
        state: State = "failing",
        backoff: bool = True,
        serving_until: float | None = None,
        ordered: bool = True,
    ) -> None:
        """Record a failure. ``ordered=False`` (and every refusal): it happened before any
        order, so unless the name already has a status it is remembered in bounded memory
        only; a flood of random names must not grow storage."""
        error_type, detail = failure.type, failure.detail
        retry_after, challenge_type = failure.retry_after, failure.challenge_type
        st = self._status.get(name)
        failures = (st.failures if st else 0) + (1 if backoff else 0)
        next_attempt = None
        if backoff:
            delay = backoff_delay(failures - 1, base=self.backoff_base, cap=self.backoff_max)
            if retry_after is not None:
                delay = max(delay, retry_after)
            next_attempt = self.clock() + delay
        hint = hint_for(
            failure.reason,
            detail,
            challenge_type=challenge_type,
            listen_ports=self.http_ports if challenge_type == "http-01" else self.listen_ports,
            serving_until=serving_until,
        )
        if (state == "denied" or not ordered) and name not in self._status:
            # Names that never reached an order come from anyone (scanners, floods of random
            # names): a bounded in-memory record for the operator's "why?", no storage write.
            self._unordered.pop(name, None)
            self._unordered[name] = DomainStatus(
                name=name,
                state=state,
                last_error=detail,
                last_error_type=error_type,
                reason=failure.reason,
                hint=hint,
                updated_at=self.clock(),
            )
            while len(self._unordered) > self._unordered_size:
                self._unordered.popitem(last=False)
            level = logging.DEBUG if state == "denied" else logging.WARNING
            log.log(level, "certificate for %s not ordered: %s: %s", name, error_type, detail)
            return
        if challenge_type is not None:
            detail = f"{challenge_type}: {detail}"
        if failure.earlier:
            detail = "".join(f"{e}; then " for e in failure.earlier) + detail
        # A cached certificate keeps being served while renewal fails: keep its state visible.
        if state == "failing" and name in self._cache:
            state = "renewing"
        self._set_status(
            name,
            state=state,
            failures=failures,
            last_error=detail,
            last_error_type=error_type,
            reason=failure.reason,
            hint=hint,
            next_attempt=next_attempt,
        )
        # Refusals are routine (scanners, random names): the status keeps them, logs stay quiet.
        level = logging.DEBUG if state == "denied" else logging.WARNING
        log.log(
            level,
            "certificate for %s: %s: %s%s",
            name,
            error_type,
            detail,
            f" (hint: {hint})" if hint else "",
        )

    def status(self, name: str) -> DomainStatus | None:
        return self._status.get(name) or self._unordered.get(name)

    def statuses(self) -> list[DomainStatus]:
        return sorted(self._status.values(), key=lambda s: s.name)

    def _unwanted(self, name: str) -> bool:
        """Removed from the registry, or refused by the policy at its last renewal check."""
        if self.registry is not None and self.registry.is_removed(name):
            return True
        st = self._status.get(name)
        return st is not None and st.state in ("denied", "removed")
