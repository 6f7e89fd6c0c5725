"""Network observation: the CA's ``acme-tls/1`` handshake and its HTTP-01 fetch, recorded
without interpretation (``TlsAttempt``; status, body, error).

Owns: connecting to one address (so the error is that address's own), the optional PROXY
header in front of the ClientHello, the client TLS context (no verification on purpose), and
reading TLS alerts out of the first bytes received. Must not know: what an observation means
(``judge``), storage.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from typing import Final, Literal

import trio

from ..tls.challenge_cert import ACME_TLS_ALPN
from ..wire.proxy_protocol import build_v1, build_v2
from ..wire.tls_alert import ALERT_CONTENT_TYPE, AlertDescription

KEEP_RECEIVED: Final = 64  # enough for the first record header and an HTTP status line
_READ: Final = 16384

_TLS_CONTENT_TYPES: Final = frozenset({20, 21, 22, 23})


ProxyPrefix = Literal["none", "v2", "v1"]


@dataclass(frozen=True, slots=True)
class TlsAttempt:
    """What one ``acme-tls/1`` attempt observed, without interpretation.

    ``received`` holds the first bytes the server sent (before decryption); ``closed`` means
    the server ended the connection (FIN or reset) before the handshake finished;
    ``tls_error`` is OpenSSL's reason when the handshake failed (e.g. the name of an alert
    that arrived encrypted, which ``received`` cannot show).
    """

    address: str
    port: int
    prefix: ProxyPrefix = "none"
    connected: bool = True
    connect_error: str | None = None
    received: bytes = b""
    closed: bool = False
    timed_out: bool = False
    handshake_ok: bool = False
    alpn: str | None = None
    certificate: bytes | None = None  # DER
    tls_error: str | None = None

    @property
    def where(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def silent(self) -> bool:
        """Accepted, then not a single byte back before close or timeout."""
        return self.connected and not self.received and not self.handshake_ok

    @property
    def speaks_tls(self) -> bool:
        r = self.received
        return self.handshake_ok or (len(r) >= 2 and r[0] in _TLS_CONTENT_TYPES and r[1] == 3)

    @property
    def alert(self) -> str | None:
        """The TLS alert the server sent, from the plaintext record or OpenSSL's reason."""
        r = self.received
        if len(r) >= 7 and r[0] == ALERT_CONTENT_TYPE and r[1] == 3:
            return _alert_name(r[6])
        return alert_from_openssl_reason(self.tls_error)


def _alert_name(code: int) -> str:
    try:
        return AlertDescription(code).name.lower()
    except ValueError:
        return f"alert_{code}"


