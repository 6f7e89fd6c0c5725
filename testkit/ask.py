"""Real on-demand ``ask`` endpoints on loopback.

``serve_ask`` is the bare HTTP/1.1 server: each request's status comes from a callback given the
raw request-target. ``start_ask_recorder`` records the raw query of every request. Raw bytes, not
a parsed name: tests that check what reaches the endpoint (a stray ``%0A``, a merged query string)
must see exactly what was sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio


async def serve_ask(
    nursery: trio.Nursery, respond: Callable[[bytes], Awaitable[bytes]], path: str = "/allowed"
) -> tuple[str, trio.CancelScope]:
    """Answer each request with the status line ``await respond(request_target)`` returns.

    Returns the endpoint's URL and a scope: cancelling it takes the endpoint down (its port then
    refuses connections), as an ask service that crashed would.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    scope = trio.CancelScope()

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        status = await respond(data.split(b" ", 2)[1])
        await stream.send_all(
            b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await stream.aclose()

    async def serve() -> None:
        with scope:
            await trio.serve_listeners(handle, listeners)
        for lst in listeners:
            await lst.aclose()

    nursery.start_soon(serve)
    return f"http://127.0.0.1:{port}{path}", scope


@dataclass
class AskRecorder:
    url: str
    queries: list[bytes] = field(default_factory=list)


async def start_ask_recorder(
    nursery: trio.Nursery, allows: Callable[[bytes], bool], path: str = "/allowed"
) -> AskRecorder:
    """Answer 200 when ``allows(raw_query)``, else 404; runs until ``nursery`` is cancelled."""
    queries: list[bytes] = []

    async def respond(target: bytes) -> bytes:
        query = target.partition(b"?")[2]
        queries.append(query)
        return b"200 OK" if allows(query) else b"404 Not Found"

    url, _ = await serve_ask(nursery, respond, path)
    return AskRecorder(url, queries)


async def ask_server(
    nursery: trio.Nursery, allowed: set[str], *, delay: float = 0.0
) -> tuple[str, trio.CancelScope]:
    """A real HTTP ask endpoint: 200 for names in ``allowed``, 404 otherwise, after ``delay``."""

    async def respond(target: bytes) -> bytes:
        text = target.decode()
        name = text.split("domain=", 1)[1] if "domain=" in text else ""
        await trio.sleep(delay)
        return b"200 OK" if name in allowed else b"404 Not Found"

    return await serve_ask(nursery, respond)
