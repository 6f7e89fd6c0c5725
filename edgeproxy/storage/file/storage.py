"""``FileStorage``: the ``Storage`` protocol on a local directory tree.

Owns the on-disk layout under one root and nothing else; it knows nothing of ACME, TLS or what
a value means (a certificate is just bytes). This module is the front: it checks arguments,
reads the clock and hands each operation to the module that owns that part of the layout.

Theory of operation
-------------------
Layout (every folder 0700, created on demand, the root too), by the module that owns it::

    values    data/<key>                  values; a key's slashes are folders
              quarantine/<stamp>-<key, / -> __>  values moved aside, ``.reason`` next to each
    leases    locks/<name>.lock           lease records, JSON {owner, expires_at, created_at,
                                          bound}
              locks/<name>.held           flocked by the lease holder's process while it lives
              locks/.guard                flock target serialising lease/challenge updates
              challenges/<name>.json      pending challenges, JSON {key_authorization,
                                          expires_at}
    registry  hostnames/<hostname>.json   registry entries, JSON (see ``HostnameEntry``)
              hostnames/.journal          names of changed entries, one a line, appended
              hostnames/.guard            flock target serialising registry updates
    outbox    events/<id>.json            event outbox, JSON {body (base64), attempts, ...}
    due       due/names/<name>            next-action time of a managed name (text float)
              due/t<hour>/<name>          the same time, filed under its hour

Every file is written whole, through a temp file and a rename (``atomic``); read-modify-write
updates run under a flock guard (``atomic``); leases are bound to their holder's process
(``leases``); secret values may be sealed at rest (``values``); the root must be ours alone
(``health``). Each module's docstring says why.

*Threads.* Every public operation is one ``trio.to_thread.run_sync`` call, so the event loop never
waits on the disk; a walk over the whole tree (``key_pages``, the sweep in ``clean``) is one call
per bounded step (``_in_steps``), so it never holds the interpreter for long either. The clock
is read on the event-loop thread and passed in, so a test may use ``trio.current_time`` as the
storage clock. ``OSError`` becomes ``StorageError`` in ``_run`` only.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import itertools
import os
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from edgeproxy.errors import StorageError
from edgeproxy.storage.base import (
    Capabilities,
    HostnameEntry,
    LockInfo,
    OutboxEvent,
    StoredItem,
)
from edgeproxy.storage.file.atomic import FileTree, read_file, unlink
from edgeproxy.storage.file.due import DueFiles
from edgeproxy.storage.file.health import old_temp_files, permission_problems, root_problems
from edgeproxy.storage.file.leases import LeaseFiles
from edgeproxy.storage.file.outbox import OutboxFiles
from edgeproxy.storage.file.records import Challenge
from edgeproxy.storage.file.registry import RegistryFiles
from edgeproxy.storage.file.values import ValueFiles
from edgeproxy.storage.frontend import SharedMethods, check_limit, check_ttl
from edgeproxy.storage.sealing import Sealer

__all__ = ["FileStorage", "root_problems"]

_T = TypeVar("_T")
_E = TypeVar("_E")

#: Directory entries a storage sweep looks at per worker-thread trip (``clean``): about a
#: millisecond of the interpreter's time, so a sweep never makes a handshake wait longer.
SWEEP_STEP = 1000


def _step(
    stream: Iterator[_E], page: int, work: Callable[[builtins.list[_E]], builtins.list[_T]]
) -> tuple[bool, builtins.list[_T]]:
    """Worker thread: the next page of ``stream`` through ``work``; (stream ended, result)."""
    taken = builtins.list(itertools.islice(stream, page))
    return len(taken) < page, work(taken)


def _same(items: builtins.list[_T]) -> builtins.list[_T]:
    return items


class FileStorage(SharedMethods):
    """``Storage`` on a local directory; see the module docstring for the layout and guarantees.

    One instance per process is enough, but any number of instances and processes may share a
    root: they coordinate through the filesystem only.
    """

    #: Temp files younger than this may belong to a live writer; ``clean`` leaves them alone.
    TEMP_GRACE = 300.0

    # The methods that only pass their arguments on are ``SharedMethods``'.
    _registry: RegistryFiles
    _outbox: OutboxFiles
    _due_index: DueFiles

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        encryption_key: str | None = None,
    ) -> None:
        self._root = Path(root)
        self.capabilities = Capabilities(upkeep=self)
        self._clock = clock
        self._tree = FileTree(self._root)
        sealer = Sealer(encryption_key) if encryption_key is not None else None
        self._values = ValueFiles(self._tree, sealer)
        self._leases = LeaseFiles(self._tree)
        self._registry = RegistryFiles(self._tree)
        self._outbox = OutboxFiles(self._tree)
        self._due_index = DueFiles(self._tree)

    def __repr__(self) -> str:
        return f"FileStorage({str(self._root)!r})"

    @property
    def root(self) -> Path:
        return self._root

    def path_of(self, key: str) -> Path:
        """Where the value for ``key`` lives (for tools and tests; not part of ``Storage``)."""
        return self._values.path_of(key)

    # -- the one place where OSError becomes StorageError ---------------------------------------

    async def _run(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            where = exc.filename if exc.filename is not None else self._root
            detail = exc.strerror or str(exc)
            raise StorageError(f"file storage: {op} failed at {where}: {detail}") from exc

    async def _in_steps(
        self,
        op: str,
        stream: Generator[_E, None, None],
        page: int,
        work: Callable[[builtins.list[_E]], builtins.list[_T]],
    ) -> AsyncGenerator[builtins.list[_T], None]:
        """``work`` on ``stream`` a page at a time, each page one trip to a worker thread; the
        non-empty results. The stream holds its place (open directory streams) between trips,
        so a walk over 100,000 files is hundreds of short steps: the interpreter is never held
        for long, and the event loop serves handshakes between them."""
        try:
            while True:
                done, result = await self._run(op, _step, stream, page, work)
                if result:
                    yield result
                if done:
                    return
        finally:
            stream.close()  # closes the directory streams of a walk left early

    # -- values ---------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        raw = await self._run("get", read_file, self.path_of(key))
        return self._values.open(key, raw)

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        path = self.path_of(key)
        data, mode = self._values.seal(key, value, secret=secret)
        await self._run("put", self._tree.write_atomic, path, data, mode)

    def root_problems(self) -> builtins.list[str]:
        """Why this root is unsafe to keep private keys in (empty: it is fine); see the docs."""
        return root_problems(self._root)

    async def delete(self, key: str) -> None:
        await self._run("delete", self._tree.delete, self.path_of(key))

    async def list(self, prefix: str = "") -> builtins.list[StoredItem]:
        return await self._run("list", self._values.list, prefix)

    def key_pages(self, prefix: str, page: int) -> AsyncGenerator[builtins.list[str], None]:
        check_limit(page)
        return self._in_steps("key_pages", self._values.keys(prefix), page, _same)

    async def quarantine(self, key: str, reason: str) -> None:
        path = self.path_of(key)
        await self._run("quarantine", self._values.quarantine, key, path, reason, self._clock())

    # -- leases ---------------------------------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_ttl(ttl)
        path = self._leases.lock_path(name)
        return await self._run("try_lock", self._leases.try_lock, path, owner, ttl, self._clock())

    async def refresh_lock(self, name: str, owner: str, ttl: float) -> bool:
        check_ttl(ttl)
        path = self._leases.lock_path(name)
        now = self._clock()
        return await self._run("refresh_lock", self._leases.refresh, path, owner, ttl, now)

    async def unlock(self, name: str, owner: str) -> None:
        await self._run("unlock", self._leases.unlock, self._leases.lock_path(name), owner)

    async def lock_info(self, name: str) -> LockInfo | None:
        self._leases.lock_path(name)  # refuse a bad name on this thread
        return await self._run("lock_info", self._leases.lock_info, name)

    async def list_locks(self) -> builtins.list[LockInfo]:
        return await self._run("list_locks", self._leases.list_locks)

    # -- challenges -----------------------------------------------------------------------------

    async def put_challenge(self, name: str, key_authorization: str, ttl: float) -> None:
        check_ttl(ttl)
        record = Challenge(key_authorization, self._clock() + ttl).to_json()
        path = self._leases.challenge_path(name)
        await self._run("put_challenge", self._leases.put_challenge, path, record)

    async def get_challenge(self, name: str) -> str | None:
        path = self._leases.challenge_path(name)
        challenge = await self._run("get_challenge", self._leases.get_challenge, path)
        if challenge is None or challenge.expires_at <= self._clock():
            return None
        return challenge.key_authorization

    async def delete_challenge(self, name: str) -> None:
        path = self._leases.challenge_path(name)
        await self._run("delete_challenge", self._leases.delete_challenge, path)

    async def list_challenges(self) -> builtins.list[tuple[str, float]]:
        return await self._run("list_challenges", self._leases.list_challenges)

    # -- hostname registry ----------------------------------------------------------------------

    async def add_hostname(self, entry: HostnameEntry) -> tuple[HostnameEntry, bool]:
        return await self._run("add_hostname", self._registry.add, entry)

    async def add_hostnames(
        self, entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        for entry in entries:
            self._registry.path(entry.hostname)  # refuse a bad name before writing any
        return await self._run("add_hostnames", self._registry.add_many, entries)

    async def get_hostname(self, hostname: str) -> HostnameEntry | None:
        return await self._run("get_hostname", self._registry.get, self._registry.path(hostname))

    async def update_hostname(self, entry: HostnameEntry) -> bool:
        return await self._run("update_hostname", self._registry.update, entry)

    async def remove_hostname(self, hostname: str, at: float) -> HostnameEntry | None:
        path = self._registry.path(hostname)
        return await self._run("remove_hostname", self._registry.remove, path, at)

    async def purge_hostname(self, hostname: str, removed_before: float) -> bool:
        path = self._registry.path(hostname)
        return await self._run("purge_hostname", self._registry.purge, path, removed_before)

    # -- event outbox ---------------------------------------------------------------------------

    async def enqueue_event(self, event: OutboxEvent) -> None:
        await self._run("enqueue_event", self._outbox.enqueue, event)

    async def update_event(self, event: OutboxEvent) -> None:
        path = self._outbox.path(event.id)
        await self._run("update_event", self._outbox.update, path, event)

    async def delete_event(self, event_id: str) -> None:
        await self._run("delete_event", self._outbox.delete, self._outbox.path(event_id))

    # -- maintenance (``edgeproxy storage check/clean``; not part of ``Storage``) ---------------

    async def check(self) -> builtins.list[str]:
        """Problems found, one line each; an empty list means healthy. Changes nothing."""
        return await self._run("check", self._check_sync, self._clock())

    async def clean(self, *, now: float | None = None) -> builtins.list[str]:
        """Remove leftover temp files, expired leases and expired challenges; say what went.

        Certificates are not pruned here: which ones are obsolete is the certificate manager's
        call. ``now`` overrides the clock, e.g. to age out temp files in tests. The temp files
        are looked for in steps of ``SWEEP_STEP`` entries (``_in_steps``): the maintenance pass
        runs this while serving, over every file of the fleet.
        """
        now = self._clock() if now is None else now
        removed: builtins.list[str] = []
        sweep = functools.partial(self._remove_old_temp_files, now)
        steps = self._in_steps("clean", self._tree.entries(), SWEEP_STEP, sweep)
        async with contextlib.aclosing(steps):  # cancelled mid-walk: its folders close at once
            async for gone in steps:
                removed.extend(gone)
        return removed + await self._run("clean", self._leases.clean, now)

    async def aclose(self) -> None:
        """Let go of the leases' liveness flocks (as a dying process would); every other
        operation opens and closes its own files."""
        self._leases.release_all()

    # -- check / clean (worker thread) ----------------------------------------------------------

    def _check_sync(self, now: float) -> builtins.list[str]:
        unsafe = root_problems(self._root)
        if not self._root.is_dir() or os.path.islink(self._root):
            return unsafe or [f"storage root {self._root} does not exist or is not a folder"]
        problems = unsafe + [
            f"leftover temp file {path} ({age:.0f}s old, from an interrupted write)"
            for path, age in old_temp_files(self._tree.entries(), now, self.TEMP_GRACE)
        ]
        for path, st in self._tree.walk():
            problems.extend(permission_problems(path, st))
        problems.extend(self._values.encryption_problems())
        problems.extend(self._leases.problems(now))
        return problems

    def _remove_old_temp_files(
        self, now: float, entries: builtins.list[os.DirEntry[str]]
    ) -> builtins.list[str]:
        return [
            f"temp file {path}"
            for path, _age in old_temp_files(entries, now, self.TEMP_GRACE)
            if unlink(path)
        ]
