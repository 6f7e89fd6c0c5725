"""The hot loop over real sockets: a pyOpenSSL client and server on socketpairs.

Half-close each way, bulk both ways with ordering intact, idle timeout, upstream reset, and
the switch from memory BIOs to the socket (bytes that arrived with the handshake included).
The scenarios that do not depend on how the handshake ran also run in socket mode (the
server's SSL object made on the socket, as the data path does for a ClientHello that arrived
whole), and bulk answers go through a client that stalls midway, so the pipe's growing
upstream reads meet a write that has to wait.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trustme
from OpenSSL import SSL

from edgeproxy.proxy.pipe import MAX_READ, PipeResult, pipe, send_all
from edgeproxy.tls.contexts import build_server_context, new_server_connection
from edgeproxy.tls.handshake import accept_tls_on_socket
from edgeproxy.tls.stream import TLSStream

MODES = ["memory", "socket"]


def _server_context(ca: trustme.CA) -> SSL.Context:
    leaf = ca.issue_cert("pipe.example.test")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    chain = [x509.load_pem_x509_certificate(b.bytes()) for b in leaf.cert_chain_pems]
    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    return build_server_context(chain, key)  # type: ignore[arg-type]


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


async def tls_pair(ca: trustme.CA) -> tuple[TLSStream, TLSStream, trio.SocketStream]:
    """(client TLSStream, server TLSStream after handshake, server SocketStream)."""
    a, b = trio.socket.socketpair()
    client_stream, server_stream = trio.SocketStream(a), trio.SocketStream(b)
    server = TLSStream(server_stream, new_server_connection(_server_context(ca)))
    client = _client(client_stream)
    async with trio.open_nursery() as n:
        n.start_soon(client.do_handshake)
        n.start_soon(server.do_handshake)
    return client, server, server_stream


async def start_socket_mode_pipe(
    nursery: trio.Nursery, ca: trustme.CA, idle: float = 10
) -> tuple[TLSStream, trio.SocketStream, list[PipeResult]]:
    """Handshake with OpenSSL on the server socket itself, then ``pipe(on_socket=True)``."""
    a, b = socket.socketpair()
    b.setblocking(False)
    client = _client(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    conn = new_server_connection(_server_context(ca), sock=b)
    async with trio.open_nursery() as n:
        n.start_soon(client.do_handshake)
        n.start_soon(accept_tls_on_socket, conn, b)
    up_proxy, up_app = _upstream_pair()
    results: list[PipeResult] = []

    async def run() -> None:
        results.append(await pipe(conn, b, up_proxy, idle_timeout=idle, on_socket=True))

    nursery.start_soon(run)
    return client, trio.SocketStream(trio.socket.from_stdlib_socket(up_app)), results


async def start(
    mode: str, nursery: trio.Nursery, idle: float = 10
) -> tuple[TLSStream, trio.SocketStream, list[PipeResult]]:
    """(client, upstream end, results) for a pipe in ``mode``."""
    if mode == "socket":
        return await start_socket_mode_pipe(nursery, trustme.CA(), idle)
    client, server, server_stream = await tls_pair(trustme.CA())
    up, results = await start_pipe(nursery, server, server_stream, idle)
    return client, up, results


async def start_pipe(
    nursery: trio.Nursery, server: TLSStream, server_stream: trio.SocketStream, idle: float = 10
) -> tuple[trio.SocketStream, list[PipeResult]]:
    up_proxy, up_app = _upstream_pair()
    raw = socket.socket(fileno=server_stream.socket.detach())
    raw.setblocking(False)
    results: list[PipeResult] = []

    async def run() -> None:
        results.append(
            await pipe(
                server.connection,
                raw,
                up_proxy,
                idle_timeout=idle,
                pending=server.take_delayed_output(),
            )
        )

    nursery.start_soon(run)
    return trio.SocketStream(trio.socket.from_stdlib_socket(up_app)), results


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


async def test_bytes_sent_with_the_handshake_are_not_lost(nursery: trio.Nursery) -> None:
    client, server, server_stream = await tls_pair(trustme.CA())
    # Written before the pipe starts: they sit in the socket or the incoming BIO at takeover.
    await client.send_all(b"early bytes")
    await trio.sleep(0.05)
    up, _ = await start_pipe(nursery, server, server_stream)
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
