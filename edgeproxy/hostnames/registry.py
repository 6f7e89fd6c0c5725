"""``HostnameRegistry``: this process's in-memory mirror of the storage hostname registry.

The data path asks it two questions per handshake, answered with dict probes and no await:
is this name removed (refuse it), and does it have an upstream override. The certificate
manager and policy ask whether a name is registered.

Theory of operation
-------------------
``run`` loads every entry once (paging through storage), then polls the storage change feed
(``hostname_changes``) every ``poll_interval`` seconds and re-reads the entries it names; a
change notification (PostgreSQL LISTEN/NOTIFY, via ``on_storage_change``) wakes the poll at
once. A full reload runs every ``resync_interval`` as a safety net for changes a feed can miss
(see the postgres backend's notes). Writers in this process call ``apply`` with what they
stored, so their own changes take effect before any poll.

*Serving does not wait for the load* (100,000 entries take seconds on the file backend): ``run``
reports started at once. Until the first load finished (``loaded``), a handshake asks
``ensure`` about its one name, which reads that entry from storage, so a registered name is
allowed, a removed one refused and an upstream override followed from the first connection.
Names found absent are remembered (bounded) until the load is done. The certificate manager
waits for ``wait_loaded`` before its first maintenance pass: renewing before the registry is
known could renew a removed name.

Listeners hear of every change of one name (``add_listener``): the certificate manager uses it
to drop the context of a removed name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field, replace

import trio

from .. import metrics
from ..addresses import HostPort
from ..errors import StorageError
from ..names import InvalidName, validate_hostname
from ..proxy.routes import Route
from ..storage.base import HostnameEntry, Storage
from .entries import upstream_hostport

log = logging.getLogger("edgeproxy.hostnames")

#: Entries read per storage page during a full load.
LOAD_PAGE = 1000
#: Names remembered as unregistered by ``ensure`` while the first load runs.
MAX_ABSENT = 10_000
#: How long a handshake waits for its name's entry before the first load is done.
ENSURE_TIMEOUT = 1.0

Listener = Callable[[str, HostnameEntry | None, HostnameEntry | None], None]


@dataclass(eq=False)
class HostnameRegistry:
    storage: Storage
    _: KW_ONLY
    poll_interval: float = 1.0
    resync_interval: float = 300.0
    clock: Callable[[], float] = time.time
    loaded: bool = field(default=False, init=False)
    _live: dict[str, HostnameEntry] = field(default_factory=dict, init=False, repr=False)
    _removed: dict[str, HostnameEntry] = field(default_factory=dict, init=False, repr=False)
    # name -> (the route it overrides, the override route): rebuilt when routes reload.
    _routes: dict[str, tuple[Route | None, Route]] = field(
        default_factory=dict, init=False, repr=False
    )
    _listeners: list[Listener] = field(default_factory=list, init=False, repr=False)
    _wake: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _marker: str | None = field(default=None, init=False, repr=False)
    _loaded: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _absent: set[str] = field(default_factory=set, init=False, repr=False)

    # ------------------------------------------------------------------ questions (hot path)

    def is_registered(self, name: str) -> bool:
        return name in self._live

    def is_removed(self, name: str) -> bool:
        return name in self._removed

    def entry(self, name: str) -> HostnameEntry | None:
        return self._live.get(name) or self._removed.get(name)

    def removed(self) -> list[HostnameEntry]:
        return list(self._removed.values())

    def entries(self) -> list[HostnameEntry]:
        """Every entry, live and removed, in no particular order."""
        return [*self._live.values(), *self._removed.values()]

    def __len__(self) -> int:
        return len(self._live)

    def route_for(self, name: str, base: Route | None) -> Route | None:
        """``base`` (the SNI route) with this name's upstream override applied, if any."""
        entry = self._live.get(name)
        if entry is None or entry.upstream is None:
            return base
        cached = self._routes.get(name)
        if cached is not None and cached[0] is base:
            return cached[1]
        route = _override(base, upstream_hostport(entry.upstream))
        self._routes[name] = (base, route)
        return route

    async def ensure(self, name: str) -> None:
        """Before the first load finished: read ``name``'s entry (if any) from storage now."""
        if self.loaded or name in self._live or name in self._removed or name in self._absent:
            return
        try:
            key = validate_hostname(name)
            # Storage that is down at start must not hold every handshake for its timeout.
            with trio.fail_after(ENSURE_TIMEOUT):
                entry = await self.storage.get_hostname(key)
        except (StorageError, InvalidName, ValueError, trio.TooSlowError) as exc:
            log.debug("hostname registry: cannot look up %s yet: %s", name, exc)
            return
        if self.loaded:
            return  # the load finished meanwhile and knows at least as much
        if entry is not None:
            self.apply(key, entry)
        elif len(self._absent) < MAX_ABSENT:
            self._absent.add(name)

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    # ------------------------------------------------------------------ changes

    def add_listener(self, listener: Listener) -> None:
        """``listener(name, before, after)`` on every change (entries None when absent)."""
        self._listeners.append(listener)

    def apply(self, name: str, entry: HostnameEntry | None) -> None:
        """Take ``entry`` (None: purged) as the current state of ``name``."""
        before = self._live.get(name) or self._removed.get(name)
        if before == entry:
            return
        self._live.pop(name, None)
        self._removed.pop(name, None)
        self._routes.pop(name, None)
        if entry is not None:
            (self._live if entry.live else self._removed)[name] = entry
        for listener in list(self._listeners):
            try:
                listener(name, before, entry)
            except Exception:
                log.exception("hostname listener %r failed for %s", listener, name)

    def on_storage_change(self, key: str) -> None:
        """A change notification from another replica: poll now rather than at the interval."""
        if key.startswith("hostnames/"):
            self._wake.set()

    # ------------------------------------------------------------------ loop

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, then follow the storage until cancelled. Started at once (see ``ensure``); a
        storage outage keeps the last known state (and is retried every poll)."""
        task_status.started()
        next_resync = 0.0
        while True:
            try:
                if trio.current_time() >= next_resync:
                    await self.reload()
                    next_resync = trio.current_time() + self.resync_interval
                else:
                    await self.poll()
            except StorageError as exc:
                log.warning("hostname registry: cannot read storage: %s", exc)
            except Exception:
                # E.g. an entry another version wrote that this one cannot read: keep the last
                # known state and keep following, instead of ending the process.
                log.exception("hostname registry: update failed; keeping the last known state")
                metrics.BACKGROUND_TASK_ERRORS.labels("registry").inc()
            with trio.move_on_after(self.poll_interval):
                await self._wake.wait()
            self._wake = trio.Event()

    async def reload(self) -> None:
        """Read every entry (removed ones too) and apply the differences."""
        marker, _ = await self.storage.hostname_changes(None)
        seen: dict[str, HostnameEntry] = {}
        after: str | None = None
        while page := await self.storage.list_hostnames(after=after, limit=LOAD_PAGE):
            for entry in page:
                seen[entry.hostname] = entry
            after = page[-1].hostname
        # Handshakes share this event loop: 100,000 comparisons in one go held them ~0.1-0.2 s
        # at every resync, so let them in every LOAD_PAGE entries.
        for n, name in enumerate([*self._live, *self._removed]):
            if name not in seen:
                self.apply(name, None)
            if n % LOAD_PAGE == 0:
                await trio.lowlevel.checkpoint()
        for n, (name, entry) in enumerate(seen.items()):
            self.apply(name, entry)
            if n % LOAD_PAGE == 0:
                await trio.lowlevel.checkpoint()
        self._marker = marker
        if not self.loaded:
            log.info("hostname registry loaded: %d live, %d removed", len(self._live),
                     len(self._removed))  # fmt: skip
        self.loaded = True
        self._absent.clear()
        self._loaded.set()

    async def poll(self) -> None:
        marker, names = await self.storage.hostname_changes(self._marker)
        if names is None:
            await self.reload()
            return
        for name in names:
            self.apply(name, await self.storage.get_hostname(name))
        self._marker = marker


def _override(base: Route | None, upstream: HostPort) -> Route:
    # Metric labels come from the route's patterns: they stay the route's (or "registry"), never
    # the customer's name, so the label set stays bounded.
    if base is None:
        return Route(index=-1, patterns=("registry",), default=False, upstreams=(upstream,),
                     send_proxy=None, alpn=())  # fmt: skip
    # The route's ALPN and PROXY settings stay: only where the bytes go changes.
    return replace(base, upstreams=(upstream,), cursor=0)
