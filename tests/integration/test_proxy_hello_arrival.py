"""However the ClientHello arrives, the client is served, and by the right handshake path.

The proxy peeks the ClientHello (``MSG_PEEK``). Arrived whole, it stays in the socket and
OpenSSL reads it from there (``ServerTLS`` in socket mode); arrived in pieces, or read together
with a PROXY header tail, it is taken off the socket and primes memory BIOs (memory mode).
The client here is Python's ``ssl`` over memory BIOs, so the test decides how the first
flight is cut into TCP segments. Each test also counts which handshake path ran, so a
change that silently sends every connection down one path fails here.
"""

from __future__ import annotations

import itertools
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from edgeproxy.tls.server import ServerTLS
from edgeproxy.wire.proxy_protocol import build_v2
from testkit.proxy import RunningProxy, base_config, running_proxy
from testkit.upstreams import http_handler, start_upstream

BODY = b"served however the hello came\n"
NAME = "arrival.example.test"
# What the client says, or a list of (bytes, pause before the next piece).
Plan = Callable[[bytes], list[tuple[bytes, float]]]


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the handshake path each connection took (the real handshake still runs)."""
    counts = {"socket": 0, "memory": 0}
    real = ServerTLS.accept

    async def counting(self: ServerTLS) -> None:
        counts["socket" if self.on_socket else "memory"] += 1
        await real(self)

    monkeypatch.setattr(ServerTLS, "accept", counting)
    return counts


async def _proxy(
    tmp_path: Path, nursery: trio.Nursery, **server: Any
) -> Any:  # an async context manager yielding RunningProxy
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(
        tmp_path,
        [{"sni": [NAME], "upstreams": [up.addr]}],
        server={"handshake_timeout": 5, **server},
    )
    return running_proxy(tmp_path, cfg)


async def fetch(p: RunningProxy, plan: Plan, *, prefix: bytes = b"") -> bytes:
    """One HTTPS request whose first flight (``prefix`` + ClientHello) is sent as ``plan`` says."""
    assert p.ca_path is not None
    ctx = ssl.create_default_context(cafile=str(p.ca_path))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=NAME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock = trio.socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await sock.connect(p.addr)
    stream = trio.SocketStream(sock)
    with trio.fail_after(10):
        for piece, pause in plan(prefix + outgoing.read()):
            await stream.send_all(piece)
            await trio.sleep(pause)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                await stream.send_all(outgoing.read())
            data = await stream.receive_some(65536)
            assert data, "the proxy closed the connection during the handshake"
            incoming.write(data)
        tls.write(b"GET / HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n")
        await stream.send_all(outgoing.read())
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                data = await stream.receive_some(65536)
                if not data:
                    incoming.write_eof()
                else:
                    incoming.write(data)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            answer += chunk
    await stream.aclose()
    return answer


def whole(first: bytes) -> list[tuple[bytes, float]]:
    return [(first, 0.0)]


def cut_at(*offsets: int, pause: float = 0.2) -> Plan:
    def plan(first: bytes) -> list[tuple[bytes, float]]:
        bounds = [0, *offsets, len(first)]
        return [(first[a:b], pause) for a, b in itertools.pairwise(bounds)]

    return plan


async def test_a_whole_hello_is_read_by_openssl_from_the_socket(
    tmp_path: Path, nursery: trio.Nursery, paths: dict[str, int]
) -> None:
    async with await _proxy(tmp_path, nursery) as p:
        for _ in range(3):
            assert (await fetch(p, whole)).endswith(BODY)
    assert paths == {"socket": 3, "memory": 0}


async def test_a_hello_in_pieces_is_read_off_and_fed_to_memory(
    tmp_path: Path, nursery: trio.Nursery, paths: dict[str, int]
) -> None:
    async with await _proxy(tmp_path, nursery) as p:
        # Inside the record header, then inside the body: each pause lets the proxy peek a part.
        assert (await fetch(p, cut_at(3))).endswith(BODY)
        assert (await fetch(p, cut_at(40, 120))).endswith(BODY)
    assert paths == {"socket": 0, "memory": 2}


async def test_proxy_header_and_hello_in_one_segment_leave_the_hello_in_the_socket(
    tmp_path: Path, nursery: trio.Nursery, paths: dict[str, int]
) -> None:
    header = build_v2(("198.51.100.7", 40000), ("203.0.113.1", 443))
    async with await _proxy(
        tmp_path, nursery, proxy_protocol="v2", proxy_protocol_from=["127.0.0.1"]
    ) as p:
        assert (await fetch(p, whole, prefix=header)).endswith(BODY)
        # The header alone first, the hello later: still peeked whole.
        assert (await fetch(p, cut_at(len(header)), prefix=header)).endswith(BODY)
    assert paths == {"socket": 2, "memory": 0}


async def test_proxy_header_in_pieces_with_the_hello_behind_its_tail(
    tmp_path: Path, nursery: trio.Nursery, paths: dict[str, int]
) -> None:
    header = build_v2(("198.51.100.7", 40000), ("203.0.113.1", 443))
    async with await _proxy(
        tmp_path, nursery, proxy_protocol="v2", proxy_protocol_from=["127.0.0.1"]
    ) as p:
        # The header's first half is read off; its tail and the whole hello then come together
        # and are read together, so the hello goes to memory BIOs.
        assert (await fetch(p, cut_at(len(header) // 2), prefix=header)).endswith(BODY)
    assert paths == {"socket": 0, "memory": 1}


async def test_a_refused_name_gets_its_alert_not_a_reset(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The peeked hello is read off before the alert: closing with unread bytes would send a
    reset, and a reset can destroy the alert before the client reads it."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="not-routed.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    async with await _proxy(tmp_path, nursery) as p:
        for _ in range(20):
            stream = await trio.open_tcp_stream(*p.addr)
            await stream.send_all(hello)
            received = b""
            with trio.fail_after(10):
                while True:
                    chunk = await stream.receive_some(65536)  # a reset raises here
                    if not chunk:
                        break
                    received += chunk
            await stream.aclose()
            # TLS alert record: fatal (2), unrecognized_name (112).
            assert received == bytes([21, 3, 3, 0, 2, 2, 112])
