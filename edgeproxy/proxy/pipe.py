"""The hot loop: plaintext between a TLS client and an upstream socket, both ways.

Owns: the fast path (on the per-run reactor) and the two directions' loops, half-close,
back-pressure, the idle deadline and why a pipe ended (``PipeEnd``). Must not know: OpenSSL
(the client side is a ``tls.server.ServerTLS``: ``receive_into``, ``send_from``,
``send_eof_nowait``, ``receive``, ``send``, ``send_eof``), certificates, routes.

Theory of operation
-------------------
Raw non-blocking sockets, no stream layers: profiles of a stream-stacked version showed trio's
per-call machinery (checkpoints, conflict detectors, cancel-scope bookkeeping) costing more
than OpenSSL itself on small exchanges. The client side's own rules (socket and memory modes,
when a read tries before waiting) are ``tls/server.py``'s.

Two paths. The *fast path* (``_Link``, an owner on ``proxy/reactor.py``'s reactor) is where a
connection spends its keep-alive life: the connection parks (a driven coroutine with
``waits.park``, a task with ``wait_task_rescheduled``: no nursery, no second task, no
coroutine per direction) and its two sockets sit, level-triggered, in the reactor's private
``select.epoll``, one per trio run. A ready socket costs one plain method call: read one chunk
(``ServerTLS.receive_into``, or ``recv_into`` the run's shared ``Scratch`` buffer), write it
at once to the other side (``send`` or ``ServerTLS.send_from`` from that same buffer: no
copy). It needs socket mode and nothing held back (``ServerTLS.nowait``); a memory-mode
connection starts in the tasks.

Ends are the reactor's too: a reset or a broken record ends the pipe; an end read on one
side half-closes the other at once (close_notify and FIN to the client, ``send_eof_nowait``,
or the upstream's write side shut), that side's socket leaves the epoll, and the second end
finishes the pipe. Anything a single non-waiting step cannot finish hands the connection to
the *slow path*, for the rest of its life: a write that has to wait (its bytes copied out of
the shared buffer; a close_notify too), a full-sized upstream read (a bulk body), OpenSSL
needing to write while reading. The link takes the sockets out of the epoll and wakes the
connection, which (after ``waits.handover``: a driven one gets its task here) goes on in
``_pipe_tasks`` from exactly there: a task per direction, as follows.

In the tasks, upstream reads wait first, then read: in a request/response exchange the next
bytes are almost never there yet. The exceptions: more reads after a wake-up while reads fill
the buffer (a bulk body), or one more after a short read until one finds nothing (an
upstream's FIN usually follows its last answer at once); see ``upstream_to_client``. Writes
try first: the socket buffer nearly always has room. The wait for readable data is also what
keeps each loop fair to other tasks (and the reactor's one wait per wake-up, with a bounded
number of sockets served per wake-up, keeps it fair).

Half-close is honoured in both directions. Client close_notify or FIN: shut the upstream's
write side, keep forwarding the answer. Upstream FIN: send close_notify and FIN to the client,
keep forwarding what the client still sends. The pipe ends when both directions ended.

Memory is bounded: each direction holds one chunk in flight and reads again only after the
write finished, so a slow reader back-pressures a fast writer (on the fast path a socket
whose write did not finish leaves it, and its chunk goes to the tasks). A chunk is ``CHUNK``
bytes, except upstream reads in the tasks while the client takes everything at once: they
grow to ``MAX_READ`` (fewer, bigger chunks: each one costs a round of Python calls) and drop
back to ``CHUNK`` as soon as a write has to wait. One idle deadline, the connection's (its
driver's, or a cancel scope's), covers both directions and both paths (a parked connection is
ended like a waiting one, and the link's sockets leave the epoll); it is moved at most about
once a second, because moving a deadline is a heap operation.
"""

from __future__ import annotations

import contextlib
import enum
import select
import socket
from dataclasses import dataclass
from typing import Final, Protocol

import trio
from trio.lowlevel import wait_readable

from .. import waits
from ..tls.server import AGAIN, ClientBroken, Failure, Scratch, ServerTLS, send_all
from .reactor import Driver, reactor

__all__ = ["CHUNK", "MAX_READ", "PipeEnd", "PipeResult", "pipe", "send_all"]

CHUNK = 65536
MAX_READ = 262144  # upstream reads grow to this while the client keeps up
_READS_PER_WAKE = 8  # at most this many upstream reads between two waits (fairness)
_NO_SCOPE: Final = contextlib.nullcontext()  # reusable: for a caller that brings its scope


