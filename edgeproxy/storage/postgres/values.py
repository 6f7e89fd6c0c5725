"""Values in PostgreSQL: ``edgeproxy_values`` and ``edgeproxy_quarantine``.

Owns storing, reading, removing and quarantining values, their sealing at rest, and the change
notification each write under the channel's prefixes sends in the same statement. Must not know
what a value means (a certificate is just bytes). Blocking: worker threads only.

Theory of operation
-------------------
*Encryption at rest* (only when an ``encryption_key`` is given). Values stored with
``secret=True`` are sealed with AES-256-GCM (``sealing``: format, key id, associated data); the
row's ``encrypted`` flag says so. A value that does not open raises ``CorruptRecord`` (wrong
key?), as does an encrypted value read without a key. Non-secret values, and secret ones
stored while no key was configured, are stored as they are (``check`` lists the latter). Values
are never logged.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Any

import psycopg

from edgeproxy.errors import CorruptRecord
from edgeproxy.storage.base import StoredItem
from edgeproxy.storage.postgres.listener import Channel
from edgeproxy.storage.sealing import KEY_ID_LEN as _KEY_ID_LEN
from edgeproxy.storage.sealing import Sealer

__all__ = ["ValueTable"]


class ValueTable:
    """The blocking half of the value methods; each takes a connection first."""

    def __init__(self, sealer: Sealer | None, channel: Channel) -> None:
        self._sealer = sealer
        self._channel = channel

    def get(self, conn: psycopg.Connection[Any], key: str) -> bytes | None:
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

    def put(
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
            "channel": self._channel.name,
            "instance": self._channel.instance,
        }
        upsert = """
            INSERT INTO edgeproxy_values AS v (key, value, size, secret, encrypted, modified)
            VALUES (%(key)s, %(value)s, %(size)s, %(secret)s, %(encrypted)s, %(modified)s)
            ON CONFLICT (key) DO UPDATE SET
                value = EXCLUDED.value, size = EXCLUDED.size, secret = EXCLUDED.secret,
                encrypted = EXCLUDED.encrypted, modified = EXCLUDED.modified,
                rev = nextval('edgeproxy_values_rev')
        """
        if not self._channel.notifies(key):
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
        if self._channel.notifies(key):
            tail = "SELECT pg_notify(%(channel)s, %(instance)s || ' 0 ' || gone.key) FROM gone"
            params = {**params, "channel": self._channel.name, "instance": self._channel.instance}
        else:
            tail = "SELECT count(*) FROM gone"
        conn.execute(f"WITH {steps} {tail}", params)

    def delete(self, conn: psycopg.Connection[Any], key: str) -> None:
        steps = "gone AS (DELETE FROM edgeproxy_values WHERE key = %(key)s RETURNING key)"
        self._removal(conn, steps, {"key": key})

    def quarantine(self, conn: psycopg.Connection[Any], key: str, reason: str, now: float) -> None:
        # Moved in one statement: the value is never both visible and quarantined, nor lost.
        steps = """
            moved AS (DELETE FROM edgeproxy_values WHERE key = %(key)s
                      RETURNING key, value, secret, encrypted),
            gone AS (INSERT INTO edgeproxy_quarantine (key, value, secret, encrypted, reason, at)
                     SELECT key, value, secret, encrypted, %(reason)s, %(at)s FROM moved
                     RETURNING key)
        """
        self._removal(conn, steps, {"key": key, "reason": reason, "at": now})

    def key_page(
        self, conn: psycopg.Connection[Any], prefix: str, after: str, limit: int
    ) -> builtins.list[str]:
        """Up to ``limit`` keys starting with ``prefix`` and sorting after ``after`` (keyset
        paging on the primary key: each page costs its own rows, wherever it starts)."""
        # The keys are COLLATE "C": those starting with the prefix lie between it and the
        # prefix with its last character incremented, so the index scan stops there.
        params: dict[str, object] = {"prefix": prefix, "after": after, "limit": limit}
        bound = ""
        if prefix:
            params["upper"] = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            bound = "AND key < %(upper)s "
        rows = conn.execute(
            "SELECT key FROM edgeproxy_values WHERE key >= %(prefix)s AND key > %(after)s "
            f"{bound}AND starts_with(key, %(prefix)s) ORDER BY key LIMIT %(limit)s",
            params,
        ).fetchall()
        return [str(r[0]) for r in rows]

    def list(self, conn: psycopg.Connection[Any], prefix: str) -> builtins.list[StoredItem]:
        rows = conn.execute(
            "SELECT key, modified, size FROM edgeproxy_values WHERE starts_with(key, %s) "
            "ORDER BY key",
            (prefix,),
        ).fetchall()
        return [StoredItem(key, float(modified), int(size)) for key, modified, size in rows]

    def encryption_problems(self, conn: psycopg.Connection[Any]) -> Iterable[str]:
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
