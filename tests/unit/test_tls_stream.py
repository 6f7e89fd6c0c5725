"""TLSStream: trio's stream contract, the TLS story of one connection, and real clients.

Three parts: (1) trio's generic conformance checks over memory and lockstep stream pairs,
against our own client and against ``trio.SSLStream`` (stdlib ssl); (2) scenarios over memory
streams (handshake failures, EOFs, half-close, tickets, renegotiation, cancellation, memory);
(3) a real trio TCP server on 127.0.0.1 with real clients: Python ``ssl`` and
``openssl s_client``.
"""

from __future__ import annotations

import functools
import gc
import inspect
import os
import shutil
import socket
import ssl
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from edgeproxy.tls import openssl_internals as internals_module
from edgeproxy.tls.contexts import build_server_context, load_pem_chain, new_server_connection
from edgeproxy.tls.errors import TLSHandshakeError, reason_from_openssl
from edgeproxy.tls.openssl_internals import (
    attach_socket,
    incoming_pending,
    outgoing_pending,
    release_idle_buffers,
)
from testkit import tlsstream as stream_module
from testkit.malloc import malloc_in_use
from testkit.tlsmem import client_connection, client_context
from testkit.tlsstream import TLSStream, TLSStreamBroken

HANG_GUARD = 20  # seconds; only stops a broken test from hanging, never asserted on

# ---- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> SSL.Context:
    leaf = ca.issue_cert("example.test")
    chain = load_pem_chain(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    return build_server_context(chain, key)


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA) -> Iterator[str]:
    with ca.cert_pem.tempfile() as path:
        yield path


def client_ctx(
    ca: trustme.CA | None,
    *,
    min_version: int | None = None,
    max_version: int | None = None,
    ciphers: bytes | None = None,
) -> SSL.Context:
    ctx = client_context(ca, min_version=min_version, max_version=max_version)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers)
    return ctx


def client_conn(
    ctx: SSL.Context, *, sni: bytes = b"example.test", alpn: Sequence[bytes] = ()
) -> SSL.Connection:
    return client_connection(ctx=ctx, sni=sni, alpn=alpn)


async def handshake_both(*streams: trio.abc.Stream) -> None:
    async with trio.open_nursery() as nursery:
        for s in streams:
            nursery.start_soon(s.do_handshake)  # type: ignore[attr-defined]


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    while chunk := await stream.receive_some():
        got += chunk
    return bytes(got)


def openssl_reason(exc: BaseException) -> str:
    args = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    return reason_from_openssl(args)


# ---- 1. trio's stream contract ---------------------------------------------------------------

VERSIONS = pytest.mark.parametrize(
    "version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls12", "tls13"]
)


@VERSIONS
async def test_conformance_against_our_client(
    ca: trustme.CA, server_ctx: SSL.Context, version: int
) -> None:
    cctx = client_ctx(ca, max_version=version)

    def maker(
        pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
    ) -> Callable[[], Awaitable[tuple[TLSStream, TLSStream]]]:
        async def make() -> tuple[TLSStream, TLSStream]:
            server_t, client_t = pair()
            server = TLSStream(server_t, new_server_connection(server_ctx))
            client = TLSStream(client_t, client_conn(cctx))
            await handshake_both(server, client)
            return server, client

        return make

    await trio.testing.check_half_closeable_stream(
        maker(trio.testing.memory_stream_pair), maker(trio.testing.lockstep_stream_pair)
    )


@VERSIONS
async def test_conformance_against_stdlib_ssl_client(
    ca: trustme.CA, server_ctx: SSL.Context, version: int
) -> None:
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    cctx.maximum_version = (
        ssl.TLSVersion.TLSv1_2 if version == SSL.TLS1_2_VERSION else ssl.TLSVersion.TLSv1_3
    )

    def maker(
        pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
    ) -> Callable[[], Awaitable[tuple[trio.abc.Stream, trio.abc.Stream]]]:
        async def make() -> tuple[trio.abc.Stream, trio.abc.Stream]:
            server_t, client_t = pair()
            server = TLSStream(server_t, new_server_connection(server_ctx))
            client = trio.SSLStream(client_t, cctx, server_hostname="example.test")
            await handshake_both(server, client)
            return server, client

        return make

    await trio.testing.check_two_way_stream(
        maker(trio.testing.memory_stream_pair), maker(trio.testing.lockstep_stream_pair)
    )


