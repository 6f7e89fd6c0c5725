"""The certificate manager: the one place that decides which certificate a name gets.

Theory of operation
-------------------
The data path asks one question: ``context_for(name)``. A cached name is answered from an LRU of
``ServerIdentity`` objects (the parsed leaf and key, served from a context shared by every name
with the same intermediate chain: ``tls/identities.py``) with no await at all. Anything else
becomes a background *acquire* task (single-flight per name, in the manager's own nursery so a
client hanging up does not abort an issuance half way): load the record from storage; if absent
or expired, ask the on-demand policy, take the storage lease for the name, re-read storage
(another process or replica may have finished meanwhile), issue, store the key and chain as one
atomic record, install the new identity. Handshakes wait for that task at most ``wait`` seconds.

A maintenance loop renews: it lists stored records, refreshes ARI windows (RFC 9773) when the
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
"""

from __future__ import annotations

import heapq
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import trio
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from OpenSSL import SSL

from .. import metrics
from ..acme import ari
from ..errors import CertificateUnavailable, LockUnavailable, OrderLimited, StorageError
from ..issuers.base import IssuanceError, Issuer, RenewalInfoError
from ..issuers.fallback import issuer_for
from ..names import InvalidName, validate_hostname
from ..storage.base import Storage
from ..storage.locks import LockLost, hold_lock, make_owner_id
from ..tls.contexts import ServerIdentity, generate_private_key
from ..tls.identities import IdentityContexts
from . import history
from .managed import ManagedCertificates
from .policy import OnDemandPolicy, TokenBucket
from .record import (
    AriState,
    Backoff,
    CertRecord,
    RecordError,
    ari_key,
    backoff_key,
    cert_key,
    lock_name,
    status_key,
)
from .renewal import RenewalPlan, backoff_delay, plan_renewal
from .static import StaticCertificates
from .status import DomainStatus, State, hint_for

if TYPE_CHECKING:
    from ..events import Events
    from ..hostnames.registry import HostnameRegistry
    from ..storage.base import HostnameEntry

log = logging.getLogger("edgeproxy.certs")

ARI_CHECK_INTERVAL = 12 * 3600.0
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
# A cached name past its renewal time is reloaded this often until a new one appears.
RECHECK_INTERVAL = 600.0
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
# Policy answers that say "could not ask", not "no": a renewal waits and asks again.
TRANSIENT_REFUSALS = frozenset({"ask_unavailable", "ask_rate_limited"})
# A wanted certificate this close to expiry, not yet renewed, makes a certificate.expiring event.
EXPIRING_NOTICE = 7 * 86400.0


@dataclass(slots=True)
class _Cached:
    """What a cached name keeps: the identity it is served with, and of its record only what
    is asked of it without a storage read (maintenance reads the full record when due)."""

    ctx: ServerIdentity
    serial: str
    not_after: float
    # When to look in storage for a successor (its renewal time, then every RECHECK_INTERVAL).
    recheck_at: float = 0.0


