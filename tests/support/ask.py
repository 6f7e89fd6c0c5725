"""A real on-demand ``ask`` endpoint on loopback that records the raw query of every request.

Raw bytes, not a parsed name: tests that check what reaches the endpoint (a stray ``%0A``, a
merged query string) must see exactly what was sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio


@dataclass
class AskRecorder:
    url: str
    queries: list[bytes] = field(default_factory=list)


async def start_ask_recorder(
    nursery: trio.Nursery, allows: Callable[[bytes], bool], path: str = "/allowed"
) -> AskRecorder:
    """Answer 200 when ``allows(raw_query)``, else 404; runs until ``nursery`` is cancelled."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    rec = AskRecorder(f"http://127.0.0.1:{port}{path}")

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        query = data.split(b" ", 2)[1].partition(b"?")[2]
        rec.queries.append(query)
        status = b"200 OK" if allows(query) else b"404 Not Found"
        await stream.send_all(
            b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return rec
