"""``PostgresStorage``: the ``Storage`` protocol on a PostgreSQL database shared by replicas.

Owns its tables, the change notifications on one channel and the at-rest encryption of secret
values. It knows nothing of ACME, TLS or what a value means (a certificate is just bytes), and
nothing of configuration files: it is given a DSN and, optionally, an encryption key.

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

*Leases.* ``try_lock`` is a single ``INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE`` the
current lease expired or is ours. PostgreSQL runs an upsert on one row atomically: a racer blocks
on the row until the first commits, then re-evaluates the ``WHERE`` against the new row, so two
replicas can never both win. ``refresh_lock`` and ``unlock`` only touch a row the caller owns.

*Leases bound to their holder's session.* Each instance keeps one dedicated connection (the
"session", ``<application_name>-leases`` in ``pg_stat_activity``) holding a session-level
advisory lock on a random key, and every lease it takes records that key and its owner
(``session_key``, ``session_owner``). A replica that dies takes its session with it (the
server sees the socket close), and with it the advisory lock: ``try_lock`` also takes over an
unexpired lease whose recorded session no longer holds its lock in ``pg_locks``. So a dead
replica's leases free within moments, not after ``lock_ttl``. A lease is vouched for only while
the session that took it lives: ``refresh_lock`` reports a lease lost once our session broke
(another replica may already have taken it). ``session_owner`` must equal ``owner`` for the
binding to count, so a row overwritten by an older replica that knows nothing of sessions falls
back to expiry. Expiry stays the safety net for a holder that hangs (or whose host vanished
without closing its sockets) while its session lingers. If the session cannot be opened (say
the server's connection limit is reached), leases are taken unbound and expire as before.

*Schema.* Created and migrated on first use. ``MIGRATIONS`` is an append-only list of SQL
scripts; ``edgeproxy_schema_version`` holds how many have run. All pending ones run in one
transaction under ``pg_advisory_xact_lock``, so replicas starting together apply each exactly
once, and a failed migration leaves nothing half-done. Migrations must stay additive (new tables,
new nullable columns): during a rolling upgrade older replicas keep running on the newer schema
(they log a warning; ``check`` reports it). Tables are prefixed ``edgeproxy_`` (``values`` is an
SQL keyword, and the prefix lets edgeproxy share a database with other applications) and are
unqualified, so the DSN's ``search_path`` (e.g. ``options=-csearch_path=edge``) picks the schema.

*Encryption at rest* (only when an ``encryption_key`` is given). Values stored with
``secret=True`` are sealed with AES-256-GCM (``sealing``: format, key id, associated data); the
row's ``encrypted`` flag says so. A value that does not open raises ``CorruptRecord`` (wrong
key?), as does an encrypted value read without a key. Non-secret values, and secret ones
stored while no key was configured, are stored as they are (``check`` lists the latter). Values
are never logged.

*Change notifications.* Putting, deleting or quarantining a key under ``NOTIFY_PREFIXES``
(``certs/``) sends ``pg_notify(CHANNEL, "<instance id> <rev> <key>")`` in the same statement, so
listeners hear of it exactly when it commits. ``rev`` comes from a sequence every write advances
(0 for removals). ``on_change`` starts a listener thread with its own autocommit connection that
``LISTEN``s, polls ``notifies()`` with a short timeout (so ``aclose`` can stop it) and hands each
foreign key to the callbacks on the trio thread. Notifications sent while the listener was
disconnected are lost, so after a reconnect it replays the keys whose ``rev`` is newer than the
last one it saw (our own writes included: the table does not say who wrote a row, and a spare
callback only drops a cache entry). Removals missed that way are not replayed: a deleted
certificate stays cached until evicted, which is harmless since it is still valid.

*Hostname registry.* One row per hostname; listing is keyset paging on the primary key
(``hostname > after ORDER BY hostname LIMIT n``), so every page costs one index range scan
however deep it is. Each change bumps the row's ``rev`` and sends ``hostnames/<name>`` on the
change channel in the same statement. ``hostname_changes`` returns the rows whose ``rev`` is
newer than the caller's marker. Sequence values are handed out before commit, so a slow writer
can commit a smaller ``rev`` after a reader moved past it: the notification, sent at commit,
names that entry anyway, and the registry mirror resynchronises in full now and then.

*Outages.* Waiting for a connection is bounded by ``timeout`` (also libpq's connect timeout), so
with the database down an operation fails within seconds with a ``StorageError`` naming the
cause. The pool verifies each connection as it lends it and replaces broken ones, and gives up a
reconnection series after ``RECONNECT_TIMEOUT`` so the next operation starts a fresh attempt at
once: when the database is back, the same instance works again. The listener reconnects with
exponential backoff (``LISTENER_BACKOFF``). The DSN's password is never logged or put in errors.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from edgeproxy.errors import CorruptRecord, StorageError
from edgeproxy.storage.base import (
    DueEntry,
    HostnameEntry,
    LockInfo,
    OutboxEvent,
    StoredItem,
    check_hostname_key,
    check_key,
)
from edgeproxy.storage.sealing import KEY_ID_LEN as _KEY_ID_LEN
from edgeproxy.storage.sealing import Sealer as _Sealer
from edgeproxy.storage.sealing import generate_encryption_key

__all__ = ["MIGRATIONS", "PostgresStorage", "generate_encryption_key"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The schema, one script per version; append only (see "Schema" above).
MIGRATIONS: tuple[str, ...] = (
    # 1: values, leases, challenges, quarantine.
    """
    CREATE SEQUENCE edgeproxy_values_rev;
    CREATE TABLE edgeproxy_values (
        key        text COLLATE "C" PRIMARY KEY,
        value      bytea NOT NULL,
        size       integer NOT NULL,          -- length before encryption
        secret     boolean NOT NULL,
        encrypted  boolean NOT NULL,
        modified   double precision NOT NULL, -- unix time, injected clock
        rev        bigint NOT NULL DEFAULT nextval('edgeproxy_values_rev')
    );
    CREATE INDEX edgeproxy_values_rev_idx ON edgeproxy_values (rev);
    CREATE TABLE edgeproxy_locks (
        name        text COLLATE "C" PRIMARY KEY,
        owner       text NOT NULL,
        expires_at  double precision NOT NULL,
        created_at  double precision NOT NULL
    );
    CREATE TABLE edgeproxy_challenges (
        name               text COLLATE "C" PRIMARY KEY,
        key_authorization  text NOT NULL,
        expires_at         double precision NOT NULL
    );
    CREATE TABLE edgeproxy_quarantine (
        id         bigserial PRIMARY KEY,
        key        text COLLATE "C" NOT NULL,
        value      bytea NOT NULL,
        secret     boolean NOT NULL,
        encrypted  boolean NOT NULL,
        reason     text NOT NULL,
        at         double precision NOT NULL
    );
    """,
    # 2: the hostname registry. The primary key's index serves keyset paging by hostname;
    # ``rev`` (advanced by every change) feeds ``hostname_changes``.
    """
    CREATE SEQUENCE edgeproxy_hostnames_rev;
    CREATE TABLE edgeproxy_hostnames (
        hostname    text COLLATE "C" PRIMARY KEY,
        upstream    text,
        metadata    text NOT NULL,
        created_at  double precision NOT NULL,
        removed_at  double precision,
        rev         bigint NOT NULL DEFAULT nextval('edgeproxy_hostnames_rev')
    );
    CREATE INDEX edgeproxy_hostnames_rev_idx ON edgeproxy_hostnames (rev);
    """,
    # 3: leases bound to the holder's database session (see "Leases bound to ..." above).
    """
    ALTER TABLE edgeproxy_locks ADD COLUMN session_key integer;
    ALTER TABLE edgeproxy_locks ADD COLUMN session_owner text;
    """,
    # 4: the event outbox; ids sort by creation time.
    """
    CREATE TABLE edgeproxy_events (
        id            text COLLATE "C" PRIMARY KEY,
        body          bytea NOT NULL,
        created_at    double precision NOT NULL,
        attempts      integer NOT NULL DEFAULT 0,
        next_attempt  double precision NOT NULL
    );
    CREATE INDEX edgeproxy_events_due_idx ON edgeproxy_events (next_attempt);
    """,
    # 5: the next-action index: one time per managed name; maintenance reads the due ones
    # through the index on ``at``, never the whole table.
    """
    CREATE TABLE edgeproxy_due (
        name  text COLLATE "C" PRIMARY KEY,
        at    double precision NOT NULL
    );
    CREATE INDEX edgeproxy_due_at_idx ON edgeproxy_due (at);
    """,
)

# Taken by every migrating replica; any constant works as long as it is ours alone.
_MIGRATION_LOCK_ID = int.from_bytes(
    hashlib.sha256(b"edgeproxy schema migrations").digest()[:8], "big", signed=True
)

# First key of the two-key advisory locks that mark live lease sessions (the second is random
# per session); kept positive, as pg_locks shows both keys as oids.
_SESSION_LOCK_CLASS = (
    int.from_bytes(hashlib.sha256(b"edgeproxy lease sessions").digest()[:4], "big") & 0x7FFFFFFF
)

# True when the lease row ``l`` is bound to a session that has ended.
_SESSION_GONE = """
    l.session_key IS NOT NULL AND l.session_owner = l.owner AND NOT EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 2
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND classid = %(session_class)s::oid AND objid = l.session_key::oid
    )
