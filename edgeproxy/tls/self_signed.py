"""Self-signed X.509 certificates: the one builder for every certificate that signs itself.

Owns: subject = issuer = one common name, a random serial, the validity window, the caller's
extensions, and the signature hash that fits the key (none for EdDSA, SHA-256 otherwise).

Must not know: what the certificate is for. The internal CA, the TLS-ALPN-01 validation
certificate and the session-ticket probe each choose their own name, window and extensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

# An extension and whether it is critical.
Extension = tuple[x509.ExtensionType, bool]


def signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """The hash to sign with ``key``: EdDSA hashes internally (None), ECDSA and RSA use SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return hashes.SHA256()
    raise TypeError(f"unsupported key type {type(key).__name__}")


def self_signed(
    key: CertificateIssuerPrivateKeyTypes,
    common_name: str,
    not_before: datetime,
    not_after: datetime,
    extensions: Sequence[Extension] = (),
) -> x509.Certificate:
    """A certificate for ``key`` named ``common_name`` and signed by that same key."""
    algorithm = signature_hash(key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, algorithm)
