"""The hot loop over real sockets: a pyOpenSSL client and server on socketpairs.

Half-close each way, bulk both ways with ordering intact, idle timeout, upstream reset, and
the switch from memory BIOs to the socket (bytes that arrived with the handshake included).
The scenarios that do not depend on how the handshake ran also run in socket mode (the
server's SSL object made on the socket, as the data path does for a ClientHello that arrived
whole), and bulk answers go through a client that stalls midway, so the pipe's growing
upstream reads meet a write that has to wait. In socket mode the pipe starts on the reactor's
fast path, so every way of leaving it is here: an end read on either side, a bulk read, a
write to either side that cannot finish at once (small socket buffers), and each side's
reset or broken record (TCP pairs, for real resets), each with its typed end and counts.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trustme
from OpenSSL import SSL

from edgeproxy.proxy.pipe import MAX_READ, PipeResult, pipe, send_all
from edgeproxy.tls.contexts import build_server_context
from edgeproxy.tls.server import Scratch, ServerTLS
from testkit.tlsstream import TLSStream

MODES = ["memory", "socket"]


def _server_context(ca: trustme.CA) -> SSL.Context:
    leaf = ca.issue_cert("pipe.example.test")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    chain = [x509.load_pem_x509_certificate(b.bytes()) for b in leaf.cert_chain_pems]
    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    return build_server_context(chain, key)


def _client(stream: trio.SocketStream) -> TLSStream:
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    cconn = SSL.Connection(cctx, None)
    cconn.set_tlsext_host_name(b"pipe.example.test")
    cconn.set_connect_state()
    return TLSStream(stream, cconn)


def _upstream_pair() -> tuple[socket.socket, socket.socket]:
    """(the pipe's upstream socket, the test's end of it), both non-blocking."""
    up_proxy, up_app = socket.socketpair()
    up_proxy.setblocking(False)
    up_app.setblocking(False)
    return up_proxy, up_app


def _server(ca: trustme.CA, sock: socket.socket, mode: str) -> ServerTLS:
    """The data path's TLS side: on the socket, or on memory BIOs (the ClientHello read off)."""
    return ServerTLS(_server_context(ca), sock, primed=None if mode == "socket" else b"")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (unlike a socketpair, it can be reset)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


