"""The RFC 8737 TLS-ALPN-01 certificate: its names, its extension bytes, and what openssl sees."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgeproxy.tls.challenge_cert import (
    ACME_IDENTIFIER_OID,
    ACME_TLS_ALPN,
    acme_identifier_value,
    build_challenge_certificate,
)

KEY_AUTH = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def test_extension_is_critical_der_octet_string_of_sha256() -> None:
    cert, _ = build_challenge_certificate("www.example.test", KEY_AUTH)

    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    raw = ext.value.value
    # OCTET STRING (tag 0x04), definite short length 32, then the digest itself.
    assert raw[:2] == b"\x04\x20" and len(raw) == 34
    assert raw[2:] == hashlib.sha256(KEY_AUTH.encode()).digest()
    assert raw == acme_identifier_value(KEY_AUTH)
    # And it sits in the DER of the whole certificate as an extnValue (OCTET STRING wrapping).
    der = cert.public_bytes(serialization.Encoding.DER)
    assert b"\x04\x22" + raw in der


def test_exactly_one_dns_san_and_self_signed() -> None:
    cert, key = build_challenge_certificate("api.example.test", KEY_AUTH)

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.DNSName("api.example.test")]
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == key.public_key()


def test_validity_window_and_key_reuse() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first, k1 = build_challenge_certificate("a.example.test", KEY_AUTH, key=key, now=NOW)
    second, k2 = build_challenge_certificate("b.example.test", "other.auth", key=key, now=NOW)

    assert k1 is key and k2 is key
    assert first.not_valid_before_utc == NOW - timedelta(hours=1)
    assert first.not_valid_after_utc == NOW + timedelta(days=7)
    assert first.serial_number != second.serial_number
    assert first.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value != (
        second.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value
    )


def test_rsa_key_is_accepted() -> None:
    cert, _ = build_challenge_certificate(
        "rsa.example.test", KEY_AUTH, key=rsa.generate_private_key(65537, 2048)
    )
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)


@pytest.mark.parametrize("identifier", ["", "*.example.test"])
def test_rejects_names_a_ca_never_validates(identifier: str) -> None:
    with pytest.raises(ValueError):
        build_challenge_certificate(identifier, KEY_AUTH)


def test_openssl_shows_the_critical_acme_identifier(tmp_path: Path) -> None:
    cert, _ = build_challenge_certificate("openssl.example.test", KEY_AUTH)
    path = tmp_path / "challenge.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    text = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert "1.3.6.1.5.5.7.1.31: critical" in text
    assert "DNS:openssl.example.test" in text


async def test_served_over_acme_tls_1(tmp_path: Path) -> None:
    """A real handshake: the client asks for acme-tls/1 and gets exactly this certificate."""
    cert, key = build_challenge_certificate("hs.example.test", KEY_AUTH)
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_path, key_path)
    server_ctx.set_alpn_protocols([ACME_TLS_ALPN])
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE  # a CA validating TLS-ALPN-01 does not verify either
    client_ctx.set_alpn_protocols([ACME_TLS_ALPN])

    server_raw, client_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    client = trio.SSLStream(client_raw, client_ctx, server_hostname="hs.example.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)

    assert client.selected_alpn_protocol() == ACME_TLS_ALPN
    peer_der = client.getpeercert(binary_form=True)
    assert peer_der is not None
    assert x509.load_der_x509_certificate(peer_der) == cert
