"""Lifecycle events: CloudEvents 1.0 (JSON, structured mode) POSTed to ``[events] url``.

Owns the event format, its signature and delivery. Producers (admin API, CLI, certificate
manager) call ``emit`` (never blocks: the outbox write runs in the background) or ``publish``
(awaits the write); nothing else about delivery concerns them.

*Storage blips.* ``emit`` puts the event in a bounded in-memory queue (``MAX_PENDING``) that
one task writes to the outbox in order, retrying a failed write with backoff until storage
answers again: an event made while storage is down is stored late, not lost. Only a queue
that fills up (storage down for long while events keep coming) drops the newest events,
counted by ``edgeproxy_events_lost_total``; a process that dies loses what it had not stored
yet. ``publish`` whose direct write fails hands its event to the same queue.

Theory of operation
-------------------
*Durable outbox.* An event is first written to storage (``enqueue_event``), so it survives a
restart or a ``kill -9`` of the process that made it. Event ids sort by creation time.

*One deliverer.* Every process runs ``run``; only the one holding the storage lease
``events-delivery`` delivers (the lease frees itself ``lease_ttl`` after its holder died, and
another process takes over). It sends the due events oldest first, one at a time.

*At least once.* An event is deleted from the outbox only after the receiver answered 2xx; a
deliverer killed between the answer and the delete makes the next one send it again, so a
receiver must deduplicate by ``id``. A failure (no answer, non-2xx, timeout) reschedules the
event with exponential backoff and jitter, capped at ``retry_max``; an event still undelivered
``max_age`` (24 h) after it was made is dropped and counted.

*Signature.* ``Edgeproxy-Signature: t=UNIX,v1=HEX`` with HEX = HMAC-SHA256(secret,
"{t}.{body}"), ``t`` the time of this attempt: a receiver checks the HMAC over the exact bytes
received and refuses old ``t`` values (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime

import httpx
import trio

from . import metrics
from .errors import StorageError
from .storage.base import OutboxEvent, Storage
from .storage.locks import LockLost, hold_lock, make_owner_id

log = logging.getLogger("edgeproxy.events")

TYPE_PREFIX = "net.edgeproxy."
TYPES = frozenset(
    {
        "hostname.created",
        "hostname.deleted",
        "certificate.issued",
        "certificate.renewed",
        "certificate.failed",
        "certificate.expiring",
    }
)
SIGNATURE_HEADER = "Edgeproxy-Signature"
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
LEASE = "events-delivery"
#: Events waiting in memory for their outbox write (storage down): beyond this they are lost.
MAX_PENDING = 10_000
#: Cap of the backoff between outbox write attempts while storage fails.
STORE_RETRY_MAX = 5.0


def new_event_id(now: float) -> str:
    """Sortable by creation time (microseconds), unique by 64 random bits."""
    return f"{int(now * 1_000_000):017d}-{secrets.token_hex(8)}"


def make_event(
    kind: str, subject: str, data: Mapping[str, object], *, source: str, now: float
) -> OutboxEvent:
    """The CloudEvent ``net.edgeproxy.<kind>`` about ``subject`` (a hostname), ready to queue."""
    if kind not in TYPES:
        raise ValueError(f"unknown event type {kind!r}")
    event_id = new_event_id(now)
    event = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": TYPE_PREFIX + kind,
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": dict(data),
    }
    body = json.dumps(event, separators=(",", ":")).encode()
    return OutboxEvent(event_id, body, now, 0, now)


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Edgeproxy-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, now: float, tolerance: float = 300) -> bool:
    """A receiver's check (and our tests'): right HMAC, ``t`` within ``tolerance`` of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    t, v1 = fields.get("t", ""), fields.get("v1", "")
    if not t.isdigit() or abs(now - int(t)) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, int(t), body), f"t={t},v1={v1}")


