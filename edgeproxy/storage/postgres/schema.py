"""The PostgreSQL backend's schema: the migration scripts and applying them.

Owns the tables' definitions and their version. Must not know how the tables are used (the
other ``postgres`` modules do) or how connections are made.

Theory of operation
-------------------
Created and migrated on first use. ``MIGRATIONS`` is an append-only list of SQL scripts;
``edgeproxy_schema_version`` holds how many have run. All pending ones run in one transaction
under ``pg_advisory_xact_lock``, so replicas starting together apply each exactly once, and a
failed migration leaves nothing half-done. Migrations must stay additive (new tables, new
nullable columns): during a rolling upgrade older replicas keep running on the newer schema
(they log a warning; ``check`` reports it). Tables are prefixed ``edgeproxy_`` (``values`` is an
SQL keyword, and the prefix lets edgeproxy share a database with other applications) and are
unqualified, so the DSN's ``search_path`` (e.g. ``options=-csearch_path=edge``) picks the schema.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import psycopg

__all__ = ["MIGRATIONS", "migrate", "schema_version"]

log = logging.getLogger(__name__)

#: The schema, one script per version; append only (see the module docstring).
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
    # 3: leases bound to the holder's database session (see the ``leases`` module).
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

_CREATE_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS edgeproxy_schema_version (
        singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version    integer NOT NULL
    );
    INSERT INTO edgeproxy_schema_version (version) VALUES (0) ON CONFLICT DO NOTHING;
"""


def schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT version FROM edgeproxy_schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection[Any], migrations: Sequence[str], description: str) -> None:
    """Apply the pending ``migrations`` in one transaction under the migration lock."""
    latest = len(migrations)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
        conn.execute(_CREATE_VERSION_TABLE)
        version = schema_version(conn)
        for number in range(version, latest):
            conn.execute(migrations[number])  # scripts hold no parameters
        if version < latest:
            conn.execute("UPDATE edgeproxy_schema_version SET version = %s", (latest,))
    if version < latest:
        log.info(
            "postgres storage schema migrated from version %d to %d (%s)",
            version,
            latest,
            description,
        )
    elif version > latest:
        log.warning(
            "postgres storage schema is at version %d, newer than this edgeproxy knows (%d); "
            "carrying on (migrations are additive), but upgrade this replica",
            version,
            latest,
        )
