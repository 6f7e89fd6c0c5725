"""One client connection's story, from accept to close.

    accept -> PROXY header? -> peek ClientHello -> decide -+-> acme-tls/1: challenge cert, close
                                                           +-> terminate TLS -> upstream -> pipe

The ClientHello is *peeked* (``MSG_PEEK``): when it arrived whole, it stays in the socket and
OpenSSL reads it from there itself, so the handshake and the pipe run with OpenSSL on the
socket from the first byte. A ClientHello that arrives in pieces (or after a PROXY header in
a segment we had to read) is taken off the socket and fed to memory BIOs instead; the pipe
moves such a connection onto the socket later. A refused connection has its peeked bytes
read before the alert goes out: closing a socket with unread data sends a reset, which can
destroy the alert before the client reads it.

Everything the peer can do wrong ends here as a ``result`` token on the connection (counted and
logged once, in the access line), never as an exception escaping the task. The handshake
timeout covers PROXY header, ClientHello and the TLS handshake together, so a slow or silent
client cannot hold a connection slot longer than ``server.handshake_timeout``; time spent
waiting for a new name's certificate (up to ``on_demand.wait``) is not the client's and is
added on top.
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
from ..tls.contexts import ServerIdentity, new_server_connection
from ..tls.errors import TLSHandshakeError
from ..tls.handshake import accept_tls, accept_tls_on_socket
from ..wire.clienthello import NEED_DATA, ClientHello, ClientHelloError, ClientHelloParser, NotTLS
from ..wire.proxy_protocol import ProxyHeaderParser, ProxyProtocolError, build_v1, build_v2
from ..wire.tls_alert import HTTP_ON_TLS_PORT, AlertDescription, alert_record
from .pipe import PipeResult, pipe, send_all
from .routes import Route
from .upstream import PendingConnect

if TYPE_CHECKING:
    from .server import Proxy, Settings

log = logging.getLogger("edgeproxy.conn")

ACME_TLS_ALPN = "acme-tls/1"
_READ = 16384
# How far past on_demand.wait a connection waiting for its certificate may live: enough for
# the manager's own wait to end first and the refusal alert to be sent.
_CERT_WAIT_GRACE = 1.0

# Refusals that are about the name, not about us: the client learns "not here".
_NAME_REASONS = frozenset(
    {"denied", "invalid_name", "no_sni", "ask_unavailable", "ask_rate_limited", "removed"}
)


@dataclass(slots=True)
class ConnInfo:
    started: float
    peer: tuple[str, int]
    client: tuple[str, int]
    # The address the client connected to (the PROXY header's destination, else ours);
    # None until needed: a getsockname per connection is wasted when nothing uses it.
    local: tuple[str, int] | None = None
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
    conn_id: int = 0  # key in Proxy.pre_hello
    # The connection's one cancel scope: the handshake deadline first (PROXY header,
    # ClientHello and TLS handshake together), then the idle timeout, which the pipe moves
    # along on activity and uses to end early. A scope per phase costs measurably.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    shed: str | None = None  # why the overload shedding closed it, if it did


def _addr(sockaddr: object) -> tuple[str, int]:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return str(sockaddr[0]), int(sockaddr[1])
    return ("unknown", 0)


async def handle_connection(proxy: Proxy, sock: socket.socket, info: ConnInfo) -> None:
    s = proxy.settings  # one snapshot per connection: a reload never changes it mid-way
    scope = info.scope  # made at accept, with the handshake deadline (see ConnInfo)
    flow = PipeResult()
    est: _Established | None = None
    try:
        with scope:
            try:
                est = await _handshake(proxy, s, sock, info)
            finally:
                proxy.end_handshake(info)
            if est is not None:
                scope.deadline = trio.current_time() + s.idle_timeout
                try:
                    await _forward(proxy, s, sock, est, info, scope, flow)
                finally:
                    est.upstream.close()
        if scope.cancelled_caught:
            if info.shed is not None:
                info.result = f"shed:{info.shed}"
            elif est is None:
                info.result = "handshake_timeout"
                metrics.HANDSHAKES.labels("failed", "timeout").inc()
            elif flow.reason == "done":
                flow.reason = "idle_timeout"
        if flow.reason != "done":
            info.result = flow.reason
        info.to_upstream = flow.to_upstream
        info.to_client = flow.to_client
    except Exception:
        info.result = "internal_error"
        log.exception("connection from %s: unexpected error", info.client[0])
    finally:
        # No trio.lowlevel.notify_closing: it exists to wake tasks waiting on the socket, and
        # every task of this connection has ended here. Closing the (never duplicated) fd
        # drops it from trio's epoll set anyway; the call would cost an exception object and
        # an epoll_ctl per socket per connection.
        if info.shed is not None:
            set_reset_on_close(sock)
        sock.close()
        proxy.connection_closed(info)


def set_reset_on_close(sock: socket.socket) -> None:
    """Make ``close`` send RST, not FIN: a refused or shed connection must cost us no
    TIME_WAIT and the client no wait."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass


