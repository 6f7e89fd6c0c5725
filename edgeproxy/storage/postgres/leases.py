"""Leases and pending challenges in PostgreSQL: ``edgeproxy_locks`` and ``edgeproxy_challenges``.

Owns taking, refreshing and releasing leases, binding them to this instance's database session,
the challenge rows, and their part of ``check``/``clean``. Must not know what a lease protects.
Blocking: worker threads only.

Theory of operation
-------------------
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
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import secrets
import threading
import time
from typing import Any

import psycopg

from edgeproxy.storage.base import LockInfo
from edgeproxy.storage.postgres.target import Target

__all__ = ["LeaseSession", "LeaseTable"]

log = logging.getLogger(__name__)

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


class LeaseSession:
    """The dedicated connection holding this instance's advisory lock (see the docstring)."""

    def __init__(self, target: Target, retry: float) -> None:
        self._target = target
        #: After failing to open the session, leases are taken unbound this long before trying
        #: again (each attempt may wait up to the connect timeout).
        self._retry = retry
        # Its own lock: opening may take the connect timeout.
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._key: int | None = None
        self._retry_at = 0.0
        self._closed = False

    def close(self) -> psycopg.Connection[Any] | None:
        """Open no session from now on; the open one, for the caller to close."""
        with self._lock:
            self._closed = True
            session, self._conn, self._key = self._conn, None, None
        return session

    def key(self) -> int | None:
        """Our live lease session's advisory-lock key, opening the session if needed; None
        when there is none to be had (leases are then taken unbound)."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute("SELECT 1")
                    return self._key
                except psycopg.Error:
                    # Leases bound to the old session may already be someone else's; their
                    # refresh says so. New ones bind to a new session.
                    log.warning("postgres storage: lease session lost; opening a new one")
                    self._conn.close()
                    self._conn, self._key = None, None
            if self._closed or time.monotonic() < self._retry_at:
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
                            self._conn, self._key = session, key
                            return key
                finally:
                    if self._conn is not session:
                        session.close()
            except psycopg.Error as exc:
                detail = self._target.scrub(" ".join(str(exc).split()))
                log.warning(
                    "postgres storage: no lease session (%s); leases taken in the next %gs "
                    "free only at expiry if this replica dies",
                    detail,
                    self._retry,
                )
            self._retry_at = time.monotonic() + self._retry
            return None


class LeaseTable:
    """The blocking half of the lease and challenge methods; each takes a connection first."""

    def __init__(self, session: LeaseSession) -> None:
        self._session = session

    def try_lock(
        self, conn: psycopg.Connection[Any], name: str, owner: str, now: float, expires_at: float
    ) -> tuple[str | None, float | None] | None:
        """None if held by someone else; else the previous (owner, expiry), for the log line.

        ``prev`` is read from the statement's snapshot, so under a race it may name an older
        holder than the row actually replaced; it feeds the log line only, never the decision.
        """
        session_key = self._session.key()
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

    def refresh(
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
        return row[0] is None or row[0] == self._session.key()

    def unlock(self, conn: psycopg.Connection[Any], name: str, owner: str) -> None:
        conn.execute("DELETE FROM edgeproxy_locks WHERE name = %s AND owner = %s", (name, owner))

    def lock_info(self, conn: psycopg.Connection[Any], name: str) -> LockInfo | None:
        row = conn.execute(
            "SELECT owner, expires_at FROM edgeproxy_locks WHERE name = %s", (name,)
        ).fetchone()
        return None if row is None else LockInfo(name, row[0], float(row[1]))

    def list_locks(self, conn: psycopg.Connection[Any]) -> builtins.list[LockInfo]:
        rows = conn.execute(
            "SELECT name, owner, expires_at FROM edgeproxy_locks ORDER BY name"
        ).fetchall()
        return [LockInfo(name, owner, float(expires_at)) for name, owner, expires_at in rows]

    def put_challenge(
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

    def get_challenge(self, conn: psycopg.Connection[Any], name: str, now: float) -> str | None:
        row = conn.execute(
            "SELECT key_authorization FROM edgeproxy_challenges "
            "WHERE name = %s AND expires_at > %s",
            (name, now),
        ).fetchone()
        return None if row is None else str(row[0])

    def delete_challenge(self, conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute("DELETE FROM edgeproxy_challenges WHERE name = %s", (name,))

    def list_challenges(self, conn: psycopg.Connection[Any]) -> builtins.list[tuple[str, float]]:
        rows = conn.execute(
            "SELECT name, expires_at FROM edgeproxy_challenges ORDER BY name"
        ).fetchall()
        return [(name, float(expires_at)) for name, expires_at in rows]

    def problems(self, conn: psycopg.Connection[Any], now: float) -> builtins.list[str]:
        problems: builtins.list[str] = []
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
        return problems

    def clean(self, conn: psycopg.Connection[Any], now: float) -> builtins.list[str]:
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
