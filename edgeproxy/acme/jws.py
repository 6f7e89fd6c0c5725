"""JSON Web Signatures as ACME uses them (RFC 8555 s6.2, RFC 7515 flattened JSON), sans-IO.

Owns: turning (key, protected header fields, payload) into the flattened JWS body an ACME
server accepts; the account key's JWK and thumbprint (RFC 7638); key authorizations (RFC 8555
s8.1); the External Account Binding inner JWS (s7.3.4) and the key-change inner JWS (s7.3.5).

Must not know: HTTP, nonces' origin, URLs' meaning. The client supplies ``url`` and ``nonce``.

josepy does the cryptography (``jwa.ES256.sign`` gives the fixed-width R||S form RFC 7518
s3.4 requires, not DER) and the JWK serialisation; we build the JSON ourselves because
josepy's ``Header`` only knows registered header names and ACME needs ``nonce`` and ``url``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import jwa, jwk

AccountKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""The account key types ACME servers accept: EC P-256/P-384 (ES256/ES384) or RSA (RS256)."""

PublicAccountKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

JSON = dict[str, Any]


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 s2), the only base64 ACME speaks."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(data: str) -> bytes:
    """Inverse of ``b64url``; tolerates missing padding, rejects non-alphabet characters."""
    try:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64url: {data!r}") from exc


def decode_eab_hmac_key(value: str) -> bytes:
    """The raw HMAC key from the base64url string a CA hands out for EAB (RFC 8555 s7.3.4).

    Some CAs pad it, some use the standard alphabet; both are accepted. Raises ``ValueError``
    on anything else or on an empty key.
    """
    text = value.strip().replace("+", "-").replace("/", "_").rstrip("=")
    if not text or any(not (c.isalnum() and c.isascii()) and c not in "-_" for c in text):
        raise ValueError("EAB HMAC key is not base64url")
    key = b64url_decode(text)
    if not key:
        raise ValueError("EAB HMAC key is empty")
    return key


def _jwk(key: AccountKey | PublicAccountKey) -> jwk.JWK:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return jwk.JWKEC(key=key)
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return jwk.JWKRSA(key=key)
    raise TypeError(f"unsupported ACME account key type {type(key).__name__}")


def algorithm(key: AccountKey) -> jwa.JWASignature:
    """The JWS ``alg`` for ``key``: ES256/ES384/ES512 by curve, RS256 for RSA (RFC 7518 s3.1)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve: dict[str, jwa.JWASignature] = {
            "secp256r1": jwa.ES256,
            "secp384r1": jwa.ES384,
            "secp521r1": jwa.ES512,
        }
        try:
            return by_curve[key.curve.name]
        except KeyError:
            raise TypeError(f"unsupported EC curve {key.curve.name} for an ACME key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return jwa.RS256
    raise TypeError(f"unsupported ACME account key type {type(key).__name__}")


def public_jwk(key: AccountKey | PublicAccountKey) -> JSON:
    """The public JWK of ``key`` (private or public) as a JSON object (RFC 7517)."""
    public: JSON = _jwk(key).public_key().to_partial_json()
    return public


def thumbprint(key: AccountKey | PublicAccountKey) -> str:
    """RFC 7638 SHA-256 thumbprint of the public key, base64url (RFC 8555 s8.1)."""
    return b64url(_jwk(key).thumbprint())


def key_authorization(token: str, key: AccountKey) -> str:
    """``token || '.' || base64url(thumbprint)`` (RFC 8555 s8.1)."""
    return f"{token}.{thumbprint(key)}"


def _encode(protected: Mapping[str, Any], payload: bytes) -> tuple[str, str, bytes]:
    protected_b64 = b64url(json.dumps(protected, separators=(",", ":")).encode())
    payload_b64 = b64url(payload)
    return protected_b64, payload_b64, f"{protected_b64}.{payload_b64}".encode("ascii")


def encode_payload(payload: Mapping[str, Any] | None) -> bytes:
    """JSON bytes for a JWS payload; ``None`` means POST-as-GET, an empty payload (s6.3)."""
    return b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()


def sign(
    key: AccountKey,
    payload: Mapping[str, Any] | None,
    *,
    url: str,
    nonce: str | None,
    kid: str | None = None,
) -> JSON:
    """A flattened JWS for an ACME request (RFC 8555 s6.2).

    With ``kid`` (the account URL) the header carries ``kid``; without it, the public ``jwk``
    (only newAccount, revocation by certificate key, and the key-change inner JWS may do that).
    ``nonce=None`` only for the key-change inner JWS, which s7.3.5 forbids to carry one.
    """
    alg = algorithm(key)
    protected: JSON = {"alg": alg.name}
    if kid is not None:
        protected["kid"] = kid
    else:
        protected["jwk"] = public_jwk(key)
    if nonce is not None:
        protected["nonce"] = nonce
    protected["url"] = url
    protected_b64, payload_b64, signing_input = _encode(protected, encode_payload(payload))
    signature = alg.sign(key, signing_input)
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64url(signature)}


def external_account_binding(
    account_key: AccountKey, *, kid: str, hmac_key: bytes, url: str
) -> JSON:
    """The ``externalAccountBinding`` field of newAccount (RFC 8555 s7.3.4).

    A JWS over the account's public JWK, MACed with HS256 under the CA-issued key, whose
    protected header holds ``alg``, the CA's ``kid`` and the newAccount ``url`` and, as the
    RFC requires, no ``nonce``.
    """
    protected = {"alg": jwa.HS256.name, "kid": kid, "url": url}
    payload = json.dumps(public_jwk(account_key), separators=(",", ":")).encode()
    protected_b64, payload_b64, signing_input = _encode(protected, payload)
    mac = jwa.HS256.sign(hmac_key, signing_input)
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64url(mac)}


def key_change_inner(
    new_key: AccountKey, old_key: AccountKey, *, account_url: str, url: str
) -> JSON:
    """The inner JWS of an account key roll-over (RFC 8555 s7.3.5).

    Signed by the *new* key with its ``jwk`` in the header and no nonce; the payload names the
    account and the old key, so the outer JWS (signed by the old key) binds both.
    """
    payload = {"account": account_url, "oldKey": public_jwk(old_key)}
    return sign(new_key, payload, url=url, nonce=None)


def decode_protected(jws: Mapping[str, Any]) -> JSON:
    """The protected header of a flattened JWS as a dict (for tests and the fault injector)."""
    header: JSON = json.loads(b64url_decode(str(jws["protected"])))
    return header


def decode_payload(jws: Mapping[str, Any]) -> JSON | None:
    """The JSON payload of a flattened JWS, or None for POST-as-GET's empty payload."""
    raw = b64url_decode(str(jws.get("payload", "")))
    if not raw:
        return None
    payload: JSON = json.loads(raw)
    return payload