async def start(
    mode: str,
    nursery: trio.Nursery,
    idle: float = 10,
    *,
    early: bytes = b"",
    tcp: bool = False,
    raw: list[socket.socket] | None = None,
) -> tuple[TLSStream, trio.SocketStream, list[PipeResult]]:
    """(client, upstream end, results): a handshake as the data path runs it in ``mode``, then
    ``pipe``. ``early``: sent by the client right after its handshake, before the pipe runs.
    ``tcp``: both sides on TCP pairs, not socketpairs. ``raw`` gets the client's socket, the
    pipe's client socket, the pipe's upstream socket and the upstream app's socket."""
    a, b = _tcp_pair() if tcp else socket.socketpair()
    b.setblocking(False)
    client = _client(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    tls = _server(trustme.CA(), b, mode)
    async with trio.open_nursery() as n:
        n.start_soon(client.do_handshake)
        n.start_soon(tls.accept)
    if early:
        # Written before the pipe starts: they sit in the socket or the incoming BIO.
        await client.send_all(early)
        await trio.sleep(0.05)
    up_proxy, up_app = _tcp_pair() if tcp else _upstream_pair()
    up_proxy.setblocking(False)
    up_app.setblocking(False)
    if raw is not None:
        raw.extend([a, b, up_proxy, up_app])
    results: list[PipeResult] = []

    async def run() -> None:
        results.append(await pipe(tls, up_proxy, idle_timeout=idle))

    nursery.start_soon(run)
    return client, trio.SocketStream(trio.socket.from_stdlib_socket(up_app)), results


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


@pytest.mark.parametrize("mode", MODES)
async def test_half_close_each_way_and_bulk_order(nursery: trio.Nursery, mode: str) -> None:
    client, up, results = await start(mode, nursery)
    blob = bytes(range(256)) * 4096  # 1 MiB with a pattern: order and completeness visible
    got: list[bytes] = []

    async def upstream_reads() -> None:
        got.append(await read_all(up))

    async with trio.open_nursery() as n:
        n.start_soon(upstream_reads)
        await client.send_all(blob)
        await client.send_eof()  # close_notify: the upstream sees EOF, the answer still flows
    assert got == [blob]
    async with trio.open_nursery() as n:
        answer: list[bytes] = []

        async def client_reads() -> None:
            answer.append(await read_all(client))

        n.start_soon(client_reads)
        await up.send_all(blob[::-1])
        await up.send_eof()
    assert answer == [blob[::-1]]
    with trio.fail_after(5):
        while not results:
            await trio.sleep(0.01)
    assert results[0].reason == "done"
    assert (results[0].to_upstream, results[0].to_client) == (len(blob), len(blob))


@pytest.mark.parametrize("mode", MODES)
async def test_bytes_sent_with_the_handshake_are_not_lost(nursery: trio.Nursery, mode: str) -> None:
    client, up, _ = await start(mode, nursery, early=b"early bytes")
    assert await up.receive_some(100) == b"early bytes"
    await up.send_all(b"answer")
    assert await client.receive_some(100) == b"answer"


@pytest.mark.parametrize("mode", MODES)
async def test_idle_timeout_closes_both_sides(nursery: trio.Nursery, mode: str) -> None:
    client, up, results = await start(mode, nursery, idle=0.5)
    with trio.fail_after(5):
        while not results:
            await trio.sleep(0.05)
    assert results[0].reason == "idle_timeout"


@pytest.mark.parametrize("mode", MODES)
async def test_upstream_close_reaches_the_client_as_close_notify(
    nursery: trio.Nursery, mode: str
) -> None:
    client, up, results = await start(mode, nursery)
    await client.send_all(b"x")
    assert await up.receive_some(10) == b"x"
    await up.aclose()
    assert await client.receive_some(10) == b""  # close_notify, not a reset
    assert not client.ragged_eof
    await client.aclose()
    with trio.fail_after(5):
        while not results:
            await trio.sleep(0.05)
    assert results[0].reason == "done"


async def test_send_all_waits_when_the_buffer_is_full() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    payload = b"z" * (8 * 1024 * 1024)
    got = bytearray()

    async def reader() -> None:
        while len(got) < len(payload):
            await trio.lowlevel.wait_readable(b)
            try:
                got.extend(b.recv(1 << 20))
            except BlockingIOError:
                pass

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await send_all(a, payload)
    assert bytes(got) == payload


@pytest.mark.parametrize("mode", MODES)
async def test_bulk_answer_survives_a_client_that_stalls_midway(
    nursery: trio.Nursery, mode: str
) -> None:
    # Several MAX_READ's worth, so upstream reads have grown when the client stops reading
    # and a write must wait; then the client reads the rest. Every byte, in order.
    client, up, results = await start(mode, nursery)
    blob = bytes(range(251)) * (8 * MAX_READ // 251 + 1)
    got = bytearray()

    async def client_reads() -> None:
        while len(got) < len(blob) // 2:
            got.extend(await client.receive_some(65536))
        await trio.sleep(0.3)  # stall: the pipe's writes to the client must wait
        while chunk := await client.receive_some(65536):
            got.extend(chunk)

    async with trio.open_nursery() as n:
        n.start_soon(client_reads)
        await up.send_all(blob)
        await up.send_eof()
    assert bytes(got) == blob
    await client.aclose()
    with trio.fail_after(5):
        while not results:
            await trio.sleep(0.01)
    assert results[0].reason == "done"
    assert results[0].to_client == len(blob)


async def _result(results: list[PipeResult]) -> PipeResult:
    with trio.fail_after(5):
        while not results:
            await trio.sleep(0.01)
    return results[0]


async def _start_small(
    mode: str, nursery: trio.Nursery, which: int
) -> tuple[TLSStream, trio.SocketStream, list[PipeResult]]:
    """``start``, with a small send buffer on the pipe's socket ``which`` (see ``raw``)."""
    raw: list[socket.socket] = []
    started = await start(mode, nursery, raw=raw)
    raw[which].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return started


@pytest.mark.parametrize("mode", MODES)
async def test_small_answers_to_a_client_that_stops_reading(
    nursery: trio.Nursery, mode: str
) -> None:
    # Answers short enough for the fast path; the pipe's socket to the client holds little,
    # so a write must wait while the client is not reading. Every byte arrives, in order.
    client, up, results = await _start_small(mode, nursery, 1)
    pieces = [bytes([i]) * 1500 for i in range(60)]
    for piece in pieces:
        await up.send_all(piece)
        await trio.sleep(0.002)  # one short read each
    await up.send_eof()
    got = bytearray()
    while chunk := await client.receive_some(65536):
        got.extend(chunk)
    assert bytes(got) == b"".join(pieces)
    await client.aclose()
    result = await _result(results)
    assert (result.reason, result.to_client) == ("done", len(got))


@pytest.mark.parametrize("mode", MODES)
async def test_requests_to_an_upstream_that_stops_reading(
    nursery: trio.Nursery, mode: str
) -> None:
    # The upstream reads nothing at first and its socket holds little: a write to it stops
    # midway; what is left goes out once it reads. Every byte, in order, counted once.
    client, up, results = await _start_small(mode, nursery, 2)
    blob = bytes(range(241)) * 2000

    async def client_sends() -> None:
        await client.send_all(blob)
        await client.send_eof()

    async with trio.open_nursery() as n:
        n.start_soon(client_sends)
        await trio.sleep(0.2)  # the pipe's write to the upstream is stuck by now
        assert await read_all(up) == blob
    await up.send_eof()
    assert await client.receive_some(10) == b""
    await client.aclose()
    result = await _result(results)
    assert (result.reason, result.to_upstream) == ("done", len(blob))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("side", "end"), [(3, "upstream_reset"), (0, "client_reset")])
async def test_a_reset_ends_the_pipe(nursery: trio.Nursery, mode: str, side: int, end: str) -> None:
    raw: list[socket.socket] = []
    client, up, results = await start(mode, nursery, tcp=True, raw=raw)
    await client.send_all(b"request")
    assert await up.receive_some(100) == b"request"
    _reset(raw[side])  # the upstream app's socket, or the client's
    result = await _result(results)
    assert (result.reason, result.to_upstream) == (end, len(b"request"))


@pytest.mark.parametrize("mode", MODES)
async def test_a_broken_record_from_the_client_ends_the_pipe(
    nursery: trio.Nursery, mode: str
) -> None:
    raw: list[socket.socket] = []
    client, up, results = await start(mode, nursery, raw=raw)
    await client.send_all(b"request")
    assert await up.receive_some(100) == b"request"
    raw[0].sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data, bad tag
    assert (await _result(results)).reason == "client_tls_error"


async def test_a_failing_step_fails_its_own_pipe_only(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in one connection's fast-path step reaches that connection's task as its
    # exception (the connection's story logs it as internal_error); the shared reactor and
    # the other connections go on.
    other, other_up, _ = await start("socket", nursery)
    real = ServerTLS.receive_into
    doomed: list[ServerTLS] = []

    def receive_into(self: ServerTLS, scratch: Scratch) -> int:
        if self in doomed:
            raise RuntimeError("a bug")
        return real(self, scratch)

    monkeypatch.setattr(ServerTLS, "receive_into", receive_into)
    a, b = socket.socketpair()
    b.setblocking(False)
    client = _client(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    tls = _server(trustme.CA(), b, "socket")
    async with trio.open_nursery() as n:
        n.start_soon(client.do_handshake)
        n.start_soon(tls.accept)
    doomed.append(tls)
    up_proxy, _up_app = _upstream_pair()
    await client.send_all(b"request")
    with trio.fail_after(5), pytest.raises(RuntimeError, match="a bug"):
        await pipe(tls, up_proxy, idle_timeout=10)
    await other.send_all(b"still here")
    assert await other_up.receive_some(100) == b"still here"
