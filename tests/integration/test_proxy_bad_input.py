"""Bad input never hurts anyone else: each misbehaving peer is dealt with while a normal client,
connecting at the same time, is served.

Scenarios: random garbage, plain HTTP, a truncated hello, an oversized hello, a silent client, a
1-byte-per-second client, an upstream that refuses, an upstream that never answers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from testkit.clienthellos import CAPTURED
from testkit.http_proxy import BODY, normal_client, read_until_closed
from testkit.proxy import RunningProxy, base_config, running_proxy
from testkit.upstreams import http_handler, silent, start_upstream


def closed(reason: str) -> float:
    """Connections closed so far for ``reason`` (the verdict the access log also carries)."""
    value = REGISTRY.get_sample_value("edgeproxy_connections_closed_total", {"reason": reason})
    return value or 0.0










async def test_random_garbage_is_closed(proxy: RunningProxy) -> None:
    s = await trio.open_tcp_stream(proxy.host, proxy.port)
    await s.send_all(os.urandom(4096))
    assert (await normal_client(proxy)).endswith(BODY)
    reply = await read_until_closed(s)
    assert not reply.startswith(b"HTTP")


async def test_plain_http_gets_a_400_that_says_tls(proxy: RunningProxy) -> None:
    s = await trio.open_tcp_stream(proxy.host, proxy.port)
    await s.send_all(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
    reply = await read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"speaks TLS" in reply
    assert (await normal_client(proxy)).endswith(BODY)


async def test_truncated_hello_then_close(proxy: RunningProxy) -> None:
    hello = (CAPTURED / "curl-http1.1.bin").read_bytes()
    s = await trio.open_tcp_stream(proxy.host, proxy.port)
    await s.send_all(hello[: len(hello) // 2])
    await s.send_eof()
    assert await read_until_closed(s) == b""
    assert (await normal_client(proxy)).endswith(BODY)
    assert proxy.rt.proxy.active <= 1


async def test_oversized_hello_is_refused_early(proxy: RunningProxy) -> None:
    # A handshake header announcing 1 MiB: refused from the length alone, not after buffering,
    # with the illegal_parameter alert OpenSSL sends for an excessive message size.
    s = await trio.open_tcp_stream(proxy.host, proxy.port)
    await s.send_all(bytes([22, 3, 1, 0x40, 0x00, 1, 0x10, 0x00, 0x00]) + b"\x00" * 1000)
    assert await read_until_closed(s, limit=5) == bytes((21, 3, 3, 0, 2, 2, 47))
    assert (await normal_client(proxy)).endswith(BODY)


async def test_silent_client_is_closed_at_the_handshake_timeout(proxy: RunningProxy) -> None:
    before = closed("handshake_timeout")
    s = await trio.open_tcp_stream(proxy.host, proxy.port)
    assert (await normal_client(proxy)).endswith(BODY)
    # handshake_timeout is 1.5 s: the proxy must hang up on its own (bounded wait here).
    assert await read_until_closed(s, limit=10) == b""
    await trio.sleep(0.1)  # the proxy counts after its close
    assert closed("handshake_timeout") == before + 1


async def test_one_byte_per_second_client_is_cut_off(proxy: RunningProxy) -> None:
    hello = (CAPTURED / "openssl-tls1_3.bin").read_bytes()
    s = await trio.open_tcp_stream(proxy.host, proxy.port)
    sent = 0
    closed = False
    with trio.move_on_after(10):
        for b in hello:
            try:
                await s.send_all(bytes([b]))
            except (trio.BrokenResourceError, OSError):
                closed = True
                break
            sent += 1
            with trio.move_on_after(1.0):
                if not await s.receive_some(1):
                    closed = True
                    break
    assert closed, "the proxy kept a dribbling client past its handshake timeout"
    assert sent < len(hello)
    assert (await normal_client(proxy)).endswith(BODY)


async def test_upstream_refusing(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # A port with nothing listening: bind, learn the port, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead = sock.getsockname()[1]
    sock.close()
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(
        tmp_path,
        [
            {"sni": ["dead.example.test"], "upstreams": [f"127.0.0.1:{dead}"]},
            {"sni": ["*"], "default": True, "upstreams": [up.addr]},
        ],
    )
    caplog.set_level(logging.WARNING)
    async with running_proxy(tmp_path, cfg) as p:
        reply = await normal_client(p, "dead.example.test")
        assert reply == b""  # TLS completed, then a clean close: no bytes, no hang
        assert (await normal_client(p)).endswith(BODY)
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "dead.example.test" in msgs and f"127.0.0.1:{dead}" in msgs


async def test_upstream_never_answering_hits_idle_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    quiet = await start_upstream(nursery, silent)
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(
        tmp_path,
        [
            {"sni": ["quiet.example.test"], "upstreams": [quiet.addr]},
            {"sni": ["*"], "default": True, "upstreams": [up.addr]},
        ],
        server={"idle_timeout": 1.0},
    )
    before = closed("idle_timeout")
    async with running_proxy(tmp_path, cfg) as p:
        async with trio.open_nursery() as n:
            results: list[bytes] = []

            async def stuck() -> None:
                results.append(await normal_client(p, "quiet.example.test"))

            n.start_soon(stuck)
            assert (await normal_client(p)).endswith(BODY)
        assert results == [b""]
        assert quiet.connections == 1
        await trio.sleep(0.1)  # the proxy counts after its close
        assert closed("idle_timeout") == before + 1


async def test_dead_upstream_is_skipped_for_the_next(tmp_path: Path, nursery: trio.Nursery) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead = sock.getsockname()[1]
    sock.close()
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(
        tmp_path, [{"sni": ["*"], "default": True, "upstreams": [f"127.0.0.1:{dead}", up.addr]}]
    )
    async with running_proxy(tmp_path, cfg) as p:
        for _ in range(4):
            assert (await normal_client(p)).endswith(BODY)
    assert up.connections == 4
