"""One client connection's story, from accept to close.

    accept -> PROXY header? -> peek ClientHello -> decide -+-> acme-tls/1: challenge cert, close
                                                           +-> terminate TLS -> upstream -> pipe

Everything the peer can do wrong ends here as a ``result`` token on the connection (counted and
logged once, in the access line), never as an exception escaping the task. The handshake
timeout covers PROXY header, ClientHello and the TLS handshake together, so a slow or silent
client cannot hold a connection slot longer than ``server.handshake_timeout``.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from OpenSSL import SSL
from trio.lowlevel import wait_readable

from .. import metrics
from ..errors import CertificateUnavailable, UpstreamError
from ..names import is_ip_literal
from ..tls.contexts import new_server_connection
from ..tls.errors import TLSHandshakeError
from ..tls.handshake import accept_tls
from ..wire.clienthello import NEED_DATA, ClientHello, ClientHelloError, ClientHelloParser, NotTLS
from ..wire.proxy_protocol import ProxyHeaderParser, ProxyProtocolError, build_v1, build_v2
from ..wire.tls_alert import HTTP_ON_TLS_PORT, AlertDescription, alert_record
from .pipe import pipe, send_all
from .routes import Route
from .upstream import PendingConnect

if TYPE_CHECKING:
    from .server import Proxy, Settings

log = logging.getLogger("edgeproxy.conn")

ACME_TLS_ALPN = "acme-tls/1"
_READ = 16384

# Refusals that are about the name, not about us: the client learns "not here".
_NAME_REASONS = frozenset(
    {"denied", "invalid_name", "no_sni", "ask_unavailable", "ask_rate_limited"}
)


@dataclass(slots=True)
class ConnInfo:
    started: float
    peer: tuple[str, int]
    client: tuple[str, int]
    local: tuple[str, int]
    sni: str | None = None
    alpn: str | None = None
    route: str | None = None
    upstream: str | None = None
    to_upstream: int = 0
    to_client: int = 0
    result: str = "ok"
    counted_ip: str | None = None  # the address charged against max_connections_per_ip
    in_handshake: bool = True  # counted in Proxy.handshaking until the handshake phase ends
    extra: dict[str, str] = field(default_factory=dict)


def _addr(sockaddr: object) -> tuple[str, int]:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return str(sockaddr[0]), int(sockaddr[1])
    return ("unknown", 0)


async def handle_connection(
    proxy: Proxy, sock: socket.socket, peer: tuple[str, int], counted_ip: str | None
) -> None:
    settings = proxy.settings  # one snapshot per connection: a reload never changes it mid-way
    try:
        local = _addr(sock.getsockname())
    except OSError:
        local = ("unknown", 0)
    info = ConnInfo(time.monotonic(), peer, peer, local)
    info.counted_ip = counted_ip
    try:
        await _serve(proxy, settings, sock, info)
    except Exception:
        info.result = "internal_error"
        log.exception("connection from %s: unexpected error", info.client[0])
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        proxy.connection_closed(info)


async def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with trio.move_on_after(1.0):
        try:
            await send_all(sock, data)
        except OSError:
            pass


async def _serve(proxy: Proxy, s: Settings, sock: socket.socket, info: ConnInfo) -> None:
    done: tuple[SSL.Connection, Route, bytes, PendingConnect] | None = None
    try:
        with trio.move_on_after(s.handshake_timeout) as hs_scope:
            done = await _handshake(proxy, s, sock, info)
    finally:
        proxy.end_handshake(info)
    if hs_scope.cancelled_caught:
        info.result = "handshake_timeout"
        metrics.HANDSHAKES.labels("failed", "timeout").inc()
        return
    if done is None:
        return
    conn, route, pending, upstream = done
    try:
        await _forward(proxy, s, sock, conn, route, pending, upstream, info)
    finally:
        upstream.close()


async def _handshake(
    proxy: Proxy, s: Settings, sock: socket.socket, info: ConnInfo
) -> tuple[SSL.Connection, Route, bytes, PendingConnect] | None:
    """PROXY header, ClientHello, decision, TLS handshake.

    Returns (connection, route, ciphertext to send first) or None when the connection ends
    here (its ``info.result`` says why).
    """
    rest = b""
    if s.proxy_protocol != "off":
        pp = ProxyHeaderParser(s.proxy_protocol)  # type: ignore[arg-type]
        while True:
            data = await _receive(sock)
            if not data:
                info.result = "eof_in_proxy_header"
                metrics.PROXY_HEADERS.labels("eof").inc()
                return None
            try:
                parsed = pp.feed(data)
            except ProxyProtocolError as exc:
                info.result = "bad_proxy_header"
                info.extra["detail"] = exc.reason
                metrics.PROXY_HEADERS.labels("invalid").inc()
                return None
            if parsed is not None:
                pp_header, rest = parsed
                break
        if pp_header.command == "LOCAL":
            # Load balancer health check: the connection is the balancer's own.
            metrics.PROXY_HEADERS.labels("local").inc()
            if not rest:
                info.result = "health_check"
        else:
            metrics.PROXY_HEADERS.labels("proxy").inc()
            if pp_header.source is not None:
                info.client = pp_header.source
        if pp_header.aws_vpce_id:
            info.extra["vpce"] = pp_header.aws_vpce_id
        if not proxy.admit_client(info):
            info.result = "limit_per_ip"
            return None

    parser = ClientHelloParser()
    hello: ClientHello | object = parser.feed(rest) if rest else NEED_DATA
    try:
        while hello is NEED_DATA:
            data = await _receive(sock)
            if not data:
                if info.result != "health_check":
                    info.result = "eof_before_hello" if parser.buffered else "eof_silent"
                    metrics.CLIENT_HELLOS.labels("eof").inc()
                return None
            hello = parser.feed(data)
    except NotTLS as exc:
        metrics.CLIENT_HELLOS.labels("http" if exc.looks_like_http else "not_tls").inc()
        if exc.looks_like_http:
            info.result = "plain_http"
            await _send_quietly(sock, HTTP_ON_TLS_PORT)
        else:
            info.result = "not_tls"
        return None
    except ClientHelloError as exc:
        metrics.CLIENT_HELLOS.labels(exc.reason).inc()
        info.result = f"bad_hello:{exc.reason}"
        return None
    assert isinstance(hello, ClientHello)
    metrics.CLIENT_HELLOS_OK.inc()
    sni = hello.sni
    if sni is not None and is_ip_literal(sni):
        # RFC 6066 forbids IP literals in SNI, yet some clients (wrk, old agents) send
        # them: answer as if no SNI was sent (default route and certificate).
        sni = None
    info.sni = sni

    if ACME_TLS_ALPN in hello.alpn_protocols:
        await _answer_challenge(proxy, sock, hello, parser.buffered, info)
        return None

    route = s.routes.match(sni)
    if route is None:
        info.result = "no_route"
        metrics.HANDSHAKES.labels("refused", "no_route").inc()
        await _send_quietly(sock, alert_record(AlertDescription.UNRECOGNIZED_NAME))
        return None
    info.route = route.label
    try:
        ctx = await proxy.certs.context_for(sni)
    except CertificateUnavailable as exc:
        info.result = f"no_certificate:{exc.reason}"
        metrics.HANDSHAKES.labels("refused", exc.reason).inc()
        desc = (
            AlertDescription.UNRECOGNIZED_NAME
            if exc.reason in _NAME_REASONS
            else AlertDescription.INTERNAL_ERROR
        )
        await _send_quietly(sock, alert_record(desc))
        return None
    conn = new_server_connection(ctx, alpn=route.alpn)
    # The upstream's TCP handshake runs while the client's TLS handshake does.
    upstream = proxy.upstreams.start(route)
    try:
        pending = await accept_tls(conn, sock, parser.buffered)
    except TLSHandshakeError as exc:
        upstream.close()
        info.result = f"tls_error:{exc.reason}"
        metrics.HANDSHAKES.labels("failed", exc.reason).inc()
        return None
    except BaseException:
        upstream.close()  # cancelled by the handshake timeout, or worse
        raise
    metrics.HANDSHAKES_OK.inc()
    metrics.HANDSHAKE_SECONDS.observe(time.monotonic() - info.started)
    alpn = conn.get_alpn_proto_negotiated()
    info.alpn = alpn.decode("ascii", "replace") if alpn else None
    return conn, route, pending, upstream


async def _forward(
    proxy: Proxy,
    s: Settings,
    client: socket.socket,
    conn: SSL.Connection,
    route: Route,
    pending: bytes,
    started: PendingConnect,
    info: ConnInfo,
) -> None:
    """Connect the route's upstream and pipe both ways until both sides are done."""
    try:
        upstream, hp = await proxy.upstreams.finish(route, started, s.connect_timeout)
    except UpstreamError as exc:
        info.result = "upstream_unreachable"
        log.error("%s (client %s, sni %s)", exc, info.client[0], info.sni)
        await _close_notify(client, conn, pending)
        return
    info.upstream = str(hp)
    try:
        if route.send_proxy is not None:
            header = (build_v2 if route.send_proxy == "v2" else build_v1)(info.client, info.local)
            try:
                await send_all(upstream, header)
            except OSError:
                info.result = "upstream_reset"
                return
        result = await pipe(conn, client, upstream, idle_timeout=s.idle_timeout, pending=pending)
        info.to_upstream = result.to_upstream
        info.to_client = result.to_client
        if result.reason != "done":
            info.result = result.reason
    finally:
        trio.lowlevel.notify_closing(upstream)
        upstream.close()


