"""Server context policy, checked by real handshakes between two in-memory pyOpenSSL peers.

No sockets: ``handshake()`` pumps bytes between a server connection from
``new_server_connection`` and a client connection until both are done or one fails, so every
policy (versions, ciphers, ALPN, tickets, key checks) is a plain synchronous test.
"""

from __future__ import annotations

import datetime

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from edgeproxy.tls.contexts import (
    ACME_TLS_ALPN,
    build_acme_challenge_context,
    build_server_context,
    generate_private_key,
    load_pem_chain,
    new_server_connection,
)
from edgeproxy.tls.errors import InvalidCertificate, TLSHandshakeError
from testkit.tlsmem import (
    chain_and_key,
    client_connection,
    client_context,
    drain,
    exchange,
    handshake,
    session_reused,
)
from testkit.tlsstream import TLSStream

# ---- helpers ---------------------------------------------------------------------------------


def self_signed(key: PrivateKeyTypes, name: str = "example.test") -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> SSL.Context:
    return build_server_context(*chain_and_key(ca.issue_cert("example.test")))


# ---- protocol policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_version", "expected"), [(SSL.TLS1_2_VERSION, "TLSv1.2"), (None, "TLSv1.3")]
)
def test_tls12_and_tls13_handshake_and_carry_data(
    ca: trustme.CA, server_ctx: SSL.Context, max_version: int | None, expected: str
) -> None:
    server = new_server_connection(server_ctx)
    client = client_connection(ca, max_version=max_version)
    handshake(server, client)
    assert server.get_protocol_version_name() == expected
    assert exchange(server, client, b"payload") == b"payload"