async def test_conformance_with_lazy_handshake(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    # No do_handshake(): the first send_all/receive_some on each side runs it.
    async def make() -> tuple[TLSStream, TLSStream]:
        server_t, client_t = trio.testing.memory_stream_pair()
        return (
            TLSStream(server_t, new_server_connection(server_ctx)),
            TLSStream(client_t, client_conn(client_ctx(ca))),
        )

    await trio.testing.check_half_closeable_stream(make, None)


# ---- 2. scenarios over memory streams --------------------------------------------------------


async def memory_pair(
    server_ctx: SSL.Context,
    cctx: SSL.Context,
    *,
    alpn: Sequence[str] = (),
    client_alpn: Sequence[bytes] = (),
    lockstep: bool = False,
) -> tuple[TLSStream, TLSStream]:
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    server_t, client_t = pair()
    server = TLSStream(server_t, new_server_connection(server_ctx, alpn=alpn))
    client = TLSStream(client_t, client_conn(cctx, alpn=client_alpn))
    return server, client


@VERSIONS
async def test_handshake_reports_what_was_agreed(
    ca: trustme.CA, server_ctx: SSL.Context, version: int
) -> None:
    server, client = await memory_pair(
        server_ctx,
        client_ctx(ca, max_version=version),
        alpn=("h2", "http/1.1"),
        client_alpn=[b"http/1.1", b"h2"],
    )
    assert (server.tls_version, server.selected_alpn) == (None, None)
    await handshake_both(server, client)
    expected = "TLSv1.2" if version == SSL.TLS1_2_VERSION else "TLSv1.3"
    assert server.tls_version == client.tls_version == expected
    assert server.selected_alpn == client.selected_alpn == "h2"
    assert server.server_name == "example.test"
    assert not server.session_reused
    await server.do_handshake()  # idempotent


async def test_send_and_receive_both_start_the_handshake(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca))
    got: list[bytes] = []

    async def server_side() -> None:
        async with trio.open_nursery() as nursery:  # both wait on the same handshake
            nursery.start_soon(server.send_all, b"from server")
            got.append(await receive_exactly(server, 11))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        await client.send_all(b"from client")
        assert await receive_exactly(client, 11) == b"from server"
    assert got == [b"from client"]


async def test_large_and_non_byte_buffers(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca))
    payload = os.urandom(3 * 1024 * 1024 + 7)  # > the 256 KiB send slices
    words = array("I", range(1000))  # a memoryview with itemsize 4
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        assert await receive_exactly(server, len(payload)) == payload
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, memoryview(words))
        assert await receive_exactly(server, 4000) == words.tobytes()


@pytest.mark.parametrize("split", [1, 5, 40, "all"])
async def test_primed_with_bytes_already_read(
    ca: trustme.CA, server_ctx: SSL.Context, split: int | str
) -> None:
    server_t, client_t = trio.testing.memory_stream_pair()
    client = TLSStream(client_t, client_conn(client_ctx(ca), alpn=[b"h2"]))

    async def server_side() -> None:
        # What the proxy does: read the start of the ClientHello itself, then hand it over.
        first = await server_t.receive_some(None if split == "all" else split)  # type: ignore[arg-type]
        assert first[:1] == b"\x16"  # a TLS handshake record
        conn = new_server_connection(server_ctx, alpn=("h2",))
        server = TLSStream(server_t, conn, initial_data=first)
        await server.do_handshake()
        assert server.selected_alpn == "h2"
        await server.send_all(await receive_exactly(server, 4))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        await client.send_all(b"ping")
        assert await receive_exactly(client, 4) == b"ping"


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n", "http_request"),
        (b"\x16\x03\x01\x00\x10" + b"\xff" * 16, "unexpected_message"),
        (b"\x16\x03\x01\xff\xff" + b"\x00" * 64, "bad_record"),
        (b"\x00" * 64, "bad_record"),
    ],
    ids=["http", "bad-handshake-message", "oversized-record", "zeros"],
)
async def test_garbage_instead_of_client_hello(
    server_ctx: SSL.Context, garbage: bytes, reason: str
) -> None:
    server_t, peer = trio.testing.memory_stream_pair()
    server = TLSStream(server_t, new_server_connection(server_ctx))
    await peer.send_all(garbage)
    with pytest.raises(TLSHandshakeError) as info:
        await server.do_handshake()
    assert info.value.reason == reason
    # It stays failed, with the same reason, and the stream is unusable.
    with pytest.raises(TLSHandshakeError) as again:
        await server.do_handshake()
    assert again.value.reason == reason
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()


def client_hello_and_client(cctx: SSL.Context) -> tuple[bytes, SSL.Connection]:
    conn = client_conn(cctx)
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536), conn


@VERSIONS
@pytest.mark.parametrize(
    "garbage",
    [b"\x17\x03\x03\x00\x20" + b"\x42" * 32, b"\x16\x03\x03\x00\x04\x14\x00\x00\x00", b"junk!"],
    ids=["fake-app-data", "early-finished", "not-a-record"],
)
async def test_garbage_mid_handshake(
    ca: trustme.CA, server_ctx: SSL.Context, version: int, garbage: bytes
) -> None:
    server_t, peer = trio.testing.memory_stream_pair()
    server = TLSStream(server_t, new_server_connection(server_ctx))
    hello, _ = client_hello_and_client(client_ctx(ca, max_version=version))

    async def peer_side() -> None:
        await peer.send_all(hello)
        assert (await peer.receive_some())[:1] == b"\x16"  # the server's flight
        await peer.send_all(garbage)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_side)
        with pytest.raises(TLSHandshakeError) as info:
            await server.do_handshake()
    assert info.value.reason in {"bad_record", "unexpected_message", "bad_handshake_message"}


