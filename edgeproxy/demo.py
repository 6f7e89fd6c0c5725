"""The embedded default: everything ``edgeproxy demo`` needs, with no config file.

A tiny HTTP/1.1 "hello" upstream on an ephemeral loopback port, and the config that routes every
name to it with certificates from the internal CA. Only for the first run and for tests.
"""

from __future__ import annotations

from pathlib import Path

import trio

from .config import Config, load_config_data

DEMO_HOST = "demo.edgeproxy.test"


async def _hello(stream: trio.SocketStream) -> None:
    try:
        head = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in head and len(head) < 16384:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        first = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        host = "?"
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"host:"):
                host = line[5:].strip().decode("latin-1", "replace")
        body = (
            f"Hello from the edgeproxy demo upstream.\n"
            f"You asked for {host} ({first}); TLS was terminated by edgeproxy.\n"
        ).encode()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def start_hello_upstream(nursery: trio.Nursery, host: str = "127.0.0.1") -> tuple[str, int]:
    listeners = await trio.open_tcp_listeners(0, host=host)
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, _hello, listeners)
    return host, port


def demo_config(
    state_dir: Path, listen: str, upstream: tuple[str, int], admin: str | None
) -> Config:
    return load_config_data(
        {
            "server": {"listen": [listen], "handshake_timeout": 10},
            "admin": {"listen": admin},
            "tls": {"issuer": "internal", "default_sni": DEMO_HOST},
            "on_demand": {"allow": ["*.edgeproxy.test", "*.localhost"]},
            "storage": {"backend": "file", "path": str(state_dir)},
            "routes": [
                {
                    "sni": ["*"],
                    "default": True,
                    "upstreams": [f"{upstream[0]}:{upstream[1]}"],
                    "alpn": ["http/1.1"],
                }
            ],
        }
    )