def alert_from_openssl_reason(reason: str | None) -> str | None:
    """``TLSV1_ALERT_INTERNAL_ERROR`` -> ``internal_error``; None if not an alert."""
    if not reason:
        return None
    r = reason.upper()
    for prefix in ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_", "TLSV1_"):
        if r.startswith(prefix):
            desc = r.removeprefix(prefix).lower()
            return desc if desc.upper() in AlertDescription.__members__ else None
    return None


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class _TapStream(trio.abc.Stream):
    """A transport that remembers the first bytes the server sent and whether it hung up, and
    can put bytes (a PROXY header) in front of the first thing we send."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix
        self.received = bytearray()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._prefix:
            data, self._prefix = self._prefix + bytes(data), b""
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self._inner.receive_some(max_bytes or _READ)
        except (trio.BrokenResourceError, OSError):
            self.closed = True
            raise
        if not data:
            self.closed = True
        elif len(self.received) < KEEP_RECEIVED:
            self.received += data[: KEEP_RECEIVED - len(self.received)]
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()


def _client_context() -> ssl.SSLContext:
    # No verification on purpose: the RFC 8737 certificate is self-signed and judging the
    # certificate is our job, not the TLS library's.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8737 s3: TLS 1.2 or later
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    return ctx


async def connect(address: str, port: int, step_timeout: float) -> trio.SocketStream | str:
    """A connected stream to the IP ``address``, or why not, in words."""
    # One socket to one address (not open_tcp_stream's happy eyeballs): the error we report
    # must be this address's own, not "all attempts failed".
    family = trio.socket.AF_INET6 if ":" in address else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    with trio.move_on_after(step_timeout):
        try:
            await sock.connect((address, port))
        except ConnectionRefusedError:
            sock.close()
            return "connection refused (nothing listens there, or a firewall rejects)"
        except OSError as exc:
            sock.close()
            return exc.strerror or str(exc)
        return trio.SocketStream(sock)
    sock.close()
    return f"no answer within {step_timeout:g}s (packets dropped: firewall / security group?)"


def _proxy_header(prefix: ProxyPrefix, stream: trio.SocketStream) -> bytes:
    if prefix == "none":
        return b""
    local = stream.socket.getsockname()
    peer = stream.socket.getpeername()
    src, dst = (str(local[0]), int(local[1])), (str(peer[0]), int(peer[1]))
    return build_v2(src, dst) if prefix == "v2" else build_v1(src, dst)


async def probe_tls(
    address: str, port: int, name: str, *, prefix: ProxyPrefix = "none", step_timeout: float = 5.0
) -> TlsAttempt:
    """Connect and do the CA's handshake (SNI ``name``, ALPN ``acme-tls/1``); record it all.

    ``step_timeout`` bounds the connect and the handshake each; running out is recorded
    (``connect_error`` / ``timed_out``), not raised: it is an observation like any other.
    """
    base = TlsAttempt(address=address, port=port, prefix=prefix)
    conn = await connect(address, port, step_timeout)
    if isinstance(conn, str):
        return TlsAttempt(address, port, prefix, connected=False, connect_error=conn)
    tap = _TapStream(conn, _proxy_header(prefix, conn))
    tls = trio.SSLStream(tap, _client_context(), server_hostname=name)
    tls_error: str | None = None
    handshake_ok = False
    timed_out = False
    alpn: str | None = None
    der: bytes | None = None
    try:
        with trio.move_on_after(step_timeout) as scope:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                if isinstance(cause, ssl.SSLError):
                    tls_error = cause.reason or cause.__class__.__name__
                elif cause is not None:
                    tls_error = str(cause) or cause.__class__.__name__
            else:
                handshake_ok = True
                alpn = tls.selected_alpn_protocol()
                der = tls.getpeercert(binary_form=True)
        timed_out = scope.cancelled_caught
    finally:
        if handshake_ok:
            with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError):
                await tls.aclose()
        await trio.aclose_forcefully(tap)
    return TlsAttempt(
        address=base.address,
        port=base.port,
        prefix=prefix,
        received=bytes(tap.received),
        closed=tap.closed,
        timed_out=timed_out,
        handshake_ok=handshake_ok,
        alpn=alpn,
        certificate=der,
        tls_error=tls_error,
    )


async def fetch_http01(
    address: str, port: int, name: str, token: str, step_timeout: float
) -> tuple[int | None, bytes, str | None]:
    """(status, body, error) of ``GET /.well-known/acme-challenge/TOKEN`` with Host NAME."""
    import h11

    conn = await connect(address, port, step_timeout)
    if isinstance(conn, str):
        return None, b"", f"could not connect: {conn}"
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=f"/.well-known/acme-challenge/{token}",
        headers=[("Host", name), ("User-Agent", "edgeproxy-doctor"), ("Connection", "close")],
    )
    status: int | None = None
    body = b""
    try:
        with trio.fail_after(step_timeout):
            await conn.send_all(
                (client.send(request) or b"") + (client.send(h11.EndOfMessage()) or b"")
            )
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await conn.receive_some(_READ))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                    if len(body) > _READ:
                        break
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    except trio.TooSlowError:
        return status, body, f"no complete answer within {step_timeout:g}s"
    except (h11.ProtocolError, trio.BrokenResourceError, OSError) as exc:
        return status, body, f"not an HTTP answer ({exc})"
    finally:
        await trio.aclose_forcefully(conn)
    return status, body, None
