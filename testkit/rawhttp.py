"""edgeproxy's plain-HTTP listener settings for tests, and one raw HTTP/1.1 exchange over a
TCP socket (bytes in, bytes out, no client library to tidy them)."""

from __future__ import annotations

import trio

from edgeproxy.proxy.http import HttpSettings


def settings(**over: object) -> HttpSettings:
    base: dict[str, object] = {
        "proxy_protocol": "off",
        "timeout": 2.0,
        "max_connections": 10,
        "max_header_bytes": 2048,
    }
    base.update(over)
    return HttpSettings(**base)  # type: ignore[arg-type]


async def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if half_close:
            await stream.send_eof()
        out = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out
