"""The per-run reactor: client connections driven without a trio task of their own.

Owns: one private ``select.epoll`` per trio run and what watches it (``Reactor``), the
connections' deadlines (its timer), and ``Driver``: a connection's coroutine stepped by hand.
Must not know: what a connection does (``proxy/connection.py``), TLS, the pipe's rules
(``proxy/pipe.py`` parks its fast path here as an ``Owner``).

Theory of operation
-------------------
Per connection, trio's own machinery cost more than anything else in Python: a task spawn, a
cancel scope and its deadline, and for each wait a registration in trio's epoll, a reschedule
and a task switch. A connection's life is mostly a few waits for its client socket, so the
reactor does those itself. ``Driver.start`` makes the connection's coroutine and sends into it
at once (in the accept loop: under load the ClientHello is usually there already); when the
coroutine waits (``waits.wait_readable``/``wait_writable``) the driver registers the socket in
the reactor's epoll, edge-triggered for reading and writing, once for the socket's life, and
remembers what the coroutine waits for. The reactor's one task waits on the epoll's fd with
``trio.lowlevel.wait_readable`` and, per wake-up, steps each ready connection with a plain
``coroutine.send``: no task switch. Readiness seen while the coroutine waits for something
else is remembered (``_seen``): edge-triggered events come once, and the code behind the waits
always tries before waiting, so a remembered event at worst costs one try that finds nothing.

Deadlines: ``Driver.deadline`` (read and set like a ``trio.CancelScope``'s) goes into the
reactor's timer heap; the timer task wakes at the earliest deadline, at most every ``_TICK``
seconds (a deadline is late by at most that), and throws ``waits.Expired`` into a connection
whose deadline passed while it waited. Entries are not removed when a deadline moves or a
connection ends (a heap has no cheap removal): a stale one is skipped when it comes up, and
the heap is rebuilt without them when they outnumber the live connections.

``handover``: whatever a driven connection cannot do with these waits (await trio itself: a
certificate being issued, the ACME challenge, its own timeout, the pipe's slow path with a
task per direction) comes after ``await waits.handover()``. The driver then takes the
connection's sockets out of the epoll and starts a task in the proxy's connection nursery that
goes on with the same coroutine (``_Relay`` passes trio's traps through), inside a cancel scope
carrying the connection's deadline. From there it is an ordinary trio task for the rest of its
life; ``Driver.deadline`` and ``cancel`` act on that scope.

A bug in a driven step (an exception the connection's story did not catch, or a trio trap
reached before ``handover``) ends that connection only, logged; the reactor goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import select
from collections.abc import Coroutine, Generator
from time import perf_counter
from typing import Any, Final, Protocol

import trio

from .. import waits
from ..waits import EPOLLIN, EPOLLOUT, SUSPEND, Expired

__all__ = ["Driver", "Owner", "Reactor", "reactor"]

log = logging.getLogger("edgeproxy.conn")

_EVENTS_PER_WAKE: Final = 64  # ready sockets taken per poll (the rest: the next one)
_POLLS_PER_WAKE: Final = 4  # polls per wake-up, while they find something (fairness bound)
_TICK: Final = 0.05  # the timer wakes at most this often (deadline precision)
_WATCH: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_PROBLEM: Final = select.EPOLLERR | select.EPOLLHUP  # wakes a wait of either kind
_COMPACT_SLACK: Final = 1024  # stale timer entries tolerated beyond twice the live ones


class Owner(Protocol):
    """What the reactor hands a ready socket to."""

    def on_ready(self, fd: int, events: int) -> None: ...

    def on_error(self, exc: Exception) -> None: ...


class Reactor:
    """One per trio run (``reactor()``): the epoll, who owns each fd in it, and the timer."""

    __slots__ = (
        "_epoll",
        "_last",
        "_offset",
        "_seq",
        "_timer_scope",
        "_timers",
        "drivers",
        "now",
        "owners",
    )

    def __init__(self) -> None:
        self._epoll = select.epoll()
        # trio's default clock is perf_counter() plus a fixed offset: reading it directly
        # saves three Python calls per read (None: another clock, e.g. a test's MockClock).
        clock = trio.lowlevel.current_clock()
        offset = getattr(clock, "offset", None)
        self._offset: float | None = (
            offset if type(clock).__name__ == "SystemClock" and isinstance(offset, float) else None
        )
        self.owners: dict[int, Owner] = {}
        self.now = 0.0  # trio's clock at the current wake-up
        self._timers: list[tuple[float, int, Driver]] = []
        self._seq = itertools.count()
        self._timer_scope: trio.CancelScope | None = None
        self._last = -math.inf  # when the timer last ran
        self.drivers = 0  # live driven (or handed-over) connections

    def clock(self) -> float:
        """``trio.current_time()``, cheaper."""
        offset = self._offset
        return trio.current_time() if offset is None else perf_counter() + offset

    # ---- the epoll -------------------------------------------------------------------------

    def watch(self, fd: int, owner: Owner, mask: int) -> None:
        """``owner`` gets ``fd``'s events from now on (registered, or re-registered)."""
        epoll = self._epoll
        if fd in self.owners:
            try:
                epoll.modify(fd, mask)
            except FileNotFoundError:  # closed and reused since: a new registration
                epoll.register(fd, mask)
        else:
            try:
                epoll.register(fd, mask)
            except FileExistsError:
                epoll.modify(fd, mask)
        self.owners[fd] = owner

    def unwatch(self, fd: int, owner: Owner) -> None:
        if self.owners.get(fd) is owner:
            del self.owners[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # closed already (and so dropped), or epoll closed
                pass

    def forget(self, fd: int, owner: Owner) -> None:
        """``fd`` was closed (the kernel dropped it from the epoll): forget its owner."""
        if self.owners.get(fd) is owner:
            del self.owners[fd]

    async def run(self) -> None:
        epoll = self._epoll
        owners = self.owners
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll)
                # Poll again after each batch, up to _POLLS_PER_WAKE times: what the batch
                # caused (an upstream's answer, its FIN behind it, a request behind a
                # client's Finished, a socket the batch just registered) is often ready by
                # then, and an empty poll costs far less than a trip through trio's loop.
                for _ in range(_POLLS_PER_WAKE):
                    ready = epoll.poll(0, _EVENTS_PER_WAKE)
                    if not ready:
                        break
                    self.now = self.clock()
                    for fd, events in ready:
                        owner = owners.get(fd)
                        if owner is None:
                            continue  # ended earlier in this batch
                        try:
                            owner.on_ready(fd, events)
                        except Exception as exc:  # a bug: that connection reports it
                            owner.on_error(exc)
        finally:
            epoll.close()

    # ---- the timer -------------------------------------------------------------------------

    def at(self, when: float, driver: Driver) -> None:
        timers = self._timers
        heapq.heappush(timers, (when, next(self._seq), driver))
        if len(timers) > 2 * self.drivers + _COMPACT_SLACK:
            self._timers = [t for t in timers if t[2].current_deadline(t[0])]
            heapq.heapify(self._timers)
        scope = self._timer_scope
        if scope is not None and when < scope.deadline:
            scope.deadline = max(when, self._last + _TICK)

    async def run_timer(self) -> None:
        while True:
            timers = self._timers
            wake = max(timers[0][0], self._last + _TICK) if timers else math.inf
            with trio.CancelScope(deadline=wake) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = self.now = self._last = trio.current_time()
            timers = self._timers
            while timers and timers[0][0] <= now:
                when, _, driver = heapq.heappop(timers)
                if driver.current_deadline(when):
                    driver.expire()
                timers = self._timers  # an expiry may have rebuilt it


