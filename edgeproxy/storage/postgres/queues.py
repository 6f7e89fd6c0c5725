"""The event outbox and the next-action index in PostgreSQL: their two tables.

Owns the statements on ``edgeproxy_events`` and ``edgeproxy_due``: outbox ids sort by creation
time, and the due index is read through its index on ``at``, never whole. Must not know what an
event says or why a name is due. Blocking: worker threads only.
"""

from __future__ import annotations

import builtins
from typing import Any

import psycopg

from edgeproxy.storage.base import DueEntry, OutboxEvent, check_hostname_key

__all__ = ["DueTable", "OutboxTable"]


class OutboxTable:
    """The blocking half of the outbox methods; each takes a connection first."""

    def enqueue(self, conn: psycopg.Connection[Any], event: OutboxEvent) -> None:
        conn.execute(
            "INSERT INTO edgeproxy_events (id, body, created_at, attempts, next_attempt) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (event.id, event.body, event.created_at, event.attempts, event.next_attempt),
        )

    def due(
        self, conn: psycopg.Connection[Any], now: float, limit: int
    ) -> builtins.list[OutboxEvent]:
        rows = conn.execute(
            "SELECT id, body, created_at, attempts, next_attempt FROM edgeproxy_events "
            "WHERE next_attempt <= %s ORDER BY id LIMIT %s",
            (now, limit),
        ).fetchall()
        return [OutboxEvent(str(r[0]), bytes(r[1]), float(r[2]), int(r[3]), float(r[4]))
                for r in rows]  # fmt: skip

    def update(self, conn: psycopg.Connection[Any], event: OutboxEvent) -> None:
        conn.execute(
            "UPDATE edgeproxy_events SET attempts = %s, next_attempt = %s WHERE id = %s",
            (event.attempts, event.next_attempt, event.id),
        )

    def delete(self, conn: psycopg.Connection[Any], event_id: str) -> None:
        conn.execute("DELETE FROM edgeproxy_events WHERE id = %s", (event_id,))

    def count(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT count(*) FROM edgeproxy_events").fetchone()
        return int(row[0]) if row else 0


class DueTable:
    """The blocking half of the next-action index methods; each takes a connection first."""

    def set_due(self, conn: psycopg.Connection[Any], name: str, at: float) -> None:
        conn.execute(
            "INSERT INTO edgeproxy_due (name, at) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET at = EXCLUDED.at",
            (name, at),
        )

    def due_names(
        self, conn: psycopg.Connection[Any], until: float, limit: int
    ) -> builtins.list[DueEntry]:
        rows = conn.execute(
            "SELECT name, at FROM edgeproxy_due WHERE at <= %s ORDER BY at, name LIMIT %s",
            (until, limit),
        ).fetchall()
        return [DueEntry(str(r[0]), float(r[1])) for r in rows]

    def clear_due(self, conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute("DELETE FROM edgeproxy_due WHERE name = %s", (name,))

    def unscheduled(
        self, conn: psycopg.Connection[Any], names: builtins.list[str]
    ) -> builtins.list[str]:
        for name in names:
            check_hostname_key(name)
        # One query per page, answered from the primary key: only the missing names travel.
        rows = conn.execute(
            "SELECT u.name FROM unnest(%s::text[]) AS u(name) "
            "WHERE NOT EXISTS (SELECT 1 FROM edgeproxy_due d WHERE d.name = u.name)",
            (names,),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def scheduled_names(self, conn: psycopg.Connection[Any]) -> builtins.list[str]:
        rows = conn.execute("SELECT name FROM edgeproxy_due ORDER BY name").fetchall()
        return [str(r[0]) for r in rows]