def test_tls11_client_is_refused_with_protocol_version_alert(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server = new_server_connection(server_ctx)
    client = client_connection(
        ca,
        min_version=SSL.TLS1_1_VERSION,
        max_version=SSL.TLS1_1_VERSION,
        ciphers=b"DEFAULT@SECLEVEL=0",  # let this OpenSSL offer TLS 1.1 at all
    )
    with pytest.raises(SSL.Error) as server_error:
        handshake(server, client)
    assert "unsupported protocol" in str(server_error.value)
    client.bio_write(drain(server))  # the alert the server queued
    with pytest.raises(SSL.Error, match="protocol version"):
        client.do_handshake()


def test_tls12_cbc_only_client_finds_no_shared_cipher(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server = new_server_connection(server_ctx)
    client = client_connection(
        ca,
        max_version=SSL.TLS1_2_VERSION,
        ciphers=b"ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA",
    )
    with pytest.raises(SSL.Error, match="no shared cipher"):
        handshake(server, client)


def test_tls12_server_picks_its_preferred_aead_suite(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    server = new_server_connection(server_ctx)
    client = client_connection(
        ca,
        max_version=SSL.TLS1_2_VERSION,
        ciphers=b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:"
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
    )
    handshake(server, client)
    assert server.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_tls13_server_preference_applies_to_suites(ca: trustme.CA, server_ctx: SSL.Context) -> None:
    server = new_server_connection(server_ctx)
    client = client_connection(
        ca, tls13_suites=b"TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
    )
    handshake(server, client)
    assert server.get_cipher_name() == "TLS_AES_256_GCM_SHA384"


def test_context_flags(ca: trustme.CA) -> None:
    ctx = build_server_context(*chain_and_key(ca.issue_cert("flags.example.test")))
    options = ctx.set_options(0)  # adds nothing, returns the current set
    for flag in (
        SSL.OP_NO_RENEGOTIATION,
        SSL.OP_NO_COMPRESSION,
        SSL.OP_CIPHER_SERVER_PREFERENCE,
    ):
        assert options & flag
    assert not options & SSL.OP_NO_TICKET  # tickets stay on
    assert ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF


def test_context_modes(ca: trustme.CA) -> None:
    # set_mode() is refused once a context made a connection: probe a fresh one.
    ctx = build_server_context(*chain_and_key(ca.issue_cert("modes.example.test")))
    mode = ctx.set_mode(0)
    assert mode & SSL.MODE_RELEASE_BUFFERS
    assert not mode & 0x1  # SSL_MODE_ENABLE_PARTIAL_WRITE: one SSL_write takes it all


def test_full_chain_is_served(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    chain, key = chain_and_key(intermediate.issue_cert("example.test"))
    assert len(chain) == 2  # leaf, intermediate
    server = new_server_connection(build_server_context(chain, key))
    client = client_connection(ca)  # trusts only the root: needs the intermediate on the wire
    handshake(server, client)
    peer_chain = client.get_peer_cert_chain(as_cryptography=True)
    assert peer_chain is not None
    assert [c.subject for c in peer_chain] == [c.subject for c in chain]


# ---- session tickets -------------------------------------------------------------------------


@pytest.mark.parametrize("max_version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_tickets_resume_on_the_same_context(
    ca: trustme.CA, server_ctx: SSL.Context, max_version: int
) -> None:
    cctx = client_context(ca, max_version=max_version)
    first_server, first = new_server_connection(server_ctx), client_connection(ctx=cctx)
    handshake(first_server, first)
    exchange(first_server, first, b"x")  # TLS 1.3 tickets arrive after the handshake
    session = first.get_session()
    assert session is not None

    second_server, second = new_server_connection(server_ctx), client_connection(ctx=cctx)
    second.set_session(session)
    handshake(second_server, second)
    assert session_reused(second_server)
    assert not session_reused(first_server)
    assert second_server.get_servername() == b"example.test"  # kept across TLS 1.2 resumption


@pytest.mark.parametrize("max_version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_session_tickets_can_be_turned_off(ca: trustme.CA, max_version: int) -> None:
    # For handshake benchmarks: every connection pays the full handshake.
    ctx = build_server_context(*chain_and_key(ca.issue_cert("example.test")), session_tickets=False)
    cctx = client_context(ca, max_version=max_version)
    first_server, first = new_server_connection(ctx), client_connection(ctx=cctx)
    handshake(first_server, first)
    exchange(first_server, first, b"x")
    session = first.get_session()
    assert session is not None
    second_server, second = new_server_connection(ctx), client_connection(ctx=cctx)
    second.set_session(session)
    handshake(second_server, second)
    assert not session_reused(second_server)


def test_tickets_from_another_context_are_not_accepted(ca: trustme.CA) -> None:
    # No shared ticket keys (see contexts.py): a second context, even for the same
    # certificate, falls back to a full handshake instead of failing.
    chain, key = chain_and_key(ca.issue_cert("example.test"))
    ctx_a, ctx_b = build_server_context(chain, key), build_server_context(chain, key)
    cctx = client_context(ca)
    server_a, client_a = new_server_connection(ctx_a), client_connection(ctx=cctx)
    handshake(server_a, client_a)
    exchange(server_a, client_a, b"x")
    session = client_a.get_session()
    assert session is not None
    server_b, client_b = new_server_connection(ctx_b), client_connection(ctx=cctx)
    client_b.set_session(session)
    handshake(server_b, client_b)
    assert not session_reused(server_b)
    assert exchange(server_b, client_b, b"still works") == b"still works"


# ---- ALPN ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route_alpn", "offered", "expected"),
    [
        (("h2", "http/1.1"), [b"http/1.1", b"h2"], b"h2"),  # server preference wins
        (("http/1.1", "h2"), [b"h2", b"http/1.1"], b"http/1.1"),
        (("h2",), [b"http/1.1"], b""),  # no overlap: no ALPN, handshake still succeeds
        ((), [b"h2", b"http/1.1"], b""),  # route without ALPN
        (("h2", "http/1.1"), [], b""),  # client without ALPN
    ],
)
def test_alpn_is_chosen_per_connection(
    ca: trustme.CA,
    server_ctx: SSL.Context,
    route_alpn: tuple[str, ...],
    offered: list[bytes],
    expected: bytes,
) -> None:
    server = new_server_connection(server_ctx, alpn=route_alpn)
    client = client_connection(ca, alpn=offered)
    handshake(server, client)
    assert server.get_alpn_proto_negotiated() == expected
    assert client.get_alpn_proto_negotiated() == expected


def test_two_connections_on_one_context_get_their_own_alpn(
    ca: trustme.CA, server_ctx: SSL.Context
) -> None:
    s1 = new_server_connection(server_ctx, alpn=("h2",))
    s2 = new_server_connection(server_ctx, alpn=("http/1.1",))
    c1 = client_connection(ca, alpn=[b"h2", b"http/1.1"])
    c2 = client_connection(ca, alpn=[b"h2", b"http/1.1"])
    handshake(s1, c1)
    handshake(s2, c2)
    assert (s1.get_alpn_proto_negotiated(), s2.get_alpn_proto_negotiated()) == (b"h2", b"http/1.1")


@pytest.mark.parametrize("bad", ["", "x" * 256])
def test_new_server_connection_rejects_invalid_alpn_ids(server_ctx: SSL.Context, bad: str) -> None:
    with pytest.raises(ValueError, match="ALPN"):
        new_server_connection(server_ctx, alpn=("h2", bad))


def test_challenge_context_selects_acme_tls() -> None:
    cert, key = _challenge_identity()
    ctx = build_acme_challenge_context(cert, key)
    server = new_server_connection(ctx, alpn=(ACME_TLS_ALPN,))
    client = client_connection(alpn=[b"h2", ACME_TLS_ALPN.encode()])
    handshake(server, client)
    assert server.get_alpn_proto_negotiated() == b"acme-tls/1"
    peer = client.get_peer_certificate(as_cryptography=True)
    assert peer is not None and peer == cert


def test_challenge_context_refuses_clients_without_acme_tls() -> None:
    cert, key = _challenge_identity()
    server = new_server_connection(build_acme_challenge_context(cert, key))
    client = client_connection(alpn=[b"h2", b"http/1.1"])
    with pytest.raises(TLSHandshakeError) as info:
        handshake(server, client)
    assert info.value.reason == "no_application_protocol"
    client.bio_write(drain(server))
    with pytest.raises(SSL.Error, match="no application protocol"):
        client.do_handshake()


async def test_challenge_refusal_surfaces_from_tls_stream_as_handshake_error() -> None:
    cert, key = _challenge_identity()
    server_transport, client_transport = trio.testing.memory_stream_pair()
    ctx = build_acme_challenge_context(cert, key)
    server = TLSStream(server_transport, new_server_connection(ctx, alpn=(ACME_TLS_ALPN,)))
    client = TLSStream(client_transport, client_connection(alpn=[b"h2"]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_handshake_error, client)
        with pytest.raises(TLSHandshakeError) as info:
            await server.do_handshake()
    assert info.value.reason == "no_application_protocol"


async def _expect_handshake_error(stream: TLSStream) -> None:
    with pytest.raises(TLSHandshakeError) as info:
        await stream.do_handshake()
    assert info.value.reason == "no_application_protocol"  # the alert reached the client


def _challenge_identity() -> tuple[x509.Certificate, PrivateKeyTypes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return self_signed(key), key


# ---- certificates and keys -------------------------------------------------------------------


def test_mismatched_key_fails_loudly(ca: trustme.CA) -> None:
    chain, _ = chain_and_key(ca.issue_cert("example.test"))
    with pytest.raises(InvalidCertificate) as info:
        build_server_context(chain, generate_private_key("ec256"))
    assert info.value.reason == "key_mismatch"


def test_empty_chain_is_refused() -> None:
    with pytest.raises(InvalidCertificate) as info:
        build_server_context([], generate_private_key("ec256"))
    assert info.value.reason == "no_certificate"


def test_key_that_cannot_sign_is_refused(ca: trustme.CA) -> None:
    chain, _ = chain_and_key(ca.issue_cert("example.test"))
    with pytest.raises(InvalidCertificate) as info:
        build_server_context(chain, x25519.X25519PrivateKey.generate())
    assert info.value.reason == "unsupported_key"


def test_weak_rsa_key_is_rejected_by_openssl() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InvalidCertificate) as info:
        build_server_context([self_signed(key)], key)
    assert info.value.reason == "rejected"


def test_rsa_certificates_work_too() -> None:
    rsa_ca = trustme.CA(key_type=trustme.KeyType.RSA)
    chain, key = chain_and_key(rsa_ca.issue_cert("example.test", key_type=trustme.KeyType.RSA))
    assert isinstance(key, rsa.RSAPrivateKey)
    server = new_server_connection(build_server_context(chain, key))
    client = client_connection(rsa_ca, max_version=SSL.TLS1_2_VERSION)
    handshake(server, client)
    assert server.get_cipher_name() == "ECDHE-RSA-AES128-GCM-SHA256"


def test_load_pem_chain_keeps_file_order(ca: trustme.CA) -> None:
    leaf = ca.create_child_ca().issue_cert("example.test")
    pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    chain = load_pem_chain(b"# comment before\n" + pem + b"trailing text\n")
    assert [c.public_bytes(serialization.Encoding.PEM) for c in chain] == [
        blob.bytes() for blob in leaf.cert_chain_pems
    ]


def test_load_pem_chain_without_certificates() -> None:
    with pytest.raises(InvalidCertificate) as info:
        load_pem_chain(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert info.value.reason == "no_certificate"


def test_load_pem_chain_with_a_damaged_block(ca: trustme.CA) -> None:
    pem = ca.cert_pem.bytes()
    damaged = pem.replace(pem.splitlines()[3], b"!!!!" + pem.splitlines()[3][4:])
    with pytest.raises(InvalidCertificate) as info:
        load_pem_chain(damaged)
    assert info.value.reason == "bad_pem"


@pytest.mark.parametrize(
    ("key_type", "kind", "size"),
    [
        ("ec256", ec.EllipticCurvePrivateKey, 256),
        ("ec384", ec.EllipticCurvePrivateKey, 384),
        ("rsa2048", rsa.RSAPrivateKey, 2048),
    ],
)
def test_generate_private_key(key_type: str, kind: type, size: int) -> None:
    key = generate_private_key(key_type)  # type: ignore[arg-type]
    assert isinstance(key, kind)
    assert key.key_size == size  # type: ignore[union-attr]


def test_generated_key_builds_a_working_context(ca: trustme.CA) -> None:
    key = generate_private_key()
    server = new_server_connection(build_server_context([self_signed(key)], key))
    handshake(server, client_connection())
    assert server.get_protocol_version_name() == "TLSv1.3"


def test_generate_private_key_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="ec256"):
        generate_private_key("dsa1024")  # type: ignore[arg-type]
