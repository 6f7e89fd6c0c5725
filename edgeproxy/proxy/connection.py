"""One client connection's story, from accept to close, top to bottom.

    accept -> PROXY header? -> ClientHello -> decide -+-> acme-tls/1: answer the challenge, close
                                                      +-> no route: unrecognized_name, close
                                                      +-> certificate -> terminate TLS -> pipe

Owns: the order of those steps (``handle_connection`` -> ``_establish``: ``_proxy_header``,
``_client_hello``, ``decide``, ``_answer_challenge`` or ``_terminate``; then ``_forward``),
the pure ``decide`` (a ``Decision`` from the ClientHello, the routes and the hostname
registry's overrides), and the connection's ``Result`` (``proxy/outcome.py``). Must not know:
OpenSSL (``tls/server.py``'s ``ServerTLS`` is the TLS side), how certificates are obtained,
how the first bytes are peeked (``proxy/first_bytes.py``).

The ClientHello is *peeked* (``MSG_PEEK``): when it arrived whole, it stays in the socket and
OpenSSL reads it from there itself, so the handshake and the pipe run with OpenSSL on the
socket from the first byte. A ClientHello that arrives in pieces (or after a PROXY header in
a segment we had to read) is taken off the socket and primes memory BIOs instead; the TLS
side moves such a connection onto the socket later. A refused connection has its peeked bytes
read before the alert goes out: closing a socket with unread data sends a reset, which can
destroy the alert before the client reads it.

Everything the peer can do wrong ends here as a typed ``Result`` on the connection (counted
and logged once, in ``outcome.count_closed``), never as an exception escaping. The handshake
timeout covers PROXY header, ClientHello and the TLS handshake together, so a slow or silent
client cannot hold a connection slot longer than ``server.handshake_timeout``; time spent
waiting for a new name's certificate (up to ``on_demand.wait``) is not the client's and is
added on top.

The story has no trio task of its own while it only waits for its sockets: the reactor drives
it (``proxy/reactor.py``; the waits are ``waits.py``'s), and ``info.timer`` holds its one
deadline. The steps that wait on trio itself (a certificate not yet cached, the registry still
loading, an ACME challenge, a slow upstream connect, the pipe's slow path) first call
``waits.handover`` and go on in a task. The deadline ends the story as ``waits.Expired`` while
driven and as ``trio.Cancelled`` in a task; both mean the same here.
"""

from __future__ import annotations

import enum
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import trio

from .. import metrics, waits
from ..errors import CertificateUnavailable, UpstreamError
from ..names import is_ip_literal
from ..tls.errors import TLSHandshakeError
from ..tls.server import Servable, ServerTLS, send_all, send_quietly
from ..waits import Expired
from ..wire.clienthello import NEED_DATA, ClientHello, ClientHelloError, ClientHelloParser, NotTLS
from ..wire.proxy_protocol import ProxyHeaderParser, ProxyProtocolError, build_v1, build_v2
from ..wire.tls_alert import HTTP_ON_TLS_PORT, AlertDescription, alert_record
from .first_bytes import FirstBytes
from .outcome import PLAIN, ConnInfo, Outcome, Result
from .pipe import PipeEnd, PipeResult, pipe
from .routes import Route, RouteTable
from .upstream import PendingConnect

if TYPE_CHECKING:
    from .server import Proxy, Settings

__all__ = ["Action", "ConnInfo", "Decision", "decide", "handle_connection", "set_reset_on_close"]

log = logging.getLogger("edgeproxy.conn")

ACME_TLS_ALPN = "acme-tls/1"
# How far past on_demand.wait a connection waiting for its certificate may live: enough for
# the manager's own wait to end first and the refusal alert to be sent.
_CERT_WAIT_GRACE = 1.0

# Refusals that are about the name, not about us: the client learns "not here".
_NAME_REASONS = frozenset(
    {"denied", "invalid_name", "no_sni", "ask_unavailable", "ask_rate_limited", "removed"}
)
# How a pipe's end reads as the connection's result.
_PIPE_RESULTS: Final = {
    end: PLAIN[Outcome(end.value)] for end in PipeEnd if end is not PipeEnd.DONE
}


# ---- the decision ------------------------------------------------------------------------


class Action(enum.Enum):
    ANSWER_CHALLENGE = "answer_challenge"  # an ACME TLS-ALPN-01 validation (RFC 8737)
    TERMINATE = "terminate"  # terminate TLS with the name's certificate, pipe to ``route``
    NO_ROUTE = "no_route"  # refuse with unrecognized_name


class RouteOverrides(Protocol):
    """The hostname registry's part in routing: a registered name's own upstream."""

    def route_for(self, name: str, base: Route | None) -> Route | None: ...


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    sni: str | None  # the name to serve: the SNI sent, None when absent or an IP literal
    route: Route | None = None  # for TERMINATE


