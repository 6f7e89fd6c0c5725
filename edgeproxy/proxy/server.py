"""Listeners, admission limits, overload shedding and draining for the data path.

``Proxy`` holds the live ``Settings`` (swapped whole on reload: each connection keeps the
snapshot it started with), accepts on every listener, refuses fast at the connection limits,
and on drain stops accepting while existing connections finish, up to a deadline.

Shed, don't refuse: at ``max_handshakes`` a newcomer is not turned away; the oldest connection
that has not yet sent a complete ClientHello is closed (reset) to make room. Silent sockets
are what an attacker holds cheaply and what a real client never leaves for long, so refusing
newcomers would serve the attacker. As the handshake slots fill past 80%, the time a
connection may stay silent shrinks linearly from ``handshake_timeout`` to one second (Envoy's
overload manager scales its timers the same way). Not earlier: an attacker re-opens every
connection we close, and each close early costs an accept; starting at half the slots, the
churn outran the accept loop with 10,000 held and queued the attacker's reconnects in front
of real clients (p99 2.9 s against 0.5 s starting at 80%, same load).

Connections with a complete hello (perhaps waiting for a certificate) and established ones
are never shed: if every slot holds one, the newcomer is refused as before. The pre-hello
connections sit in an ``OrderedDict`` keyed by connection id, oldest first, so admitting,
shedding and leaving are all O(1).

Accept errors that mean "out of file descriptors or memory" are logged and retried after a
short pause, as trio's ``serve_listeners`` does: a proxy that dies under an fd storm turns an
overload into an outage.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .. import metrics
from ..addresses import HostPort, bound_socket
from ..certs.challenges import ChallengeResponder
from ..certs.manager import CertificateManager
from ..logs import LogThrottle
from ..tls.tickets import TicketKeys
from .connection import handle_connection, set_reset_on_close
from .outcome import ConnInfo, count_closed
from .reactor import Driver, Reactor
from .reactor import reactor as the_reactor
from .routes import RouteTable
from .senders import AddressSet, RefusalSummary
from .upstream import UpstreamPool

log = logging.getLogger("edgeproxy.proxy")

_ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPTS_PER_EVENT = 64  # accepts per ready event on a listener (fairness to the others)

# Pre-ClientHello timeout scaling: full ``handshake_timeout`` up to this share of
# ``max_handshakes`` in use, then down linearly to ``_HELLO_TIMEOUT_FLOOR`` when all are.
_SCALE_FROM = 0.8
# A real client sends its ClientHello right after the TCP handshake; a second is many round
# trips even on a poor mobile path.
_HELLO_TIMEOUT_FLOOR = 1.0
_SWEEP_INTERVAL = 0.25  # how often the scaled timeout is applied
_SHED_LOG_INTERVAL = 10.0  # at most one summary line per this many seconds
# At most one "no pending challenge" line per this many seconds (the metric counts them all).
UNANSWERED_VALIDATION_LOG_INTERVAL = 60.0


def scaled_hello_timeout(handshake_timeout: float, in_use: int, limit: int) -> float:
    """How long a connection may stay before its ClientHello at this occupancy."""
    floor = min(_HELLO_TIMEOUT_FLOOR, handshake_timeout)
    pressure = in_use / limit if limit > 0 else 1.0
    if pressure <= _SCALE_FROM:
        return handshake_timeout
    share = min(1.0, (pressure - _SCALE_FROM) / (1.0 - _SCALE_FROM))
    return handshake_timeout - (handshake_timeout - floor) * share


@dataclass(frozen=True, slots=True)
class Settings:
    routes: RouteTable
    proxy_protocol: str
    handshake_timeout: float
    idle_timeout: float
    connect_timeout: float
    max_connections: int
    max_connections_per_ip: int
    max_handshakes: int
    # Who may send PROXY headers; None when proxy_protocol is off (nobody sends them).
    proxy_senders: AddressSet | None = None


async def open_listeners(
    addresses: Sequence[HostPort], *, reuse_port: bool = False
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets (the accept loop drives them directly)."""
    listeners = []
    try:
        for hp in addresses:
            sock = bound_socket(hp, reuse_port=reuse_port)
            listeners.append(sock)
            sock.listen(4096)
            sock.setblocking(False)
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


