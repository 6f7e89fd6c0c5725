"""The hostname registry in PostgreSQL: ``edgeproxy_hostnames``.

Owns the registry rows, keyset paging and the change feed. Must not know what an entry means
(``edgeproxy.hostnames`` does). Blocking: worker threads only.

Theory of operation
-------------------
*Hostname registry.* One row per hostname; listing is keyset paging on the primary key
(``hostname > after ORDER BY hostname LIMIT n``), so every page costs one index range scan
however deep it is. Each change bumps the row's ``rev`` and sends ``hostnames/<name>`` on the
change channel in the same statement. ``hostname_changes`` returns the rows whose ``rev`` is
newer than the caller's marker. Sequence values are handed out before commit, so a slow writer
can commit a smaller ``rev`` after a reader moved past it: the notification, sent at commit,
names that entry anyway, and the registry mirror resynchronises in full now and then.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import psycopg

from edgeproxy.storage.base import HostnameEntry
from edgeproxy.storage.postgres.listener import Channel

__all__ = ["RegistryTable"]


class RegistryTable:
    """The blocking half of the registry methods; each takes a connection first."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    # Every changing statement returns the row and notifies in one go.
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
            {**params, "channel": self._channel.name, "instance": self._channel.instance},
        ).fetchone()
        return None if row is None else _entry(row[:5])

    def add(
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
        current = self.get(conn, entry.hostname)
        if current is None or not current.live:
            # Purged or removed between the two statements: a rare race, simply try again.
            return self.add(conn, entry)
        return current, False

    def add_many(
        self, conn: psycopg.Connection[Any], entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        # One transaction per batch: one commit (the costly part) instead of one per entry.
        with conn.transaction():
            return [self.add(conn, entry) for entry in entries]

    def get(self, conn: psycopg.Connection[Any], hostname: str) -> HostnameEntry | None:
        row = conn.execute(
            f"SELECT {self._ENTRY_COLUMNS} FROM edgeproxy_hostnames WHERE hostname = %s",
            (hostname,),
        ).fetchone()
        return None if row is None else _entry(row)

    def update(self, conn: psycopg.Connection[Any], entry: HostnameEntry) -> bool:
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

    def remove(
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

    def purge(self, conn: psycopg.Connection[Any], hostname: str, removed_before: float) -> bool:
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

    def list_page(
        self, conn: psycopg.Connection[Any], after: str | None, limit: int
    ) -> builtins.list[HostnameEntry]:
        rows = conn.execute(
            f"SELECT {self._ENTRY_COLUMNS} FROM edgeproxy_hostnames "
            "WHERE %(after)s::text IS NULL OR hostname > %(after)s "
            "ORDER BY hostname LIMIT %(limit)s",
            {"after": after, "limit": limit},
        ).fetchall()
        return [_entry(row) for row in rows]

    def changes(
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