class PipeEnd(enum.StrEnum):
    """Why a pipe ended (``DONE``: both directions ended in order)."""

    DONE = "done"
    IDLE_TIMEOUT = "idle_timeout"
    CLIENT_RESET = "client_reset"
    UPSTREAM_RESET = "upstream_reset"
    CLIENT_TLS_ERROR = "client_tls_error"


_CLIENT_FAILURE = {Failure.RESET: PipeEnd.CLIENT_RESET, Failure.TLS_ERROR: PipeEnd.CLIENT_TLS_ERROR}


@dataclass(slots=True)
class PipeResult:
    to_upstream: int = 0
    to_client: int = 0
    reason: PipeEnd = PipeEnd.DONE


_SCRATCH: trio.lowlevel.RunVar[Scratch] = trio.lowlevel.RunVar("edgeproxy.pipe.scratch")


def _scratch() -> Scratch:
    """The run's shared read buffer: every link copies out what it must keep."""
    try:
        return _SCRATCH.get()
    except LookupError:
        scratch = Scratch(CHUNK)
        _SCRATCH.set(scratch)
        return scratch


class Deadline(Protocol):
    """The connection's deadline, as a ``trio.CancelScope`` or a ``reactor.Driver`` has it."""

    deadline: float

    def cancel(self) -> None: ...


class _Link:
    """A pipe while its connection waits for it: the fast path, run by the reactor.

    It forwards a chunk at a time, each read and write finishing at once, and half-closes each
    way when that needs no wait (the ended side's socket leaves the epoll). Anything else ends
    the fast path (``end``): the connection (its parked task, or its driven coroutine) goes on
    in ``_pipe_tasks`` from exactly there (``pending_*`` hold a write that did not finish,
    ``*_eof`` an end already read), or returns when the pipe is over.
    """

    __slots__ = (
        "added",
        "client_eof",
        "client_fd",
        "close_sent",
        "driver",
        "error",
        "idle_timeout",
        "over",
        "pending_to_client",
        "pending_to_upstream",
        "reactor",
        "result",
        "scope",
        "scratch",
        "slack",
        "task",
        "tls",
        "touch_at",
        "upstream",
        "upstream_eof",
        "upstream_fd",
    )

    def __init__(
        self,
        tls: ServerTLS,
        upstream: socket.socket,
        scope: Deadline,
        result: PipeResult,
        idle_timeout: float,
    ) -> None:
        self.tls = tls
        self.upstream = upstream
        self.client_fd = tls.sock.fileno()
        self.upstream_fd = upstream.fileno()
        self.scope = scope
        self.result = result
        self.idle_timeout = idle_timeout
        self.slack = min(1.0, idle_timeout / 10)
        # Activity after this moves the deadline (as the tasks' ``touch``).
        self.touch_at = scope.deadline - idle_timeout + self.slack
        self.reactor = reactor()
        self.scratch = _scratch()
        self.added = False  # both sockets are in the reactor's epoll
        self.task: trio.lowlevel.Task | None = None  # the parked task (a task's pipe)
        self.driver: Driver | None = None  # the parked coroutine's driver (a driven pipe)
        self.over = False  # the pipe ended in the fast path
        self.error: Exception | None = None
        self.pending_to_upstream = b""
        self.pending_to_client = b""
        self.client_eof = False  # the client's end was read, the upstream's write side shut
        self.upstream_eof = False  # the upstream's end was read
        self.close_sent = False  # ... and close_notify and FIN went to the client

    def add(self) -> None:
        """Both sockets into the reactor's epoll, level-triggered (each ready event reads one
        chunk; what is left reports again)."""
        r = self.reactor
        r.watch(self.client_fd, self, select.EPOLLIN)
        try:
            r.watch(self.upstream_fd, self, select.EPOLLIN)
        except BaseException:
            r.unwatch(self.client_fd, self)
            raise
        self.added = True

    def remove(self) -> None:
        if self.added:
            self.added = False
            r = self.reactor
            r.unwatch(self.client_fd, self)
            r.unwatch(self.upstream_fd, self)

    def on_ready(self, fd: int, events: int) -> None:
        if fd == self.client_fd:
            self.from_client(self.scratch)
        else:
            self.from_upstream(self.scratch)

    def on_error(self, exc: Exception) -> None:
        self.end(error=exc)  # a bug: the connection's story reports it

    def abort(self, _: object) -> trio.lowlevel.Abort:
        self.remove()  # cancelled (the idle deadline, a drain): no more events
        return trio.lowlevel.Abort.SUCCEEDED

    def end(self, reason: PipeEnd | None = None, error: Exception | None = None) -> None:
        """Leave the fast path: the connection goes on (``reason``: the pipe is over)."""
        driver = self.driver
        if driver is not None and reason is not None and self.added:
            # A driven connection closes both sockets in the step this starts, which drops
            # them from the epoll: no unregistering syscalls for sockets about to close.
            self.added = False
            r = self.reactor
            r.forget(self.client_fd, self)
            r.forget(self.upstream_fd, self)
        else:
            self.remove()
        task, self.task = self.task, None
        self.driver = None
        if task is None and driver is None:
            return  # already woken (a handler that failed after ending its link)
        if reason is not None:
            self.over = True
            if self.result.reason is PipeEnd.DONE:
                self.result.reason = reason
        self.error = error
        if task is not None:
            trio.lowlevel.reschedule(task)
        elif driver is not None:
            driver.resume()  # steps the coroutine on, here and now

    def touch(self) -> None:
        """Move the idle deadline (``touch_at`` keeps that to about once a second)."""
        now = self.reactor.now
        self.scope.deadline = now + self.idle_timeout
        self.touch_at = now + self.slack

    def from_client(self, scratch: Scratch) -> None:
        try:
            n = self.tls.receive_into(scratch)
        except ClientBroken as exc:
            self.end(_CLIENT_FAILURE[exc.failure])
            return
        if n <= 0:
            if n == AGAIN:
                return  # part of a record: the rest follows
            if n:
                self.end()  # OpenSSL must write first: the tasks wait for that
                return
            self.client_eof = True  # close_notify, or a FIN
            if self.upstream_eof:
                self.end(PipeEnd.DONE)  # both ends read: the upstream is closed next, no shutdown
                return
            with contextlib.suppress(OSError):
                self.upstream.shutdown(socket.SHUT_WR)
            self.reactor.unwatch(self.client_fd, self)
            return
        if self.reactor.now > self.touch_at:
            self.touch()
        try:
            sent = self.upstream.send(scratch.view[:n])
        except BlockingIOError:
            sent = 0
        except OSError:
            self.end(PipeEnd.UPSTREAM_RESET)
            return
        if sent < n:
            self.pending_to_upstream = bytes(scratch.view[sent:n])
            self.result.to_upstream += sent
            self.end()  # the upstream is slow: the tasks wait for it
            return
        self.result.to_upstream += n

    def from_upstream(self, scratch: Scratch) -> None:
        try:
            n = self.upstream.recv_into(scratch.view)
        except BlockingIOError:
            return
        except OSError:
            self.end(PipeEnd.UPSTREAM_RESET)
            return
        if n == 0:
            self.upstream_eof = True
            if not self.tls.send_eof_nowait():
                self.end()  # the tasks send close_notify when the client has room
            elif self.client_eof:
                self.end(PipeEnd.DONE)
            else:
                self.close_sent = True
                self.reactor.unwatch(self.upstream_fd, self)
            return
        if self.reactor.now > self.touch_at:
            self.touch()
        if n == CHUNK:
            # A bulk answer: the tasks read it in growing chunks, several per wake-up.
            self.pending_to_client = bytes(scratch.view[:n])
            self.end()
            return
        try:
            done = self.tls.send_from(scratch, n)
        except ClientBroken:
            self.end(PipeEnd.CLIENT_RESET)
            return
        if not done:
            self.pending_to_client = bytes(scratch.view[:n])
            self.end()  # the client is slow: the tasks wait for it
            return
        self.result.to_client += n


