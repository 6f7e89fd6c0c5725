"""The steps of a connection's story that need no proxy: the first-bytes reader and ``decide``.

The reader runs on a real socketpair (the kernel's ``MSG_PEEK`` is what it keeps books on);
``decide`` is a pure function over a ClientHello, a route table and the registry's overrides.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from edgeproxy.config import HostPort
from edgeproxy.proxy.connection import Action, Decision, decide
from edgeproxy.proxy.first_bytes import FirstBytes
from edgeproxy.proxy.outcome import OK, PLAIN, Outcome, Result
from edgeproxy.proxy.pipe import PipeEnd
from edgeproxy.proxy.routes import Route, RouteTable
from edgeproxy.wire.clienthello import ClientHello

HEADER = b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 443\r\n"
HELLO = b"\x16\x03\x01\x00\x05hello"  # what follows the header; the reader does not parse it


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the client's end, the proxy's non-blocking end)."""
    client, ours = socket.socketpair()
    ours.setblocking(False)
    yield client, ours
    client.close()
    ours.close()


def in_socket(sock: socket.socket) -> bytes:
    """What is still unread in ``sock``, left there."""
    try:
        return sock.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


async def test_header_and_hello_in_one_segment_leave_the_hello_in_the_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, ours = pair
    client.sendall(HEADER + HELLO)
    reader = FirstBytes(ours)
    assert await reader.peek() == HEADER + HELLO
    assert reader.queued == len(HEADER + HELLO)
    reader.finish(HELLO)  # the header parser used the header only
    assert in_socket(ours) == HELLO
    assert (reader.queued, reader.carried) == (0, b"")
    assert await reader.peek() == HELLO  # the hello parser's peek: still in the socket
    assert reader.queued == len(HELLO)
    assert in_socket(ours) == HELLO


async def test_a_header_in_pieces_is_read_off_and_carries_what_follows(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, ours = pair
    client.sendall(HEADER[:10])
    reader = FirstBytes(ours)
    assert await reader.peek() == HEADER[:10]
    client.sendall(HEADER[10:] + HELLO[:4])
    await trio.sleep(0.01)
    # The parser needs more: what it was shown is read off, then the rest is read.
    assert await reader.read() == HEADER[10:] + HELLO[:4]
    assert reader.queued == 0
    client.sendall(HELLO[4:])
    reader.finish(HELLO[:4])
    assert reader.carried == HELLO[:4]
    # The next parser gets the carried bytes first, without touching the socket.
    assert await reader.peek() == HELLO[:4]
    assert reader.queued == 0
    await trio.sleep(0.01)
    assert in_socket(ours) == HELLO[4:]
    assert await reader.read() == HELLO[4:]


async def test_settle_reads_off_what_was_peeked_only(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, ours = pair
    client.sendall(HELLO)
    reader = FirstBytes(ours)
    assert await reader.peek() == HELLO
    client.sendall(b"later")
    await trio.sleep(0.01)
    reader.settle()  # before a refusal: closing with unread data would send a reset
    assert reader.queued == 0
    assert in_socket(ours) == b"later"


async def test_peek_waits_for_the_first_bytes_and_eof_reads_empty(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, ours = pair
    reader = FirstBytes(ours)
    async with trio.open_nursery() as n:

        async def late() -> None:
            await trio.sleep(0.05)
            client.sendall(b"x")

        n.start_soon(late)
        with trio.fail_after(5):
            assert await reader.peek() == b"x"
    client.close()
    assert await reader.read() == b""  # the peeked byte was read off, then EOF
    assert await reader.peek() == b""
    assert reader.queued == 0


def route(index: int, *patterns: str, default: bool = False) -> Route:
    return Route(index, patterns, default, (HostPort("127.0.0.1", 9000 + index),), None, ())


def hello(sni: str | None, *alpn: str) -> ClientHello:
    return ClientHello(sni, alpn, (0x0304,), 0x0303, (0x1301,), (), b"")


EXAMPLE = route(0, "example.test")
WILD = route(1, "*.example.test")
DEFAULT = route(2, "fallback.test", default=True)
ROUTES = RouteTable([EXAMPLE, WILD, DEFAULT])


class Overrides:
    """A registry with one registered name on its own upstream."""

    def __init__(self, name: str, own: Route) -> None:
        self.name, self.own = name, own

    def route_for(self, name: str, base: Route | None) -> Route | None:
        return self.own if name == self.name else base


@pytest.mark.parametrize(
    ("client_hello", "expected"),
    [
        (hello("example.test"), Decision(Action.TERMINATE, "example.test", EXAMPLE)),
        (hello("a.example.test", "h2"), Decision(Action.TERMINATE, "a.example.test", WILD)),
        (hello(None), Decision(Action.TERMINATE, None, DEFAULT)),
        # RFC 6066 forbids IP literals in SNI: answered as if none was sent.
        (hello("192.0.2.7"), Decision(Action.TERMINATE, None, DEFAULT)),
        (hello("[2001:db8::1]"), Decision(Action.TERMINATE, None, DEFAULT)),
        # A validation is answered whatever the routes say, even for a name with none.
        (hello("other.test", "acme-tls/1"), Decision(Action.ANSWER_CHALLENGE, "other.test")),
        (
            hello("example.test", "h2", "acme-tls/1"),
            Decision(Action.ANSWER_CHALLENGE, "example.test"),
        ),
    ],
)
def test_decide(client_hello: ClientHello, expected: Decision) -> None:
    assert decide(client_hello, ROUTES, None) == expected


def test_no_route_without_a_default() -> None:
    routes = RouteTable([EXAMPLE])
    assert decide(hello("other.test"), routes, None) == Decision(Action.NO_ROUTE, "other.test")
    assert decide(hello(None), routes, None) == Decision(Action.NO_ROUTE, None)


def test_a_registered_name_gets_its_own_upstream() -> None:
    own = route(7, "registered.test")
    overrides = Overrides("registered.test", own)
    routes = RouteTable([EXAMPLE])
    assert decide(hello("registered.test"), routes, overrides).route is own
    assert decide(hello("example.test"), routes, overrides).route is EXAMPLE
    # No SNI: nothing to look up.
    assert decide(hello(None), routes, overrides) == Decision(Action.NO_ROUTE, None)


def test_results_read_as_the_access_line_always_showed_them() -> None:
    assert str(OK) == "ok"
    assert str(Result(Outcome.BAD_HELLO, "decode_error")) == "bad_hello:decode_error"
    assert str(Result(Outcome.NO_CERTIFICATE, "denied")) == "no_certificate:denied"
    assert str(PLAIN[Outcome.NO_ROUTE]) == "no_route"
    # Every way a pipe can end early is a connection outcome of the same name.
    for end in PipeEnd:
        if end is not PipeEnd.DONE:
            assert Outcome(end.value) == end.value
