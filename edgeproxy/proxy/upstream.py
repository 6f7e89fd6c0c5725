"""Upstream connections: round-robin over a route's upstreams, skipping ones that fail.

A failed connect marks the upstream as suspect for a short while so the next connections try
healthy ones first (passive health checking); if every upstream is suspect they are all tried
anyway, because a stale mark must never turn a recovered backend into an outage.

Connections are raw non-blocking sockets (the hot loop in ``pipe.py`` drives them directly):
a plain non-blocking connect, no happy-eyeballs machinery per connection. Hostnames are
resolved through trio (a thread) and remembered for ``DNS_TTL`` seconds; IP literals skip
resolution entirely.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .. import metrics
from ..addresses import HostPort
from ..errors import UpstreamError
from ..waits import handover, wait_writable
from .routes import Route

log = logging.getLogger("edgeproxy.upstream")

SUSPECT_FOR = 5.0
DNS_TTL = 30.0

Address = tuple[int, tuple[str, int] | tuple[str, int, int, int]]


@dataclass(slots=True)
class PendingConnect:
    """An upstream connection begun by ``UpstreamPool.start``; ``close`` it if unused."""

    order: list[HostPort]
    sock: socket.socket | None = None
    early_error: tuple[HostPort, OSError] | None = None
    started: float = 0.0

    def close(self) -> None:
        if self.sock is not None:
            _close(self.sock)
            self.sock = None


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


@functools.lru_cache(maxsize=4096)
def _literal_address(hp: HostPort) -> Address | None:
    # Cached: parsing the address costs more than the rest of starting a connect in Python.
    try:
        ip = ipaddress.ip_address(hp.host)
    except ValueError:
        return None
    if ip.version == 6:
        return (socket.AF_INET6, (hp.host, hp.port, 0, 0))
    return (socket.AF_INET, (hp.host, hp.port))


async def _wait_connected(sock: socket.socket, per_attempt: float) -> None:
    try:
        sock.getpeername()
        return  # the TCP handshake finished while we were busy: no wait at all
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
    await handover()  # the connect timeout is a trio timeout: a task's
    with trio.fail_after(per_attempt):
        await wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


class UpstreamPool:
    def __init__(self) -> None:
        self._suspect_until: dict[HostPort, float] = {}
        self._resolved: dict[HostPort, tuple[float, list[Address]]] = {}
        # Per route label, its histogram child's bound observe (metrics.observer).
        self._connect_seconds: dict[str, Callable[[float], None]] = {}

    def _order(self, route: Route) -> list[HostPort]:
        order = route.upstream_order()
        if self._suspect_until:
            now = time.monotonic()
            order.sort(key=lambda hp: self._suspect_until.get(hp, 0.0) > now)
        return order

    def start(self, route: Route) -> PendingConnect:
        """Begin connecting to the route's next upstream without waiting (no await).

        The data path calls this before the client's TLS handshake, so the upstream's TCP
        handshake runs meanwhile and is usually done when ``finish`` is called: no extra wait
        and no latency. Only IP-literal upstreams start early (a hostname needs DNS first).
        """
        order = self._order(route)
        pending = PendingConnect(order, None, None, time.monotonic())
        hp = order[0]
        addr = _literal_address(hp)
        if addr is None:
            return pending
        try:
            # Non-blocking from birth: one fcntl fewer per connection.
            sock = socket.socket(addr[0], socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE/ENFILE under an fd storm: an upstream failure, no crash
            pending.early_error = (hp, exc)
            return pending
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(addr[1])
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            pending.early_error = (hp, OSError(err, os.strerror(err)))
            return pending
        pending.sock = sock
        return pending

    async def finish(
        self, route: Route, pending: PendingConnect, per_attempt: float
    ) -> tuple[socket.socket, HostPort]:
        """Complete what ``start`` began; on failure try the route's other upstreams."""
        errors: list[str] = []
        order = pending.order
        if pending.sock is not None or pending.early_error is not None:
            hp = order[0]
            order = order[1:]
            sock = pending.sock
            pending.sock = None
            try:
                if pending.early_error is not None:
                    raise pending.early_error[1]
                assert sock is not None
                await _wait_connected(sock, per_attempt)
            except (OSError, trio.TooSlowError) as exc:
                if sock is not None:
                    _close(sock)
                errors.append(self._failed(route, hp, exc))
            else:
                self._connected(route, hp, pending.started)
                return sock, hp
        if order:
            await handover()  # timeouts and DNS are trio's: a task's
        for hp in order:
            t0 = time.monotonic()
            try:
                with trio.fail_after(per_attempt):
                    sock = await self._connect_one(hp)
            except (OSError, trio.TooSlowError) as exc:
                errors.append(self._failed(route, hp, exc))
                continue
            self._connected(route, hp, t0)
            return sock, hp
        raise UpstreamError(f"route {route.label}: no upstream reachable ({'; '.join(errors)})")

    def _failed(self, route: Route, hp: HostPort, exc: BaseException) -> str:
        if isinstance(exc, trio.TooSlowError):
            reason = "timeout"
        elif isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
        else:
            reason = type(exc).__name__
        metrics.UPSTREAM_CONNECT_FAILURES.labels(route.label, str(hp)).inc()
        self._suspect_until[hp] = time.monotonic() + SUSPECT_FOR
        log.warning("route %s: upstream %s connect failed: %s", route.label, hp, reason)
        return f"{hp}: {reason}"

    def _connected(self, route: Route, hp: HostPort, t0: float) -> None:
        observe = self._connect_seconds.get(route.label)
        if observe is None:
            observe = self._connect_seconds[route.label] = metrics.observer(
                metrics.UPSTREAM_CONNECT_SECONDS.labels(route.label)
            )
        observe(time.monotonic() - t0)
        if self._suspect_until:
            self._suspect_until.pop(hp, None)

    async def _addresses(self, hp: HostPort) -> list[Address]:
        literal = _literal_address(hp)
        if literal is not None:
            return [literal]
        cached = self._resolved.get(hp)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        infos = await trio.socket.getaddrinfo(hp.host, hp.port, type=socket.SOCK_STREAM)
        addrs: list[Address] = [(int(fam), sa) for fam, _, _, _, sa in infos]  # type: ignore[misc]
        if not addrs:
            raise OSError(errno.EHOSTUNREACH, f"{hp.host} resolved to nothing")
        self._resolved[hp] = (time.monotonic() + DNS_TTL, addrs)
        return addrs

    async def _connect_one(self, hp: HostPort) -> socket.socket:
        last: OSError | None = None
        for family, addr in await self._addresses(hp):
            try:
                return await connect_raw(family, addr)
            except OSError as exc:
                last = exc
        assert last is not None
        raise last


async def connect_raw(
    family: int, addr: tuple[str, int] | tuple[str, int, int, int]
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err == errno.EINPROGRESS:
            await wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return sock
