"""Real TLS handshakes between two in-memory pyOpenSSL peers, for the TLS unit tests.

No sockets: ``handshake()`` pumps bytes between a server connection and a client connection
until both are done or one fails. ``proxy_handshake`` makes a connection the way the data path
does: the client's first flight goes through our ClientHello parser before the server
connection exists, so the server side can be chosen from what the client offered (its ticket).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto

from edgeproxy.tls.contexts import load_pem_chain
from edgeproxy.tls.openssl_internals import Internals
from edgeproxy.wire.clienthello import ClientHello, parse_client_hello


def drain(conn: SSL.Connection) -> bytes:
    out = []
    while True:
        try:
            out.append(conn.bio_read(65536))
        except SSL.WantReadError:
            return b"".join(out)


def handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    """Run both handshakes to completion over memory BIOs; the first failure propagates."""
    done = {"server": False, "client": False}
    for _ in range(20):
        for name, conn in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    conn.do_handshake()
                    done[name] = True
                except SSL.WantReadError:
                    pass
        moved = False
        for src, dst in ((client, server), (server, client)):
            data = drain(src)
            if data:
                dst.bio_write(data)
                moved = True
        if all(done.values()) and not moved:
            return
    raise AssertionError("handshake did not finish")


def exchange(server: SSL.Connection, client: SSL.Connection, data: bytes) -> bytes:
    """Server sends ``data`` (with any post-handshake messages); the client reads it back."""
    server.sendall(data)
    client.bio_write(drain(server))
    got = b""
    while len(got) < len(data):
        got += client.recv(65536)
    return got


def client_connection(
    ca: trustme.CA | None = None,
    *,
    ctx: SSL.Context | None = None,
    alpn: Sequence[bytes] = (),
    sni: bytes = b"example.test",
    max_version: int | None = None,
    min_version: int | None = None,
    ciphers: bytes | None = None,
    tls13_suites: bytes | None = None,
) -> SSL.Connection:
    if ctx is None:
        ctx = client_context(ca, max_version=max_version, min_version=min_version)
        if ciphers is not None:
            ctx.set_cipher_list(ciphers)
        if tls13_suites is not None:
            ctx.set_tls13_ciphersuites(tls13_suites)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(sni)
    if alpn:
        conn.set_alpn_protos(list(alpn))
    return conn


def client_context(
    ca: trustme.CA | None, *, max_version: int | None = None, min_version: int | None = None
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if ca is not None:
        ctx.set_verify(SSL.VERIFY_PEER)
        root = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(root))  # type: ignore[union-attr]
    if min_version is not None:
        ctx.set_min_proto_version(min_version)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    return ctx


def chain_and_key(leaf: trustme.LeafCert) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    chain = load_pem_chain(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    return chain, key


def session_reused(conn: SSL.Connection) -> bool:
    return Internals.session_reused(conn)


def proxy_handshake(
    cctx: SSL.Context,
    sni: bytes,
    server_for: Callable[[ClientHello], SSL.Connection],
    session: SSL.Session | None = None,
) -> tuple[SSL.Connection, SSL.Connection, ClientHello]:
    """Handshake a client (resuming ``session`` if given) with the server connection
    ``server_for`` makes from its parsed first flight; returns (server, client, hello)."""
    client = client_connection(ctx=cctx, sni=sni)
    if session is not None:
        client.set_session(session)
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    first_flight = drain(client)
    hello = parse_client_hello(first_flight)
    assert hello is not None
    server = server_for(hello)
    server.bio_write(first_flight)
    handshake(server, client)
    return server, client, hello
