"""The stored form of one managed certificate: chain, key and what we know about renewing it.

Key and chain are one record written in one atomic put, so no reader can ever pair a new key
with an old certificate (the "stale or torn files" incident). Pure data and (de)serialisation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from ..issuers.base import private_key_pem

FORMAT_VERSION = 1


def _per_name(prefix: str, suffix: str = ".json") -> Callable[[str], str]:
    """Where one name's (already normalised) record lives: ``prefix``, the name, ``suffix``."""

    def key(name: str) -> str:
        return f"{prefix}{name}{suffix}"

    return key


# A name's records, each its own key: the certificate record; the failed attempts and the next
# allowed one, shared by every process (``Backoff``); the ARI state, apart from the record
# because refreshing it must never race a renewal's write. Then the lease held while ordering.
cert_key = _per_name("certs/")
backoff_key = _per_name("backoff/")
ari_key = _per_name("ari/")
lock_name = _per_name("issue-", suffix="")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Consecutive failed orders for a name and when the next may start: written under the
    name's lease before it is released, read under it before ordering, so no worker or replica
    (nor a restart) orders before ``next_attempt``."""

    failures: int
    next_attempt: float
    # When validations failed in the last hour: [acme.limits] failed_validations_per_hostname
    # counts them (pruned on each write, so bounded by the failures one hour can hold).
    validations: tuple[float, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Backoff:
        try:
            d = json.loads(raw)
            # Records from before the field: no validation times.
            times = tuple(float(t) for t in d.get("validations", ()))
            return cls(int(d["failures"]), float(d["next_attempt"]), times)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RecordError(f"unparseable backoff record: {exc}") from None


@dataclass(frozen=True, slots=True)
class AriState:
    """What the CA said about renewing one certificate (RFC 9773), and when to ask again.

    ``start``/``end`` are the suggested window, None when the last request gave none; then
    ``error`` says why. ``long_term`` marks an answer meaning the CA has no ARI for this
    certificate (e.g. 404 for its CertID): renewal goes by the backstop and sends no
    ``replaces``. ``failures`` counts consecutive failed requests (short-term backoff).
    """

    serial: str  # the certificate this window is for
    start: float | None
    end: float | None
    explanation_url: str | None
    next_check: float
    error: str | None = None
    long_term: bool = False
    failures: int = 0

    @property
    def window(self) -> tuple[float, float] | None:
        if self.start is None or self.end is None:
            return None
        return self.start, self.end

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AriState:
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise RecordError(f"unparseable ARI state: {exc}") from None


class RecordError(ValueError):
    """A stored certificate record does not parse or is inconsistent."""


@dataclass(frozen=True, slots=True)
class CertRecord:
    name: str
    issuer_id: str
    chain_pem: str
    key_pem: str
    not_before: float
    not_after: float
    serial: str
    issued_at: float
    # The ACME challenge type that validated: the next order for this name starts with it.
    challenge_type: str | None = None

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def to_json(self) -> bytes:
        d = asdict(self)
        if d["challenge_type"] is None:
            del d["challenge_type"]  # records without it stay readable by older versions
        d["format"] = FORMAT_VERSION
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CertRecord:
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.pop("format", None) != FORMAT_VERSION:
                raise RecordError("unknown record format")
            # Fields a newer version added are ignored (replicas mid-upgrade share storage).
            rec = cls(**{k: v for k, v in d.items() if k in _RECORD_FIELDS})
        except (ValueError, TypeError) as exc:
            raise RecordError(f"unparseable certificate record: {exc}") from None
        rec.verify()
        return rec

    def verify(self) -> None:
        """Check the key belongs to the leaf certificate; raise RecordError otherwise."""
        try:
            chain = x509.load_pem_x509_certificates(self.chain_pem.encode())
            key = serialization.load_pem_private_key(self.key_pem.encode(), password=None)
        except ValueError as exc:
            raise RecordError(f"bad PEM in certificate record: {exc}") from None
        if not chain:
            raise RecordError("empty certificate chain")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if chain[0].public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
            raise RecordError("private key does not match the certificate")

    @classmethod
    def build(
        cls,
        name: str,
        issuer_id: str,
        chain_pem: bytes,
        key: CertificateIssuerPrivateKeyTypes,
        now: float,
        challenge_type: str | None = None,
    ) -> CertRecord:
        chain = x509.load_pem_x509_certificates(chain_pem)
        leaf = chain[0]
        rec = cls(
            name=name,
            issuer_id=issuer_id,
            chain_pem=chain_pem.decode(),
            key_pem=private_key_pem(key),
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            serial=format(leaf.serial_number, "x"),
            issued_at=now,
            challenge_type=challenge_type,
        )
        rec.verify()
        return rec

    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.chain_pem.encode())

    def private_key(self) -> CertificateIssuerPrivateKeyTypes:
        key = serialization.load_pem_private_key(self.key_pem.encode(), password=None)
        return key  # type: ignore[return-value]


_RECORD_FIELDS = frozenset(f.name for f in fields(CertRecord))


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