class Proxy:
    def __init__(
        self,
        settings: Settings,
        certs: CertificateManager,
        challenges: ChallengeResponder,
        tickets: TicketKeys | None = None,
    ) -> None:
        self.settings = settings
        self.certs = certs
        self.challenges = challenges
        # The process's session ticket keys; None when tickets are off (tls.session_tickets).
        self.tickets = tickets
        self.upstreams = UpstreamPool()
        self.active = 0
        # Connections still before the end of their TLS handshake: the cheap ones for an
        # attacker (slowloris, silent sockets) are capped separately from established ones.
        self.handshaking = 0
        # The subset of those before a complete ClientHello, oldest first: the sheddable ones.
        self.pre_hello: OrderedDict[int, ConnInfo] = OrderedDict()
        self.live: dict[int, ConnInfo] = {}  # every open connection, by id
        self._ids = itertools.count()
        self._shed_since_log: Counter[str] = Counter()
        self.per_ip: dict[str, int] = {}
        self.draining = False
        self.bound: list[tuple[str, int]] = []
        self.untrusted = RefusalSummary()
        # acme-tls/1 hellos for names with no pending challenge: anyone can send them.
        self.unanswered_validations = LogThrottle(UNANSWERED_VALIDATION_LOG_INTERVAL)
        self._accept_scope = trio.CancelScope()
        self._idle = trio.Event()
        self._idle.set()

    def reload(self, settings: Settings) -> None:
        self.settings = settings
        self.upstreams = UpstreamPool()

    async def serve(
        self,
        listeners: Sequence[socket.socket],
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until ``drain()``; connection tasks live in ``conn_nursery``."""
        self.bound = [_addr(lst.getsockname()) for lst in listeners]
        for lst in listeners:
            # Accepted sockets inherit TCP_NODELAY from their listener (Linux): set once here,
            # not once per connection (our small TLS flights and records must not wait on
            # Nagle for an ACK).
            try:
                lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        async with trio.open_nursery() as conn_nursery:
            try:
                with self._accept_scope:
                    async with trio.open_nursery() as accept_nursery:
                        for lst in listeners:
                            accept_nursery.start_soon(self._accept_loop, lst, conn_nursery)
                        accept_nursery.start_soon(self._sweep)
                        accept_nursery.start_soon(self._summarise_refusals)
                        task_status.started(self.bound)
                for lst in listeners:
                    trio.lowlevel.notify_closing(lst)
                    lst.close()
                # Drain: connections are driven, not tasks the nursery would wait for.
                await self.wait_idle()
            finally:
                # Cancelled (the drain timed out, or shutdown): end the driven connections
                # (a task's is ended by the nursery's cancellation).
                for info in list(self.live.values()):
                    info.timer.cancel(outer=True)

    async def _accept_loop(self, listener: socket.socket, conn_nursery: trio.Nursery) -> None:
        """Accept on ``listener`` until cancelled (``stop_accepting``).

        The listener is one more socket in the reactor's epoll (``_Acceptor``): accepting, a
        connection's first steps and whatever its ClientHello starts happen in one wake-up
        of the reactor, with no trip through trio's loop for the accept alone. This task only
        holds the registration, and pauses it when accepting fails for want of descriptors.
        """
        reactor = the_reactor()
        acceptor = _Acceptor(self, listener, conn_nursery, reactor)
        fd = listener.fileno()
        try:
            while True:
                acceptor.failed = trio.Event()
                reactor.watch(fd, acceptor, select.EPOLLIN)
                await acceptor.failed.wait()  # the acceptor has left the epoll
                exc = acceptor.error
                assert exc is not None
                if not (isinstance(exc, OSError) and exc.errno in _ACCEPT_PAUSE_ERRNOS):
                    raise exc
                log.error("accept failed: %s; pausing 100 ms and continuing", exc)
                metrics.CONNECTIONS_REFUSED.labels("accept_error").inc()
                await trio.sleep(0.1)
        finally:
            reactor.unwatch(fd, acceptor)

    def admit(
        self, fd: int, addr: tuple[str, int], family: int, nursery: trio.Nursery, reactor: Reactor
    ) -> None:
        """One accepted connection: refused at the limits, or started (driven, no task)."""
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        metrics.ACCEPTED_ADD()
        s = self.settings
        # Before anything is read: a peer that may not send a PROXY header gets nothing
        # from us, not even a chance to send one.
        if s.proxy_senders is not None and not s.proxy_senders.allows(addr[0]):
            metrics.PROXY_UNTRUSTED.inc()
            if line := self.untrusted.note(str(addr[0])):
                log.warning("%s", line)
            _abort(sock)
            return
        if self.active >= s.max_connections:
            metrics.CONNECTIONS_REFUSED.labels("max_connections").inc()
            _abort(sock)
            return
        if self.handshaking >= s.max_handshakes and not self._shed_oldest("max_handshakes"):
            metrics.CONNECTIONS_REFUSED.labels("max_handshakes").inc()
            _abort(sock)
            return
        peer = addr if len(addr) == 2 else _addr(addr)  # IPv4 is (str, int) already
        counted_ip = None
        if s.max_connections_per_ip and s.proxy_protocol == "off":
            ip = peer[0]
            if self.per_ip.get(ip, 0) >= s.max_connections_per_ip:
                metrics.CONNECTIONS_REFUSED.labels("max_connections_per_ip").inc()
                _abort(sock)
                return
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            counted_ip = ip
        sock.setblocking(False)  # not inherited; TCP_NODELAY is (see serve)
        self.active += 1
        self.handshaking += 1
        if self.active == 1:
            self._idle = trio.Event()
        metrics.ACTIVE_UP()
        # No task: the reactor drives the connection's story (proxy/reactor.py), from here
        # on, until it needs a task of its own.
        timer = Driver(reactor, nursery, reactor.clock() + s.handshake_timeout)
        info = ConnInfo(
            time.monotonic(),
            peer,
            peer,
            counted_ip=counted_ip,
            conn_id=next(self._ids),
            timer=timer,
        )
        self.pre_hello[info.conn_id] = info
        self.live[info.conn_id] = info
        timer.start(handle_connection(self, sock, info))

    def _shed_oldest(self, reason: str) -> bool:
        """Close the oldest connection still before its ClientHello; False if there is none.

        Its handshake slot is freed at once, and a driven connection ends here and now (reset);
        one in a task of its own ends when the cancellation reaches it.
        """
        if not self.pre_hello:
            return False
        _, info = self.pre_hello.popitem(last=False)
        info.shed = reason
        self.end_handshake(info)
        info.timer.cancel()
        metrics.CONNECTIONS_SHED.labels(reason).inc()
        self._shed_since_log[reason] += 1
        return True

    async def _sweep(self) -> None:
        """Apply the scaled pre-ClientHello timeout; log a summary of what was shed."""
        next_log = trio.current_time()  # the first shed is reported at once
        while True:
            await trio.sleep(_SWEEP_INTERVAL)
            s = self.settings
            while self.pre_hello:
                allowed = scaled_hello_timeout(
                    s.handshake_timeout, self.handshaking, s.max_handshakes
                )
                if allowed >= s.handshake_timeout:
                    break  # no pressure: the connection's own deadline applies
                oldest = next(iter(self.pre_hello.values()))
                if time.monotonic() - oldest.started < allowed:
                    break  # oldest first: nothing younger is due either
                self._shed_oldest("hello_timeout_scaled")
            if self._shed_since_log and trio.current_time() >= next_log:
                next_log = trio.current_time() + _SHED_LOG_INTERVAL
                counts = ", ".join(f"{n} for {r}" for r, n in sorted(self._shed_since_log.items()))
                log.warning(
                    "overload: shed %d connections that had sent no ClientHello (%s); "
                    "%d of max_handshakes=%d in use; next summary in %.0fs at the earliest",
                    sum(self._shed_since_log.values()),
                    counts,
                    self.handshaking,
                    s.max_handshakes,
                    _SHED_LOG_INTERVAL,
                )
                self._shed_since_log.clear()

    def hello_received(self, info: ConnInfo) -> None:
        """The connection sent a complete ClientHello: from now on it is never shed."""
        self.pre_hello.pop(info.conn_id, None)

    async def _summarise_refusals(self) -> None:
        while True:
            await trio.sleep(self.untrusted.interval)
            if line := self.untrusted.flush():
                log.warning("%s", line)

    def admit_client(self, info: ConnInfo) -> bool:
        """Per-IP limit for addresses learnt from the PROXY header."""
        s = self.settings
        if not s.max_connections_per_ip or s.proxy_protocol == "off":
            return True
        ip = info.client[0]
        if self.per_ip.get(ip, 0) >= s.max_connections_per_ip:
            metrics.CONNECTIONS_REFUSED.labels("max_connections_per_ip").inc()
            return False
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        info.counted_ip = ip
        return True

    def end_handshake(self, info: ConnInfo) -> None:
        """The connection left its handshake phase (idempotent)."""
        if info.in_handshake:
            info.in_handshake = False
            self.handshaking -= 1
            self.pre_hello.pop(info.conn_id, None)

    def connection_closed(self, info: ConnInfo) -> None:
        self.end_handshake(info)
        self.live.pop(info.conn_id, None)
        self.active -= 1
        metrics.ACTIVE_DOWN()
        ip = info.counted_ip
        if ip is not None:
            n = self.per_ip.get(ip, 1) - 1
            if n <= 0:
                self.per_ip.pop(ip, None)
            else:
                self.per_ip[ip] = n
        if self.active == 0:
            self._idle.set()
        count_closed(info)

    def stop_accepting(self) -> None:
        self.draining = True
        self._accept_scope.cancel()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _Acceptor:
    """A listener as an owner in the reactor's epoll (level-triggered): each ready event
    accepts up to ``_ACCEPTS_PER_EVENT`` connections (what is left reports again, after the
    other sockets of that wake-up had their turn)."""

    __slots__ = ("error", "failed", "family", "listener", "nursery", "proxy", "reactor")

    def __init__(
        self, proxy: Proxy, listener: socket.socket, nursery: trio.Nursery, reactor: Reactor
    ) -> None:
        self.proxy = proxy
        self.listener = listener
        self.family = listener.family
        self.nursery = nursery
        self.reactor = reactor
        self.failed = trio.Event()
        self.error: Exception | None = None

    def on_ready(self, fd: int, events: int) -> None:
        listener = self.listener
        admit = self.proxy.admit
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                # ``accept()`` without its wrapper: it converts the listener's family and type
                # to enums for every connection, more Python than the rest of an accept.
                conn_fd, addr = listener._accept()  # type: ignore[attr-defined]  # CPython
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up before we accepted: nothing to do
                self.on_error(exc)
                return
            admit(conn_fd, addr, self.family, self.nursery, self.reactor)

    def on_error(self, exc: Exception) -> None:
        """Accepting failed: the accept loop's task takes over (pauses, or raises ``exc``)."""
        self.reactor.unwatch(self.listener.fileno(), self)
        self.error = exc
        self.failed.set()


def _abort(sock: socket.socket) -> None:
    set_reset_on_close(sock)
    sock.close()


def _addr(sockaddr: object) -> tuple[str, int]:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return str(sockaddr[0]), int(sockaddr[1])
    return ("unknown", 0)