async def pipe(
    tls: ServerTLS,
    upstream: socket.socket,
    *,
    idle_timeout: float,
    scope: Deadline | None = None,
    result: PipeResult | None = None,
) -> PipeResult:
    """Forward until both directions ended, a side resets, or ``idle_timeout`` passes.

    ``tls``: the client's connection, its handshake done (``ServerTLS.accept``).

    ``scope``: the caller's deadline (the connection's ``reactor.Driver``, or a cancel scope
    already entered), already set for the idle timeout. The pipe moves it on activity and
    cancels it to end early, so the caller must read ``result`` (pass one in) after the
    cancellation (``Cancelled`` or ``waits.Expired``) reached it, and treat one whose reason
    is still ``DONE`` as the idle timeout. Without it the pipe makes and enters a scope of its
    own (a task's pipe).
    """
    result = PipeResult() if result is None else result
    own_scope = None
    if scope is None:
        scope = own_scope = trio.CancelScope(deadline=trio.current_time() + idle_timeout)
    with own_scope if own_scope is not None else _NO_SCOPE:
        link = None
        if tls.nowait:
            # Park: the sockets go to the reactor until it hands them back (or a cancellation
            # or the deadline, which takes them out).
            link = _Link(tls, upstream, scope, result, idle_timeout)
            driver = waits.current
            if driver is not None:
                assert isinstance(driver, Driver)
                driver.release_fds()  # the link takes the client socket over
                link.driver = driver
                link.add()
                try:
                    await waits.park()
                finally:
                    link.remove()
            else:
                link.task = trio.lowlevel.current_task()
                link.add()
                try:
                    await trio.lowlevel.wait_task_rescheduled(link.abort)
                finally:
                    link.remove()
            if link.error is not None:
                raise link.error
        if link is None or not link.over:
            await waits.handover()
            await _pipe_tasks(tls, upstream, idle_timeout, scope, result, link)
    if own_scope is not None and own_scope.cancelled_caught and result.reason is PipeEnd.DONE:
        result.reason = PipeEnd.IDLE_TIMEOUT
    return result


