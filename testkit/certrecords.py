"""Real certificate records for storage tests: a fresh key and a self-signed leaf per call.

``cert_record(name, not_after)`` gives a ``CertRecord`` that parses and verifies like an issued
one, valid for the 90 days before ``not_after``.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeproxy.certs.record import CertRecord


def cert_record(name: str, not_after: dt.datetime, *, issued_at: float = 0.0) -> CertRecord:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=90))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return CertRecord.build(name, "test", pem, key, issued_at)