def decide(hello: ClientHello, routes: RouteTable, overrides: RouteOverrides | None) -> Decision:
    """What to do with a connection, from its ClientHello alone (no I/O, no clock)."""
    sni = hello.sni
    if sni is not None and is_ip_literal(sni):
        # RFC 6066 forbids IP literals in SNI, yet some clients (wrk, old agents) send
        # them: answer as if no SNI was sent (default route and certificate).
        sni = None
    if ACME_TLS_ALPN in hello.alpn_protocols:
        return Decision(Action.ANSWER_CHALLENGE, sni)
    route = routes.match(sni)
    if overrides is not None and sni is not None:
        route = overrides.route_for(sni, route)  # a registered name's own upstream, if any
    if route is None:
        return Decision(Action.NO_ROUTE, sni)
    return Decision(Action.TERMINATE, sni, route)


# ---- the story ---------------------------------------------------------------------------


async def handle_connection(proxy: Proxy, sock: socket.socket, info: ConnInfo) -> None:
    """The connection's story; its coroutine is driven by the reactor (``info.timer``, made at
    accept with the handshake deadline) until it needs a task of its own."""
    s = proxy.settings  # one snapshot per connection: a reload never changes it mid-way
    timer = info.timer
    flow = PipeResult()
    est: _Established | None = None
    try:
        try:
            try:
                est = await _establish(proxy, s, sock, info)
            finally:
                proxy.end_handshake(info)
            if est is not None:
                timer.deadline = timer.clock() + s.idle_timeout
                try:
                    await _forward(proxy, s, sock, est, info, flow)
                finally:
                    est.upstream.close()
        except (Expired, trio.Cancelled) as exc:
            if not timer.ours(exc):
                raise  # the proxy is shutting down
            if info.shed is not None:
                info.result = Result(Outcome.SHED, info.shed)
            elif est is None:
                info.result = PLAIN[Outcome.HANDSHAKE_TIMEOUT]
                metrics.HANDSHAKES.labels("failed", "timeout").inc()
            elif flow.reason is PipeEnd.DONE:
                flow.reason = PipeEnd.IDLE_TIMEOUT
        if flow.reason is not PipeEnd.DONE:
            info.result = _PIPE_RESULTS[flow.reason]
        info.to_upstream = flow.to_upstream
        info.to_client = flow.to_client
    except Exception:
        info.result = PLAIN[Outcome.INTERNAL_ERROR]
        log.exception("connection from %s: unexpected error", info.client[0])
    finally:
        # No trio.lowlevel.notify_closing: it exists to wake tasks waiting on the socket, and
        # every task of this connection has ended here. Closing the (never duplicated) fd
        # drops it from trio's epoll set and the reactor's anyway; the call would cost an
        # exception object and an epoll_ctl per socket per connection.
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


def _addr(sockaddr: object) -> tuple[str, int]:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return str(sockaddr[0]), int(sockaddr[1])
    return ("unknown", 0)


@dataclass(slots=True)
class _Established:
    tls: ServerTLS
    route: Route
    upstream: PendingConnect


async def _establish(
    proxy: Proxy, s: Settings, sock: socket.socket, info: ConnInfo
) -> _Established | None:
    """PROXY header, ClientHello, decide, then answer the challenge or terminate TLS.

    Returns the established connection, or None when the connection ends here (its
    ``info.result`` says why).
    """
    reader = FirstBytes(sock)
    if s.proxy_protocol != "off" and not await _proxy_header(proxy, s, reader, info):
        return None
    got = await _client_hello(reader, info)
    if got is None:
        return None
    hello, hello_bytes = got
    proxy.hello_received(info)
    metrics.CLIENT_HELLOS_OK_ADD()
    registry = proxy.certs.registry
    decision = decide(hello, s.routes, registry)
    info.sni = decision.sni
    if (
        decision.action is not Action.ANSWER_CHALLENGE
        and registry is not None
        and decision.sni is not None
        and not registry.loaded
    ):
        # A fresh process still loading the registry: ask for this name, then decide again.
        await waits.handover()
        await registry.ensure(decision.sni)
        decision = decide(hello, s.routes, registry)
    if decision.action is Action.ANSWER_CHALLENGE:
        reader.settle()
        await waits.handover()  # rare, and it may wait on the cluster's challenge store
        await _answer_challenge(proxy, sock, hello, hello_bytes, info)
        return None
    if decision.action is Action.NO_ROUTE:
        metrics.HANDSHAKES.labels("refused", "no_route").inc()
        await _refuse(reader, info, PLAIN[Outcome.NO_ROUTE], AlertDescription.UNRECOGNIZED_NAME)
        return None
    return await _terminate(proxy, reader, hello, hello_bytes, decision, info)


