"""Real upstream servers for tests, on loopback port 0, run inside the test's nursery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@dataclass
class Upstream:
    host: str
    port: int
    seen: list[bytes] = field(default_factory=list)  # first bytes of each connection, if recorded
    connections: int = 0

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


async def start_upstream(nursery: trio.Nursery, handler: Handler) -> Upstream:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    up = Upstream("127.0.0.1", listeners[0].socket.getsockname()[1])

    async def counted(stream: trio.SocketStream) -> None:
        up.connections += 1
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    nursery.start_soon(trio.serve_listeners, counted, listeners)
    return up


def _head_complete(data: bytes) -> bool:
    # Look past any PROXY header: the v2 signature itself begins with CRLF CRLF.
    start = data.find(b" HTTP/1.")
    return start >= 0 and b"\r\n\r\n" in data[start:]


async def read_http_head(stream: trio.abc.ReceiveStream) -> bytes:
    head = b""
    while not _head_complete(head):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        head += chunk
    return head


def http_handler(body: bytes = b"hello from upstream\n") -> Handler:
    async def handle(stream: trio.SocketStream) -> None:
        await read_http_head(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    return handle


def proxy_header_recorder(up_ref: list[Upstream], body: bytes = b"ok\n") -> Handler:
    """Records everything before the HTTP request line (the PROXY header) then answers."""

    async def handle(stream: trio.SocketStream) -> None:
        data = await read_http_head(stream)
        up_ref[0].seen.append(data)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    return handle


def answer_after_eof(reply_size: int) -> Handler:
    """Reads until the client half-closes, then sends ``reply_size`` bytes and closes."""

    async def handle(stream: trio.SocketStream) -> None:
        total = 0
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            total += len(chunk)
        pattern = f"got {total} bytes;".encode()
        out = (pattern * (reply_size // len(pattern) + 1))[:reply_size]
        await stream.send_all(out)
        await stream.send_eof()

    return handle


async def silent(stream: trio.SocketStream) -> None:
    """Accepts and never answers (but keeps reading so the client is not blocked on send)."""
    while await stream.receive_some(65536):
        pass
    await trio.sleep_forever()


async def echo(stream: trio.SocketStream) -> None:
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            await stream.send_eof()
            return
        await stream.send_all(chunk)
