"""An edgeproxy with the internal issuer in front of one HTTP upstream, and the raw clients that
talk to it (a normal TLS client, a reader until the proxy closes).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from testkit.proxy import RunningProxy, base_config, running_proxy
from testkit.upstreams import http_handler, start_upstream

BODY = b"normal client served\n"


async def normal_client(
    p: RunningProxy, name: str = "normal.example.test", ctx: ssl.SSLContext | None = None
) -> bytes:
    assert p.ca_path is not None
    ctx = ctx or ssl.create_default_context(cafile=str(p.ca_path))
    tcp = await trio.open_tcp_stream(p.host, p.port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    await tls.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    with trio.fail_after(10):
        while True:
            try:
                chunk = await tls.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
    await trio.aclose_forcefully(tls)
    return data


async def read_until_closed(stream: trio.SocketStream, limit: float = 15) -> bytes:
    data = b""
    with trio.fail_after(limit):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


@asynccontextmanager
async def proxy_to_http(
    tmp_path: Path, nursery: trio.Nursery, **sections: Any
) -> AsyncIterator[RunningProxy]:
    """The proxy these tests share (internal issuer, one default route to an HTTP upstream
    answering BODY), with ``sections`` merged into its config."""
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(
        tmp_path, [{"sni": ["*"], "default": True, "upstreams": [up.addr]}], **sections
    )
    async with running_proxy(tmp_path, cfg) as p:
        yield p