async def _refuse(
    reader: FirstBytes, info: ConnInfo, result: Result, alert: AlertDescription
) -> None:
    """End the connection with a TLS alert (its unread bytes read off first)."""
    reader.settle()
    info.result = result
    await send_quietly(reader.sock, alert_record(alert))


async def _proxy_header(proxy: Proxy, s: Settings, reader: FirstBytes, info: ConnInfo) -> bool:
    """Read the PROXY header (only its bytes leave the socket); False: the connection ends."""
    pp = ProxyHeaderParser(s.proxy_protocol)  # type: ignore[arg-type]
    # Peek first: the balancer usually sends the header and the ClientHello in one segment,
    # and only the header should leave the socket.
    data = await reader.peek()
    while True:
        if not data:
            info.result = PLAIN[Outcome.EOF_IN_PROXY_HEADER]
            metrics.PROXY_HEADERS.labels("eof").inc()
            return False
        try:
            parsed = pp.feed(data)
        except ProxyProtocolError as exc:
            info.result = PLAIN[Outcome.BAD_PROXY_HEADER]
            info.extra["detail"] = exc.reason
            metrics.PROXY_HEADERS.labels("invalid").inc()
            return False
        if parsed is not None:
            break
        data = await reader.read()
    header, after = parsed
    reader.finish(after)
    if header.command == "LOCAL":
        # Load balancer health check: the connection is the balancer's own.
        metrics.PROXY_HEADERS.labels("local").inc()
        if not after:
            info.result = PLAIN[Outcome.HEALTH_CHECK]
    else:
        metrics.PROXY_HEADERS.labels("proxy").inc()
        # Only IP families name a client: UNSPEC and UNIX (a path is no address, and may hold
        # a newline) mean "the balancer's own connection", as LOCAL does.
        if header.family in ("TCP4", "TCP6"):
            if header.source is not None:
                info.client = header.source
            if header.destination is not None:
                info.local = header.destination
    if header.aws_vpce_id:
        info.extra["vpce"] = header.aws_vpce_id
    if not proxy.admit_client(info):
        info.result = PLAIN[Outcome.LIMIT_PER_IP]
        return False
    return True


async def _client_hello(reader: FirstBytes, info: ConnInfo) -> tuple[ClientHello, bytes] | None:
    """The parsed ClientHello and its bytes (peeked: still in the socket if it came whole),
    or None when the connection ends here."""
    parser = ClientHelloParser()
    try:
        data = await reader.peek()
        hello = parser.feed(data) if data else NEED_DATA
        while hello is NEED_DATA:
            data = await reader.read()  # in pieces: taken off the socket from here on
            if not data:
                if info.result.outcome is not Outcome.HEALTH_CHECK:
                    info.result = PLAIN[
                        Outcome.EOF_BEFORE_HELLO if parser.buffered else Outcome.EOF_SILENT
                    ]
                    metrics.CLIENT_HELLOS.labels("eof").inc()
                return None
            hello = parser.feed(data)
    except NotTLS as exc:
        reader.settle()
        metrics.CLIENT_HELLOS.labels("http" if exc.looks_like_http else "not_tls").inc()
        if exc.looks_like_http:
            info.result = PLAIN[Outcome.PLAIN_HTTP]
            await send_quietly(reader.sock, HTTP_ON_TLS_PORT)
        else:
            info.result = PLAIN[Outcome.NOT_TLS]
        return None
    except ClientHelloError as exc:
        reader.settle()
        metrics.CLIENT_HELLOS.labels(exc.reason).inc()
        info.result = Result(Outcome.BAD_HELLO, exc.reason)
        if exc.alert is not None:
            # RFC 8446 s6: the peer learns why (decode_error, record_overflow ...), as from
            # OpenSSL, instead of a bare close it cannot tell from a network fault.
            await send_quietly(reader.sock, alert_record(exc.alert))
        return None
    assert isinstance(hello, ClientHello)
    return hello, parser.buffered


