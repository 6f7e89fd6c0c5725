"""Holding a storage lease for the length of a block: wait, heartbeat, release.

Owns the lease *lifecycle* on top of any ``Storage`` (``try_lock`` / ``refresh_lock`` /
``unlock``); it knows nothing of files, databases or what the lock protects.

    async with hold_lock(storage, "issue/example.com", owner=make_owner_id()) as lease:
        ...  # runs only while the lease is ours; cancelled with LockLost if it stops being so

A lease is refreshed every ``ttl / 3``, so one slow refresh still leaves a third of the lease
in hand. A refresh that fails or says the lease was taken over ends the block: we can no longer
prove that we are the only holder, and a body that carries on could, say, order the same
certificate twice. Every exit unlocks (shielded, with a time bound); a failed unlock is only
logged, because the lease frees itself at expiry anyway.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from edgeproxy.errors import LockUnavailable, StorageError
from edgeproxy.storage.base import LockInfo, Storage

__all__ = ["LockLost", "hold_lock", "make_owner_id"]

log = logging.getLogger(__name__)

#: Upper bound on the final unlock, which runs shielded from cancellation.
UNLOCK_TIMEOUT = 10.0


class LockLost(StorageError):
    """A held lease could not be refreshed, or was taken over; the body was cancelled."""


def make_owner_id() -> str:
    """A lease owner id unique across hosts, processes and calls: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


@asynccontextmanager
async def hold_lock(
    storage: Storage,
    name: str,
    *,
    owner: str,
    ttl: float = 60.0,
    wait: float = 30.0,
    poll: float = 0.25,
    on_lost: Callable[[], None] | None = None,
) -> AsyncIterator[LockInfo]:
    """Hold the lease ``name`` while the block runs.

    Tries every ``poll`` seconds for up to ``wait`` seconds, then raises ``LockUnavailable``.
    Yields the lease as first taken. If the lease is lost, calls ``on_lost`` (from the
    heartbeat task), cancels the body and raises ``LockLost`` from the ``async with``.
    """
    if not ttl > 0 or wait < 0 or not poll > 0:
        raise ValueError(f"need ttl > 0, wait >= 0, poll > 0 (got {ttl=}, {wait=}, {poll=})")
    await _acquire(storage, name, owner, ttl, wait, poll)
    try:
        info = await storage.lock_info(name)
        if info is None or info.owner != owner:
            raise LockLost(f"lock {name!r} was taken over right after we took it")
        lost: list[str] = []  # why the heartbeat gave up; empty while the lease is ours
        async with trio.open_nursery() as nursery:
            body = trio.CancelScope()
            # start(), not start_soon(): the first refresh is scheduled before the body runs.
            await nursery.start(_heartbeat, storage, name, owner, ttl, lost, on_lost, body)
            # The body runs inside the nursery (the heartbeat must live exactly as long), but
            # its exceptions are kept out of it: a nursery wraps them in an ExceptionGroup, and
            # callers of a context manager expect their own exception back unchanged.
            failure: BaseException | None = None
            try:
                with body:
                    yield info
            except BaseException as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if lost:
            raise LockLost(f"lock {name!r} lost while held by {owner!r}: {lost[0]}")
    finally:
        await _release(storage, name, owner)


async def _acquire(
    storage: Storage, name: str, owner: str, ttl: float, wait: float, poll: float
) -> None:
    deadline = trio.current_time() + wait
    while not await storage.try_lock(name, owner, ttl):
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            holder = await storage.lock_info(name)
            by = f" by {holder.owner!r}" if holder else ""
            raise LockUnavailable(f"lock {name!r} still held{by} after waiting {wait:g}s")
        await trio.sleep(min(poll, remaining))


async def _heartbeat(
    storage: Storage,
    name: str,
    owner: str,
    ttl: float,
    lost: list[str],
    on_lost: Callable[[], None] | None,
    body: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    interval = ttl / 3
    # Beats are counted from the start of each refresh, not its end, so a slow refresh
    # does not push the next one later and eat into the margin.
    next_beat = trio.current_time() + interval
    task_status.started()
    while True:
        await trio.sleep_until(next_beat)
        next_beat = trio.current_time() + interval
        try:
            still_ours = await storage.refresh_lock(name, owner, ttl)
        except StorageError as exc:
            reason = f"refresh failed: {exc}"
        else:
            if still_ours:
                continue
            reason = "taken over by another owner after it expired"
        lost.append(reason)
        log.warning("lock %r lost by %r: %s", name, owner, reason)
        body.cancel()
        if on_lost is not None:
            try:
                on_lost()
            except Exception:
                # A failing callback must not turn LockLost into an ExceptionGroup.
                log.exception("on_lost callback for lock %r failed", name)
        return


async def _release(storage: Storage, name: str, owner: str) -> None:
    with trio.move_on_after(UNLOCK_TIMEOUT, shield=True) as scope:
        try:
            await storage.unlock(name, owner)
        except StorageError as exc:
            log.warning("unlock of %r by %r failed (it expires on its own): %s", name, owner, exc)
    if scope.cancelled_caught:
        log.warning("unlock of %r by %r timed out (it expires on its own)", name, owner)
