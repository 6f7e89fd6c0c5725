"""``InternalIssuer``: a local CA kept in storage, for the demo, development and private names.

The CA is created on first use (under a storage lock, so concurrent workers agree on one CA)
and stored as one secret record: certificate and key always travel together. Leaf certificates
are short-lived (30 days by default) so renewal is exercised like with a public CA.

There is one CA per key family, and a leaf is signed by the CA of its own family: an ECDSA CA
(P-256) for ``ec256``/``ec384`` leaves, an RSA CA (2048 bits) for ``rsa2048``/``rsa4096``. A
client that only speaks RSA signatures must verify the chain's signatures too (TLS 1.3
``signature_algorithms`` covers them, RFC 8446 s4.2.3), so an RSA leaf under an ECDSA CA fails
exactly the clients ``tls.key_type = "rsa2048"`` is chosen for. The ECDSA CA keeps its original
record key, so existing deployments keep their trusted ``ca.pem``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import CorruptRecord, reading_record
from ..storage.base import Storage
from ..storage.locks import hold_lock, make_owner_id
from ..tls.self_signed import self_signed
from .base import IssuedCertificate, IssueRequest, RenewalWindow, private_key_pem

CA_KEY = "internal-ca/ca.json"  # the ECDSA CA (the original, and default, record)
RSA_CA_KEY = "internal-ca/ca-rsa.json"
ISSUER_ID = "internal"

Family = Literal["ec", "rsa"]
_CA_KEYS: Final[dict[Family, str]] = {"ec": CA_KEY, "rsa": RSA_CA_KEY}
_CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_CA = tuple[x509.Certificate, _CAKey]


def family_of(key_type: str) -> Family:
    """The CA family for a ``tls.key_type`` (``rsa2048`` -> ``rsa``, ``ec256`` -> ``ec``)."""
    return "rsa" if key_type.startswith("rsa") else "ec"


def _family_of_key(key: object) -> Family:
    return "rsa" if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey) else "ec"


def _new_ca_key(family: Family) -> _CAKey:
    if family == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _new_ca(common_name: str, family: Family) -> _CA:
    key = _new_ca_key(family)
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = self_signed(
        key,
        common_name,
        now - timedelta(hours=1),
        now + timedelta(days=3650),
        [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True), (ski, False)],
    )
    return cert, key


class InternalIssuer:
    def __init__(
        self,
        storage: Storage,
        *,
        common_name: str = "edgeproxy internal CA",
        validity: timedelta = timedelta(days=30),
        key_type: str = "ec256",
    ) -> None:
        self._storage = storage
        self._common_name = common_name
        self._validity = validity
        self._family = family_of(key_type)  # whose CA ca_certificate_pem returns
        self._cas: dict[Family, _CA] = {}

    @property
    def id(self) -> str:
        return ISSUER_ID

    async def ca_certificate_pem(self) -> bytes:
        """The CA that signs the configured ``key_type``'s leaves (what clients must trust)."""
        cert, _ = await self._load_or_create(self._family)
        return cert.public_bytes(serialization.Encoding.PEM)

    async def _load_or_create(self, family: Family) -> _CA:
        ca = self._cas.get(family)
        if ca is not None:
            return ca
        ca = await self._load(family)
        if ca is None:
            async with hold_lock(
                self._storage, "internal-ca", owner=make_owner_id(), ttl=30, wait=30
            ):
                ca = await self._load(family)
                if ca is None:
                    ca = _new_ca(self._common_name, family)
                    record = {
                        "cert_pem": ca[0].public_bytes(serialization.Encoding.PEM).decode(),
                        "key_pem": private_key_pem(ca[1]),
                    }
                    await self._storage.put(
                        _CA_KEYS[family], json.dumps(record).encode(), secret=True
                    )
        self._cas[family] = ca
        return ca

    async def _load(self, family: Family) -> _CA | None:
        record_key = _CA_KEYS[family]
        raw = await self._storage.get(record_key)
        if raw is None:
            return None
        # Never silently mint a second CA: clients trust the first one.
        remedy = (
            "restore it from backup or delete it to create a new CA "
            "(clients must then trust the new ca.pem)"
        )
        with reading_record(f"internal CA record {record_key}", remedy):
            record = json.loads(raw)
            cert = x509.load_pem_x509_certificate(record["cert_pem"].encode())
            key = serialization.load_pem_private_key(record["key_pem"].encode(), password=None)
        expected = rsa.RSAPrivateKey if family == "rsa" else ec.EllipticCurvePrivateKey
        if not isinstance(key, expected):
            raise CorruptRecord(f"internal CA record {record_key} holds an unexpected key type")
        return cert, key

    async def issue(self, request: IssueRequest) -> IssuedCertificate:
        return await self.issue_for([x509.DNSName(n) for n in request.names], request.private_key)

    async def issue_for(
        self, names: Sequence[x509.GeneralName], private_key: CertificateIssuerPrivateKeyTypes
    ) -> IssuedCertificate:
        """A leaf for several names, IP addresses included (``names[0]`` is the subject):
        the demo's certificate for localhost, 127.0.0.1 and ::1."""
        # The leaf's own family signs it: an RSA-only client must verify the chain too.
        family = _family_of_key(private_key)
        ca_cert, ca_key = await self._load_or_create(family)
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))]))
            .issuer_name(ca_cert.subject)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + self._validity)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        return IssuedCertificate(chain_pem=chain, issuer_id=ISSUER_ID)

    async def renewal_window(self, chain_pem: bytes) -> RenewalWindow | None:
        """Renew now a leaf signed by the other family's CA, else no opinion.

        Before the CA followed the key type, RSA leaves were signed by the ECDSA CA; such a
        stored certificate is replaced at the next maintenance pass instead of serving
        RSA-only clients ``handshake_failure`` until its normal renewal.
        """
        try:
            leaf, signer = x509.load_pem_x509_certificates(chain_pem)[:2]
        except ValueError:
            return None
        if _family_of_key(leaf.public_key()) == _family_of_key(signer.public_key()):
            return None
        now = datetime.now(UTC)
        return RenewalWindow(start=now - timedelta(hours=1), end=now)
