"""JWS as ACME signs it: verified independently with josepy's algorithms and raw cryptography.

The signer builds the flattened JSON itself, so every test decodes the result from scratch
(base64url, JSON) and checks the signature over ``protected.payload`` with a verifier that
shares no code with the signing path's header handling.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from josepy import jwa

from edgeproxy.acme.jws import (
    algorithm,
    decode_eab_hmac_key,
    external_account_binding,
    key_authorization,
    key_change_inner,
    public_jwk,
    sign,
    thumbprint,
)

URL = "https://ca.test/acme/new-order"
KID = "https://ca.test/acme/acct/42"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parts(jws: dict[str, Any]) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """(protected header, payload bytes, signature bytes, signing input) of a flattened JWS."""
    assert set(jws) == {"protected", "payload", "signature"}
    signing_input = f"{jws['protected']}.{jws['payload']}".encode()
    return (
        json.loads(_unb64(jws["protected"])),
        _unb64(jws["payload"]),
        _unb64(jws["signature"]),
        signing_input,
    )


@pytest.fixture(scope="module")
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def test_es256_with_kid_verifies_and_carries_no_jwk(p256: ec.EllipticCurvePrivateKey) -> None:
    jws = sign(
        p256, {"identifiers": [{"type": "dns", "value": "a.test"}]}, url=URL, nonce="n1", kid=KID
    )
    header, payload, signature, signing_input = _parts(jws)

    assert header == {"alg": "ES256", "kid": KID, "nonce": "n1", "url": URL}
    assert json.loads(payload) == {"identifiers": [{"type": "dns", "value": "a.test"}]}
    # RFC 7518 s3.4: R || S, 32 octets each for P-256, not DER.
    assert len(signature) == 64
    assert jwa.ES256.verify(p256.public_key(), signing_input, signature)
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    p256.public_key().verify(der, signing_input, ec.ECDSA(hashes.SHA256()))


def test_jwk_header_only_without_kid(p256: ec.EllipticCurvePrivateKey) -> None:
    header, _, signature, signing_input = _parts(sign(p256, {}, url=URL, nonce="n2"))

    assert "kid" not in header
    assert header["jwk"] == public_jwk(p256)
    assert header["jwk"]["kty"] == "EC" and header["jwk"]["crv"] == "P-256"
    assert "d" not in header["jwk"]  # never the private part
    assert jwa.ES256.verify(p256.public_key(), signing_input, signature)


def test_rs256_verifies_with_cryptography(rsa_key: rsa.RSAPrivateKey) -> None:
    header, _, signature, signing_input = _parts(
        sign(rsa_key, {"a": 1}, url=URL, nonce="n", kid=KID)
    )

    assert header["alg"] == "RS256"
    rsa_key.public_key().verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(InvalidSignature):
        rsa_key.public_key().verify(
            signature, signing_input + b"x", padding.PKCS1v15(), hashes.SHA256()
        )


def test_post_as_get_has_an_empty_payload(p256: ec.EllipticCurvePrivateKey) -> None:
    jws = sign(p256, None, url=URL, nonce="n", kid=KID)
    _, payload, signature, signing_input = _parts(jws)

    assert jws["payload"] == "" and payload == b""  # RFC 8555 s6.3, not "{}"
    assert jwa.ES256.verify(p256.public_key(), signing_input, signature)


def test_algorithm_follows_the_key() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    header, _, signature, signing_input = _parts(sign(p384, {}, url=URL, nonce="n", kid=KID))
    assert header["alg"] == "ES384" and len(signature) == 96
    assert jwa.ES384.verify(p384.public_key(), signing_input, signature)
    with pytest.raises(TypeError):
        algorithm(ed25519.Ed25519PrivateKey.generate())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        algorithm(ec.generate_private_key(ec.SECP256K1()))


def test_thumbprint_matches_rfc7638_example() -> None:
    # RFC 7638 s3.1: the example RSA key and its SHA-256 thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    public = rsa.RSAPublicNumbers(65537, int.from_bytes(_unb64(n), "big")).public_key()

    assert thumbprint(public) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_key_authorization_is_token_dot_thumbprint(p256: ec.EllipticCurvePrivateKey) -> None:
    jwk = public_jwk(p256)
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")

    assert key_authorization("tok-123", p256) == f"tok-123.{expected.decode()}"


def test_external_account_binding_structure(p256: ec.EllipticCurvePrivateKey) -> None:
    mac_key = b"\x01" * 32
    eab = external_account_binding(p256, kid="kid-7", hmac_key=mac_key, url=URL)
    header, payload, signature, signing_input = _parts(eab)

    # RFC 8555 s7.3.4: HS256 over the account's public JWK; kid and url, and no nonce.
    assert header == {"alg": "HS256", "kid": "kid-7", "url": URL}
    assert json.loads(payload) == public_jwk(p256)
    assert hmac.compare_digest(signature, hmac.new(mac_key, signing_input, hashlib.sha256).digest())


def test_key_change_inner_jws(p256: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey) -> None:
    inner = key_change_inner(rsa_key, p256, account_url=KID, url=URL)
    header, payload, signature, signing_input = _parts(inner)

    # RFC 8555 s7.3.5: signed by the NEW key, which it carries as jwk; no nonce.
    assert header == {"alg": "RS256", "jwk": public_jwk(rsa_key), "url": URL}
    assert json.loads(payload) == {"account": KID, "oldKey": public_jwk(p256)}
    rsa_key.public_key().verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize(
    "text",
    [
        "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
        "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W  ",
    ],
)
def test_decode_eab_hmac_key(text: str) -> None:
    key = decode_eab_hmac_key(text)
    assert len(key) == 48
    assert base64.urlsafe_b64encode(key).rstrip(b"=").decode() == text.strip()


def test_decode_eab_hmac_key_accepts_padding_and_std_alphabet() -> None:
    raw = bytes(range(250, 256)) + b"\xfb\xff"
    std = base64.b64encode(raw).decode()  # has + / and = padding
    assert decode_eab_hmac_key(std) == raw
    assert decode_eab_hmac_key(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw


@pytest.mark.parametrize("text", ["", "   ", "not base64!", "a.b"])
def test_decode_eab_hmac_key_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        decode_eab_hmac_key(text)