async def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with trio.move_on_after(1.0):
        try:
            await send_all(sock, data)
        except OSError:
            pass


@dataclass(slots=True)
class _Established:
    conn: SSL.Connection
    route: Route
    upstream: PendingConnect
    on_socket: bool  # OpenSSL reads and writes the client socket itself
    pending: bytes = b""  # memory-BIO mode: ciphertext to send before the first response


async def _handshake(
    proxy: Proxy, s: Settings, sock: socket.socket, info: ConnInfo
) -> _Established | None:
    """PROXY header, ClientHello, decision, TLS handshake.

    Returns the established connection, or None when the connection ends here (its
    ``info.result`` says why).
    """
    rest = b""  # bytes read off the socket past the PROXY header
    if s.proxy_protocol != "off":
        pp = ProxyHeaderParser(s.proxy_protocol)  # type: ignore[arg-type]
        # Peek first: the balancer usually sends the header and the ClientHello in one
        # segment, and only the header should leave the socket.
        data = await _peek(sock)
        after: bytes | None = None
        while True:
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
            if after is None:  # ``data`` was peeked: take what the parser used
                if parsed is not None:
                    pp_header, after = parsed
                    _consume(sock, len(data) - len(after))
                    break
                after = b""
                _consume(sock, len(data))
            elif parsed is not None:
                pp_header, rest = parsed
                after = rest
                break
            data = await _receive(sock)
        if pp_header.command == "LOCAL":
            # Load balancer health check: the connection is the balancer's own.
            metrics.PROXY_HEADERS.labels("local").inc()
            if not after:
                info.result = "health_check"
        else:
            metrics.PROXY_HEADERS.labels("proxy").inc()
            # Only IP families name a client: UNSPEC and UNIX (a path is no address, and may
            # hold a newline) mean "the balancer's own connection", as LOCAL does.
            if pp_header.family in ("TCP4", "TCP6"):
                if pp_header.source is not None:
                    info.client = pp_header.source
                if pp_header.destination is not None:
                    info.local = pp_header.destination
        if pp_header.aws_vpce_id:
            info.extra["vpce"] = pp_header.aws_vpce_id
        if not proxy.admit_client(info):
            info.result = "limit_per_ip"
            return None

    parser = ClientHelloParser()
    hello: ClientHello | object = NEED_DATA
    queued = 0  # bytes fed to the parser that were only peeked: still in the socket
    try:
        if rest:
            hello = parser.feed(rest)
        else:
            data = await _peek(sock)
            queued = len(data)
            if data:
                hello = parser.feed(data)
                if hello is NEED_DATA:
                    # In pieces: take them off the socket and read the rest the usual way.
                    _consume(sock, queued)
                    queued = 0
        while hello is NEED_DATA:
            data = await _receive(sock)
            if not data:
                if info.result != "health_check":
                    info.result = "eof_before_hello" if parser.buffered else "eof_silent"
                    metrics.CLIENT_HELLOS.labels("eof").inc()
                return None
            hello = parser.feed(data)
    except NotTLS as exc:
        _consume(sock, queued)
        metrics.CLIENT_HELLOS.labels("http" if exc.looks_like_http else "not_tls").inc()
        if exc.looks_like_http:
            info.result = "plain_http"
            await _send_quietly(sock, HTTP_ON_TLS_PORT)
        else:
            info.result = "not_tls"
        return None
    except ClientHelloError as exc:
        _consume(sock, queued)
        metrics.CLIENT_HELLOS.labels(exc.reason).inc()
        info.result = f"bad_hello:{exc.reason}"
        if exc.alert is not None:
            # RFC 8446 s6: the peer learns why (decode_error, record_overflow ...), as from
            # OpenSSL, instead of a bare close it cannot tell from a network fault.
            await _send_quietly(sock, alert_record(exc.alert))
        return None
    assert isinstance(hello, ClientHello)
    proxy.hello_received(info)
    metrics.CLIENT_HELLOS_OK.inc()
    sni = hello.sni
    if sni is not None and is_ip_literal(sni):
        # RFC 6066 forbids IP literals in SNI, yet some clients (wrk, old agents) send
        # them: answer as if no SNI was sent (default route and certificate).
        sni = None
    info.sni = sni

    if ACME_TLS_ALPN in hello.alpn_protocols:
        _consume(sock, queued)
        await _answer_challenge(proxy, sock, hello, parser.buffered, info)
        return None

    registry = proxy.certs.registry
    if registry is not None and sni is not None and not registry.loaded:
        await registry.ensure(sni)  # a fresh process still loading the registry: ask for this one
    route = s.routes.match(sni)
    if registry is not None and sni is not None:
        route = registry.route_for(sni, route)  # a registered name's own upstream, if it has one
    if route is None:
        _consume(sock, queued)
        info.result = "no_route"
        metrics.HANDSHAKES.labels("refused", "no_route").inc()
        await _send_quietly(sock, alert_record(AlertDescription.UNRECOGNIZED_NAME))
        return None
    info.route = route.label
    try:
        ctx = proxy.certs.cached_context(sni) if sni is not None else None
        if ctx is None:
            ctx = await _certificate_for(proxy, sni, info)
    except CertificateUnavailable as exc:
        _consume(sock, queued)
        info.result = f"no_certificate:{exc.reason}"
        metrics.HANDSHAKES.labels("refused", exc.reason).inc()
        desc = (
            AlertDescription.UNRECOGNIZED_NAME
            if exc.reason in _NAME_REASONS
            else AlertDescription.INTERNAL_ERROR
        )
        await _send_quietly(sock, alert_record(desc))
        return None
    on_socket = queued > 0
    tickets = proxy.tickets
    conn = new_server_connection(
        ctx,
        alpn=route.alpn,
        sock=sock if on_socket else None,
        session_ctx=tickets.context_for(hello.ticket) if tickets is not None else None,
    )
    # The upstream's TCP handshake runs while the client's TLS handshake does.
    upstream = proxy.upstreams.start(route)
    pending = b""
    try:
        if on_socket:
            await accept_tls_on_socket(conn, sock)
        else:
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
    if route.alpn and hello.alpn_protocols:  # otherwise nothing can have been negotiated
        alpn = conn.get_alpn_proto_negotiated()
        info.alpn = alpn.decode("ascii", "replace") if alpn else None
    return _Established(conn, route, upstream, on_socket, pending)