"""

_CREATE_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS edgeproxy_schema_version (
        singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version    integer NOT NULL
    );
    INSERT INTO edgeproxy_schema_version (version) VALUES (0) ON CONFLICT DO NOTHING;
"""

# -- connection parameters ---------------------------------------------------------------------

# Filled in unless the DSN sets them: a dead peer must be noticed, and sessions identifiable.
_CONNECTION_DEFAULTS = {
    "application_name": "edgeproxy",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
_DESCRIBED_PARAMS = ("host", "hostaddr", "port", "dbname", "user")


@dataclass(frozen=True, slots=True)
class _Target:
    conninfo: str  # with the password: handed to libpq only
    listener_conninfo: str  # the same, named "<application_name>-listener" in pg_stat_activity
    session_conninfo: str  # the same, named "<application_name>-leases"
    description: str  # without it: for logs, errors and repr
    password: str | None

    @classmethod
    def parse(cls, dsn: str, connect_timeout: float) -> _Target:
        try:
            parsed = conninfo_to_dict(dsn)
        except psycopg.Error:
            # The parser's message quotes the DSN, password included; keep it out.
            raise ValueError("invalid PostgreSQL DSN (not shown: it may hold a password)") from None
        params = {key: str(value) for key, value in parsed.items() if value is not None}
        for key, value in _CONNECTION_DEFAULTS.items():
            params.setdefault(key, value)
        # libpq's connect_timeout is whole seconds and treats anything below 2 as 2.
        params.setdefault("connect_timeout", str(max(2, math.ceil(connect_timeout))))
        described = " ".join(f"{k}={params[k]}" for k in _DESCRIBED_PARAMS if k in params)
        listener = {**params, "application_name": params["application_name"] + "-listener"}
        session = {**params, "application_name": params["application_name"] + "-leases"}
        return cls(
            conninfo=make_conninfo("", **params),
            listener_conninfo=make_conninfo("", **listener),
            session_conninfo=make_conninfo("", **session),
            description=described or "(libpq defaults)",
            password=params.get("password"),
        )

    def scrub(self, text: str) -> str:
        """``text`` with the password blanked, should libpq ever quote it."""
        return text.replace(self.password, "***") if self.password else text


# -- the storage -------------------------------------------------------------------------------


class PostgresStorage:
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
        self._target = _Target.parse(dsn, timeout)
        self._sealer = _Sealer(encryption_key) if encryption_key is not None else None
        self._min_size, self._max_size = min_size, max_size
        self._clock = clock
        self._timeout = timeout
        # Tells our own notifications apart from other replicas' (the pool's backends vary).
        self._instance = secrets.token_hex(8)
        self._state_lock = threading.Lock()  # guards the fields below, across worker threads
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._schema_ready = False
        self._closed = False
        self._callbacks: builtins.list[Callable[[str], None]] = []
        self._listener: _Listener | None = None
        # The lease session (see "Leases bound to ..."): connection, its advisory-lock key, and
        # when to try again after a failed open. Its own lock: opening may take ``timeout``.
        self._session_lock = threading.Lock()
        self._session: psycopg.Connection[Any] | None = None
        self._session_key: int | None = None
        self._session_retry_at = 0.0

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
                self._migrate_sync(conn)
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
        return await self._run("migrate", self._schema_version_sync)

    def _schema_version_sync(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT version FROM edgeproxy_schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate_sync(self, conn: psycopg.Connection[Any]) -> None:
        latest = len(self.migrations)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
            conn.execute(_CREATE_VERSION_TABLE)
            version = self._schema_version_sync(conn)
            for number in range(version, latest):
                conn.execute(self.migrations[number])  # scripts hold no parameters
            if version < latest:
                conn.execute("UPDATE edgeproxy_schema_version SET version = %s", (latest,))
        if version < latest:
            log.info(
                "postgres storage schema migrated from version %d to %d (%s)",
                version,
                latest,
                self._target.description,
            )
        elif version > latest:
            log.warning(
                "postgres storage schema is at version %d, newer than this edgeproxy knows (%d); "
                "carrying on (migrations are additive), but upgrade this replica",
                version,
                latest,
            )

    # -- values ---------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        return await self._run("get", self._get_sync, key)

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        check_key(key)
        await self._run("put", self._put_sync, key, bytes(value), secret, self._clock())

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._run("delete", self._delete_sync, key)

    async def list(self, prefix: str = "") -> builtins.list[StoredItem]:
        return await self._run("list", self._list_sync, prefix)

    async def quarantine(self, key: str, reason: str) -> None:
        check_key(key)
        await self._run("quarantine", self._quarantine_sync, key, reason, self._clock())

    # -- leases ---------------------------------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_key(name)
        _check_ttl(ttl)
        now = self._clock()
        taken = await self._run("try_lock", self._try_lock_sync, name, owner, now, now + ttl)
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
        _check_ttl(ttl)
        expires_at = self._clock() + ttl
        return await self._run("refresh_lock", self._refresh_sync, name, owner, expires_at)

    async def unlock(self, name: str, owner: str) -> None:
        check_key(name)
        await self._run("unlock", self._unlock_sync, name, owner)

    async def lock_info(self, name: str) -> LockInfo | None:
        check_key(name)
        return await self._run("lock_info", self._lock_info_sync, name)

    async def list_locks(self) -> builtins.list[LockInfo]:
        return await self._run("list_locks", self._list_locks_sync)

    # -- challenges -----------------------------------------------------------------------------

    async def put_challenge(self, name: str, key_authorization: str, ttl: float) -> None:
        check_key(name)
        _check_ttl(ttl)
        expires_at = self._clock() + ttl
        await self._run(
            "put_challenge", self._put_challenge_sync, name, key_authorization, expires_at
        )

    async def get_challenge(self, name: str) -> str | None:
        check_key(name)
        return await self._run("get_challenge", self._get_challenge_sync, name, self._clock())

    async def delete_challenge(self, name: str) -> None:
        check_key(name)
        await self._run("delete_challenge", self._delete_challenge_sync, name)

    async def list_challenges(self) -> builtins.list[tuple[str, float]]:
        return await self._run("list_challenges", self._list_challenges_sync)

    # -- hostname registry ----------------------------------------------------------------------

    async def add_hostname(self, entry: HostnameEntry) -> tuple[HostnameEntry, bool]:
        check_hostname_key(entry.hostname)
        return await self._run("add_hostname", self._add_hostname_sync, entry)

    async def add_hostnames(
        self, entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        for entry in entries:
            check_hostname_key(entry.hostname)
        return await self._run("add_hostnames", self._add_hostnames_sync, entries)

    async def get_hostname(self, hostname: str) -> HostnameEntry | None:
        check_hostname_key(hostname)
        return await self._run("get_hostname", self._get_hostname_sync, hostname)

    async def update_hostname(self, entry: HostnameEntry) -> bool:
        check_hostname_key(entry.hostname)
        return await self._run("update_hostname", self._update_hostname_sync, entry)

    async def remove_hostname(self, hostname: str, at: float) -> HostnameEntry | None:
        check_hostname_key(hostname)
        return await self._run("remove_hostname", self._remove_hostname_sync, hostname, at)

    async def purge_hostname(self, hostname: str, removed_before: float) -> bool:
        check_hostname_key(hostname)
        return await self._run(
            "purge_hostname", self._purge_hostname_sync, hostname, removed_before
        )

    async def list_hostnames(
        self, *, after: str | None = None, limit: int = 100
    ) -> builtins.list[HostnameEntry]:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit!r}")
        return await self._run("list_hostnames", self._list_hostnames_sync, after, limit)

    async def hostname_changes(self, since: str | None) -> tuple[str, builtins.list[str] | None]:
        return await self._run("hostname_changes", self._hostname_changes_sync, since)

    # -- event outbox ---------------------------------------------------------------------------

    async def enqueue_event(self, event: OutboxEvent) -> None:
        check_hostname_key(event.id)
        await self._run("enqueue_event", self._enqueue_event_sync, event)

    async def due_events(self, now: float, limit: int) -> builtins.list[OutboxEvent]:
        return await self._run("due_events", self._due_events_sync, now, limit)

    async def update_event(self, event: OutboxEvent) -> None:
        await self._run("update_event", self._update_event_sync, event)

    async def delete_event(self, event_id: str) -> None:
        await self._run("delete_event", self._delete_event_sync, event_id)

    async def count_events(self) -> int:
        return await self._run("count_events", self._count_events_sync)

    def _enqueue_event_sync(self, conn: psycopg.Connection[Any], event: OutboxEvent) -> None:
        conn.execute(
            "INSERT INTO edgeproxy_events (id, body, created_at, attempts, next_attempt) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (event.id, event.body, event.created_at, event.attempts, event.next_attempt),
        )

    def _due_events_sync(
        self, conn: psycopg.Connection[Any], now: float, limit: int
    ) -> builtins.list[OutboxEvent]:
        rows = conn.execute(
            "SELECT id, body, created_at, attempts, next_attempt FROM edgeproxy_events "
            "WHERE next_attempt <= %s ORDER BY id LIMIT %s",
            (now, limit),
        ).fetchall()
        return [OutboxEvent(str(r[0]), bytes(r[1]), float(r[2]), int(r[3]), float(r[4]))
                for r in rows]  # fmt: skip

    def _update_event_sync(self, conn: psycopg.Connection[Any], event: OutboxEvent) -> None:
        conn.execute(
            "UPDATE edgeproxy_events SET attempts = %s, next_attempt = %s WHERE id = %s",
            (event.attempts, event.next_attempt, event.id),
        )

    def _delete_event_sync(self, conn: psycopg.Connection[Any], event_id: str) -> None:
        conn.execute("DELETE FROM edgeproxy_events WHERE id = %s", (event_id,))

    def _count_events_sync(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT count(*) FROM edgeproxy_events").fetchone()
        return int(row[0]) if row else 0

    # -- next-action index ----------------------------------------------------------------------

    async def set_due(self, name: str, at: float) -> None:
        check_hostname_key(name)
        await self._run("set_due", self._set_due_sync, name, float(at))

    async def due_names(self, until: float, limit: int) -> builtins.list[DueEntry]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit!r}")
        return await self._run("due_names", self._due_names_sync, until, limit)

    async def clear_due(self, name: str) -> None:
        check_hostname_key(name)
        await self._run("clear_due", self._clear_due_sync, name)

    async def scheduled_names(self) -> builtins.list[str]:
        return await self._run("scheduled_names", self._scheduled_names_sync)

    def _set_due_sync(self, conn: psycopg.Connection[Any], name: str, at: float) -> None:
        conn.execute(
            "INSERT INTO edgeproxy_due (name, at) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET at = EXCLUDED.at",
            (name, at),
        )

    def _due_names_sync(
        self, conn: psycopg.Connection[Any], until: float, limit: int
    ) -> builtins.list[DueEntry]:
        rows = conn.execute(
            "SELECT name, at FROM edgeproxy_due WHERE at <= %s ORDER BY at, name LIMIT %s",
            (until, limit),
        ).fetchall()
        return [DueEntry(str(r[0]), float(r[1])) for r in rows]

    def _clear_due_sync(self, conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute("DELETE FROM edgeproxy_due WHERE name = %s", (name,))

    def _scheduled_names_sync(self, conn: psycopg.Connection[Any]) -> builtins.list[str]:
        rows = conn.execute("SELECT name FROM edgeproxy_due ORDER BY name").fetchall()
        return [str(r[0]) for r in rows]

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
                self._listener = _Listener(self, token)
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
        with self._session_lock:
            session, self._session, self._session_key = self._session, None, None
        if session is not None:
            await trio.to_thread.run_sync(session.close)
        if listener is not None:
            listener.stop_soon()
            await trio.to_thread.run_sync(listener.join)
        if pool is not None:
            await trio.to_thread.run_sync(pool.close)

    # -- blocking primitives (worker thread only) -----------------------------------------------

    def _notifies(self, key: str) -> bool:
        return key.startswith(self.NOTIFY_PREFIXES)

    def _get_sync(self, conn: psycopg.Connection[Any], key: str) -> bytes | None:
        row = conn.execute(
            "SELECT value, encrypted FROM edgeproxy_values WHERE key = %s", (key,)
        ).fetchone()
        if row is None:
            return None
        value, encrypted = bytes(row[0]), bool(row[1])
        if not encrypted:
            return value
        if self._sealer is None:
            raise CorruptRecord(
                f"value {key!r} is encrypted at rest but no encryption key is configured"
            )
        return self._sealer.open(key, value)

    def _put_sync(
        self, conn: psycopg.Connection[Any], key: str, value: bytes, secret: bool, now: float
    ) -> None:
        encrypted = secret and self._sealer is not None
        stored = self._sealer.seal(key, value) if encrypted and self._sealer else value
        params = {
            "key": key,
            "value": stored,
            "size": len(value),
            "secret": secret,
            "encrypted": encrypted,
            "modified": now,
            "channel": self.CHANNEL,
            "instance": self._instance,
        }
        upsert = """
            INSERT INTO edgeproxy_values AS v (key, value, size, secret, encrypted, modified)
            VALUES (%(key)s, %(value)s, %(size)s, %(secret)s, %(encrypted)s, %(modified)s)
            ON CONFLICT (key) DO UPDATE SET
                value = EXCLUDED.value, size = EXCLUDED.size, secret = EXCLUDED.secret,
                encrypted = EXCLUDED.encrypted, modified = EXCLUDED.modified,
                rev = nextval('edgeproxy_values_rev')
        """
        if not self._notifies(key):
            conn.execute(upsert, params)
            return
        # One statement: the notification is sent exactly when the new value commits.
        conn.execute(
            f"""
            WITH up AS ({upsert} RETURNING v.key, v.rev)
            SELECT pg_notify(%(channel)s, %(instance)s || ' ' || up.rev || ' ' || up.key) FROM up
            """,
            params,
        )

    def _removal(
        self, conn: psycopg.Connection[Any], steps: str, params: dict[str, object]
    ) -> None:
        """Run ``WITH {steps}``, whose last step ``gone`` returns the key if one was removed.

        The notification rides in the same statement (a data-modifying ``WITH`` may not nest,
        hence steps rather than a statement to wrap).
        """
        key = params["key"]
        assert isinstance(key, str)
        if self._notifies(key):
            tail = "SELECT pg_notify(%(channel)s, %(instance)s || ' 0 ' || gone.key) FROM gone"
            params = {**params, "channel": self.CHANNEL, "instance": self._instance}
        else:
            tail = "SELECT count(*) FROM gone"
        conn.execute(f"WITH {steps} {tail}", params)

    def _delete_sync(self, conn: psycopg.Connection[Any], key: str) -> None:
        steps = "gone AS (DELETE FROM edgeproxy_values WHERE key = %(key)s RETURNING key)"
        self._removal(conn, steps, {"key": key})

    def _quarantine_sync(
        self, conn: psycopg.Connection[Any], key: str, reason: str, now: float
    ) -> None:
        # Moved in one statement: the value is never both visible and quarantined, nor lost.
        steps = """
            moved AS (DELETE FROM edgeproxy_values WHERE key = %(key)s
                      RETURNING key, value, secret, encrypted),
            gone AS (INSERT INTO edgeproxy_quarantine (key, value, secret, encrypted, reason, at)
                     SELECT key, value, secret, encrypted, %(reason)s, %(at)s FROM moved
                     RETURNING key)
        """
        self._removal(conn, steps, {"key": key, "reason": reason, "at": now})

    def _list_sync(self, conn: psycopg.Connection[Any], prefix: str) -> builtins.list[StoredItem]:
        rows = conn.execute(
            "SELECT key, modified, size FROM edgeproxy_values WHERE starts_with(key, %s) "
            "ORDER BY key",
            (prefix,),
        ).fetchall()
        return [StoredItem(key, float(modified), int(size)) for key, modified, size in rows]

    def _lease_session(self) -> int | None:
        """Our live lease session's advisory-lock key, opening the session if needed; None
        when there is none to be had (leases are then taken unbound)."""
        with self._session_lock:
            if self._session is not None:
                try:
                    self._session.execute("SELECT 1")
                    return self._session_key
                except psycopg.Error:
                    # Leases bound to the old session may already be someone else's; their
                    # refresh says so. New ones bind to a new session.
                    log.warning("postgres storage: lease session lost; opening a new one")
                    self._session.close()
                    self._session, self._session_key = None, None
            if self._closed or time.monotonic() < self._session_retry_at:
                return None
            try:
                session = psycopg.connect(self._target.session_conninfo, autocommit=True)
                try:
                    for _ in range(8):  # a clash with a live session's key is 1 in 2**31
                        key = 1 + secrets.randbelow(0x7FFFFFFF)
                        row = session.execute(
                            "SELECT pg_try_advisory_lock(%s, %s)", (_SESSION_LOCK_CLASS, key)
                        ).fetchone()
                        if row is not None and row[0]:
                            self._session, self._session_key = session, key
                            return key
                finally:
                    if self._session is not session:
                        session.close()
            except psycopg.Error as exc:
                detail = self._target.scrub(" ".join(str(exc).split()))
                log.warning(
                    "postgres storage: no lease session (%s); leases taken in the next %gs "
                    "free only at expiry if this replica dies",
                    detail,
                    self.SESSION_RETRY,
                )
            self._session_retry_at = time.monotonic() + self.SESSION_RETRY
            return None

    def _try_lock_sync(
        self, conn: psycopg.Connection[Any], name: str, owner: str, now: float, expires_at: float
    ) -> tuple[str | None, float | None] | None:
        """None if held by someone else; else the previous (owner, expiry), for the log line.

        ``prev`` is read from the statement's snapshot, so under a race it may name an older
        holder than the row actually replaced; it feeds the log line only, never the decision.
        """
        session_key = self._lease_session()
        row = conn.execute(
            """
            WITH prev AS (SELECT owner, expires_at FROM edgeproxy_locks WHERE name = %(name)s)
            INSERT INTO edgeproxy_locks AS l
                (name, owner, expires_at, created_at, session_key, session_owner)
            VALUES (%(name)s, %(owner)s, %(expires_at)s, %(now)s, %(session_key)s, %(owner)s)
            ON CONFLICT (name) DO UPDATE SET
                owner = EXCLUDED.owner,
                expires_at = EXCLUDED.expires_at,
                created_at = CASE WHEN l.owner = EXCLUDED.owner
                                  THEN l.created_at ELSE EXCLUDED.created_at END,
                session_key = EXCLUDED.session_key,
                session_owner = EXCLUDED.session_owner
            WHERE l.expires_at <= %(now)s OR l.owner = EXCLUDED.owner OR """
            + _SESSION_GONE
            + """
            RETURNING (SELECT owner FROM prev), (SELECT expires_at FROM prev)
            """,
            {
                "name": name,
                "owner": owner,
                "now": now,
                "expires_at": expires_at,
                "session_key": session_key,
                "session_class": _SESSION_LOCK_CLASS,
            },
        ).fetchone()
        if row is None:
            return None
        return (row[0], None if row[1] is None else float(row[1]))

    def _refresh_sync(
        self, conn: psycopg.Connection[Any], name: str, owner: str, expires_at: float
    ) -> bool:
        # Still ours even if past expiry: nobody took it over, so extending it is safe.
        row = conn.execute(
            "UPDATE edgeproxy_locks SET expires_at = %s WHERE name = %s AND owner = %s "
            "RETURNING session_key",
            (expires_at, name, owner),
        ).fetchone()
        if row is None:
            return False
        # Bound to a session: ours only while that session still lives (else another replica
        # may take it over any moment, or already has and lost it again).
        return row[0] is None or row[0] == self._lease_session()

    def _unlock_sync(self, conn: psycopg.Connection[Any], name: str, owner: str) -> None:
        conn.execute("DELETE FROM edgeproxy_locks WHERE name = %s AND owner = %s", (name, owner))

    def _lock_info_sync(self, conn: psycopg.Connection[Any], name: str) -> LockInfo | None:
        row = conn.execute(
            "SELECT owner, expires_at FROM edgeproxy_locks WHERE name = %s", (name,)
        ).fetchone()
        return None if row is None else LockInfo(name, row[0], float(row[1]))

    def _list_locks_sync(self, conn: psycopg.Connection[Any]) -> builtins.list[LockInfo]:
        rows = conn.execute(
            "SELECT name, owner, expires_at FROM edgeproxy_locks ORDER BY name"
        ).fetchall()
        return [LockInfo(name, owner, float(expires_at)) for name, owner, expires_at in rows]

    def _put_challenge_sync(
        self, conn: psycopg.Connection[Any], name: str, key_authorization: str, expires_at: float
    ) -> None:
        conn.execute(
            """
            INSERT INTO edgeproxy_challenges (name, key_authorization, expires_at)
            VALUES (%s, %s, %s)
            ON CONFLICT (name) DO UPDATE SET
                key_authorization = EXCLUDED.key_authorization, expires_at = EXCLUDED.expires_at
            """,
            (name, key_authorization, expires_at),
        )

    def _get_challenge_sync(
        self, conn: psycopg.Connection[Any], name: str, now: float
    ) -> str | None:
        row = conn.execute(
            "SELECT key_authorization FROM edgeproxy_challenges "
            "WHERE name = %s AND expires_at > %s",
            (name, now),
        ).fetchone()
        return None if row is None else str(row[0])

    def _delete_challenge_sync(self, conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute("DELETE FROM edgeproxy_challenges WHERE name = %s", (name,))

    def _list_challenges_sync(
        self, conn: psycopg.Connection[Any]
    ) -> builtins.list[tuple[str, float]]:
        rows = conn.execute(
            "SELECT name, expires_at FROM edgeproxy_challenges ORDER BY name"
        ).fetchall()
        return [(name, float(expires_at)) for name, expires_at in rows]

    # hostname registry: every changing statement returns the row and notifies in one go.
    _ENTRY_COLUMNS = "hostname, upstream, metadata, created_at, removed_at"

    def _changed(
        self, conn: psycopg.Connection[Any], change: str, params: dict[str, object]
    ) -> HostnameEntry | None:
        """Run ``change`` (a data-modifying statement returning ``_ENTRY_COLUMNS``) and notify
        ``hostnames/<name>`` when it touched a row; the returned entry."""
        row = conn.execute(
            f"""
            WITH ch AS ({change})
            SELECT ch.*, pg_notify(%(channel)s, %(instance)s || ' 0 hostnames/' || ch.hostname)
            FROM ch
            """,
            {**params, "channel": self.CHANNEL, "instance": self._instance},
        ).fetchone()
        return None if row is None else _entry(row[:5])

    def _add_hostname_sync(
        self, conn: psycopg.Connection[Any], entry: HostnameEntry
    ) -> tuple[HostnameEntry, bool]:
        cols = self._ENTRY_COLUMNS
        added = self._changed(
            conn,
            f"""
            INSERT INTO edgeproxy_hostnames AS h ({cols})
            VALUES (%(hostname)s, %(upstream)s, %(metadata)s, %(created_at)s, NULL)
            ON CONFLICT (hostname) DO UPDATE SET
                upstream = EXCLUDED.upstream, metadata = EXCLUDED.metadata,
                created_at = EXCLUDED.created_at, removed_at = NULL,
                rev = nextval('edgeproxy_hostnames_rev')
            WHERE h.removed_at IS NOT NULL
            RETURNING {cols}
            """,
            _entry_params(entry),
        )
        if added is not None:
            return added, True
        current = self._get_hostname_sync(conn, entry.hostname)
        if current is None or not current.live:
            # Purged or removed between the two statements: a rare race, simply try again.
            return self._add_hostname_sync(conn, entry)
        return current, False

    def _add_hostnames_sync(
        self, conn: psycopg.Connection[Any], entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        # One transaction per batch: one commit (the costly part) instead of one per entry.
        with conn.transaction():
            return [self._add_hostname_sync(conn, entry) for entry in entries]

    def _get_hostname_sync(
        self, conn: psycopg.Connection[Any], hostname: str
    ) -> HostnameEntry | None:
        row = conn.execute(
            f"SELECT {self._ENTRY_COLUMNS} FROM edgeproxy_hostnames WHERE hostname = %s",
            (hostname,),
        ).fetchone()
        return None if row is None else _entry(row)

    def _update_hostname_sync(self, conn: psycopg.Connection[Any], entry: HostnameEntry) -> bool:
        updated = self._changed(
            conn,
            f"""
            UPDATE edgeproxy_hostnames
            SET upstream = %(upstream)s, metadata = %(metadata)s,
                rev = nextval('edgeproxy_hostnames_rev')
            WHERE hostname = %(hostname)s AND removed_at IS NULL
            RETURNING {self._ENTRY_COLUMNS}
            """,
            _entry_params(entry),
        )
        return updated is not None

    def _remove_hostname_sync(
        self, conn: psycopg.Connection[Any], hostname: str, at: float
    ) -> HostnameEntry | None:
        removed = self._changed(
            conn,
            f"""
            UPDATE edgeproxy_hostnames
            SET removed_at = %(at)s, rev = nextval('edgeproxy_hostnames_rev')
            WHERE hostname = %(hostname)s AND removed_at IS NULL
            RETURNING {self._ENTRY_COLUMNS}
            """,
            {"hostname": hostname, "at": at},
        )
        if removed is None:
            return None
        return HostnameEntry(
            removed.hostname, removed.upstream, removed.metadata, removed.created_at
        )

    def _purge_hostname_sync(
        self, conn: psycopg.Connection[Any], hostname: str, removed_before: float
    ) -> bool:
        purged = self._changed(
            conn,
            f"""
            DELETE FROM edgeproxy_hostnames
            WHERE hostname = %(hostname)s AND removed_at <= %(before)s
            RETURNING {self._ENTRY_COLUMNS}
            """,
            {"hostname": hostname, "before": removed_before},
        )
        return purged is not None

    def _list_hostnames_sync(
        self, conn: psycopg.Connection[Any], after: str | None, limit: int
    ) -> builtins.list[HostnameEntry]:
        rows = conn.execute(
            f"SELECT {self._ENTRY_COLUMNS} FROM edgeproxy_hostnames "
            "WHERE %(after)s::text IS NULL OR hostname > %(after)s "
            "ORDER BY hostname LIMIT %(limit)s",
            {"after": after, "limit": limit},
        ).fetchall()
        return [_entry(row) for row in rows]

    def _hostname_changes_sync(
        self, conn: psycopg.Connection[Any], since: str | None
    ) -> tuple[str, builtins.list[str] | None]:
        row = conn.execute("SELECT last_value, is_called FROM edgeproxy_hostnames_rev").fetchone()
        newest = int(row[0]) if row and row[1] else 0
        marker = str(newest)
        if since is None or not since.isdigit():
            return marker, None
        rows = conn.execute(
            "SELECT hostname FROM edgeproxy_hostnames WHERE rev > %s ORDER BY rev", (int(since),)
        ).fetchall()
        return marker, [name for (name,) in rows]

    def _check_sync(self, conn: psycopg.Connection[Any], now: float) -> builtins.list[str]:
        problems: builtins.list[str] = []
        version = self._schema_version_sync(conn)
        if version > len(self.migrations):
            problems.append(
                f"database schema version {version} is newer than this edgeproxy knows "
                f"({len(self.migrations)}): upgrade this replica"
            )
        for name, owner, expires_at in conn.execute(
            "SELECT name, owner, expires_at FROM edgeproxy_locks WHERE expires_at <= %s "
            "ORDER BY name",
            (now,),
        ):
            problems.append(
                f"expired lock {name!r} held by {owner!r}, expired {now - expires_at:.0f}s ago"
            )
        for name, owner in conn.execute(
            "SELECT name, owner FROM edgeproxy_locks AS l WHERE expires_at > %(now)s AND "
            + _SESSION_GONE
            + " ORDER BY name",
            {"now": now, "session_class": _SESSION_LOCK_CLASS},
        ):
            problems.append(
                f"lock {name!r} held by {owner!r}, whose database session ended "
                "(the next taker gets it at once)"
            )
        for (name,) in conn.execute(
            "SELECT name FROM edgeproxy_challenges WHERE expires_at <= %s ORDER BY name", (now,)
        ):
            problems.append(f"expired challenge for {name!r}")
        problems.extend(self._encryption_problems(conn))
        return problems

    def _encryption_problems(self, conn: psycopg.Connection[Any]) -> Iterable[str]:
        if self._sealer is None:
            row = conn.execute("SELECT count(*) FROM edgeproxy_values WHERE encrypted").fetchone()
            count = int(row[0]) if row else 0
            if count:
                yield (
                    f"{count} values are encrypted at rest but no encryption key is configured: "
                    "they cannot be read"
                )
            return
        for (key,) in conn.execute(
            "SELECT key FROM edgeproxy_values WHERE secret AND NOT encrypted ORDER BY key"
        ):
            yield f"secret value {key!r} is stored unencrypted (store it again to encrypt it)"
        for key, key_id in conn.execute(
            "SELECT key, substring(value FROM 2 FOR %s) FROM edgeproxy_values "
            "WHERE encrypted AND substring(value FROM 2 FOR %s) <> %s ORDER BY key",
            (_KEY_ID_LEN, _KEY_ID_LEN, self._sealer.key_id),
        ):
            yield (
                f"secret value {key!r} is encrypted with another key (key id "
                f"{bytes(key_id).hex()}, configured {self._sealer.key_id.hex()})"
            )

    def _clean_sync(self, conn: psycopg.Connection[Any], now: float) -> builtins.list[str]:
        # Each DELETE re-checks expiry as it runs: a lease refreshed a moment ago survives.
        locks = conn.execute(
            "DELETE FROM edgeproxy_locks WHERE expires_at <= %s RETURNING name", (now,)
        ).fetchall()
        challenges = conn.execute(
            "DELETE FROM edgeproxy_challenges WHERE expires_at <= %s RETURNING name", (now,)
        ).fetchall()
        return [f"expired lock {name!r}" for (name,) in sorted(locks)] + [
            f"expired challenge {name!r}" for (name,) in sorted(challenges)
        ]

    # -- for the listener (its own thread) ------------------------------------------------------

    def _listener_connect(self) -> psycopg.Connection[Any]:
        self._ready_pool()  # the schema must exist before the catch-up query
        return psycopg.connect(self._target.listener_conninfo, autocommit=True)


class _Listener:
    """Thread that forwards change notifications to the storage's callbacks on the trio thread."""

    def __init__(self, storage: PostgresStorage, token: trio.lowlevel.TrioToken) -> None:
        self._storage = storage
        self._token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="edgeproxy-storage-listener", daemon=True
        )
        self.listening = False

    def start(self) -> None:
        self._thread.start()

    def stop_soon(self) -> None:
        self._stop.set()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        storage = self._storage
        since: int | None = None  # newest rev seen; None until the first connection
        delay, cap = storage.LISTENER_BACKOFF
        failures = 0
        while not self._stop.is_set():
            try:
                with storage._listener_connect() as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(storage.CHANNEL)))
                    # After LISTEN, so nothing committed from here on can fall into a gap.
                    since, missed = _catch_up(conn, since, storage.NOTIFY_PREFIXES)
                    self.listening = True
                    if failures:
                        log.info(
                            "change listener reconnected; replaying %d missed changes", len(missed)
                        )
                    failures = 0
                    for key in missed:
                        if not self._deliver(key):
                            return
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=storage.LISTENER_POLL):
                            since, delivered = self._handle(note.payload, since)
                            if not delivered:
                                return  # the trio run is over: nobody left to tell
            except (psycopg.Error, StorageError) as exc:
                if self._stop.is_set():
                    return  # aclose closed the pool under us: not an outage
                detail = storage._target.scrub(" ".join(str(exc).split()))
                log.log(
                    logging.WARNING if failures == 0 else logging.DEBUG,
                    "change listener lost its connection (%s): %s; reconnecting",
                    storage._target.description,
                    detail,
                )
                failures += 1
            finally:
                self.listening = False
            wait = min(cap, delay * 2 ** min(failures - 1, 16)) if failures else delay
            self._stop.wait(wait)

    def _handle(self, payload: str, since: int) -> tuple[int, bool]:
        """Deliver one notification: the newest rev seen, and False if trio has gone away."""
        instance, _, rest = payload.partition(" ")
        rev_text, _, key = rest.partition(" ")
        if not rev_text.isdigit() or not key:
            return since, True  # not in our format: someone else's use of the channel
        since = max(since, int(rev_text))
        if instance == self._storage._instance:
            return since, True
        return since, self._deliver(key)

    def _deliver(self, key: str) -> bool:
        try:
            trio.from_thread.run_sync(self._storage._dispatch, key, trio_token=self._token)
        except trio.RunFinishedError:
            return False
        return True


def _catch_up(
    conn: psycopg.Connection[Any], since: int | None, prefixes: Sequence[str]
) -> tuple[int, builtins.list[str]]:
    """The newest rev now, and the keys under ``prefixes`` written after ``since``."""
    row = conn.execute("SELECT coalesce(max(rev), 0) FROM edgeproxy_values").fetchone()
    newest = int(row[0]) if row else 0
    if since is None:
        return newest, []
    rows = conn.execute(
        "SELECT key FROM edgeproxy_values WHERE rev > %s ORDER BY rev", (since,)
    ).fetchall()
    return max(newest, since), [key for (key,) in rows if key.startswith(tuple(prefixes))]


def _entry_params(entry: HostnameEntry) -> dict[str, object]:
    return {
        "hostname": entry.hostname,
        "upstream": entry.upstream,
        "metadata": entry.metadata,
        "created_at": entry.created_at,
    }


def _entry(row: Sequence[Any]) -> HostnameEntry:
    hostname, upstream, metadata, created_at, removed_at = row
    return HostnameEntry(
        str(hostname),
        None if upstream is None else str(upstream),
        str(metadata),
        float(created_at),
        None if removed_at is None else float(removed_at),
    )


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