async def test_eof_mid_handshake_is_peer_closed(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    server_t, peer = trio.testing.memory_stream_pair()
    server = TLSStream(server_t, new_server_connection(server_ctx))
    hello, _ = client_hello_and_client(client_ctx(ca))
    await peer.send_all(hello[:20])
    await peer.send_eof()
    with pytest.raises(TLSHandshakeError) as info:
        await server.do_handshake()
    assert info.value.reason == "peer_closed"


async def test_reset_mid_handshake_is_peer_closed(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    server_t, peer = trio.testing.memory_stream_pair()
    server = TLSStream(server_t, new_server_connection(server_ctx))
    hello, _ = client_hello_and_client(client_ctx(ca))
    await peer.send_all(hello)
    await peer.aclose()  # the server's flight cannot be delivered
    with pytest.raises(TLSHandshakeError) as info:
        await server.do_handshake()
    assert info.value.reason == "peer_closed"
    assert isinstance(info.value.__cause__, trio.BrokenResourceError)


@pytest.mark.parametrize(
    ("client_kwargs", "server_reason", "client_reason"),
    [
        (
            {
                "min_version": SSL.TLS1_1_VERSION,
                "max_version": SSL.TLS1_1_VERSION,
                "ciphers": b"DEFAULT@SECLEVEL=0",
            },
            "unsupported_protocol",
            "unsupported_protocol",  # the client got our protocol_version alert
        ),
        (
            {"max_version": SSL.TLS1_2_VERSION, "ciphers": b"ECDHE-ECDSA-AES128-SHA:AES128-SHA"},
            "no_shared_cipher",
            "handshake_failure",
        ),
    ],
    ids=["tls11", "cbc-only"],
)
async def test_refused_clients_get_a_typed_reason_and_an_alert(
    ca: trustme.CA,
    server_ctx: SSL.Context,
    client_kwargs: dict[str, object],
    server_reason: str,
    client_reason: str,
) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca, **client_kwargs))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_handshake_failure, client, client_reason)
        await _expect_handshake_failure(server, server_reason)


async def _expect_handshake_failure(stream: TLSStream, reason: str) -> None:
    with pytest.raises(TLSHandshakeError) as info:
        await stream.do_handshake()
    assert info.value.reason == reason, info.value


async def test_client_that_does_not_trust_us_sends_unknown_ca(server_ctx: SSL.Context) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(trustme.CA()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_handshake_failure, client, "certificate_verify_failed")
        await _expect_handshake_failure(server, "unknown_ca")


async def test_close_notify_is_a_clean_eof(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca))
    await handshake_both(server, client)
    await client.send_all(b"last words")
    await client.aclose()
    assert await receive_all(server) == b"last words"
    assert not server.ragged_eof
    assert await server.receive_some() == b""  # and stays at EOF


async def test_tcp_eof_without_close_notify_is_a_ragged_eof(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca))
    await handshake_both(server, client)
    await client.send_all(b"truncated?")
    await client.transport_stream.aclose()  # TCP FIN, no close_notify
    assert await receive_all(server) == b"truncated?"
    assert server.ragged_eof
    assert await server.receive_some() == b""


@VERSIONS
async def test_half_close_keeps_the_other_direction_open(
    ca: trustme.CA, server_ctx: SSL.Context, version: int
) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca, max_version=version))
    await handshake_both(server, client)
    # The client ends its request; the server still answers, then ends too.
    await client.send_all(b"request")
    await client.send_eof()
    assert await receive_all(server) == b"request"
    assert not server.ragged_eof
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"more")
    await server.send_all(b"response")
    await server.send_eof()
    assert await receive_all(client) == b"response"
    assert not client.ragged_eof
    await server.aclose()
    await client.aclose()


async def test_tls13_handshake_does_not_wait_for_a_client_that_is_not_reading(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    # Over an unbuffered (lockstep) transport, sending session tickets at the end of the
    # handshake would block until the client reads. They go out with the first data instead.
    cctx = client_ctx(ca)
    server, client = await memory_pair(server_ctx, cctx, lockstep=True)
    await handshake_both(server, client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"first")
        assert await receive_exactly(client, 5) == b"first"
    session = client.connection.get_session()
    assert session is not None
    # The tickets came along: a new connection resumes with them.
    server2, client2 = await memory_pair(server_ctx, cctx)
    client2.connection.set_session(session)
    await handshake_both(server2, client2)
    assert server2.session_reused and client2.session_reused


@VERSIONS
async def test_session_resumption(ca: trustme.CA, server_ctx: SSL.Context, version: int) -> None:
    cctx = client_ctx(ca, max_version=version)
    server, client = await memory_pair(server_ctx, cctx)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"hi")
        assert await receive_exactly(client, 2) == b"hi"
    assert not server.session_reused
    session = client.connection.get_session()
    assert session is not None
    server2, client2 = await memory_pair(server_ctx, cctx)
    client2.connection.set_session(session)
    await handshake_both(server2, client2)
    assert server2.session_reused
    assert server2.tls_version == server.tls_version


