"""The hot loop over real sockets: a pyOpenSSL client and server on socketpairs.

Half-close each way, bulk both ways with ordering intact, idle timeout, upstream reset, and
the switch from memory BIOs to the socket (bytes that arrived with the handshake included).
"""

from __future__ import annotations

import socket

import trio
import trustme
from OpenSSL import SSL

from edgeproxy.proxy.pipe import pipe, send_all
from edgeproxy.tls.contexts import build_server_context, new_server_connection
from edgeproxy.tls.stream import TLSStream


async def tls_pair(ca: trustme.CA) -> tuple[TLSStream, TLSStream, trio.SocketStream]:
    """(client TLSStream, server TLSStream after handshake, server SocketStream)."""
    a, b = trio.socket.socketpair()
    client_stream, server_stream = trio.SocketStream(a), trio.SocketStream(b)
    leaf = ca.issue_cert("pipe.example.test")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    chain = [x509.load_pem_x509_certificate(b.bytes()) for b in leaf.cert_chain_pems]
    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    server = TLSStream(server_stream, new_server_connection(build_server_context(chain, key)))  # type: ignore[arg-type]
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    cconn = SSL.Connection(cctx, None)
    cconn.set_tlsext_host_name(b"pipe.example.test")
    cconn.set_connect_state()
    client = TLSStream(client_stream, cconn)
    async with trio.open_nursery() as n:
        n.start_soon(client.do_handshake)
        n.start_soon(server.do_handshake)
    return client, server, server_stream


async def start_pipe(
    nursery: trio.Nursery, server: TLSStream, server_stream: trio.SocketStream, idle: float = 10
):
    up_proxy, up_app = socket.socketpair()
    up_proxy.setblocking(False)
    up_app.setblocking(False)
    raw = socket.socket(fileno=server_stream.socket.detach())
    raw.setblocking(False)
    results = []

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


async def test_half_close_each_way_and_bulk_order(nursery: trio.Nursery) -> None:
    client, server, server_stream = await tls_pair(trustme.CA())
    up, results = await start_pipe(nursery, server, server_stream)
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


async def test_idle_timeout_closes_both_sides(nursery: trio.Nursery) -> None:
    client, server, server_stream = await tls_pair(trustme.CA())
    up, results = await start_pipe(nursery, server, server_stream, idle=0.5)
    with trio.fail_after(5):
        while not results:
            await trio.sleep(0.05)
    assert results[0].reason == "idle_timeout"


async def test_upstream_close_reaches_the_client_as_close_notify(nursery: trio.Nursery) -> None:
    client, server, server_stream = await tls_pair(trustme.CA())
    up, results = await start_pipe(nursery, server, server_stream)
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