class CertificateManager:
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
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
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._identities = IdentityContexts(session_tickets=session_tickets)
        self._cache_size = cache_size
        self._inflight: dict[str, trio.Event] = {}
        self._max_inflight = max_inflight
        # Ordered by last update, oldest first: the bound evicts from the front.
        self._status: OrderedDict[str, DomainStatus] = OrderedDict()
        self._status_size = status_size
        self._unordered: OrderedDict[str, DomainStatus] = OrderedDict()
        self._unordered_size = unordered_size
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

    # ------------------------------------------------------------------ data path

    def cached_context(self, name: str) -> SSL.Context | ServerIdentity | None:
        hit = self._cache.get(name)
        if hit is None:
            return None
        self._cache.move_to_end(name)
        return hit.ctx

    async def context_for(self, name: str | None) -> SSL.Context | ServerIdentity:
        """An SSL context for ``name`` (normalised SNI; None = no SNI sent).

        Raises CertificateUnavailable with a reason token when none can be had in time.
        """
        if name is None:
            if self.default_sni is None:
                raise CertificateUnavailable(
                    None, "no_sni", "client sent no SNI and tls.default_sni is unset"
                )
            name = self.default_sni
        cached = self.cached_context(name)
        if cached is not None:
            return cached
        static = self.static.match(name)
        if static is not None:
            return static
        if self.managed is not None:
            managed = self.managed.match(name)
            if managed is not None:
                return managed
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
        if st is not None and st.last_error_type:
            raise CertificateUnavailable(
                name, st.last_error_type.rsplit(":", 1)[-1], st.last_error or ""
            )
        raise CertificateUnavailable(name, "unavailable")

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

    def invalidate(self, name: str) -> None:
        """Forget the cached context (another replica stored a new certificate)."""
        self._cache.pop(name, None)
        metrics.CERTIFICATES_CACHED.set(len(self._cache))

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
                             hint=None, next_attempt=None)  # fmt: skip
        else:
            self._status.pop(name, None)
        log.info("hostname %s removed: no longer served or renewed", name)

    def _drop_expiry_series(self, name: str) -> None:
        if not self.per_domain_metrics:
            return
        if metrics.multiprocess_mode():
            # Worker processes share values through files whose series cannot be removed:
            # 0 says "not watched" (the gauge's readers ignore 0, as for the earliest one).
            metrics.CERTIFICATE_EXPIRY.labels(name).set(0)
        else:
            metrics.CERTIFICATE_EXPIRY.remove(name)

    def _emit(self, kind: str, name: str, data: dict[str, object]) -> None:
        if self.events is not None:
            self.events.emit(kind, name, {"hostname": name, **data})

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
        self._emit("certificate.expiring", rec.name, _cert_data(rec))

    def start_issue(self, name: str) -> None:
        """Acquire ``name`` in the background now (the registry API's "issue at once")."""
        if self._start_acquire(name) is None:
            log.warning(
                "hostname %s: not issued now (%d acquisitions in flight); its first visitor "
                "will start it",
                name,
                self._max_inflight,
            )

    def _unwanted(self, name: str) -> bool:
        """Removed from the registry, or refused by the policy at its last renewal check."""
        if self.registry is not None and self.registry.is_removed(name):
            return True
        st = self._status.get(name)
        return st is not None and st.state in ("denied", "removed")

    # ------------------------------------------------------------------ lifecycle

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
            _task_failed(task, name)

    async def _acquire_task(self, name: str, ev: trio.Event) -> None:
        try:
            await self._acquire(name)
        except Exception:
            _task_failed("acquire", name)
        finally:
            del self._inflight[name]
            ev.set()

    # ------------------------------------------------------------------ control path

    async def _acquire(self, name: str) -> None:
        try:
            validate_hostname(name)
        except InvalidName as exc:
            self._fail(name, "invalid_name", str(exc), state="denied", backoff=False)
            return
        now = self.clock()
        try:
            rec = await self._load(name)
        except StorageError as exc:
            self._fail(name, "storage", str(exc), backoff=False, ordered=False)
            return
        if rec is not None and rec.not_after > now:
            self._install(rec)
            return
        st = self._status.get(name)
        if st is not None and st.next_attempt and st.next_attempt > now and st.state == "failing":
            return  # in backoff; the status already holds the error the handshake will report
        decision = await self.policy.check(name)
        if not decision.allowed:
            self._fail(
                name,
                decision.reason,
                decision.detail or decision.reason,
                state="denied",
                backoff=False,
            )
            return
        if not self._orders.take():
            self._fail(
                name,
                "order_rate_limited",
                "on_demand.max_orders_per_minute reached",
                backoff=False,
                ordered=False,
            )
            return
        await self.obtain(name, old=rec)

    async def issue_now(self, name: str, *, force: bool = False) -> CertRecord | None:
        """Order ``name`` now (the admin API's issue), within the limits a handshake's order
        has: the per-name backoff after failures and ``max_orders_per_minute``, forced orders
        included. The allow-check is the caller's. Without ``force`` a valid stored
        certificate is returned without any order (and without spending an order token).

        Raises OrderLimited when a limit says not now; returns None when the order failed
        (the status says why).
        """
        now = self.clock()
        if not force:
            try:
                rec = await self._load(name)
            except StorageError as exc:
                self._fail(name, "storage", str(exc), backoff=False, ordered=False)
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
                f"{st.last_error}; next attempt at {_iso(st.next_attempt)}",
            )
        if not self._orders.take():
            raise OrderLimited(
                name,
                "on_demand.max_orders_per_minute",
                self._orders.wait_time(),
                "the order rate limit is reached (forced orders count too)",
            )
        return await self.obtain(name, force=force)

    async def obtain(
        self, name: str, *, old: CertRecord | None = None, force: bool = False
    ) -> CertRecord | None:
        """Issue (or renew) ``name`` under the storage lease; return the stored record.

        Policy is the caller's business (the data path checks it before calling; the CLI and
        admin API check it themselves). Returns None and records the failure on error.
        """
        renewing = old is not None
        state: State = "renewing" if renewing else "issuing"
        self._set_status(name, state=state)
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
                            name, key, replacing=replacing, prefer=prefer
                        )
                    except IssuanceError as exc:
                        # Recorded before the lease is released: whoever takes it next sees it.
                        await self._store_backoff(name, shared, exc.retry_after)
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
            if isinstance(exc, IssuanceError):
                self._fail(
                    name,
                    exc.error_type,
                    exc.detail,
                    retry_after=exc.retry_after,
                    challenge_type=exc.challenge_type,
                    serving_until=serving_until,
                    earlier=exc.earlier,
                )
                metrics.ACME_ORDERS.labels("failed").inc()
                if renewing:
                    metrics.RENEWALS.labels("failed").inc()
            elif isinstance(exc, trio.TooSlowError):
                detail = f"issuance took longer than {self.issue_timeout:.0f}s"
                self._fail(name, "timeout", detail, serving_until=serving_until)
            elif isinstance(exc, StorageError):
                self._fail(name, "storage", str(exc), serving_until=serving_until)
            else:
                self._fail(name, "lock_timeout", str(exc), serving_until=serving_until)
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
                   _cert_data(rec))  # fmt: skip
        log.info(
            "certificate %s for %s (issuer %s, valid until %s)",
            "renewed" if renewing else "issued",
            name,
            rec.issuer_id,
            _iso(rec.not_after),
        )
        self._install(rec)
        return rec

    async def _stored_backoff(self, name: str) -> Backoff | None:
        raw = await self.storage.get(backoff_key(name))
        if raw is None:
            return None
        try:
            return Backoff.from_json(raw)
        except RecordError:
            return None  # unreadable: as if none (the next failure rewrites it)

    async def _store_backoff(
        self, name: str, previous: Backoff | None, retry_after: float | None
    ) -> None:
        failures = (previous.failures if previous is not None else 0) + 1
        delay = backoff_delay(failures - 1, base=self.backoff_base, cap=self.backoff_max)
        if retry_after is not None:
            delay = max(delay, retry_after)
        try:
            await self.storage.put(
                backoff_key(name), Backoff(failures, self.clock() + delay).to_json()
            )
        except StorageError as exc:
            log.warning("could not record the backoff for %s: %s", name, exc)

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
                             else "backoff"),
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

    async def _load(self, name: str) -> CertRecord | None:
        key = cert_key(name)
        raw = await self.storage.get(key)
        if raw is None:
            return None
        try:
            return CertRecord.from_json(raw)
        except RecordError as exc:
            log.error(
                "certificate record %s is corrupt (%s): quarantined; it will be re-issued", key, exc
            )
            await self.storage.quarantine(key, str(exc))
            metrics.STORAGE_ERRORS.labels("corrupt_record").inc()
            return None

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
            self._cache[rec.name] = _Cached(ident, rec.serial, rec.not_after, recheck_at=recheck)
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

    # ------------------------------------------------------------------ status

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
            self._spawn("persist_status", name, self._persist_status, st.name, st.to_json())
        return st

    async def _persist_status(self, name: str, raw: bytes) -> None:
        try:
            await self.storage.put(status_key(name), raw)
        except StorageError as exc:
            log.debug("could not persist status for %s: %s", name, exc)

    def _fail(
        self,
        name: str,
        error_type: str,
        detail: str,
        *,
        state: State = "failing",
        backoff: bool = True,
        retry_after: float | None = None,
        challenge_type: str | None = None,
        serving_until: float | None = None,
        ordered: bool = True,
        earlier: tuple[str, ...] = (),
    ) -> None:
        """Record a failure. ``ordered=False`` (and every refusal): it happened before any
        order, so unless the name already has a status it is remembered in bounded memory
        only; a flood of random names must not grow storage."""
        st = self._status.get(name)
        failures = (st.failures if st else 0) + (1 if backoff else 0)
        next_attempt = None
        if backoff:
            delay = backoff_delay(failures - 1, base=self.backoff_base, cap=self.backoff_max)
            if retry_after is not None:
                delay = max(delay, retry_after)
            next_attempt = self.clock() + delay
        hint = hint_for(
            error_type,
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
        if earlier:
            detail = "".join(f"{e}; then " for e in earlier) + detail
        # A cached certificate keeps being served while renewal fails: keep its state visible.
        if state == "failing" and name in self._cache:
            state = "renewing"
        self._set_status(
            name,
            state=state,
            failures=failures,
            last_error=detail,
            last_error_type=error_type,
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

    # ------------------------------------------------------------------ maintenance

    async def maintenance_once(self) -> None:
        """One renewal pass over every stored certificate (and, now and then, a storage sweep)."""
        t0 = time.monotonic()
        try:
            await self._maintenance_pass()
        finally:
            metrics.MAINTENANCE_PASS_SECONDS.observe(time.monotonic() - t0)

    async def _maintenance_pass(self) -> None:
        now = self.clock()
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
        for state in ("allowed", "denied", "issuing", "valid", "renewing", "failing", "removed"):
            metrics.CERTIFICATES.labels(state).set(counts.get(state, 0))
        await self._purge_removed(now)

    async def _reconcile(self, now: float) -> None:
        """Give every stored certificate without a next-action time one (now): stores written
        before the index existed, or by a writer that died between its two writes. Lists keys
        only; reads no certificate."""
        stored = {
            item.key[len("certs/") : -len(".json")]
            for item in await self.storage.list("certs/")
            if item.key.endswith(".json")
        }
        missing = stored.difference(await self.storage.scheduled_names())
        for name in sorted(missing):
            await self.storage.set_due(name, now)
        if missing:
            log.info("maintenance: %d stored certificate(s) added to the schedule", len(missing))

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
                    _task_failed("renew", name)
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

    def _push_recheck(self, at: float, name: str) -> None:
        heapq.heappush(self._recheck, (at, name))
        if len(self._recheck) > 2 * self._cache_size + 1024:
            # Evictions leave stale entries behind: keep the heap about the cache's size.
            self._recheck = [(c.recheck_at, n) for n, c in self._cache.items()]
            heapq.heapify(self._recheck)

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
                    log.info("hostname %s purged (removed %s)", name, _iso(entry.removed_at))
            except StorageError as exc:
                log.warning("could not purge removed hostname %s: %s", name, exc)
                return
            self.registry.apply(name, None)

    async def _maintain(self, name: str, now: float) -> tuple[float | None, bool]:
        """Plan (and if due, renew) one stored certificate whose time has come: (its next
        action time, or None when it is no longer managed; whether a renewal was tried)."""
        rec = await self._load(name)
        cached = self._cache.get(name)
        if rec is not None and cached is not None and cached.serial != rec.serial:
            log.info("picked up new certificate for %s stored by another process", name)
            self._install(rec)
        if rec is None:
            return None, False
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
            renewed = await self._renew(rec)
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

    async def _current_serial(self, name: str) -> str | None:
        cached = self._cache.get(name)
        if cached is not None:
            return cached.serial
        current = await self._load(name)
        return current.serial if current is not None else None

    async def _sweep_storage(self) -> None:
        clean = getattr(self.storage, "clean", None)
        if clean is None:
            return
        try:
            removed = await clean()
        except StorageError as exc:
            log.warning("storage sweep failed: %s", exc)
            return
        for item in removed:
            log.info("storage sweep: %s", item)

    async def _plan(self, rec: CertRecord, now: float) -> tuple[RenewalPlan, float | None]:
        """When to renew ``rec``, and when its ARI window should be asked for next."""
        ari_state = await self._ari_state(rec, now)
        window = ari_state.window if ari_state else None
        # Seeded by serial and window: every pass and every replica picks the same random
        # moment for this certificate, so the schedule neither drifts nor disagrees.
        rand = random.Random(f"{rec.serial}/{window}").random
        plan = plan_renewal(
            rec.not_before,
            rec.not_after,
            now,
            ari_start=window[0] if window else None,
            ari_end=window[1] if window else None,
            rand=rand,
        )
        reason = self._renewal_reason(rec, plan, ari_state)
        ari_next = ari_state.next_check if ari_state is not None else None
        st = self._status.get(rec.name)
        if st is None or (st.renew_at, st.renewal_source, st.ari_window, st.renewal_reason) != (
            plan.at,
            plan.source,
            window,
            reason,
        ):
            self._set_status(
                rec.name,
                renew_at=plan.at,
                renewal_source=plan.source,
                renewal_reason=reason,
                ari_window=window,
                not_after=rec.not_after,
                issuer=rec.issuer_id,
                **({"state": "valid"} if st is None else {}),
            )
        return plan, ari_next

    def _renewal_reason(
        self, rec: CertRecord, plan: RenewalPlan, ari_state: AriState | None
    ) -> str:
        """The operator's "why this renewal time?", in words for the status."""
        if plan.source == "expiring":
            return "in the last 5% of its lifetime: renewing now whatever ARI says"
        if plan.source == "ari":
            extra = (
                f" ({ari_state.explanation_url})" if ari_state and ari_state.explanation_url else ""
            )
            return f"a random time inside the CA's ARI window{extra}"
        if issuer_for(self.issuer, rec.issuer_id) is None:
            return f"issued by {rec.issuer_id}, not a configured issuer: no ARI, backstop"
        if ari_state is None:
            return "the issuer offers no ARI (RFC 9773): backstop"
        if ari_state.error is not None:
            if ari_state.long_term:
                what = "the CA has no ARI for this certificate (renewal sends no replaces)"
            else:
                what = f"ARI request failed {ari_state.failures} time(s) in a row"
            return (
                f"backstop: {what}: {ari_state.error}; next ARI check {_iso(ari_state.next_check)}"
            )
        return "backstop: the CA's ARI window lies past the backstop"

    async def _stored_ari(self, rec: CertRecord) -> AriState | None:
        """The stored ARI state for exactly this certificate (a renewed one starts afresh)."""
        raw = await self.storage.get(ari_key(rec.name))
        if raw is None:
            return None
        try:
            state = AriState.from_json(raw)
        except RecordError:
            return None
        return state if state.serial == rec.serial else None

    async def _ari_state(self, rec: CertRecord, now: float) -> AriState | None:
        issuer = issuer_for(self.issuer, rec.issuer_id)
        if issuer is None:
            return None
        state = await self._stored_ari(rec)
        if state is not None and state.next_check > now:
            return state
        try:
            window = await issuer.renewal_window(rec.chain_pem.encode())
        except IssuanceError as exc:
            # RFC 9773 s4.3.3: a long-term error (the CA does not know this CertID) is asked
            # about again after six hours, short-term ones with backoff; never every pass.
            typed = exc if isinstance(exc, RenewalInfoError) else None
            long_term = typed is not None and typed.long_term
            status = typed.status if typed is not None else 0
            failures = (state.failures if state is not None and state.error else 0) + 1
            delay = ari.error_retry_delay(long_term, failures, exc.retry_after)
            log.info(
                "ARI check for %s failed (%s, next in %.0fs): %s",
                rec.name,
                "long-term" if long_term else "short-term",
                delay,
                exc,
            )
            # A short-term failure keeps the last window (the CA has not withdrawn it); a
            # long-term one means there is none for this certificate.
            keep = state is not None and not long_term
            state = AriState(
                serial=rec.serial,
                start=state.start if keep and state is not None else None,
                end=state.end if keep and state is not None else None,
                explanation_url=state.explanation_url if keep and state is not None else None,
                next_check=now + delay,
                error=f"{exc}" + (f" (HTTP {status})" if status else ""),
                long_term=long_term,
                failures=failures,
            )
        else:
            if window is None:
                return None
            retry = window.retry_after if window.retry_after is not None else ARI_CHECK_INTERVAL
            state = AriState(
                serial=rec.serial,
                start=window.start.timestamp(),
                end=window.end.timestamp(),
                explanation_url=window.explanation_url,
                next_check=now + retry,
            )
        try:
            await self.storage.put(ari_key(rec.name), state.to_json())
        except StorageError as exc:
            log.debug("could not store ARI state for %s: %s", rec.name, exc)
        return state

    async def _replaces_allowed(self, old: CertRecord) -> bool:
        """May a renewal of ``old`` name it in ``replaces``? Not when the CA said it has no
        ARI for it: such a CA would refuse the order (it is retried without, but why ask)."""
        if issuer_for(self.issuer, old.issuer_id) is None:
            return False
        try:
            state = await self._stored_ari(old)
        except StorageError:
            return True  # the client drops replaces by itself if the CA objects
        return state is None or not state.long_term

    async def _renew(self, rec: CertRecord) -> CertRecord | None:
        """Renew ``rec`` unless someone is at it or the policy refuses: the new record, or
        None when there is none (yet)."""
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
            detail = decision.detail or decision.reason
            if decision.reason in TRANSIENT_REFUSALS:
                # "Could not ask" is not "no": keep the certificate and ask again later.
                self._fail(rec.name, decision.reason, detail)
                return None
            log.info("not renewing %s: %s (%s)", rec.name, decision.reason, detail)
            self._drop_expiry_series(rec.name)
            self._fail(rec.name, decision.reason, detail, state="denied")
            return None
        log.info("renewing %s (not after %s)", rec.name, _iso(rec.not_after))
        return await self.obtain(rec.name, old=rec)


def _task_failed(task: str, name: str) -> None:
    """Count and log (with the traceback) an exception a background task did not expect."""
    metrics.BACKGROUND_TASK_ERRORS.labels(task).inc()
    log.exception(
        "background task %s for %s failed unexpectedly; dropped, the process keeps running",
        task,
        name,
    )


def expiring_key(name: str) -> str:
    """Where the serial last told about in a certificate.expiring event is kept."""
    return f"expiring/{name}"


def _cert_data(rec: CertRecord) -> dict[str, object]:
    return {"serial": rec.serial, "issuer": rec.issuer_id, "not_after": _iso(rec.not_after)}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
