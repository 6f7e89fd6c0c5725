"""An accepted client socket has TCP_NODELAY (our small TLS flights must not wait on Nagle for
an ACK). The proxy sets it once on each listener and relies on Linux handing it down to every
accepted socket; this reads it off the proxy's own end of a real connection."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import trio

from testkit.proxy import base_config, running_proxy
from testkit.upstreams import http_handler, start_upstream


def _server_end_nodelay(client_addr: tuple[str, int]) -> int | None:
    """TCP_NODELAY of this process's socket whose peer is ``client_addr`` (None: none yet)."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            dup = socket.socket(fileno=os.dup(int(fd)))
            with dup:
                if dup.type == socket.SOCK_STREAM and dup.getpeername() == client_addr:
                    return dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    return None


async def test_an_accepted_client_socket_has_nodelay(tmp_path: Path, nursery: trio.Nursery) -> None:
    up = await start_upstream(nursery, http_handler(b"origin\n"))
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": [up.addr]}])
    async with running_proxy(tmp_path, cfg) as p:
        client = trio.socket.socket()
        with client:
            await client.connect(("127.0.0.1", p.port))
            mine = client.getsockname()
            with trio.fail_after(10):
                while (nodelay := _server_end_nodelay(mine)) is None:
                    await trio.sleep(0.01)  # accepted, but not yet by the proxy
            assert nodelay, "the proxy's end of an accepted connection has Nagle on"
