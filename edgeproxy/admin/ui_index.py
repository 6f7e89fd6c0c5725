"""Counts by state and the state filter of the status page, fast at 100,000 hostnames.

Owns one question: which state is every registered hostname in, right now? Describing a name
exactly (``hostnames.describe_hostname``) costs two storage reads and a certificate parse,
fine for a page of rows but not for every name on every page load. So the index keeps what it
needs in memory: the registry mirror already holds every entry, this process's manager holds
its statuses, and the statuses other processes stored are read once and then only when their
``modified`` time changes (one storage listing per refresh). A page load older than
``REFRESH`` seconds starts a refresh in the background and is answered from the index it has
(the page says when it was counted): with 100,000 stored statuses the first count reads them
all (tens of seconds on the file backend) and each refresh lists them (a second or two), too
slow to make a page wait. The names of each state are kept sorted, so a page of a state filter
(with a name prefix) is a bisection.

The state rule is ``hostnames.hostname_state`` with the status's ``not_after`` standing for the
certificate record's: the rows on the page are described exactly, so a name whose state moved
since the last refresh shows its new state there.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ..certs import status_store
from ..certs.status import DomainStatus
from ..errors import StorageError
from ..storage.base import HostnameEntry
from .hostnames import STATES

log = logging.getLogger("edgeproxy.admin")

#: Seconds a computed index is served before a page load starts a refresh in the background.
REFRESH = 30.0
#: Parallel storage reads while (re)reading stored statuses.
READ_CONCURRENCY = 16
#: Entries per storage page when the registry mirror has not loaded yet.
LOAD_PAGE = 1000
#: Greater than every character a hostname can hold (see ``prefix_start``).
_ABOVE_NAMES = "~"


def prefix_start(prefix: str) -> str | None:
    """A keyset cursor just before the first name starting with ``prefix``.

    Storage pages return names strictly after the cursor, so the cursor must sort below
    ``prefix`` and above every shorter name that sorts below it: the prefix with its last
    character lowered by one, then a character above any hostname character.
    """
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) - 1) + _ABOVE_NAMES


def entry_state(entry: HostnameEntry, st: DomainStatus | None, now: float) -> str:
    if not entry.live:
        return "removed"
    if st is not None and st.state in (
        "issuing", "denied", "failing", "rate_limited", "account_paused"
    ):
        return st.state
    if st is not None and st.not_after is not None and st.not_after > now:
        return "active"
    return "pending"


class StateIndex:
    def __init__(
        self, storage: Any, registry: Any, certs: Any, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.certs = certs
        self.clock = clock
        self.counted_at: float | None = None
        self._stored: dict[str, tuple[float, DomainStatus | None]] = {}
        self._by_state: dict[str, list[str]] = {s: [] for s in STATES}
        self._refreshing = False
        self._ready = trio.Event()

    async def ensure(self, wait: float) -> bool:
        """Start a refresh in the background when the index is older than ``REFRESH``; wait
        up to ``wait`` seconds for the first one. True when an index exists (maybe stale):
        page loads never wait for a refresh, only the very first for up to ``wait``."""
        if not self._refreshing and (
            self.counted_at is None or self.clock() - self.counted_at >= REFRESH
        ):
            self._refreshing = True
            # A system task: the page answers now, the refresh outlives the request.
            trio.lowlevel.spawn_system_task(self._refresh_task)
        if self.counted_at is None:
            with trio.move_on_after(wait):
                await self._ready.wait()
        return self.counted_at is not None

    def counts(self) -> dict[str, int]:
        return {s: len(names) for s, names in self._by_state.items()}

    def page(
        self, state: str, prefix: str, after: str | None, limit: int
    ) -> tuple[list[str], bool]:
        """Up to ``limit`` names in ``state`` starting with ``prefix``, after ``after``."""
        names = self._by_state.get(state, [])
        cursor = after if after is not None else prefix_start(prefix)
        i = bisect.bisect_right(names, cursor) if cursor is not None else 0
        found: list[str] = []
        for name in names[i:]:
            if not name.startswith(prefix):
                break
            if len(found) == limit:
                return found, True
            found.append(name)
        return found, False

    async def _refresh_task(self) -> None:
        try:
            await self.refresh()
        except Exception:
            log.exception("status page: counting hostnames by state failed")
        finally:
            self._refreshing = False

    async def refresh(self) -> None:
        try:
            await self._refresh_stored()
        except StorageError as exc:
            log.warning("status page: cannot list stored statuses: %s", exc)
        entries = await self._entries()
        now = self.clock()
        by_state: dict[str, list[str]] = {s: [] for s in STATES}
        for entry in sorted(entries, key=lambda e: e.hostname):
            name = entry.hostname
            st = self.certs.status(name) or self._stored.get(name, (0.0, None))[1]
            by_state[entry_state(entry, st, now)].append(name)
        self._by_state = by_state
        self.counted_at = now
        self._ready.set()

    async def _entries(self) -> Iterable[HostnameEntry]:
        if getattr(self.registry, "loaded", False):
            entries: list[HostnameEntry] = self.registry.entries()
            return entries
        out: list[HostnameEntry] = []
        after: str | None = None
        while page := await self.storage.list_hostnames(after=after, limit=LOAD_PAGE):
            out.extend(page)
            after = page[-1].hostname
        return out

    async def _refresh_stored(self) -> None:
        listed = dict(await status_store.listed(self.storage))
        for gone in self._stored.keys() - listed.keys():
            del self._stored[gone]
        changed = [n for n, m in listed.items() if self._stored.get(n, (None,))[0] != m]
        limiter = trio.CapacityLimiter(READ_CONCURRENCY)

        async def read(name: str) -> None:
            async with limiter:
                try:
                    st = await status_store.read(self.storage, name)
                except status_store.UnreadableStatus:
                    st = None
                except (StorageError, ValueError):
                    return
            self._stored[name] = (listed[name], st)

        async with trio.open_nursery() as nursery:
            for name in changed:
                nursery.start_soon(read, name)
