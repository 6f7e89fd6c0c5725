"""The PostgreSQL backend's change channel: what writers send, and the LISTEN thread.

Owns the notification payload (``"<instance id> <rev> <key>"`` on one channel) and the thread
that listens for it and hands other replicas' keys to callbacks on the trio thread. Must not
know what a key's change means to the callbacks.

Theory of operation
-------------------
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
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import trio
from psycopg import sql

from edgeproxy.errors import StorageError
from edgeproxy.storage.postgres.target import Target

__all__ = ["Channel", "Listener", "catch_up"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Channel:
    """The change channel as writers and the listener share it."""

    name: str
    instance: str  # tells our own notifications apart from other replicas'
    prefixes: tuple[str, ...]  # keys whose writes notify

    def notifies(self, key: str) -> bool:
        return key.startswith(self.prefixes)


@dataclass(eq=False)
class Listener:
    """Thread that forwards change notifications to the storage's callbacks on the trio thread.

    ``connect`` opens its own connection (the schema must exist by then); ``dispatch`` runs on
    the trio thread ``token`` names; ``backoff`` is the reconnect delay's first value and cap;
    every ``poll`` seconds it looks up from ``notifies()`` to see whether it should stop.
    """

    channel: Channel
    connect: Callable[[], psycopg.Connection[Any]]
    dispatch: Callable[[str], None]
    target: Target
    backoff: tuple[float, float]
    poll: float
    token: trio.lowlevel.TrioToken
    listening: bool = field(default=False, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="edgeproxy-storage-listener", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop_soon(self) -> None:
        self._stop.set()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        since: int | None = None  # newest rev seen; None until the first connection
        delay, cap = self.backoff
        failures = 0
        while not self._stop.is_set():
            try:
                with self.connect() as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel.name)))
                    # After LISTEN, so nothing committed from here on can fall into a gap.
                    since, missed = catch_up(conn, since, self.channel.prefixes)
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
                        for note in conn.notifies(timeout=self.poll):
                            since, delivered = self._handle(note.payload, since)
                            if not delivered:
                                return  # the trio run is over: nobody left to tell
            except (psycopg.Error, StorageError) as exc:
                if self._stop.is_set():
                    return  # aclose closed the pool under us: not an outage
                detail = self.target.scrub(" ".join(str(exc).split()))
                log.log(
                    logging.WARNING if failures == 0 else logging.DEBUG,
                    "change listener lost its connection (%s): %s; reconnecting",
                    self.target.description,
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
        if instance == self.channel.instance:
            return since, True
        return since, self._deliver(key)

    def _deliver(self, key: str) -> bool:
        try:
            trio.from_thread.run_sync(self.dispatch, key, trio_token=self.token)
        except trio.RunFinishedError:
            return False
        return True


def catch_up(
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
