"""The TLS-ALPN-01 validation certificate (RFC 8737 s3).

Owns: building the self-signed certificate a server presents when a CA connects with ALPN
``acme-tls/1``: exactly one DNS SAN (the identifier being validated) and the critical
``acmeIdentifier`` extension (id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31) whose value is the
DER OCTET STRING of SHA-256(key authorization).

Must not know: ACME accounts, orders, sockets or SSL contexts. The data path turns the
result into a context; the ACME client supplies the key authorization.

Generating a key is the slow part (an EC P-256 key costs far more than the certificate), so
callers that answer many challenges pass one ``key`` in and reuse it: RFC 8737 puts no
requirement on the key, only on the certificate's names and extension.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ObjectIdentifier

from .self_signed import self_signed

__all__ = [
    "ACME_IDENTIFIER_OID",
    "ACME_TLS_ALPN",
    "acme_identifier_value",
    "build_challenge_certificate",
]

ACME_TLS_ALPN = "acme-tls/1"
"""The ALPN protocol name a CA offers when validating (RFC 8737 s6.2)."""

ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
"""id-pe-acmeIdentifier (RFC 8737 s6.1)."""

# Validity is irrelevant to the CA (RFC 8737 does not check it) but a backdated start keeps
# validators with skewed clocks from rejecting the handshake before looking at the extension.
_BACKDATE = timedelta(hours=1)
_LIFETIME = timedelta(days=7)


def acme_identifier_value(key_authorization: str) -> bytes:
    """The extension's extnValue contents: DER ``OCTET STRING (SIZE (32))`` of the digest.

    ``Authorization ::= OCTET STRING (SIZE (32))`` (RFC 8737 s3): tag 0x04, length 0x20,
    then SHA-256 over the ASCII key authorization.
    """
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return b"\x04\x20" + digest


def build_challenge_certificate(
    identifier: str,
    key_authorization: str,
    *,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    now: datetime | None = None,
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """A self-signed RFC 8737 certificate for ``identifier``; returns (certificate, key).

    ``key`` defaults to a fresh EC P-256 key; pass one to reuse it across challenges.
    ``now`` anchors the validity window (tests pass a fixed clock).
    """
    if not identifier or identifier.startswith("*."):
        # RFC 8737 s3: the CA validates the base name of a wildcard, never "*.example".
        raise ValueError(f"not a validatable DNS identifier: {identifier!r}")
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    start = (now or datetime.now(UTC)) - _BACKDATE
    # The subject is a fixed label: the identifier may exceed the 64-character CN limit and
    # the CA only looks at the SAN.
    acme_identifier = x509.UnrecognizedExtension(
        ACME_IDENTIFIER_OID, acme_identifier_value(key_authorization)
    )
    cert = self_signed(
        key,
        "ACME TLS-ALPN-01 challenge",
        start,
        start + _BACKDATE + _LIFETIME,
        [(x509.SubjectAlternativeName([x509.DNSName(identifier)]), False), (acme_identifier, True)],
    )
    return cert, key
