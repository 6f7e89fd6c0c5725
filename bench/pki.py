"""The benchmark's certificate: a throwaway CA and one ECDSA P-256 leaf, made at run time.

Owns the files every terminator loads (PEM chain, PEM key, and the chain+key bundle HAProxy
and hitch want) and the CA file clients verify against. Must not know who loads them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["BenchPki", "make_pki"]


@dataclass(frozen=True)
class BenchPki:
    name: str  # the leaf's only DNS name; clients send it as SNI
    ca_pem: Path
    cert_pem: Path  # the leaf alone: the CA is the trust anchor, never sent
    key_pem: Path
    combined_pem: Path  # leaf then key, for HAProxy ``crt`` and hitch ``pem-file``


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_pki(directory: Path, name: str = "localhost") -> BenchPki:
    """Write a new CA and a P-256 leaf for ``name`` (valid two days) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeproxy bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pki = BenchPki(
        name=name,
        ca_pem=directory / "ca.pem",
        cert_pem=directory / "leaf.pem",
        key_pem=directory / "leaf.key",
        combined_pem=directory / "leaf-and-key.pem",
    )
    pki.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_pem.write_bytes(leaf_pem)
    pki.key_pem.write_bytes(key_bytes)
    pki.key_pem.chmod(0o600)
    pki.combined_pem.write_bytes(leaf_pem + key_bytes)
    pki.combined_pem.chmod(0o600)
    return pki
