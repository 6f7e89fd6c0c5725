"""The certificate manager's state: its settings, its bounded per-name tables, and the edge
where a background task's surprise stops.

Owns: the constructor every layer shares, the bounds on per-name memory, the nursery tasks
are spawned in (``_spawn``: a failure is counted and logged, never cancels the nursery),
lifecycle events (``_emit``).
Must not know: issuance, renewal policy, sockets.

Theory of operation
-------------------
``CertificateManager`` (``certs/manager.py``) is one object built from layers, one module
each; every layer subclasses the one below it, so a layer calls only what lies beneath it
and the order path, the maintenance pass and the data path each read in one file:

    manager_state.ManagerState   settings, bounded tables, background-task containment
    status_book.StatusBook       per-name statuses: set, fail (hint, backoff), persist
    cache.CertificateCache       served identities: load, install, reload, recheck
    schedule.RenewalSchedule     when a stored certificate renews: plan, ARI state (RFC 9773)
    acquisition.Acquisition      the order path: single-flight acquire, issue_now, obtain
    maintenance.Maintenance      the maintenance pass: due index, renewals, sweeps, purges
    manager.CertificateManager   the data path's questions, the run loop, hostname removal
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .. import metrics
from ..issuers.account_pause import AccountPauses
from ..issuers.base import Issuer
from ..storage.base import Storage
from ..storage.locks import make_owner_id
from ..timefmt import iso_utc
from ..tls.contexts import ServerIdentity
from ..tls.identities import IdentityContexts
from .budget_store import CaBudgets
from .managed import ManagedCertificates
from .policy import OnDemandPolicy, TokenBucket
from .record import CertRecord
from .static import StaticCertificates
from .status import DomainStatus

if TYPE_CHECKING:
    from ..events import Events
    from ..hostnames.registry import HostnameRegistry
    from ..storage.base import HostnameEntry

log = logging.getLogger("edgeproxy.certs")

# Per-name memory is bounded everywhere, because names come from anyone who can send a
# ClientHello. The bounds (constructor arguments, defaults here):
# - certificate contexts: ``cache_size`` (tls.cache_size), LRU; a cold name reloads from storage;
# - statuses of names that reached an order or hold a certificate: STATUSES_REMEMBERED, least
#   recently updated forgotten first (its stored copy stays, and the admin API reads it);
# - names that failed before any order (refused, invalid, order rate limit, storage down):
#   UNORDERED_REMEMBERED, in memory only, never written to storage;
# - acquisitions in flight: MAX_INFLIGHT; beyond it a new name is refused with "busy" at once.
STATUSES_REMEMBERED = 100_000
UNORDERED_REMEMBERED = 1024
MAX_INFLIGHT = 4096


@dataclass(slots=True)
class CachedIdentity:
    """What a cached name keeps: the identity it is served with, and of its record only what
    is asked of it without a storage read (maintenance reads the full record when due)."""

    ctx: ServerIdentity
    serial: str
    not_after: float
    # When to look in storage for a successor (its renewal time, then every RECHECK_INTERVAL).
    recheck_at: float = 0.0


class ManagerState:
    """The state of a ``CertificateManager`` (``certs/manager.py``); see the layers above."""

    def __init__(
        self,
        *,
        storage: Storage,
        issuer: Issuer,
        policy: OnDemandPolicy,
        static: StaticCertificates | None = None,
        managed: ManagedCertificates | None = None,
        default_sni: str | None = None,
        key_type: str = "ec256",
        wait: float = 20.0,
        max_orders_per_minute: int = 30,
        cache_size: int = 10000,
        lock_ttl: float = 60.0,
        issue_timeout: float = 180.0,
        renew_interval: float = 60.0,
        backoff_base: float = 30.0,
        backoff_max: float = 86400.0,
        owner: str | None = None,
        session_tickets: bool = True,
        per_domain_metrics: bool = False,
        listen_ports: Sequence[int] = (443,),
        http_ports: Sequence[int] = (),
        registry: HostnameRegistry | None = None,
        events: Events | None = None,
        removal_grace: float = 7 * 86400.0,
        status_size: int = STATUSES_REMEMBERED,
        unordered_size: int = UNORDERED_REMEMBERED,
        max_inflight: int = MAX_INFLIGHT,
        budgets: CaBudgets | None = None,
        clock: Callable[[], float] = time.time,
        account_pauses: AccountPauses | None = None,
    ) -> None:
        self.storage = storage
        # The CA accounts' pauses after a rateLimited (shared with the ACME issuers).
        self.account_pauses = account_pauses
        # [acme.limits]: None orders without budgets (the internal issuer, most tests).
        self.budgets = budgets
        self.registry = registry
        self.events = events
        self.removal_grace = removal_grace
        if registry is not None:
            registry.add_listener(self._on_hostname_change)
        self.issuer = issuer
        self.policy = policy
        self.static = static or StaticCertificates()
        self.managed = managed
        self.default_sni = default_sni
        self.key_type = key_type
        self.wait = wait
        self.lock_ttl = lock_ttl
        self.issue_timeout = issue_timeout
        self.renew_interval = renew_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.owner = owner or make_owner_id()
        self.session_tickets = session_tickets
        self.per_domain_metrics = per_domain_metrics
        # The ports the CA's validation must reach us on, named in hints (not always 443).
        self.listen_ports = tuple(listen_ports)
        self.http_ports = tuple(http_ports)
        self.clock = clock
        self._cache: OrderedDict[str, CachedIdentity] = OrderedDict()
        self._identities = IdentityContexts(session_tickets=session_tickets)
        self._cache_size = cache_size
        self._inflight: dict[str, trio.Event] = {}
        self._max_inflight = max_inflight
        # Ordered by last update, oldest first: the bound evicts from the front.
        self._status: OrderedDict[str, DomainStatus] = OrderedDict()
        self._status_size = status_size
        self._unordered: OrderedDict[str, DomainStatus] = OrderedDict()
        self._unordered_size = unordered_size
        # Status encodings not yet written, newest per name, and the names with a writer task
        # (both bounded by the names whose status changes meanwhile; ``status_book``).
        self._status_unwritten: dict[str, bytes] = {}
        self._status_writers: set[str] = set()
        self._orders = TokenBucket(
            max_orders_per_minute / 60.0, float(max_orders_per_minute), time.monotonic
        )
        self._nursery: trio.Nursery | None = None
        self._next_clean = 0.0
        self._next_reconcile = 0.0
        # Names past their renewal time and not yet renewed (not_after): the due gauge.
        self._overdue: dict[str, float] = {}
        # (recheck_at, name) of cached names; stale entries are skipped when popped.
        self._recheck: list[tuple[float, str]] = []

    def _spawn(
        self, task: str, name: str, fn: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        """Run ``fn(*args)`` for ``name`` in the manager's nursery, its failure contained."""
        if self._nursery is None:
            raise RuntimeError("CertificateManager.run() is not running")
        self._nursery.start_soon(self._guarded, task, name, fn, *args)

    @staticmethod
    async def _guarded(
        task: str, name: str, fn: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        try:
            await fn(*args)
        except Exception:
            task_failed(task, name)

    def _emit(self, kind: str, name: str, data: dict[str, object]) -> None:
        if self.events is not None:
            self.events.emit(kind, name, {"hostname": name, **data})

    def _on_hostname_change(
        self, name: str, before: HostnameEntry | None, after: HostnameEntry | None
    ) -> None:
        """The hostname registry's listener, registered by the constructor; the manager's
        lifecycle (``certs/manager.py``) decides what a removal means."""
        raise NotImplementedError


def task_failed(task: str, name: str) -> None:
    """Count and log (with the traceback) an exception a background task did not expect."""
    metrics.BACKGROUND_TASK_ERRORS.labels(task).inc()
    log.exception(
        "background task %s for %s failed unexpectedly; dropped, the process keeps running",
        task,
        name,
    )


def cert_data(rec: CertRecord) -> dict[str, object]:
    return {"serial": rec.serial, "issuer": rec.issuer_id, "not_after": iso_utc(rec.not_after)}