async def test_tls12_client_renegotiation_is_refused(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca, max_version=SSL.TLS1_2_VERSION))
    await handshake_both(server, client)
    assert client.connection.renegotiate()

    async def client_side() -> None:
        with pytest.raises(TLSStreamBroken) as info:
            await client.send_all(b"x")  # SSL_write drives the renegotiation handshake
            await client.receive_some()
        assert info.value.reason == "renegotiation_refused"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_side)
        with pytest.raises(TLSStreamBroken) as info:
            await receive_all(server)
    assert info.value.reason == "renegotiation_refused"
    assert isinstance(info.value, trio.BrokenResourceError)  # what the proxy's pipe catches


async def test_client_copes_with_server_initiated_renegotiation(ca: trustme.CA) -> None:
    # Our server refuses renegotiation, but the engine must cope when a peer does it: then
    # send_all needs to read, and two tasks can want the transport at once (the receive task
    # met the HelloRequest; the send task's SSL_write waits for the new handshake).
    leaf = ca.issue_cert("example.test")
    lenient = SSL.Context(SSL.TLS_SERVER_METHOD)
    lenient.set_max_proto_version(SSL.TLS1_2_VERSION)
    lenient.use_certificate(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    lenient.use_privatekey(key)
    server_t, client_t = trio.testing.memory_stream_pair()
    server_conn = SSL.Connection(lenient, None)
    server_conn.set_accept_state()
    server = TLSStream(server_t, server_conn)
    client = TLSStream(client_t, client_conn(client_ctx(ca)))
    await handshake_both(server, client)
    upload = os.urandom(2 * 1024 * 1024)

    async def client_uploads() -> None:
        for start in range(0, len(upload), 50_000):
            await client.send_all(upload[start : start + 50_000])

    async def server_side() -> None:
        # Renegotiate from the receive path (OpenSSL accepts data interleaved with the new
        # handshake only in SSL_read), then answer once everything arrived.
        first = await receive_exactly(server, 500_000)
        assert server_conn.renegotiate()
        rest = await receive_exactly(server, len(upload) - len(first))
        assert first + rest == upload
        await server.send_all(b"done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        nursery.start_soon(client_uploads)
        assert await receive_exactly(client, 4) == b"done"
    assert server_conn.total_renegotiations() == 1
    assert not server_conn.renegotiate_pending()


async def test_tampered_record_breaks_the_stream(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    server_t, client_t = trio.testing.memory_stream_pair()
    server = TLSStream(server_t, new_server_connection(server_ctx))
    client = TLSStream(client_t, client_conn(client_ctx(ca)))
    await handshake_both(server, client)
    conn = client.connection
    conn.sendall(b"genuine")
    record = bytearray(conn.bio_read(65536))
    record[-1] ^= 1
    await client_t.send_all(bytes(record))
    with pytest.raises(TLSStreamBroken) as info:
        await server.receive_some()
    assert info.value.reason == "bad_record"
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()


async def test_error_after_buffered_records_comes_after_their_data(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server_t, client_t = trio.testing.memory_stream_pair()
    server = TLSStream(server_t, new_server_connection(server_ctx))
    client = TLSStream(client_t, client_conn(client_ctx(ca)))
    await handshake_both(server, client)
    conn = client.connection
    conn.sendall(b"good")
    good = conn.bio_read(65536)
    conn.sendall(b"bad!")
    bad = bytearray(conn.bio_read(65536))
    bad[-1] ^= 1
    await client_t.send_all(good + bytes(bad))  # one transport read carries both records
    assert await server.receive_some() == b"good"
    with pytest.raises(TLSStreamBroken):
        await server.receive_some()


async def test_cancelled_receive_leaves_the_stream_usable(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca))
    await handshake_both(server, client)
    with trio.move_on_after(0.01):
        await server.receive_some()
        pytest.fail("nothing was sent")
    await client.send_all(b"after the cancel")
    assert await receive_exactly(server, 16) == b"after the cancel"


async def test_cancelled_send_breaks_the_stream(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca), lockstep=True)
    await handshake_both(server, client)
    with trio.move_on_after(0.01):
        await server.send_all(b"nobody reads this")  # lockstep: blocks until the peer reads
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"the record sequence is lost")


async def test_aclose_never_hangs_on_a_peer_that_does_not_read(
    ca: trustme.CA, server_ctx: SSL.Context, autojump_clock: trio.testing.MockClock
) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca), lockstep=True)
    await handshake_both(server, client)
    await server.aclose()  # close_notify cannot be delivered; the grace period runs out
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await server.transport_stream.send_all(b"x")  # the transport was closed too