async def _certificate_for(
    proxy: Proxy, sni: str | None, info: ConnInfo
) -> SSL.Context | ServerIdentity:
    """The certificate for a name not in the cache: loaded, or issued while the client waits.

    Waiting for a certificate is not the client being slow: it may last ``on_demand.wait``,
    longer than ``server.handshake_timeout`` (which bounds the client's own part: PROXY
    header, ClientHello, TLS handshake). So the connection's deadline moves out to cover the
    wait (the manager gives up at ``wait`` and we answer with an alert; the grace only makes
    sure its answer comes first), and afterwards the time spent waiting is added to the
    original deadline: the rest of the handshake keeps what was left of its own timeout.
    """
    scope = info.scope
    deadline = scope.deadline
    start = trio.current_time()
    scope.deadline = max(deadline, start + proxy.certs.wait + _CERT_WAIT_GRACE)
    try:
        return await proxy.certs.context_for(sni)
    finally:
        scope.deadline = deadline + (trio.current_time() - start)


async def _forward(
    proxy: Proxy,
    s: Settings,
    client: socket.socket,
    est: _Established,
    info: ConnInfo,
    scope: trio.CancelScope,
    flow: PipeResult,
) -> None:
    """Connect the route's upstream and pipe both ways until both sides are done.

    ``scope`` and ``flow`` are the connection's (see ``pipe``): the caller reads the byte
    counts and the pipe's verdict from ``flow`` after its ``with scope`` block.
    """
    route, conn = est.route, est.conn
    try:
        upstream, hp = await proxy.upstreams.finish(route, est.upstream, s.connect_timeout)
    except UpstreamError as exc:
        info.result = "upstream_unreachable"
        log.error("%s (client %s, sni %s)", exc, info.client[0], info.sni)
        if est.on_socket:
            _close_notify_on_socket(conn)
        else:
            await _close_notify(client, conn, est.pending)
        return
    info.upstream = str(hp)
    try:
        if route.send_proxy is not None:
            if info.local is None:
                try:
                    info.local = _addr(client.getsockname())
                except OSError:
                    info.local = ("unknown", 0)
            header = (build_v2 if route.send_proxy == "v2" else build_v1)(info.client, info.local)
            try:
                await send_all(upstream, header)
            except OSError:
                info.result = "upstream_reset"
                return
        await pipe(
            conn,
            client,
            upstream,
            idle_timeout=s.idle_timeout,
            pending=est.pending,
            on_socket=est.on_socket,
            scope=scope,
            result=flow,
        )
    finally:
        upstream.close()  # the pipe's tasks have ended: see handle_connection


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


