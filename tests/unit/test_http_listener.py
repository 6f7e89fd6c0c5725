"""The plain-HTTP listener: ``decide`` (pure) and the listener on real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from edgeproxy.config import HostPort
from edgeproxy.proxy.http import CHALLENGE_PREFIX, HttpListener, decide
from edgeproxy.proxy.server import open_listeners
from edgeproxy.wire.proxy_protocol import build_v2
from testkit.rawhttp import exchange, settings

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def served(name: str) -> bool:
    return name.endswith(".example.test")


@pytest.mark.parametrize(
    ("method", "target", "host", "status", "result"),
    [
        ("GET", CHALLENGE_PREFIX + TOKEN, "a.example.test", 200, "challenge"),
        ("HEAD", CHALLENGE_PREFIX + TOKEN, None, 200, "challenge"),  # any Host, or none
        ("GET", CHALLENGE_PREFIX + TOKEN, "other.test", 200, "challenge"),
        ("POST", CHALLENGE_PREFIX + TOKEN, "a.example.test", 405, "challenge_bad_method"),
        (
            "GET",
            CHALLENGE_PREFIX + "../../etc/passwd",
            "a.example.test",
            404,
            "challenge_bad_token",
        ),
        ("GET", CHALLENGE_PREFIX, "a.example.test", 404, "challenge_bad_token"),
        ("GET", CHALLENGE_PREFIX + TOKEN + "?x", "a.example.test", 404, "challenge_bad_token"),
        ("GET", "/shop?q=1", "a.example.test", 308, "redirect"),
        ("POST", "/form", "A.Example.Test:80", 308, "redirect"),
        ("GET", "/", "other.test", 404, "not_served"),
        ("GET", "/", None, 404, "unknown_host"),
        ("GET", "/", "[::1]:80", 404, "unknown_host"),
        ("GET", "/", "127.0.0.1", 404, "unknown_host"),
        ("GET", "/", "bad_name.example.test", 404, "unknown_host"),
        ("GET", "//evil.test/x", "a.example.test", 400, "bad_target"),
        ("GET", "http://evil.test/x", "a.example.test", 400, "bad_target"),
        ("OPTIONS", "*", "a.example.test", 400, "bad_target"),
    ],
)
def test_decide(method: str, target: str, host: str | None, status: int, result: str) -> None:
    d = decide(method, target, host, served)
    assert (d.status, d.result) == (status, result)
    if status == 308:
        assert d.location is not None and d.location.startswith("https://a.example.test/")
        assert d.location.endswith(target)
    if result == "challenge":
        assert d.token == TOKEN




@asynccontextmanager
async def listening(**over: object) -> AsyncIterator[int]:
    async def key_authorization(token: str) -> str | None:
        return KEY_AUTH if token == TOKEN else None

    listener = HttpListener(settings(**over), key_authorization=key_authorization, serves=served)
    socks = await open_listeners([HostPort("127.0.0.1", 0)])
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(listener.serve, socks)
        yield bound[0][1]
        nursery.cancel_scope.cancel()




async def test_challenge_redirect_and_404_over_a_socket() -> None:
    async with listening() as port:
        got = await exchange(
            port, f"GET {CHALLENGE_PREFIX}{TOKEN} HTTP/1.1\r\nHost: a.example.test\r\n\r\n".encode()
        )
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(KEY_AUTH.encode())
        got = await exchange(
            port, f"GET {CHALLENGE_PREFIX}nothere HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        )
        assert got.startswith(b"HTTP/1.1 404 ")
        got = await exchange(port, b"GET /a?b=c HTTP/1.1\r\nHost: shop.example.test\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 308 ")
        assert b"\r\nlocation: https://shop.example.test/a?b=c\r\n" in got.lower()
        got = await exchange(port, b"GET / HTTP/1.1\r\nHost: x.other.test\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 404 ")


async def test_head_gets_headers_without_a_body() -> None:
    async with listening() as port:
        got = await exchange(
            port, f"HEAD {CHALLENGE_PREFIX}{TOKEN} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        )
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body == b""
        assert f"content-length: {len(KEY_AUTH)}".encode() in head.lower()


async def test_oversized_headers_are_refused_with_431() -> None:
    async with listening() as port:
        big = b"GET / HTTP/1.1\r\nHost: a.example.test\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
        got = await exchange(port, big)
        assert got.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01\x00\x05hello\r\n\r\n", b"GET / HTTP/9\r\n\r\n"])
async def test_garbage_gets_400_or_a_close(garbage: bytes) -> None:
    async with listening() as port:
        got = await exchange(port, garbage)
        assert got == b"" or got.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 505 "))


async def test_a_silent_client_is_closed_after_the_timeout() -> None:
    async with listening(timeout=0.5) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with trio.fail_after(5):  # generous: liveness, not timing
                assert await stream.receive_some(100) == b""


async def test_beyond_max_connections_new_ones_are_closed_at_once() -> None:
    async with listening(max_connections=2, timeout=5.0) as port:
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.sleep(0.1)
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            try:
                assert await extra.receive_some(100) == b""
            except trio.BrokenResourceError:
                pass  # reset instead of FIN: closed either way
        for s in [*held, extra]:
            await s.aclose()


async def test_proxy_v2_header_is_read_and_a_missing_one_refused() -> None:
    header = build_v2(("203.0.113.7", 4242), ("127.0.0.1", 80))
    request = b"GET / HTTP/1.1\r\nHost: shop.example.test\r\n\r\n"
    async with listening(proxy_protocol="v2") as port:
        got = await exchange(port, header + request)
        assert got.startswith(b"HTTP/1.1 308 ")
        assert await exchange(port, request) == b""  # no PROXY header: closed, no answer


async def test_a_peer_outside_proxy_protocol_from_gets_nothing() -> None:
    import ipaddress

    from edgeproxy.proxy.senders import AddressSet

    header = build_v2(("203.0.113.7", 4242), ("127.0.0.1", 80))
    request = b"GET / HTTP/1.1\r\nHost: shop.example.test\r\n\r\n"
    senders = AddressSet([ipaddress.ip_network("10.0.0.0/8")])
    async with listening(proxy_protocol="v2", proxy_senders=senders) as port:
        try:
            got = await exchange(port, header + request)
        except trio.BrokenResourceError:
            got = b""  # reset before our bytes were read
        assert got == b""
    trusted = AddressSet([ipaddress.ip_network("127.0.0.0/8")])
    async with listening(proxy_protocol="v2", proxy_senders=trusted) as port:
        assert (await exchange(port, header + request)).startswith(b"HTTP/1.1 308 ")
