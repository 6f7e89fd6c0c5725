"""One client connection's story, from accept to close.

    accept -> PROXY header? -> peek ClientHello -> decide -+-> acme-tls/1: challenge cert, close
                                                           +-> terminate TLS -> upstream -> pipe

Everything the peer can do wrong ends here as a ``result`` token on the connection (counted and
logged once, in the access line), never as an exception escaping the task. The handshake
timeout covers PROXY header, ClientHello and the TLS handshake together, so a slow or silent
client cannot hold a connection slot longer than ``server.handshake_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .. import metrics
from ..errors import CertificateUnavailable, UpstreamError
from ..names import is_ip_literal
from ..tls.contexts import new_server_connection
from ..tls.stream import TLSHandshakeError, TLSStream
from ..wire.clienthello import NEED_DATA, ClientHello, ClientHelloError, ClientHelloParser, NotTLS
from ..wire.proxy_protocol import ProxyHeaderParser, ProxyProtocolError, build_v1, build_v2
from ..wire.tls_alert import HTTP_ON_TLS_PORT, AlertDescription, alert_record
from .pipe import pipe, send_all
from .routes import Route

if TYPE_CHECKING:
    from .server import Proxy, Settings

log = logging.getLogger("edgeproxy.conn")
access_log = logging.getLogger("edgeproxy.access")

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
    proxy: Proxy, stream: trio.SocketStream, counted_ip: str | None
) -> None:
    settings = proxy.settings  # one snapshot per connection: a reload never changes it mid-way
    try:
        peer = _addr(stream.socket.getpeername())
        local = _addr(stream.socket.getsockname())
    except OSError:
        # Reset before we got to it (a scanner's SYN-RST): nothing to serve, nothing to log.
        peer = local = ("unknown", 0)
    info = ConnInfo(time.monotonic(), peer, peer, local)
    info.counted_ip = counted_ip
    try:
        if peer[0] == "unknown":
            info.result = "reset_before_start"
            return
        await _serve(proxy, settings, stream, info)
    except Exception:
        info.result = "internal_error"
        log.exception("connection from %s: unexpected error", info.client[0])
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        proxy.connection_closed(info)


async def _send_quietly(stream: trio.SocketStream, data: bytes) -> None:
    with trio.move_on_after(1.0):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(data)


async def _serve(proxy: Proxy, s: Settings, stream: trio.SocketStream, info: ConnInfo) -> None:
    tls: TLSStream | None = None
    route: Route | None = None
    try:
        with trio.move_on_after(s.handshake_timeout) as hs_scope:
            tls, route = await _handshake(proxy, s, stream, info)
    finally:
        proxy.end_handshake(info)
    if hs_scope.cancelled_caught:
        info.result = "handshake_timeout"
        metrics.HANDSHAKES.labels("failed", "timeout").inc()
        return
    if tls is None or route is None:
        return
    await _forward(proxy, s, stream, tls, route, info)


async def _handshake(
    proxy: Proxy, s: Settings, stream: trio.SocketStream, info: ConnInfo
) -> tuple[TLSStream | None, Route | None]:
    """PROXY header, ClientHello, decision, TLS handshake: (stream, route) or (None, None)."""
    rest = b""
    if s.proxy_protocol != "off":
        pp = ProxyHeaderParser(s.proxy_protocol)  # type: ignore[arg-type]
        while True:
            data = await _receive(stream)
            if not data:
                info.result = "eof_in_proxy_header"
                metrics.PROXY_HEADERS.labels("eof").inc()
                return None, None
            try:
                parsed = pp.feed(data)
            except ProxyProtocolError as exc:
                info.result = "bad_proxy_header"
                info.extra["detail"] = exc.reason
                metrics.PROXY_HEADERS.labels("invalid").inc()
                return None, None
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
            return None, None

    parser = ClientHelloParser()
    hello: ClientHello | object = parser.feed(rest) if rest else NEED_DATA
    try:
        while hello is NEED_DATA:
            data = await _receive(stream)
            if not data:
                if info.result != "health_check":
                    info.result = "eof_before_hello" if parser.buffered else "eof_silent"
                    metrics.CLIENT_HELLOS.labels("eof").inc()
                return None, None
            hello = parser.feed(data)
    except NotTLS as exc:
        metrics.CLIENT_HELLOS.labels("http" if exc.looks_like_http else "not_tls").inc()
        if exc.looks_like_http:
            info.result = "plain_http"
            await _send_quietly(stream, HTTP_ON_TLS_PORT)
        else:
            info.result = "not_tls"
        return None, None
    except ClientHelloError as exc:
        metrics.CLIENT_HELLOS.labels(exc.reason).inc()
        info.result = f"bad_hello:{exc.reason}"
        return None, None
    assert isinstance(hello, ClientHello)
    metrics.CLIENT_HELLOS.labels("ok").inc()
    sni = hello.sni
    if sni is not None and is_ip_literal(sni):
        # RFC 6066 forbids IP literals in SNI, yet some clients (wrk, old agents) send
        # them: answer as if no SNI was sent (default route and certificate).
        sni = None
    info.sni = sni

    if ACME_TLS_ALPN in hello.alpn_protocols:
        await _answer_challenge(proxy, stream, hello, parser.buffered, info)
        return None, None

    route = s.routes.match(sni)
    if route is None:
        info.result = "no_route"
        metrics.HANDSHAKES.labels("refused", "no_route").inc()
        await _send_quietly(stream, alert_record(AlertDescription.UNRECOGNIZED_NAME))
        return None, None
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
        await _send_quietly(stream, alert_record(desc))
        return None, None
    tls = TLSStream(
        stream, new_server_connection(ctx, alpn=route.alpn), initial_data=parser.buffered
    )
    try:
        await tls.do_handshake()
    except TLSHandshakeError as exc:
        info.result = f"tls_error:{exc.reason}"
        metrics.HANDSHAKES.labels("failed", exc.reason).inc()
        return None, None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        info.result = "tls_error:peer_closed"
        metrics.HANDSHAKES.labels("failed", "peer_closed").inc()
        return None, None
    metrics.HANDSHAKES.labels("ok", "").inc()
    metrics.HANDSHAKE_SECONDS.observe(time.monotonic() - info.started)
    info.alpn = tls.selected_alpn
    return tls, route


async def _forward(
    proxy: Proxy,
    s: Settings,
    stream: trio.SocketStream,
    tls: TLSStream,
    route: Route,
    info: ConnInfo,
) -> None:
    """Connect the route's upstream and pipe both ways until both sides are done."""
    try:
        upstream, hp = await proxy.upstreams.connect(route, s.connect_timeout)
    except UpstreamError as exc:
        info.result = "upstream_unreachable"
        log.error("%s (client %s, sni %s)", exc, info.client[0], info.sni)
        with trio.move_on_after(1.0):
            await tls.aclose()
        return
    info.upstream = str(hp)
    # From here on the hot loop drives the sockets and the SSL object directly.
    client = socket.socket(fileno=stream.socket.detach())
    try:
        client.setblocking(False)
        if route.send_proxy is not None:
            header = (build_v2 if route.send_proxy == "v2" else build_v1)(info.client, info.local)
            try:
                await send_all(upstream, header)
            except OSError:
                info.result = "upstream_reset"
                return
        result = await pipe(
            tls.connection,
            client,
            upstream,
            idle_timeout=s.idle_timeout,
            pending=tls.take_delayed_output(),
        )
        info.to_upstream = result.to_upstream
        info.to_client = result.to_client
        if result.reason != "done":
            info.result = result.reason
    finally:
        for sock in (client, upstream):
            trio.lowlevel.notify_closing(sock)
            sock.close()


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(_READ)
    except (trio.BrokenResourceError, OSError):
        return b""


async def _answer_challenge(
    proxy: Proxy, stream: trio.SocketStream, hello: ClientHello, buffered: bytes, info: ConnInfo
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
        await _send_quietly(stream, alert_record(AlertDescription.UNRECOGNIZED_NAME))
        return
    tls = TLSStream(
        stream, new_server_connection(ctx, alpn=(ACME_TLS_ALPN,)), initial_data=buffered
    )
    try:
        await tls.do_handshake()
    except (TLSHandshakeError, trio.BrokenResourceError) as exc:
        info.result = f"acme_tls_error:{getattr(exc, 'reason', 'peer_closed')}"
        return
    metrics.CHALLENGES_ANSWERED.inc()
    info.result = "acme_challenge_answered"
    log.info("answered TLS-ALPN-01 validation for %s from %s", name, info.client[0])
    with trio.move_on_after(1.0):
        await tls.aclose()