def _close_notify_on_socket(conn: SSL.Connection) -> None:
    """A clean TLS close when OpenSSL writes the socket itself; one try, no waiting."""
    try:
        conn.shutdown()
    except SSL.Error:
        pass


async def _peek(sock: socket.socket) -> bytes:
    """What the socket holds, left in place (``MSG_PEEK``); waits only if it holds nothing.

    Never waits while bytes are queued: the socket stays readable until they are read, so
    a wait would return at once, forever. Callers that need more than one segment read the
    peeked bytes off (``_consume``) and continue with ``_receive``.
    """
    while True:
        try:
            return sock.recv(_READ, socket.MSG_PEEK)
        except BlockingIOError:
            await wait_readable(sock)
        except OSError:
            return b""


def _consume(sock: socket.socket, count: int) -> None:
    """Read off ``count`` bytes a peek showed are queued (a reset just ends it early)."""
    while count > 0:
        try:
            got = len(sock.recv(min(count, 65536)))
        except OSError:
            return
        if not got:
            return
        count -= got


async def _receive(sock: socket.socket) -> bytes:
    """Read what is there, waiting only if nothing is (b"" at EOF or on a reset).

    Tries before waiting: a client sends its PROXY header and ClientHello right after the TCP
    handshake, so under load they have usually arrived by the time the connection's task
    runs, and a failed ``recv`` costs far less than a round trip through the scheduler.
    """
    while True:
        try:
            return sock.recv(_READ)
        except BlockingIOError:
            await wait_readable(sock)
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
        # Anyone can send these (scanners do), so the long explanation is throttled.
        suppressed = proxy.unanswered_validations.admit()
        if suppressed is not None:
            log.warning(
                "validation attempt for %s with no pending challenge on this node (client %s): "
                "answered unrecognized_name. If you did not expect a validation, ignore this; "
                "otherwise check replicas share storage and the load balancer forwards TCP "
                "untouched (%d more since the last such line; at most one per %.0f s, "
                "edgeproxy_acme_validation_without_pending_challenge_total counts them all)",
                name,
                info.client[0],
                suppressed,
                proxy.unanswered_validations.interval,
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
