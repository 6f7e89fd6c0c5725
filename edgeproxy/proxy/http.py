"""The plain-HTTP listener (``[http] listen``, port 80): ACME HTTP-01 answers and HTTPS redirects.

Per connection: the PROXY header when configured (the same parser and modes as the TLS side,
accepted only from ``server.proxy_protocol_from``),
then one HTTP/1.1 request parsed by h11 (sans-IO) with a bounded header size, one response,
close. The whole exchange has one deadline (``http.timeout``) and the listener a connection cap
(``http.max_connections``; beyond it a connection is closed at once), so a slow or silent
client costs a bounded amount. Every request gets one access-log line on the same logger as
the TLS side.

What is answered (``decide`` is the pure part):

* ``GET``/``HEAD /.well-known/acme-challenge/TOKEN``: the key authorization of a pending
  HTTP-01 challenge (RFC 8555 s8.3) from the shared store, whichever replica published it;
  404 when none is pending. The Host is not checked: the token is the secret, and the CA may
  send the name in any case.
* any other request for a name edgeproxy serves: 308 to ``https://NAME/path`` (308 keeps
  the method and body, RFC 9110 s15.4.9);
* anything else: 404 (no redirect for names we do not serve: an open redirector for any
  Host would let anyone borrow our address).
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import h11
import trio

from .. import metrics
from ..names import InvalidName, validate_hostname
from ..wire.proxy_protocol import ProxyHeaderParser, ProxyProtocolError
from .senders import AddressSet

log = logging.getLogger("edgeproxy.http")
access_log = logging.getLogger("edgeproxy.access")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
# RFC 8555 s8.3: the token is base64url; real ones are 43 characters.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_READ = 8192
_MAX_TARGET = 8192


@dataclass(frozen=True, slots=True)
class HttpSettings:
    proxy_protocol: str  # off | v1 | v2 | any
    timeout: float
    max_connections: int
    max_header_bytes: int
    # Who may send PROXY headers (server.proxy_protocol_from); None when proxy_protocol is off.
    proxy_senders: AddressSet | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer: ``status``, and either a ``token`` to look up or a ``location``."""

    status: int
    result: str  # access-log and metric token
    token: str | None = None
    location: str | None = None


def _host_name(host: str) -> str | None:
    """The DNS name in a Host header (port and trailing dot dropped), or None."""
    if host.startswith("["):
        return None  # an IPv6 literal: never a name we serve
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        return validate_hostname(name)
    except InvalidName:
        return None


def decide(method: str, target: str, host: str | None, serves: Callable[[str], bool]) -> Decision:
    """The answer to one request, from its method, request-target and Host (pure)."""
    if target.startswith(CHALLENGE_PREFIX):
        if method not in ("GET", "HEAD"):
            return Decision(405, "challenge_bad_method")
        token = target[len(CHALLENGE_PREFIX) :]
        if not _TOKEN.fullmatch(token):
            return Decision(404, "challenge_bad_token")
        return Decision(200, "challenge", token=token)
    name = _host_name(host) if host else None
    if name is None:
        return Decision(404, "unknown_host")
    if not serves(name):
        return Decision(404, "not_served")
    # Origin-form only (RFC 9112 s3.2.1): "//evil.example/x" would make the Location point
    # elsewhere, and absolute-form is for proxies.
    if not target.startswith("/") or target.startswith("//"):
        return Decision(400, "bad_target")
    return Decision(308, "redirect", location=f"https://{name}{target}")


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return ""


