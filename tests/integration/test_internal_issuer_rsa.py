"""``tls.key_type = "rsa2048"`` with the internal issuer serves an all-RSA chain.

An RSA leaf under an ECDSA CA fails the clients RSA is chosen for: one that says it can only
verify RSA signatures in certificates (``signature_algorithms_cert``, RFC 8446 s4.2.3: Java,
tlsfuzzer) gets ``handshake_failure`` from OpenSSL. The CA follows the key type instead.
"""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.x509.oid import NameOID

from edgeproxy.issuers.base import IssueRequest
from edgeproxy.issuers.internal import CA_KEY, RSA_CA_KEY, InternalIssuer
from edgeproxy.storage.file import FileStorage
from edgeproxy.tls.contexts import generate_private_key
from testkit import tlsbuild as tb
from testkit.http_proxy import BODY, normal_client, proxy_to_http, read_until_closed
from testkit.proxy import RunningProxy, base_config, running_proxy

RSA_PSS_RSAE_SHA256 = 0x0804
RSA_PKCS1_SHA256 = 0x0401
EXT_SIGNATURE_ALGORITHMS_CERT = 50


@pytest.fixture
async def rsa_proxy(tmp_path: Path, nursery: trio.Nursery) -> RunningProxy:  # type: ignore[misc]
    async with proxy_to_http(tmp_path, nursery, tls={"key_type": "rsa2048"}) as p:
        yield p


def _rsa_only_tls13_hello(name: str) -> bytes:
    """A TLS 1.3 hello that can verify RSA signatures only, in handshakes and certificates."""
    public = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    rsa_only = (RSA_PSS_RSAE_SHA256, RSA_PKCS1_SHA256)
    ext = [
        tb.server_name(name),
        tb.supported_groups(tb.X25519),
        tb.signature_algorithms(*rsa_only),
        (EXT_SIGNATURE_ALGORITHMS_CERT, tb.signature_algorithms(*rsa_only)[1]),
        tb.supported_versions(tb.TLS13),
        (tb.EXT_KEY_SHARE, tb.vec16(tb.u16(tb.X25519) + tb.vec16(public))),
    ]
    body = tb.client_hello_body(cipher_suites=(0x1301,), extensions=ext)
    return tb.to_records(tb.handshake_message(body))


async def test_rsa_only_client_gets_a_server_hello(rsa_proxy: RunningProxy) -> None:
    stream = await trio.open_tcp_stream(rsa_proxy.host, rsa_proxy.port)
    await stream.send_all(_rsa_only_tls13_hello("rsa.example.test"))
    with trio.fail_after(10):
        first = await stream.receive_some(5 + 4)
        while len(first) < 6:
            first += await stream.receive_some(6 - len(first))
    await stream.aclose()
    # A handshake record carrying a ServerHello (type 2), not alert 40 (no_shared_sigalg).
    assert first[0] == 22 and first[5] == 2, first


async def test_rsa_only_tls12_client_completes_and_trusts_an_rsa_ca(
    rsa_proxy: RunningProxy,
) -> None:
    assert rsa_proxy.ca_path is not None
    ctx = ssl.create_default_context(cafile=str(rsa_proxy.ca_path))  # the RSA CA only
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    assert (await normal_client(rsa_proxy, "rsa.example.test", ctx)).endswith(BODY)
    ca = x509.load_pem_x509_certificate(rsa_proxy.ca_path.read_bytes())
    assert isinstance(ca.public_key(), rsa.RSAPublicKey)


async def test_each_leaf_is_signed_by_the_ca_of_its_own_family(tmp_path: Path) -> None:
    storage = FileStorage(str(tmp_path / "state"))
    issuer = InternalIssuer(storage, key_type="rsa2048")
    for key_type, ca_key_type, record in (
        ("rsa2048", rsa.RSAPublicKey, RSA_CA_KEY),
        ("ec256", ec.EllipticCurvePublicKey, CA_KEY),
    ):
        issued = await issuer.issue(IssueRequest(("x.example.test",), generate_private_key(key_type)))  # type: ignore[arg-type]
        leaf, ca = x509.load_pem_x509_certificates(issued.chain_pem)
        assert isinstance(ca.public_key(), ca_key_type)
        leaf.verify_directly_issued_by(ca)
        assert await storage.get(record) is not None
    # The ECDSA CA keeps its original record: a deployment's trusted ca.pem stays valid.
    ec_ca = await InternalIssuer(storage).ca_certificate_pem()
    assert isinstance(x509.load_pem_x509_certificate(ec_ca).public_key(), ec.EllipticCurvePublicKey)


async def test_ecdsa_default_still_refuses_an_rsa_only_client(tmp_path: Path) -> None:
    # The contrast: with ec256 an RSA-only client cannot be served, and learns so by an alert.
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}])
    async with running_proxy(tmp_path, cfg) as p:
        stream = await trio.open_tcp_stream(p.host, p.port)
        await stream.send_all(_rsa_only_tls13_hello("ec.example.test"))
        reply = await read_until_closed(stream, limit=10)
        await stream.aclose()
    assert reply[:1] == b"\x15" and reply[-1] == 40, reply  # handshake_failure


async def test_a_stored_rsa_leaf_under_the_ecdsa_ca_is_renewed_at_once(tmp_path: Path) -> None:
    # What the issuer produced before the CA followed the key type: an RSA leaf under the
    # ECDSA CA. The issuer asks for it to be replaced now (a renewal window already open).
    storage = FileStorage(str(tmp_path / "state"))
    ec_issuer = InternalIssuer(storage)
    ec_ca = x509.load_pem_x509_certificate(await ec_issuer.ca_certificate_pem())
    ec_chain = (
        await ec_issuer.issue(IssueRequest(("x.example.test",), ec.generate_private_key(ec.SECP256R1())))
    ).chain_pem
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_key = serialization.load_pem_private_key(
        json.loads((await storage.get(CA_KEY)) or b"{}")["key_pem"].encode(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    old_leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x.example.test")]))
        .issuer_name(ec_ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    mixed = old_leaf.public_bytes(serialization.Encoding.PEM) + ec_ca.public_bytes(
        serialization.Encoding.PEM
    )
    issuer = InternalIssuer(storage, key_type="rsa2048")
    window = await issuer.renewal_window(mixed)
    assert window is not None and window.start <= datetime.now(UTC)
    # A leaf under its own family's CA: no opinion, the usual schedule applies.
    assert await issuer.renewal_window(ec_chain) is None
    rsa_chain = (await issuer.issue(IssueRequest(("x.example.test",), leaf_key))).chain_pem
    assert await issuer.renewal_window(rsa_chain) is None