def retry_delay(attempts: int, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before attempt ``attempts + 1``: 1, 2, 4 ... s up to ``cap``, +-25 % jitter."""
    base = min(cap, 2.0 ** max(0, attempts - 1))
    return max(0.5, base * (0.75 + 0.5 * rand()))


@dataclass(eq=False)
class Events:
    """Emit and deliver lifecycle events; with no ``url`` every emit is a no-op."""

    storage: Storage
    _: KW_ONLY
    url: str | None
    # The HMAC key events are signed with (repr=False: a secret).
    secret: bytes | None = field(repr=False)
    source: str = "edgeproxy"
    timeout: float = 10.0
    retry_max: float = 3600.0
    max_age: float = 86400.0
    poll: float = 1.0
    lease_ttl: float = 15.0
    # The delivery client (tests pass theirs); None: one per delivery loop, closed with it.
    http: httpx.AsyncClient | None = field(default=None, repr=False)
    clock: Callable[[], float] = time.time
    max_pending: int = MAX_PENDING
    _wake: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    # Made but not yet in the outbox, oldest first (written by ``_store_pending``).
    _pending: deque[OutboxEvent] = field(default_factory=deque, init=False, repr=False)
    _pending_wake: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _running: bool = field(default=False, init=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.url is not None

    # ------------------------------------------------------------------ producing

    def emit(self, kind: str, subject: str, data: Mapping[str, object]) -> None:
        """Queue an event without waiting (data path and manager callers)."""
        if self.enabled:
            self._queue(make_event(kind, subject, data, source=self.source, now=self.clock()))

    async def publish(self, kind: str, subject: str, data: Mapping[str, object]) -> None:
        """Queue an event and wait until it is stored (API and CLI callers). If storage fails,
        a process running ``run`` leaves it to the background writer (as ``emit`` does); one
        that does not (the CLI) gets the StorageError, since nothing would retry it."""
        if not self.enabled:
            return
        event = make_event(kind, subject, data, source=self.source, now=self.clock())
        try:
            await self._store(event)
        except StorageError as exc:
            if not self._running:
                raise
            log.warning("event %s not stored yet (%s): retried in the background", event.id, exc)
            self._queue(event)

    async def flush(self) -> None:
        """Store every queued event now (a process about to exit that runs no ``run``: the
        CLI); the StorageError of the first that fails, which stays queued with the rest."""
        while self._pending:
            await self._store(self._pending[0])
            self._pending.popleft()

    def _queue(self, event: OutboxEvent) -> None:
        if len(self._pending) >= self.max_pending:
            # The newest is dropped, not the oldest: the writer may be storing the head now.
            metrics.EVENTS_LOST.inc()
            log.error("event %s lost: %d events already wait for storage", event.id,
                      len(self._pending))  # fmt: skip
            return
        self._pending.append(event)
        self._pending_wake.set()

    async def _store(self, event: OutboxEvent) -> None:
        await self.storage.enqueue_event(event)
        metrics.EVENTS_QUEUED.inc()
        self._wake.set()

    async def _store_pending(self) -> None:
        """Write queued events to the outbox in order, retrying each until storage takes it
        (a repeated write is harmless: the outbox keeps one event per id)."""
        delay = 0.1
        while True:
            if not self._pending:
                self._pending_wake = trio.Event()
                await self._pending_wake.wait()
                continue
            event = self._pending[0]
            try:
                await self._store(event)
            except StorageError as exc:
                log.warning("event %s not stored (%s); %d waiting, next try in %.1fs", event.id,
                            exc, len(self._pending), delay)  # fmt: skip
                await trio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
                continue
            except Exception:
                # This task lives as long as the process, in its nursery: an exception escaping
                # it would end both. The event is dropped (retrying would fail the same way).
                metrics.BACKGROUND_TASK_ERRORS.labels("event").inc()
                metrics.EVENTS_LOST.inc()
                log.exception("event %s failed unexpectedly on its way to storage; lost", event.id)
            delay = 0.1
            self._pending.popleft()

    # ------------------------------------------------------------------ delivering

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept emits; take the delivery lease whenever it is free and deliver."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            if not self.enabled:
                await trio.sleep_forever()
            nursery.start_soon(self._store_pending)
            self._running = True
            try:
                await self._refresh_queued()
                while True:
                    try:
                        async with hold_lock(self.storage, LEASE, owner=make_owner_id(),
                                             ttl=self.lease_ttl, wait=0):  # fmt: skip
                            log.info("delivering events to %s", self.url)
                            await self._deliver_forever()
                    except LockLost:
                        log.warning("event delivery lease lost; another process delivers")
                    except Exception as exc:  # LockUnavailable, StorageError: retry later
                        log.debug("not delivering events now: %s", exc)
                    await trio.sleep(self.poll)
            finally:
                self._running = False

    async def _deliver_forever(self) -> None:
        client = self.http or httpx.AsyncClient(timeout=self.timeout)
        try:
            while True:
                self._wake = trio.Event()
                due = await self.storage.due_events(self.clock(), 100)
                for event in due:
                    await self._deliver(client, event)
                await self._refresh_queued()
                if len(due) < 100:
                    with trio.move_on_after(self.poll):
                        await self._wake.wait()
        finally:
            if self.http is None:
                await client.aclose()

    async def _deliver(self, client: httpx.AsyncClient, event: OutboxEvent) -> None:
        now = self.clock()
        if now - event.created_at > self.max_age:
            log.error("event %s undelivered after %.0f h: dropped", event.id, self.max_age / 3600)
            metrics.EVENTS_DROPPED.inc()
            await self.storage.delete_event(event.id)
            return
        assert self.url is not None
        headers = {"content-type": CONTENT_TYPE}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.secret, int(now), event.body)
        problem = None
        try:
            with trio.fail_after(self.timeout):
                resp = await client.post(self.url, content=event.body, headers=headers)
            if not 200 <= resp.status_code < 300:
                problem = f"answered {resp.status_code}"
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if problem is None:
            metrics.EVENTS_DELIVERED.inc()
            await self.storage.delete_event(event.id)
            return
        metrics.EVENTS_FAILED.inc()
        attempts = event.attempts + 1
        delay = retry_delay(attempts, self.retry_max)
        log.warning("event %s delivery %d failed (%s); next try in %.0fs", event.id, attempts,
                    problem, delay)  # fmt: skip
        await self.storage.update_event(
            OutboxEvent(event.id, event.body, event.created_at, attempts, now + delay)
        )

    async def _refresh_queued(self) -> None:
        try:
            metrics.EVENTS_QUEUED.set(await self.storage.count_events())
        except StorageError:
            pass