async def _terminate(
    proxy: Proxy,
    reader: FirstBytes,
    hello: ClientHello,
    hello_bytes: bytes,
    decision: Decision,
    info: ConnInfo,
) -> _Established | None:
    """The name's certificate, then the TLS handshake (the upstream connecting meanwhile)."""
    sni, route = decision.sni, decision.route
    assert route is not None
    info.route = route.label
    try:
        ctx = proxy.certs.ready_context(sni)  # a served name: one lookup, no deadline moves
        if ctx is None:
            ctx = await _certificate_for(proxy, sni, info)
    except CertificateUnavailable as exc:
        metrics.HANDSHAKES.labels("refused", exc.reason).inc()
        desc = (
            AlertDescription.UNRECOGNIZED_NAME
            if exc.reason in _NAME_REASONS
            else AlertDescription.INTERNAL_ERROR
        )
        await _refuse(reader, info, Result(Outcome.NO_CERTIFICATE, exc.reason), desc)
        return None
    tickets = proxy.tickets
    tls = ServerTLS(
        ctx,
        reader.sock,
        alpn=route.alpn,
        session_ctx=tickets.context_for(hello.ticket) if tickets is not None else None,
        # Still in the socket: OpenSSL reads it there. Read off: memory BIOs get the bytes.
        primed=None if reader.queued else hello_bytes,
    )
    # The upstream's TCP handshake runs while the client's TLS handshake does.
    upstream = proxy.upstreams.start(route)
    try:
        await tls.accept()
    except TLSHandshakeError as exc:
        upstream.close()
        info.result = Result(Outcome.TLS_ERROR, exc.reason)
        metrics.HANDSHAKES.labels("failed", exc.reason).inc()
        return None
    except BaseException:
        upstream.close()  # cancelled by the handshake timeout, or worse
        raise
    metrics.HANDSHAKES_OK_ADD()
    metrics.HANDSHAKE_SECONDS_OBSERVE(time.monotonic() - info.started)
    if route.alpn and hello.alpn_protocols:  # otherwise nothing can have been negotiated
        info.alpn = tls.alpn
    return _Established(tls, route, upstream)


async def _certificate_for(proxy: Proxy, sni: str | None, info: ConnInfo) -> Servable:
    """The certificate for a name not in the cache: loaded, or issued while the client waits.

    Waiting for a certificate is not the client being slow: it may last ``on_demand.wait``,
    longer than ``server.handshake_timeout`` (which bounds the client's own part: PROXY
    header, ClientHello, TLS handshake). So the connection's deadline moves out to cover the
    wait (the manager gives up at ``wait`` and we answer with an alert; the grace only makes
    sure its answer comes first), and afterwards the time spent waiting is added to the
    original deadline: the rest of the handshake keeps what was left of its own timeout.
    """
    await waits.handover()  # the manager waits on trio (issuance, storage, the ask endpoint)
    timer = info.timer
    deadline = timer.deadline
    start = trio.current_time()
    timer.deadline = max(deadline, start + proxy.certs.wait + _CERT_WAIT_GRACE)
    try:
        return await proxy.certs.context_for(sni)
    finally:
        timer.deadline = deadline + (trio.current_time() - start)


async def _forward(
    proxy: Proxy,
    s: Settings,
    client: socket.socket,
    est: _Established,
    info: ConnInfo,
    flow: PipeResult,
) -> None:
    """Connect the route's upstream and pipe both ways until both sides are done.

    ``flow`` is the connection's (see ``pipe``): the caller reads the byte counts and the
    pipe's verdict from it, also after the deadline ended the pipe.
    """
    route = est.route
    try:
        upstream, hp = await proxy.upstreams.finish(route, est.upstream, s.connect_timeout)
    except UpstreamError as exc:
        info.result = PLAIN[Outcome.UPSTREAM_UNREACHABLE]
        log.error("%s (client %s, sni %s)", exc, info.client[0], info.sni)
        await est.tls.close_quietly()
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
                info.result = PLAIN[Outcome.UPSTREAM_RESET]
                return
        await pipe(est.tls, upstream, idle_timeout=s.idle_timeout, scope=info.timer, result=flow)
    finally:
        upstream.close()  # the pipe's tasks have ended: see handle_connection


async def _answer_challenge(
    proxy: Proxy, sock: socket.socket, hello: ClientHello, buffered: bytes, info: ConnInfo
) -> None:
    info.alpn = ACME_TLS_ALPN
    name = hello.sni
    ctx = await proxy.challenges.context_for(name) if name else None
    if ctx is None:
        info.result = PLAIN[Outcome.ACME_NO_PENDING_CHALLENGE]
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
        await send_quietly(sock, alert_record(AlertDescription.UNRECOGNIZED_NAME))
        return
    tls = ServerTLS(ctx, sock, alpn=(ACME_TLS_ALPN,), primed=buffered)
    try:
        await tls.accept()
    except TLSHandshakeError as exc:
        info.result = Result(Outcome.ACME_TLS_ERROR, exc.reason)
        return
    metrics.CHALLENGES_ANSWERED.inc()
    info.result = PLAIN[Outcome.ACME_CHALLENGE_ANSWERED]
    log.info("answered TLS-ALPN-01 validation for %s from %s", name, info.client[0])
    await tls.close_quietly()
