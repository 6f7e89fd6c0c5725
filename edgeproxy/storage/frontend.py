"""What both backends' ``Storage`` front ends share: the checks made before a worker-thread hop,
and the methods that only pass their arguments on.

Owns the argument checks every backend makes alike (a lease's ``ttl``, a page ``limit``) and the
async half of the methods that are the same for every backend that runs its blocking
operations in a worker thread (``_run``) and keeps them in parts named alike (``_registry``,
``_outbox``, ``_due_index``). Must not know how a backend stores anything.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from edgeproxy.storage.base import DueEntry, HostnameEntry, OutboxEvent, check_hostname_key

__all__ = ["SharedMethods", "check_limit", "check_ttl"]

_T = TypeVar("_T")


def check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")


def check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit!r}")


class _BlockingRegistry(Protocol):
    def list_page(self, *args: Any) -> builtins.list[HostnameEntry]: ...

    def changes(self, *args: Any) -> tuple[str, builtins.list[str] | None]: ...


class _BlockingOutbox(Protocol):
    def due(self, *args: Any) -> builtins.list[OutboxEvent]: ...

    def count(self, *args: Any) -> int: ...


class _BlockingDueIndex(Protocol):
    def set_due(self, *args: Any) -> None: ...

    def due_names(self, *args: Any) -> builtins.list[DueEntry]: ...

    def clear_due(self, *args: Any) -> None: ...

    def scheduled_names(self, *args: Any) -> builtins.list[str]: ...

    def unscheduled(self, *args: Any) -> builtins.list[str]: ...


class SharedMethods:
    """The ``Storage`` methods that check their arguments and hand them to a blocking part.

    Each blocking operation takes what the backend's ``_run`` supplies (the database backend:
    a connection) and then the method's arguments.
    """

    _registry: _BlockingRegistry
    _outbox: _BlockingOutbox
    _due_index: _BlockingDueIndex

    async def _run(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        raise NotImplementedError  # every backend has its own

    # -- hostname registry ----------------------------------------------------------------------

    async def list_hostnames(
        self, *, after: str | None = None, limit: int = 100
    ) -> builtins.list[HostnameEntry]:
        check_limit(limit)
        return await self._run("list_hostnames", self._registry.list_page, after, limit)

    async def hostname_changes(self, since: str | None) -> tuple[str, builtins.list[str] | None]:
        return await self._run("hostname_changes", self._registry.changes, since)

    # -- event outbox ---------------------------------------------------------------------------

    async def due_events(self, now: float, limit: int) -> builtins.list[OutboxEvent]:
        return await self._run("due_events", self._outbox.due, now, limit)

    async def count_events(self) -> int:
        return await self._run("count_events", self._outbox.count)

    # -- next-action index ----------------------------------------------------------------------

    async def set_due(self, name: str, at: float) -> None:
        check_hostname_key(name)
        await self._run("set_due", self._due_index.set_due, name, float(at))

    async def due_names(self, until: float, limit: int) -> builtins.list[DueEntry]:
        check_limit(limit)
        return await self._run("due_names", self._due_index.due_names, until, limit)

    async def clear_due(self, name: str) -> None:
        check_hostname_key(name)
        await self._run("clear_due", self._due_index.clear_due, name)

    async def scheduled_names(self) -> builtins.list[str]:
        return await self._run("scheduled_names", self._due_index.scheduled_names)

    async def unscheduled(self, names: Sequence[str]) -> builtins.list[str]:
        # Names are checked in the worker (a page of hundreds: not on the event loop).
        return await self._run("unscheduled", self._due_index.unscheduled, builtins.list(names))
