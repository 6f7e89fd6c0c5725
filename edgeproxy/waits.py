"""Waiting for a socket, in a trio task or in a connection the reactor drives.

Owns: the waits the data path uses (``wait_readable``, ``wait_writable``), ``handover`` (from
here on, a trio task) and ``park``, for code that runs the same way in both places. Must not
know: what a connection is, epoll, OpenSSL.

A client connection starts *driven* (``proxy/reactor.py``): its coroutine has no trio task of
its own, the reactor sends into it, and while it is being stepped ``current`` names its
driver. A wait then suspends the coroutine on the reactor's epoll (one registration per socket
for its life, no task switch, no cancel scope); the connection's deadline is the reactor's
timer, which throws ``Expired`` in at the wait. Anything a driven connection cannot do without
a task (waiting on trio itself: a certificate being issued, a timeout of its own, a nursery)
comes after ``await handover()``: the driver starts a task that goes on with the same
coroutine, inside a cancel scope carrying the connection's deadline. In a task (``current`` is
None) these calls are trio's own waits and ``handover`` is nothing.

Driven code must never reach a trio checkpoint before ``handover``: the driver treats a trio
trap coming out of a driven step as the bug it is (the connection ends as internal_error).
"""

from __future__ import annotations

import select
import socket
import types
from collections.abc import Generator
from typing import Final, Protocol

import trio

__all__ = [
    "SUSPEND",
    "Driven",
    "Expired",
    "current",
    "handover",
    "park",
    "wait_readable",
    "wait_writable",
]

EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT


class Expired(BaseException):
    """Thrown into a driven connection at its wait: its deadline passed, it was shed, or the
    proxy is shutting down. A ``BaseException``, as ``trio.Cancelled`` is, so that handlers for
    errors let it through to the connection's story."""


class Driven(Protocol):
    """What a wait asks of the driver stepping the coroutine (``proxy.reactor.Driver``)."""

    def arm(self, fd: int, events: int) -> bool:
        """Wait for ``events`` on ``fd``; False: they were seen already, do not suspend."""

    def want_task(self) -> None: ...

    def want_park(self) -> None: ...


# The driver stepping a coroutine right now, None in a trio task (set by the driver only).
current: Driven | None = None

# What a driven step yields when it stopped at one of ours (anything else is a trio trap).
SUSPEND: Final = object()


@types.coroutine
def _suspend() -> Generator[object, None, None]:
    yield SUSPEND


async def wait_readable(sock: socket.socket) -> None:
    d = current
    if d is None:
        await trio.lowlevel.wait_readable(sock)
    elif d.arm(sock.fileno(), EPOLLIN):
        await _suspend()


async def wait_writable(sock: socket.socket) -> None:
    d = current
    if d is None:
        await trio.lowlevel.wait_writable(sock)
    elif d.arm(sock.fileno(), EPOLLOUT):
        await _suspend()


async def handover() -> None:
    """Go on in a trio task of the connection's own (nothing if already in one)."""
    d = current
    if d is not None:
        d.want_task()
        await _suspend()


async def park() -> None:
    """A driven connection waits for something else to step it (``Driver.resume``)."""
    d = current
    assert d is not None, "park() is for driven connections"
    d.want_park()
    await _suspend()