async def test_aclose_does_not_queue_behind_a_blocked_sender(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca), lockstep=True)
    await handshake_both(server, client)

    async def blocked_sender() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"stuck")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        await server.aclose()  # returns without waiting for the sender: it closes the transport


async def test_receive_after_own_aclose_is_closed(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    server, client = await memory_pair(server_ctx, client_ctx(ca))
    await handshake_both(server, client)
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await server.do_handshake()
    assert await receive_all(client) == b""
    assert not client.ragged_eof  # aclose sent close_notify


def test_connection_with_a_socket_is_refused(server_ctx: SSL.Context) -> None:
    a, b = socket.socketpair()
    with a, b:
        conn = SSL.Connection(server_ctx, a)
        with pytest.raises(ValueError, match=r"Connection\(ctx, None\)"):
            TLSStream(trio.testing.memory_stream_pair()[0], conn)


# ---- memory: idle connections give their buffers back ----------------------------------------


def test_openssl_internals_reachable(server_ctx: SSL.Context) -> None:
    """If this fails, a pyOpenSSL upgrade moved what openssl_internals.Internals relies on."""
    assert internals_module.Internals.available
    assert internals_module.Internals.usable_for(new_server_connection(server_ctx))
    assert internals_module.Internals.plaintext_calls


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    """Move every pending ciphertext byte between two memory-BIO connections, both ways."""
    moved = True
    while moved:
        moved = False
        for src, dst in ((a, b), (b, a)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
            moved = True


@pytest.mark.parametrize("fast", [True, False])
def test_plaintext_calls_match_recv_and_send(
    ca: trustme.CA, server_ctx: SSL.Context, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    # The pipe's read_plaintext/write_plaintext bypass pyOpenSSL's recv/send on success;
    # data and every exception the pipe tells apart must be the same (fast=False: the
    # fallback used when pyOpenSSL's internals are not reachable).
    monkeypatch.setattr(internals_module.Internals, "plaintext_calls", fast)
    server = new_server_connection(server_ctx)
    client = client_conn(client_ctx(ca))
    for _ in range(10):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        _pump(client, server)
    with pytest.raises(SSL.WantReadError):
        internals_module.read_plaintext(server, 65536)  # nothing sent yet
    client.sendall(b"request")
    _pump(client, server)
    assert internals_module.read_plaintext(server, 65536) == b"request"
    body = bytes(range(256)) * 300  # several records
    assert internals_module.write_plaintext(server, body) == len(body)
    _pump(client, server)
    got = b""
    while len(got) < len(body):
        got += client.recv(65536)
    assert got == body
    client.shutdown()  # close_notify
    _pump(client, server)
    with pytest.raises(SSL.ZeroReturnError):
        internals_module.read_plaintext(server, 65536)


async def _idle_server_bytes(server_ctx: SSL.Context, cctx: SSL.Context, n: int) -> float:
    """Heap bytes an idle server TLSStream holds after 256 KiB each way plus a short tail."""
    pairs = []
    for _ in range(n):
        server, client = await memory_pair(server_ctx, cctx)
        await handshake_both(server, client)
        for src, dst in ((server, client), (client, server)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_burst, src)
                await receive_exactly(dst, 4 * 65536 + 100)
        pairs.append((server, client))
    servers = [s for s, _ in pairs]
    clients = [c for _, c in pairs]
    del pairs
    gc.collect()
    before = malloc_in_use()
    del servers
    gc.collect()
    after = malloc_in_use()
    del clients
    assert before is not None and after is not None
    return (before - after) / n


async def _send_burst(stream: TLSStream) -> None:
    for _ in range(4):
        await stream.send_all(b"x" * 65536)
    await stream.send_all(b"y" * 100)


async def test_idle_connection_stays_within_the_memory_budget(
    ca: trustme.CA, server_ctx: SSL.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    if malloc_in_use() is None:
        pytest.skip("needs glibc mallinfo2")
    cctx = client_ctx(ca)
    per_connection = await _idle_server_bytes(server_ctx, cctx, 100)
    # Budget: 64 KiB per idle connection, transport included; TLSStream + OpenSSL get 40.
    assert per_connection < 40 * 1024, per_connection
    # Control: without replacing the grown BIOs the same traffic pins far more.
    monkeypatch.setattr(stream_module, "_BIO_KEEP", 1 << 40)
    assert await _idle_server_bytes(server_ctx, cctx, 100) > 100 * 1024


# ---- helpers for code that takes the Connection over (proxy/pipe.py) -------------------------


async def test_attach_socket_hands_the_connection_to_the_socket(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server_sock, client_sock = trio.socket.socketpair()
    server = TLSStream(trio.SocketStream(server_sock), new_server_connection(server_ctx))
    client = TLSStream(trio.SocketStream(client_sock), client_conn(client_ctx(ca)))
    await handshake_both(server, client)
    conn = server.connection
    tickets = server.take_delayed_output()  # TLS 1.3 tickets, held back for the first write
    assert tickets and server.take_delayed_output() == b""
    assert (incoming_pending(conn), outgoing_pending(conn)) == (0, 0)

    assert attach_socket(conn, server_sock.fileno())
    assert (incoming_pending(conn), outgoing_pending(conn)) == (-1, -1)  # the BIOs are gone
    assert not release_idle_buffers(conn)
    with pytest.raises(TypeError):
        conn.bio_read(1)  # refused, not a use-after-free
    await server_sock.send(tickets)
    conn.send(b"direct")  # OpenSSL writes the socket itself now
    assert await receive_exactly(client, 6) == b"direct"
    await client.send_all(b"reply")
    await trio.lowlevel.wait_readable(server_sock)
    assert conn.recv(100) == b"reply"
    await client.transport_stream.send_eof()  # type: ignore[attr-defined]  # FIN, no close_notify
    await trio.lowlevel.wait_readable(server_sock)
    with pytest.raises(SSL.ZeroReturnError):
        conn.recv(100)  # a plain FIN reads as the end, not as an error
    server_sock.close()
    client_sock.close()


def test_attach_socket_refuses_while_bytes_are_buffered(server_ctx: SSL.Context) -> None:
    conn = new_server_connection(server_ctx)
    conn.bio_write(b"\x16\x03\x01")
    a, b = socket.socketpair()
    with a, b:
        assert not attach_socket(conn, a.fileno())
    assert incoming_pending(conn) == 3  # untouched
    assert not release_idle_buffers(conn)


def test_release_idle_buffers_swaps_empty_bios(server_ctx: SSL.Context) -> None:
    conn = new_server_connection(server_ctx)
    before = conn._into_ssl
    assert release_idle_buffers(conn)
    assert conn._into_ssl != before
    assert (incoming_pending(conn), outgoing_pending(conn)) == (0, 0)


# ---- error vocabulary ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "token"),
    [
        ("no shared cipher", "no_shared_cipher"),
        ("unsupported protocol", "unsupported_protocol"),
        ("tlsv1 alert protocol version", "unsupported_protocol"),
        ("tlsv1 alert unknown ca", "unknown_ca"),
        ("tls alert unknown ca", "unknown_ca"),  # OpenSSL 4 spelling
        ("sslv3 alert certificate unknown", "certificate_unknown"),
        ("tls alert handshake failure", "handshake_failure"),
        ("tlsv1 unrecognized name", "unrecognized_name"),
        ("wrong version number", "bad_record"),
        ("decryption failed or bad record mac", "bad_record"),
        ("http request", "http_request"),
        ("unexpected eof while reading", "peer_closed"),
        ("no renegotiation", "renegotiation_refused"),
        ("tls alert made up alert", "protocol_error"),
        ("something new in OpenSSL 5", "protocol_error"),
    ],
)
def test_openssl_reasons_become_tokens(reason: str, token: str) -> None:
    assert reason_from_openssl([("SSL routines", "", reason)]) == token


def test_first_recognised_entry_wins() -> None:
    entries = [
        ("SSL routines", "", "odd"),
        ("SSL routines", "", "no shared cipher"),
        ("SSL routines", "", "http request"),
    ]
    assert reason_from_openssl(entries) == "no_shared_cipher"
    assert reason_from_openssl([]) == "protocol_error"


# ---- 3. real sockets, real clients -----------------------------------------------------------


@dataclass
class Outcome:
    version: str | None = None
    alpn: str | None = None
    sni: str | None = None
    reused: bool = False
    received: bytes = b""
    ragged: bool = False
    error: BaseException | None = None


Handler = Callable[[TLSStream, Outcome], Awaitable[None]]


async def greet_and_echo(tls: TLSStream, outcome: Outcome) -> None:
    await tls.send_all(b"hello\n")
    while data := await tls.receive_some():
        outcome.received += data
        await tls.send_all(data)
    outcome.ragged = tls.ragged_eof


async def listen(tls: TLSStream, outcome: Outcome) -> None:
    # Never writes, so a client that closes right after sending cannot make us see a reset.
    outcome.received = await receive_all(tls)
    outcome.ragged = tls.ragged_eof


async def echo(tls: TLSStream, outcome: Outcome) -> None:
    while data := await tls.receive_some():
        outcome.received += data
        await tls.send_all(data)
    outcome.ragged = tls.ragged_eof


async def greet_and_close(tls: TLSStream, outcome: Outcome) -> None:
    await tls.send_all(b"hello\n")


@dataclass
class ServerUnderTest:
    ctx: SSL.Context
    alpn: tuple[str, ...] = ()
    body: Handler = greet_and_echo
    prime: int = 0  # read this many bytes ourselves first and pass them as initial_data
    port: int = 0
    _send: trio.MemorySendChannel[Outcome] = field(init=False)
    _recv: trio.MemoryReceiveChannel[Outcome] = field(init=False)

    def __post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[Outcome](100)

    async def handle(self, tcp: trio.SocketStream) -> None:
        outcome = Outcome()
        try:
            initial = b""
            while len(initial) < self.prime:
                initial += await tcp.receive_some(self.prime - len(initial))
            conn = new_server_connection(self.ctx, alpn=self.alpn)
            tls = TLSStream(tcp, conn, initial_data=initial)
            try:
                await tls.do_handshake()
                outcome.version, outcome.alpn = tls.tls_version, tls.selected_alpn
                outcome.sni, outcome.reused = tls.server_name, tls.session_reused
                await self.body(tls, outcome)
            finally:
                await tls.aclose()
        except (TLSHandshakeError, trio.BrokenResourceError) as exc:
            outcome.error = exc
        finally:
            await self._send.send(outcome)

    async def outcome(self) -> Outcome:
        with trio.fail_after(HANG_GUARD):
            return await self._recv.receive()


@asynccontextmanager
async def serving(ctx: SSL.Context, **kwargs: object) -> AsyncIterator[ServerUnderTest]:
    server = ServerUnderTest(ctx, **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def s_client(port: int, *args: str, stdin: bytes = b"") -> str:
    if shutil.which("openssl") is None:
        pytest.skip("openssl binary not installed")
    with trio.fail_after(HANG_GUARD):
        done = await trio.run_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return (done.stdout + done.stderr).decode(errors="replace")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_python_ssl_client_over_tcp(
    ca: trustme.CA, server_ctx: SSL.Context, version: ssl.TLSVersion
) -> None:
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    cctx.minimum_version = cctx.maximum_version = version
    cctx.set_alpn_protocols(["http/1.1", "h2"])
    async with serving(server_ctx, alpn=("h2", "http/1.1")) as server:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        client = trio.SSLStream(tcp, cctx, server_hostname="example.test")
        await client.do_handshake()
        assert client.selected_alpn_protocol() == "h2"
        assert await receive_exactly(client, 6) == b"hello\n"
        await client.send_all(b"ping" * 5000)
        assert await receive_exactly(client, 20000) == b"ping" * 5000
        await client.aclose()
        outcome = await server.outcome()
    assert outcome.error is None
    assert outcome.version == ("TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
    assert (outcome.alpn, outcome.sni) == ("h2", "example.test")
    assert outcome.received == b"ping" * 5000
    assert not outcome.ragged


@pytest.mark.parametrize("prime", [1, 5, 64])
async def test_priming_over_tcp(ca: trustme.CA, server_ctx: SSL.Context, prime: int) -> None:
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    async with serving(server_ctx, prime=prime) as server:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        client = trio.SSLStream(tcp, cctx, server_hostname="example.test")
        assert await receive_exactly(client, 6) == b"hello\n"
        await client.send_all(b"primed")
        assert await receive_exactly(client, 6) == b"primed"
        await client.aclose()
        outcome = await server.outcome()
    assert outcome.error is None and outcome.received == b"primed"


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize(
    ("route_alpn", "client_alpn", "expected"),
    [
        (("h2", "http/1.1"), "http/1.1,h2", "h2"),
        (("http/1.1",), "h2,http/1.1", "http/1.1"),
        (("h2",), "http/1.1", None),
    ],
)
async def test_s_client_alpn_sni_and_versions(
    server_ctx: SSL.Context,
    ca_file: str,
    flag: str,
    route_alpn: tuple[str, ...],
    client_alpn: str,
    expected: str | None,
) -> None:
    async with serving(server_ctx, alpn=route_alpn, body=listen) as server:
        out = await s_client(
            server.port,
            flag,
            "-servername",
            "example.test",
            "-alpn",
            client_alpn,
            "-CAfile",
            ca_file,
            "-verify_return_error",
            stdin=b"ping\n",
        )
        outcome = await server.outcome()
    version = "TLSv1.2" if flag == "-tls1_2" else "TLSv1.3"
    assert f"New, {version}" in out, out
    assert "Verify return code: 0 (ok)" in out
    assert (f"ALPN protocol: {expected}" if expected else "No ALPN negotiated") in out
    assert outcome.error is None
    assert (outcome.version, outcome.alpn, outcome.sni) == (version, expected, "example.test")
    assert outcome.received == b"ping\n"


async def test_s_client_tls11_is_refused(server_ctx: SSL.Context) -> None:
    async with serving(server_ctx) as server:
        out = await s_client(server.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        outcome = await server.outcome()
    assert "alert protocol version" in out, out
    assert isinstance(outcome.error, TLSHandshakeError)
    assert outcome.error.reason == "unsupported_protocol"


async def test_s_client_renegotiation_is_refused(server_ctx: SSL.Context, ca_file: str) -> None:
    # No greeting: application data arriving mid-renegotiation would fail s_client for
    # another reason ("unexpected record").
    async with serving(server_ctx, body=echo) as server:
        # "R" makes s_client renegotiate (a blocking call, done before it sees stdin's EOF).
        # Not with -ign_eof: that also turns its single-letter commands off.
        out = await s_client(server.port, "-tls1_2", "-CAfile", ca_file, stdin=b"R\n")
        outcome = await server.outcome()
    assert "RENEGOTIATING" in out and "no renegotiation" in out, out
    assert isinstance(outcome.error, TLSStreamBroken)
    assert outcome.error.reason == "renegotiation_refused"


async def test_s_client_tls12_ticket_resumption(server_ctx: SSL.Context, ca_file: str) -> None:
    async with serving(server_ctx) as server:
        out = await s_client(
            server.port, "-tls1_2", "-servername", "example.test", "-CAfile", ca_file, "-reconnect"
        )
        outcomes = [await server.outcome() for _ in range(6)]  # first + 5 reconnects
    assert out.count("Reused, TLSv1.2") == 5, out
    assert [o.reused for o in outcomes] == [False] + [True] * 5
    assert {o.sni for o in outcomes} == {"example.test"}


async def test_s_client_tls13_ticket_resumption(
    server_ctx: SSL.Context, ca_file: str, tmp_path: os.PathLike[str]
) -> None:
    session = os.path.join(tmp_path, "session.pem")
    async with serving(server_ctx, body=greet_and_close) as server:
        # -ign_eof: read until our close_notify, so the tickets sent with "hello" are seen.
        first = await s_client(
            server.port, "-tls1_3", "-CAfile", ca_file, "-ign_eof", "-sess_out", session
        )
        second = await s_client(
            server.port, "-tls1_3", "-CAfile", ca_file, "-ign_eof", "-sess_in", session
        )
        outcomes = [await server.outcome(), await server.outcome()]
    assert "New, TLSv1.3" in first and "hello" in first, first
    assert "Reused, TLSv1.3" in second, second
    assert [o.reused for o in outcomes] == [False, True]


async def test_garbage_mid_handshake_over_tcp(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    hello, _ = client_hello_and_client(client_ctx(ca))
    async with serving(server_ctx) as server:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        await tcp.send_all(hello)
        assert (await tcp.receive_some())[:1] == b"\x16"
        await tcp.send_all(b"\x17\x03\x03\x00\x20" + os.urandom(32))
        outcome = await server.outcome()
        await tcp.aclose()
    assert isinstance(outcome.error, TLSHandshakeError)
    assert outcome.error.reason == "bad_record"


async def half_close_server_side(tls: TLSStream, outcome: Outcome) -> None:
    # Read the whole request (the client half-closed), then answer and half-close.
    outcome.received = await receive_all(tls)
    outcome.ragged = tls.ragged_eof
    await tls.send_all(b"answer to " + outcome.received)
    await tls.send_eof()


async def banner_then_listen(tls: TLSStream, outcome: Outcome) -> None:
    # Half-close first, keep listening.
    await tls.send_all(b"banner")
    await tls.send_eof()
    outcome.received = await receive_all(tls)
    outcome.ragged = tls.ragged_eof


@VERSIONS
async def test_half_close_over_tcp_client_first(
    ca: trustme.CA, server_ctx: SSL.Context, version: int
) -> None:
    async with serving(server_ctx, body=half_close_server_side) as server:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        client = TLSStream(tcp, client_conn(client_ctx(ca, max_version=version)))
        await client.send_all(b"question")
        await client.send_eof()
        assert await receive_all(client) == b"answer to question"
        assert not client.ragged_eof
        await client.aclose()
        outcome = await server.outcome()
    assert outcome.error is None
    assert (outcome.received, outcome.ragged) == (b"question", False)


@VERSIONS
async def test_half_close_over_tcp_server_first(
    ca: trustme.CA, server_ctx: SSL.Context, version: int
) -> None:
    async with serving(server_ctx, body=banner_then_listen) as server:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        client = TLSStream(tcp, client_conn(client_ctx(ca, max_version=version)))
        assert await receive_all(client) == b"banner"
        await client.send_all(b"still talking")
        await client.send_eof()
        outcome = await server.outcome()
        await client.aclose()
    assert outcome.error is None
    assert (outcome.received, outcome.ragged) == (b"still talking", False)


# ---- every async test above fails instead of hanging -----------------------------------------
# A locking or flushing bug in a stream shows up as a deadlock. (pytest-trio ignores autouse
# async fixtures, so a watchdog fixture cannot do this.)


def _fail_instead_of_hanging(
    test: Callable[..., Awaitable[None]],
) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)  # keeps the signature (fixtures) and the parametrize marks
    async def guarded(*args: object, **kwargs: object) -> None:
        with trio.fail_after(HANG_GUARD):
            await test(*args, **kwargs)

    return guarded


for _name, _test in list(globals().items()):
    if _name.startswith("test_") and inspect.iscoroutinefunction(_test):
        globals()[_name] = _fail_instead_of_hanging(_test)