_REACTOR: trio.lowlevel.RunVar[Reactor] = trio.lowlevel.RunVar("edgeproxy.reactor")


def reactor() -> Reactor:
    """This trio run's reactor (made, with its two system tasks, on first use)."""
    try:
        return _REACTOR.get()
    except LookupError:
        r = Reactor()
        trio.lowlevel.spawn_system_task(r.run, name="edgeproxy.reactor")
        trio.lowlevel.spawn_system_task(r.run_timer, name="edgeproxy.reactor.timer")
        _REACTOR.set(r)
        return r


# What a suspended driven coroutine waits for.
_RUNNING: Final = 0  # being stepped (or not started)
_WAIT: Final = 1  # for ``_fd`` to show ``_events``
_PARKED: Final = 2  # for someone to call ``resume`` (the pipe's fast path)
_TASK: Final = 3  # it asked for a task (handover)
_DONE: Final = 4


class Driver:
    """One connection's coroutine, stepped by the reactor until it asks for a task.

    Quacks like the ``trio.CancelScope`` the data path used to carry (``deadline``,
    ``cancel``), so the pipe and the certificate wait move and end it the same way in both
    modes.
    """

    __slots__ = (
        "_cancelled",
        "_coro",
        "_deadline",
        "_events",
        "_fd",
        "_nursery",
        "_reactor",
        "_seen",
        "_state",
        "_watched",
        "outer",
        "scope",
    )

    def __init__(self, r: Reactor, nursery: trio.Nursery, deadline: float) -> None:
        self._reactor = r
        self._nursery = nursery
        self._deadline = deadline
        self._coro: Coroutine[Any, Any, None] | None = None
        self._state = _RUNNING
        self._fd = -1
        self._events = 0
        self._seen = 0  # events on the client socket that came while nobody waited for them
        self._watched: list[int] = []  # fds in the epoll for this driver
        self._cancelled = False  # cancel() while being stepped: expire at the next wait
        self.scope: trio.CancelScope | None = None  # after handover: the task's scope
        self.outer = False  # ended by the proxy shutting down, not by its own deadline

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        self._coro = coro
        self._reactor.drivers += 1
        self._reactor.at(self._deadline, self)
        self._step(None)

    # ---- the CancelScope face ----------------------------------------------------------

    @property
    def deadline(self) -> float:
        scope = self.scope
        return self._deadline if scope is None else scope.deadline

    @deadline.setter
    def deadline(self, when: float) -> None:
        scope = self.scope
        if scope is not None:
            scope.deadline = when
        elif when != self._deadline:
            self._deadline = when
            if self._state != _DONE:
                self._reactor.at(when, self)

    def cancel(self, *, outer: bool = False) -> None:
        """End the connection now (shed, or the proxy shutting down: ``outer``)."""
        self.outer = self.outer or outer
        if self.scope is not None:
            self.scope.cancel()
        elif self._state in (_WAIT, _PARKED):
            self.expire()
        elif self._state == _RUNNING:
            self._cancelled = True

    def ours(self, exc: BaseException) -> bool:
        """Whether ``exc`` (``Expired`` or ``Cancelled``) is this connection's own end."""
        if self.outer:
            return False
        if isinstance(exc, Expired):
            return True
        scope = self.scope
        return scope is not None and scope.cancel_called

    # ---- what the reactor and the timer call ------------------------------------------------

    def clock(self) -> float:
        """``trio.current_time()``, as the reactor reads it."""
        return self._reactor.clock()

    def current_deadline(self, when: float) -> bool:
        """A timer entry for ``when`` is still this driven connection's deadline."""
        return self._deadline == when and self.scope is None and self._state != _DONE

    def expire(self) -> None:
        if self._state in (_WAIT, _PARKED):
            self._step(Expired())

    def on_ready(self, fd: int, events: int) -> None:
        if events & _PROBLEM:
            events |= EPOLLIN | EPOLLOUT
        if self._state == _WAIT and fd == self._fd and events & self._events:
            self._step(None)
        else:
            self._seen |= events

    def on_error(self, exc: Exception) -> None:  # pragma: no cover - _step catches all
        log.error("connection driver failed: %r", exc)

    def resume(self) -> None:
        """Wake a parked coroutine (the pipe's fast path is over, or must go to the tasks)."""
        if self._state == _PARKED:
            self._step(None)

    # ---- what waits.py calls while this driver steps -----------------------------------------

    def arm(self, fd: int, events: int) -> bool:
        if self._cancelled:
            self._state = _WAIT  # suspend: the step's end throws Expired in
            return True
        seen = self._seen
        if seen & events:
            self._seen = seen & ~events
            return False
        if fd not in self._watched:
            self._reactor.watch(fd, self, _WATCH)
            self._watched.append(fd)
        self._state = _WAIT
        self._fd = fd
        self._events = events
        return True

    def want_task(self) -> None:
        self._state = _TASK

    def want_park(self) -> None:
        self._state = _PARKED

    def release_fds(self) -> None:
        """Hand this connection's sockets, still in the epoll, to another owner (the pipe's
        fast path watches them its own way and gives them back unregistered)."""
        self._watched.clear()
        self._seen = 0

    def unwatch_all(self) -> None:
        """Take this connection's sockets out of the epoll (at handover: a task waits in
        trio's epoll)."""
        r = self._reactor
        for fd in self._watched:
            r.unwatch(fd, self)
        self._watched.clear()
        self._seen = 0

    # ---- stepping ----------------------------------------------------------------------------

    def _step(self, exc: BaseException | None) -> None:
        """Send into the coroutine (or throw ``exc``) until it suspends at one of ours or ends.

        Suspended at a trio trap (a bug: trio awaited before ``handover``): a ``RuntimeError``
        goes in. Suspended after ``cancel`` came while it ran: ``Expired`` goes in.
        """
        coro = self._coro
        assert coro is not None
        before = waits.current
        waits.current = self
        try:
            while True:
                self._state = _RUNNING
                try:
                    yielded = coro.send(None) if exc is None else coro.throw(exc)
                except BaseException as end:
                    self._finish(end)
                    return
                if yielded is not SUSPEND:
                    exc = RuntimeError(f"a driven connection awaited trio itself ({yielded!r})")
                elif self._cancelled and self._state in (_WAIT, _PARKED):
                    self._cancelled = False
                    exc = Expired()
                else:
                    break
        finally:
            waits.current = before
        if self._state == _TASK:
            self._handover()

    def _finish(self, end: BaseException) -> None:
        self._state = _DONE
        self._coro = None
        r = self._reactor
        for fd in self._watched:  # closed by the connection: dropped from the epoll already
            r.forget(fd, self)
        self._watched.clear()
        r.drivers -= 1
        if not isinstance(end, (StopIteration, Expired)):
            log.error("connection ended by an error its story did not catch", exc_info=end)

    def _handover(self) -> None:
        self.unwatch_all()
        self.scope = trio.CancelScope(deadline=self._deadline)
        if self._cancelled:
            self.scope.cancel()
        self._nursery.start_soon(self._in_task, name="edgeproxy.connection")

    async def _in_task(self) -> None:
        coro = self._coro
        assert coro is not None and self.scope is not None
        try:
            with self.scope:
                await _Relay(coro)
        finally:
            self._state = _DONE
            self._coro = None
            self._reactor.drivers -= 1


class _Relay:
    """Awaitable that goes on with a coroutine suspended at ``handover`` inside this task:
    what it yields (trio's traps) goes up to trio, what trio sends or throws goes down."""

    __slots__ = ("_coro",)

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self._coro = coro

    def __await__(self) -> Generator[Any, Any, None]:
        coro = self._coro
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration:
                return
            value = error = None
            try:
                value = yield yielded
            except BaseException as exc:  # trio's Cancelled, or any error thrown in
                error = exc