async def _close_notify(client: socket.socket, conn: SSL.Connection, pending: bytes) -> None:
    """A clean TLS close (the client sees an orderly end, not a reset); best effort."""
    try:
        conn.shutdown()
    except SSL.Error:
        pass
    out = pending
    try:
        while True:
            out += conn.bio_read(65536)
    except SSL.Error:
        pass
    await _send_quietly(client, out)


async def _receive(sock: socket.socket) -> bytes:
    """Wait for bytes, then read them (b"" at EOF or on a reset)."""
    while True:
        await wait_readable(sock)
        try:
            return sock.recv(_READ)
        except BlockingIOError:
            continue
        except OSError:
            return b""


async def _answer_challenge(
    proxy: Proxy, sock: socket.socket, hello: ClientHello, buffered: bytes, info: ConnInfo
) -> None:
    info.alpn = ACME_TLS_ALPN
    name = hello.sni
    ctx = await proxy.challenges.context_for(name) if name else None
    if ctx is None:
        info.result = "acme_no_pending_challenge"
        metrics.CHALLENGES_WITHOUT_PENDING.inc()
        log.warning(
            "validation attempt for %s with no pending challenge on this node (client %s): "
            "answered unrecognized_name. If you did not expect a validation, ignore this; "
            "otherwise check replicas share storage and the load balancer forwards TCP untouched",
            name,
            info.client[0],
        )
        await _send_quietly(sock, alert_record(AlertDescription.UNRECOGNIZED_NAME))
        return
    conn = new_server_connection(ctx, alpn=(ACME_TLS_ALPN,))
    try:
        pending = await accept_tls(conn, sock, buffered)
    except TLSHandshakeError as exc:
        info.result = f"acme_tls_error:{exc.reason}"
        return
    metrics.CHALLENGES_ANSWERED.inc()
    info.result = "acme_challenge_answered"
    log.info("answered TLS-ALPN-01 validation for %s from %s", name, info.client[0])
    await _close_notify(sock, conn, pending)
