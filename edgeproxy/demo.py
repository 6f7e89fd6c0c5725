"""The embedded default: everything ``edgeproxy demo`` needs, with no config file.

A tiny HTTP/1.1 "hello" upstream on an ephemeral loopback port, and the config that routes every
name to it with certificates from the internal CA. Only for the first run and for tests.

``prepare_state`` runs before any listener opens: a client that connects the moment the port
accepts finds ``ca.pem`` already there. It also issues, from the same local CA, the certificate
for what people type first: ``localhost``, ``127.0.0.1`` and ``::1`` (an IP literal sends no
SNI, so that certificate is also the no-SNI one) plus the demo host. It is loaded as a static
certificate: single-label names and IP addresses never go to on-demand issuance.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from .config import Config, load_config_data
from .issuers.base import private_key_pem
from .issuers.internal import InternalIssuer
from .storage.file import FileStorage

DEMO_HOST = "demo.edgeproxy.test"
LOCAL_NAMES: tuple[x509.GeneralName, ...] = (
    x509.DNSName(DEMO_HOST),
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
)


@dataclass(frozen=True, slots=True)
class DemoFiles:
    ca: Path  # what clients trust (``curl --cacert``)
    local_cert: Path  # chain for demo host, localhost, 127.0.0.1, ::1
    local_key: Path


async def prepare_state(state_dir: Path) -> DemoFiles:
    """The CA (created on first use) written to ``ca.pem``, and a fresh local certificate."""
    storage = FileStorage(state_dir)
    try:
        issuer = InternalIssuer(storage)
        ca_pem = await issuer.ca_certificate_pem()
        key = ec.generate_private_key(ec.SECP256R1())
        issued = await issuer.issue_for(LOCAL_NAMES, key)
    finally:
        await storage.aclose()
    files = DemoFiles(state_dir / "ca.pem", state_dir / "local.pem", state_dir / "local-key.pem")
    _write(files.ca, ca_pem, 0o644)
    _write(files.local_cert, issued.chain_pem, 0o644)
    _write(files.local_key, private_key_pem(key).encode(), 0o600)
    return files


def _write(path: Path, data: bytes, mode: int) -> None:
    # Whole file or nothing under the final name: a client may read it any moment.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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
    state_dir: Path,
    listen: str,
    upstream: tuple[str, int],
    admin: str | None,
    files: DemoFiles | None = None,
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
            "certificates": (
                [{"cert": str(files.local_cert), "key": str(files.local_key)}] if files else []
            ),
        }
    )