class HttpListener:
    """Serves ``decide``'s answers on already-bound sockets (see ``proxy.server.open_listeners``).

    ``key_authorization(token)`` looks up a pending HTTP-01 challenge; ``serves(name)`` says
    whether a redirect may be given for ``name``.
    """

    def __init__(
        self,
        settings: HttpSettings,
        *,
        key_authorization: Callable[[str], Awaitable[str | None]],
        serves: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self._key_authorization = key_authorization
        self._serves = serves
        self.active = 0
        self.bound: list[tuple[str, int]] = []

    async def serve(
        self,
        sockets: Sequence[socket.socket],
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        self.bound = [s.getsockname()[:2] for s in sockets]
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(self.bound)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: wait, don't spin
                    log.warning("http accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                senders = self.settings.proxy_senders
                if senders is not None and not senders.allows(_peer_host(stream)):
                    # As on the TLS side: nobody but the balancer may claim a client address.
                    metrics.PROXY_UNTRUSTED.inc()
                    metrics.HTTP_REQUESTS.labels("refused_proxy_sender").inc()
                    await trio.aclose_forcefully(stream)
                    continue
                if self.active >= self.settings.max_connections:
                    metrics.HTTP_REQUESTS.labels("refused_max_connections").inc()
                    await trio.aclose_forcefully(stream)
                    continue
                self.active += 1
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        started = time.monotonic()
        peer = stream.socket.getpeername()
        client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("unknown", 0)
        host = target = "-"
        status, result = 0, "timeout"
        try:
            with trio.move_on_after(self.settings.timeout):
                status, result, client, host, target = await self._exchange(stream, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            result = "connection_error"
        except Exception:
            # A bug or an input nobody foresaw must cost this one connection, never the
            # listener's nursery (and with it the process).
            log.exception("port-80 connection from %s failed", client[0])
            metrics.BACKGROUND_TASK_ERRORS.labels("http").inc()
            result = "internal_error"
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)
        metrics.HTTP_REQUESTS.labels(result.split(":", 1)[0]).inc()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s http host=%s target=%s status=%d dur=%.3f result=%s",
                client[0],
                host,
                target[:200],
                status,
                time.monotonic() - started,
                result,
                extra={
                    "client": f"{client[0]}:{client[1]}",
                    "host": host,
                    "status": status,
                    "duration": round(time.monotonic() - started, 6),
                    "result": result,
                },
            )

    async def _exchange(
        self, stream: trio.SocketStream, client: tuple[str, int]
    ) -> tuple[int, str, tuple[str, int], str, str]:
        """(status, result, client, host, target) of the one request on ``stream``."""
        rest = b""
        health_check = False
        if self.settings.proxy_protocol != "off":
            parser = ProxyHeaderParser(self.settings.proxy_protocol)  # type: ignore[arg-type]
            while True:
                data = await stream.receive_some(_READ)
                if not data:
                    return 0, "eof_in_proxy_header", client, "-", "-"
                try:
                    parsed = parser.feed(data)
                except ProxyProtocolError as exc:
                    return 0, f"bad_proxy_header:{exc.reason}", client, "-", "-"
                if parsed is not None:
                    header, rest = parsed
                    break
            # LOCAL: the balancer's own health check, with our own address as the client.
            health_check = header.command == "LOCAL"
            if not health_check and header.source is not None:
                client = header.source
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        received = len(rest)
        if rest:
            conn.receive_data(rest)
        request: h11.Request | None = None
        while request is None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._send(stream, conn, status, b"bad request\n", [], force_close=True)
                result = "headers_too_large" if status == 431 else "bad_request"
                return status, result, client, "-", "-"
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_READ)
                received += len(data)
                if received > self.settings.max_header_bytes:
                    # h11's own bound only covers a head still incomplete; a whole one that
                    # arrived in one read is measured here.
                    await self._send(stream, conn, 431, b"", [], force_close=True)
                    return 431, "headers_too_large", client, "-", "-"
                conn.receive_data(bytes(data))
                if not data and conn.their_state is h11.IDLE:
                    result = "health_check" if health_check else "eof_before_request"
                    return 0, result, client, "-", "-"
            elif isinstance(event, h11.Request):
                request = event
            else:
                return 0, "eof_before_request", client, "-", "-"
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        host_values = [v for k, v in request.headers if k == b"host"]
        host = host_values[0].decode("ascii", "replace") if len(host_values) == 1 else None
        if len(target) > _MAX_TARGET:
            decision = Decision(414, "target_too_long")
        else:
            decision = decide(method, target, host, self._serves)
        body = b""
        headers: list[tuple[str, str]] = []
        status = decision.status
        result = decision.result
        if decision.token is not None:
            key_auth = await self._key_authorization(decision.token)
            if key_auth is None:
                status, result = 404, "challenge_not_pending"
                body = b"no such challenge\n"
            else:
                body = key_auth.encode("ascii")
                metrics.CHALLENGES_ANSWERED.inc()
            headers.append(("Content-Type", "text/plain"))
        elif decision.location is not None:
            headers.append(("Location", decision.location))
        elif status == 404:
            body = b"not found\n"
        await self._send(
            stream, conn, status, b"" if method == "HEAD" else body, headers, len(body)
        )
        return status, result, client, host or "-", target

    async def _send(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]],
        length: int | None = None,
        *,
        force_close: bool = False,
    ) -> None:
        all_headers = [
            *headers,
            ("Content-Length", str(len(body) if length is None else length)),
            ("Connection", "close"),
        ]
        if force_close or conn.our_state is not h11.SEND_RESPONSE:
            # h11 refuses to answer a request it could not parse; write the bytes ourselves.
            reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}.get(
                status, b"Error"
            )
            head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
            head += b"".join(f"{k}: {v}\r\n".encode() for k, v in all_headers) + b"\r\n"
            await stream.send_all(head + body)
            return
        data = conn.send(h11.Response(status_code=status, headers=all_headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
