"""``PostgresStorage``: the ``Storage`` protocol on a PostgreSQL database shared by replicas.

Owns its tables, the change notifications on one channel and the at-rest encryption of secret
values. It knows nothing of ACME, TLS or what a value means (a certificate is just bytes), and
nothing of configuration files: it is given a DSN and, optionally, an encryption key. This
module is the front: the pool, the worker-thread hop, errors, and handing each operation to the
module that owns its tables: ``values`` (values, quarantine, sealing), ``leases`` (leases bound
to a database session, challenges), ``registry`` (hostnames), ``queues`` (event outbox,
next-action index), ``schema`` (migrations), ``listener`` (the change channel and its LISTEN
thread) and ``target`` (the DSN). Each module's docstring says why it works as it does.

Theory of operation
-------------------
*Threads.* psycopg's async API is asyncio-only, so every public operation is one
``trio.to_thread.run_sync`` hop into blocking psycopg code, with a connection borrowed from a
``psycopg_pool.ConnectionPool`` (opened lazily on the first operation, closed by ``aclose``).
Connections are in autocommit mode: almost every operation is a single statement, which is a
transaction of its own, and the few that need more (migrations) open one explicitly. psycopg
errors become ``StorageError`` in ``_run`` only.

*Time.* Leases, challenges and ``modified`` use the injected clock, read on the event-loop thread
and passed to the database as a number (unix seconds in ``double precision`` columns), never the
database's ``now()``. All replicas must therefore have synchronised clocks (NTP), as they must
anyway for certificate validity. We chose this over database time because expiry is then
testable with a fake clock, and ``FileStorage`` behaves the same way.

*Outages.* Waiting for a connection is bounded by ``timeout`` (also libpq's connect timeout), so
with the database down an operation fails within seconds with a ``StorageError`` naming the
cause. The pool verifies each connection as it lends it and replaces broken ones, and gives up a
reconnection series after ``RECONNECT_TIMEOUT`` so the next operation starts a fresh attempt at
once: when the database is back, the same instance works again. The listener reconnects with
exponential backoff (``LISTENER_BACKOFF``). The DSN's password is never logged or put in errors.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import trio
from psycopg import sql

from edgeproxy.errors import StorageError
from edgeproxy.storage.base import (
    Capabilities,
    HostnameEntry,
    LockInfo,
    OutboxEvent,
    StoredItem,
    check_hostname_key,
    check_key,
)
from edgeproxy.storage.frontend import SharedMethods, check_limit, check_ttl
from edgeproxy.storage.postgres.leases import LeaseSession, LeaseTable
from edgeproxy.storage.postgres.listener import Channel, Listener
from edgeproxy.storage.postgres.queues import DueTable, OutboxTable
from edgeproxy.storage.postgres.registry import RegistryTable
from edgeproxy.storage.postgres.schema import MIGRATIONS, migrate, schema_version
from edgeproxy.storage.postgres.target import Target
from edgeproxy.storage.postgres.values import ValueTable
from edgeproxy.storage.sealing import Sealer, generate_encryption_key

__all__ = ["MIGRATIONS", "PostgresStorage", "generate_encryption_key"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class PostgresStorage(SharedMethods):
    """``Storage`` on PostgreSQL; see the module docstring for the schema and guarantees.

    One instance per process; any number of processes and replicas may share a database.
    ``timeout`` bounds connecting and waiting for a pooled connection (seconds).
    """

    #: Notification channel for changed keys under ``NOTIFY_PREFIXES``.
    CHANNEL = "edgeproxy_changes"
    NOTIFY_PREFIXES: tuple[str, ...] = ("certs/",)
    #: How long the pool keeps retrying a lost connection before leaving it to the next request.
    RECONNECT_TIMEOUT = 10.0
    #: Bound on any one statement (a safety net against a hung server; ours take milliseconds).
    STATEMENT_TIMEOUT = 30.0
    #: Listener reconnect backoff: first delay and cap (seconds).
    LISTENER_BACKOFF = (0.1, 5.0)
    #: How often the listener looks up from ``notifies()`` to see whether it should stop.
    LISTENER_POLL = 0.25
    #: After failing to open the lease session, take leases unbound for this long before
    #: trying again (each attempt may wait up to ``timeout``).
    SESSION_RETRY = 10.0
    #: Schema scripts this class applies (a subclass may extend it; tests do, to play upgrades).
    migrations: Sequence[str] = MIGRATIONS

    # The methods that only pass their arguments on are ``SharedMethods``'.
    _registry: RegistryTable
    _outbox: OutboxTable
    _due_index: DueTable

    def __init__(
        self,
        dsn: str,
        *,
        encryption_key: str | None = None,
        min_size: int = 1,
        max_size: int = 8,
        clock: Callable[[], float] = time.time,
        timeout: float = 5.0,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(
                f"need 0 <= min_size <= max_size, max_size >= 1 ({min_size=}, {max_size=})"
            )
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self._target = Target.parse(dsn, timeout)
        self.capabilities = Capabilities(upkeep=self, change_feed=self)
        self._min_size, self._max_size = min_size, max_size
        self._clock = clock
        self._timeout = timeout
        # Tells our own notifications apart from other replicas' (the pool's backends vary).
        self._channel = Channel(self.CHANNEL, secrets.token_hex(8), self.NOTIFY_PREFIXES)
        self._state_lock = threading.Lock()  # guards the fields below, across worker threads
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._schema_ready = False
        self._closed = False
        self._callbacks: builtins.list[Callable[[str], None]] = []
        self._listener: Listener | None = None
        sealer = Sealer(encryption_key) if encryption_key is not None else None
        self._values = ValueTable(sealer, self._channel)
        self._session = LeaseSession(self._target, self.SESSION_RETRY)
        self._leases = LeaseTable(self._session)
        self._registry = RegistryTable(self._channel)
        self._outbox = OutboxTable()
        self._due_index = DueTable()

    def __repr__(self) -> str:
        return f"PostgresStorage({self._target.description!r})"

    @property
    def listening(self) -> bool:
        """True while the change listener is connected and subscribed."""
        return self._listener is not None and self._listener.listening

    # -- the one place where psycopg errors become StorageError ---------------------------------

    async def _run(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        return await trio.to_thread.run_sync(self._call, op, fn, args)

    def _call(self, op: str, fn: Callable[..., _T], args: Sequence[object]) -> _T:
        """Worker thread: borrow a connection, run ``fn(conn, *args)``, map errors."""
        try:
            pool = self._ready_pool()
            with pool.connection() as conn:
                return fn(conn, *args)
        except psycopg_pool.PoolTimeout as exc:
            cause = self._probe()
            raise self._error(
                op, f"no database connection within {self._timeout:g}s ({cause})"
            ) from exc
        except psycopg_pool.PoolClosed as exc:
            raise self._error(op, "storage is closed") from exc
        except psycopg.Error as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise self._error(op, detail) from exc

    def _error(self, op: str, detail: str) -> StorageError:
        message = f"postgres storage: {op} failed ({self._target.description}): {detail}"
        return StorageError(self._target.scrub(message))

    def _probe(self) -> str:
        """Why no connection came: one direct attempt, whose error names the cause."""
        try:
            psycopg.connect(self._target.conninfo, connect_timeout=2).close()
        except psycopg.Error as exc:
            return " ".join(str(exc).split())
        return "the database accepts connections: the pool was busy or still reconnecting"

    def _ready_pool(self) -> psycopg_pool.ConnectionPool:
        with self._state_lock:
            if self._closed:
                raise psycopg_pool.PoolClosed("closed")
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self._target.conninfo,
                    kwargs={"autocommit": True},
                    min_size=self._min_size,
                    max_size=self._max_size,
                    open=False,
                    configure=self._configure,
                    check=psycopg_pool.ConnectionPool.check_connection,
                    timeout=self._timeout,
                    reconnect_timeout=self.RECONNECT_TIMEOUT,
                    name="edgeproxy-storage",
                )
                self._pool.open(wait=False)
            pool = self._pool
            ready = self._schema_ready
        if not ready:
            with pool.connection() as conn:
                migrate(conn, self.migrations, self._target.description)
            with self._state_lock:
                self._schema_ready = True
        return pool

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            sql.SQL("SET statement_timeout = {}").format(int(self.STATEMENT_TIMEOUT * 1000))
        )

    # -- schema ---------------------------------------------------------------------------------

    async def migrate(self) -> int:
        """Create or upgrade the schema now (it also happens on first use); the version after."""
        return await self._run("migrate", schema_version)

    # -- values ---------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        return await self._run("get", self._values.get, key)

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        check_key(key)
        await self._run("put", self._values.put, key, bytes(value), secret, self._clock())

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._run("delete", self._values.delete, key)

    async def list(self, prefix: str = "") -> builtins.list[StoredItem]:
        return await self._run("list", self._values.list, prefix)

    async def key_pages(self, prefix: str, page: int) -> AsyncGenerator[builtins.list[str], None]:
        check_limit(page)
        after = ""
        while True:
            keys = await self._run("key_pages", self._values.key_page, prefix, after, page)
            if keys:
                yield keys
            if len(keys) < page:
                return
            after = keys[-1]

    async def quarantine(self, key: str, reason: str) -> None:
        check_key(key)
        await self._run("quarantine", self._values.quarantine, key, reason, self._clock())

    # -- leases ---------------------------------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_key(name)
        check_ttl(ttl)
        now = self._clock()
        taken = await self._run("try_lock", self._leases.try_lock, name, owner, now, now + ttl)
        if taken is None:
            return False
        previous_owner, previous_expiry = taken
        if previous_owner is not None and previous_owner != owner and previous_expiry is not None:
            if previous_expiry > now:
                log.warning(
                    "lock %r: took over the lease of %r, whose database session ended",
                    name,
                    previous_owner,
                )
            else:
                log.warning(
                    "lock %r: took over the lease of %r, which expired %.0fs ago",
                    name,
                    previous_owner,
                    now - previous_expiry,
                )
        return True

    async def refresh_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_key(name)
        check_ttl(ttl)
        expires_at = self._clock() + ttl
        return await self._run("refresh_lock", self._leases.refresh, name, owner, expires_at)

    async def unlock(self, name: str, owner: str) -> None:
        check_key(name)
        await self._run("unlock", self._leases.unlock, name, owner)

    async def lock_info(self, name: str) -> LockInfo | None:
        check_key(name)
        return await self._run("lock_info", self._leases.lock_info, name)

    async def list_locks(self) -> builtins.list[LockInfo]:
        return await self._run("list_locks", self._leases.list_locks)

    # -- challenges -----------------------------------------------------------------------------

    async def put_challenge(self, name: str, key_authorization: str, ttl: float) -> None:
        check_key(name)
        check_ttl(ttl)
        expires_at = self._clock() + ttl
        await self._run(
            "put_challenge", self._leases.put_challenge, name, key_authorization, expires_at
        )

    async def get_challenge(self, name: str) -> str | None:
        check_key(name)
        return await self._run("get_challenge", self._leases.get_challenge, name, self._clock())

    async def delete_challenge(self, name: str) -> None:
        check_key(name)
        await self._run("delete_challenge", self._leases.delete_challenge, name)

    async def list_challenges(self) -> builtins.list[tuple[str, float]]:
        return await self._run("list_challenges", self._leases.list_challenges)

    # -- hostname registry ----------------------------------------------------------------------

    async def add_hostname(self, entry: HostnameEntry) -> tuple[HostnameEntry, bool]:
        check_hostname_key(entry.hostname)
        return await self._run("add_hostname", self._registry.add, entry)

    async def add_hostnames(
        self, entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        for entry in entries:
            check_hostname_key(entry.hostname)
        return await self._run("add_hostnames", self._registry.add_many, entries)

    async def get_hostname(self, hostname: str) -> HostnameEntry | None:
        check_hostname_key(hostname)
        return await self._run("get_hostname", self._registry.get, hostname)

    async def update_hostname(self, entry: HostnameEntry) -> bool:
        check_hostname_key(entry.hostname)
        return await self._run("update_hostname", self._registry.update, entry)

    async def remove_hostname(self, hostname: str, at: float) -> HostnameEntry | None:
        check_hostname_key(hostname)
        return await self._run("remove_hostname", self._registry.remove, hostname, at)

    async def purge_hostname(self, hostname: str, removed_before: float) -> bool:
        check_hostname_key(hostname)
        return await self._run("purge_hostname", self._registry.purge, hostname, removed_before)

    # -- event outbox ---------------------------------------------------------------------------

    async def enqueue_event(self, event: OutboxEvent) -> None:
        check_hostname_key(event.id)
        await self._run("enqueue_event", self._outbox.enqueue, event)

    async def update_event(self, event: OutboxEvent) -> None:
        await self._run("update_event", self._outbox.update, event)

    async def delete_event(self, event_id: str) -> None:
        await self._run("delete_event", self._outbox.delete, event_id)

    # -- change notifications -------------------------------------------------------------------

    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(key)`` on this trio thread whenever *another* process (or instance)
        stores, deletes or quarantines a key under ``NOTIFY_PREFIXES``.

        Must be called from within trio; the first call starts the listener thread, which
        ``aclose`` stops. A callback that raises is logged and does not stop the others.
        """
        token = trio.lowlevel.current_trio_token()
        with self._state_lock:
            if self._closed:
                raise StorageError("postgres storage: on_change after aclose")
            self._callbacks.append(callback)
            if self._listener is None:
                self._listener = Listener(
                    self._channel,
                    self._listener_connect,
                    self._dispatch,
                    self._target,
                    backoff=self.LISTENER_BACKOFF,
                    poll=self.LISTENER_POLL,
                    token=token,
                )
                self._listener.start()

    def _dispatch(self, key: str) -> None:
        """Trio thread: hand ``key`` to every callback."""
        for callback in builtins.list(self._callbacks):
            try:
                callback(key)
            except Exception:
                log.exception("on_change callback %r failed for key %r", callback, key)

    # -- maintenance (``edgeproxy storage check/clean``; not part of ``Storage``) ---------------

    async def check(self) -> builtins.list[str]:
        """Problems found, one line each; an empty list means healthy. Changes nothing."""
        return await self._run("check", self._check_sync, self._clock())

    async def clean(self, *, now: float | None = None) -> builtins.list[str]:
        """Remove expired leases and expired challenges; say what went.

        Certificates are not pruned here (that is the certificate manager's call), nor is the
        quarantine (someone should look at it first). ``now`` overrides the clock.
        """
        return await self._run("clean", self._clean_sync, self._clock() if now is None else now)

    async def aclose(self) -> None:
        """Stop the listener and close the pool; later operations raise ``StorageError``."""
        with self._state_lock:
            self._closed = True
            pool, self._pool = self._pool, None
            listener, self._listener = self._listener, None
        session = self._session.close()
        if session is not None:
            await trio.to_thread.run_sync(session.close)
        if listener is not None:
            listener.stop_soon()
            await trio.to_thread.run_sync(listener.join)
        if pool is not None:
            await trio.to_thread.run_sync(pool.close)

    # -- maintenance (worker thread) ---------------------------------------------------------

    def _check_sync(self, conn: psycopg.Connection[Any], now: float) -> builtins.list[str]:
        problems: builtins.list[str] = []
        version = schema_version(conn)
        if version > len(self.migrations):
            problems.append(
                f"database schema version {version} is newer than this edgeproxy knows "
                f"({len(self.migrations)}): upgrade this replica"
            )
        problems.extend(self._leases.problems(conn, now))
        problems.extend(self._values.encryption_problems(conn))
        return problems

    def _clean_sync(self, conn: psycopg.Connection[Any], now: float) -> builtins.list[str]:
        return self._leases.clean(conn, now)

    # -- for the listener (its own thread) ------------------------------------------------------

    def _listener_connect(self) -> psycopg.Connection[Any]:
        self._ready_pool()  # the schema must exist before the catch-up query
        return psycopg.connect(self._target.listener_conninfo, autocommit=True)