async def _pipe_tasks(
    tls: ServerTLS,
    upstream: socket.socket,
    idle_timeout: float,
    scope: Deadline,
    result: PipeResult,
    link: _Link | None,
) -> None:
    """The slow path: a task per direction, from where the fast path (``link``) stopped."""
    slack = min(1.0, idle_timeout / 10)

    def touch() -> None:
        t = trio.current_time()
        if scope.deadline - t < idle_timeout - slack:
            scope.deadline = t + idle_timeout

    def abort(reason: PipeEnd) -> None:
        if result.reason is PipeEnd.DONE:
            result.reason = reason
        scope.cancel()

    async def client_to_upstream() -> None:
        if link is not None and link.client_eof:
            return  # the fast path read the end and shut the upstream's write side
        if link is not None and link.pending_to_upstream:
            try:
                await send_all(upstream, link.pending_to_upstream)
            except OSError:
                abort(PipeEnd.UPSTREAM_RESET)
                return
            result.to_upstream += len(link.pending_to_upstream)
        while True:
            try:
                data = await tls.receive(CHUNK)
            except ClientBroken as exc:
                abort(_CLIENT_FAILURE[exc.failure])
                return
            if not data:
                break  # close_notify, or a FIN
            touch()
            try:
                await send_all(upstream, data)
            except OSError:
                abort(PipeEnd.UPSTREAM_RESET)
                return
            result.to_upstream += len(data)
        try:
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def upstream_to_client() -> None:
        # Reading: after a wake-up, keep reading while reads fill the buffer (a bulk body
        # has more queued), up to _READS_PER_WAKE reads, which keeps the loop fair. After a
        # short read, one more try (an upstream that closes after its answer has usually
        # sent its FIN with it), until the first such try finds nothing (a keep-alive
        # upstream waiting for the next request): then short reads go straight back to
        # waiting, so idle pauses cost one failed call per connection, not one per answer.
        # Read size: from CHUNK, doubled after each full read the client took without the
        # write having to wait, up to MAX_READ, and back to CHUNK as soon as a write waits.
        # Each chunk costs a round of Python calls, so a fast bulk transfer wants few, big
        # ones; a client that cannot keep up holds one chunk of at most MAX_READ when its
        # first write waits, and CHUNK-sized ones after that until it keeps up again.
        speculate = True
        size = CHUNK
        budget = 0  # reads left before the next wait
        probe = False  # the last read came up short: the next one is a guess
        data: bytes | None = None
        if link is not None:
            if link.upstream_eof:
                if not link.close_sent:
                    await tls.send_eof()
                return
            if link.pending_to_client:
                data = link.pending_to_client  # the fast path's read, not yet written
                budget = _READS_PER_WAKE
        while True:
            if data is None and budget:
                budget -= 1
                try:
                    data = upstream.recv(size)
                except BlockingIOError:
                    if probe:
                        speculate = False
                    budget = 0
                except OSError:
                    abort(PipeEnd.UPSTREAM_RESET)
                    return
            if data is None:
                await wait_readable(upstream)
                try:
                    data = upstream.recv(size)
                except BlockingIOError:
                    continue
                except OSError:
                    abort(PipeEnd.UPSTREAM_RESET)
                    return
                budget = _READS_PER_WAKE
            if not data:
                break
            full = len(data) == size
            probe = not full
            if probe and not speculate:
                budget = 0
            touch()
            blocked = tls.blocked
            try:
                await tls.send(data)
            except ClientBroken:
                abort(PipeEnd.CLIENT_RESET)
                return
            result.to_client += len(data)
            if tls.blocked != blocked:
                size = CHUNK
            elif full and size < MAX_READ and tls.on_socket:
                size *= 2
            data = None
        await tls.send_eof()

    if tls.held:
        # Ciphertext the handshake held back (TLS 1.3 session tickets) goes out first.
        try:
            await tls.send_held()
        except ClientBroken:
            abort(PipeEnd.CLIENT_RESET)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream_to_client, name="edgeproxy.pipe.upstream_to_client")
        await client_to_upstream()
