"""Adopting certificates obtained elsewhere (``edgeproxy certs import``): a PEM chain and its key
become the same stored records an issuance makes, one per DNS name the leaf covers.

Owns: reading and checking a certificate/key pair, and writing its records. Must not know: the
CLI, where files come from beyond the paths given, ACME.

Everything is checked before anything is written: a pair that fails a check is reported by
path and reason and nothing of it is stored. Each record is one atomic put (chain and key
together), followed by its next-action time set to now, so the next maintenance pass plans its
renewal (by the backstop: an imported certificate has no ARI with our CA and is renewed through
the configured issuer, without ``replaces``). A name whose stored certificate lasts at least as
long is left alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..names import InvalidName, validate_hostname
from ..storage.base import Storage
from ..tls.contexts import check_key
from ..tls.errors import InvalidCertificate
from .record import CertRecord, RecordError, cert_key

__all__ = ["IMPORTED_ISSUER", "BadImport", "Imported", "caddy_pairs", "import_pair", "read_pair"]

#: The issuer id of an adopted certificate (no ARI, no ``replaces`` at its renewal).
IMPORTED_ISSUER = "imported"
_MAX_FILE = 1 << 20  # a PEM chain or key is a few KiB; refuse to read anything huge


class BadImport(ValueError):
    """A pair that cannot be imported; ``str`` names the path and the reason."""


@dataclass(frozen=True, slots=True)
class Imported:
    name: str
    not_after: float
    stored: bool  # False: a stored certificate for the name lasts at least as long


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as exc:
        raise BadImport(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise BadImport(f"{path}: larger than {_MAX_FILE} bytes: not a certificate or key")
    return data


def read_pair(cert_path: Path, key_path: Path, *, now: float | None = None) -> list[CertRecord]:
    """The records ``cert_path`` (PEM chain, leaf first) and ``key_path`` make: one per DNS
    name of the leaf. Raises BadImport naming the path at fault."""
    now = time.time() if now is None else now
    chain_pem = _read(cert_path)
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise BadImport(f"{cert_path}: no PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise BadImport(f"{key_path}: not an unencrypted PEM private key: {exc}") from None
    leaf = chain[0]
    try:
        servable = check_key(leaf, key)
    except InvalidCertificate as exc:
        raise BadImport(f"{key_path}: {exc.detail} ({cert_path})") from None
    if leaf.not_valid_after_utc.timestamp() <= now:
        raise BadImport(f"{cert_path}: expired {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = sans.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    names = []
    for raw in dns:
        try:
            names.append(validate_hostname(raw))
        except InvalidName:
            continue  # wildcards and the like: not a name a handshake is served from storage
    if not names:
        raise BadImport(f"{cert_path}: the leaf names no DNS name edgeproxy serves by itself")
    # A chain the PEM round trip keeps as given (intermediates included, order kept).
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    records = []
    for name in dict.fromkeys(names):
        try:
            records.append(
                CertRecord.build(name, IMPORTED_ISSUER, pem, servable, now)
            )
        except (RecordError, ValueError) as exc:
            raise BadImport(f"{cert_path}: {exc}") from None
    return records


def caddy_pairs(root: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """The (certificate, key) files of a Caddy/CertMagic file storage folder, and what is wrong
    with the rest: CertMagic keeps ``certificates/<issuer>/<name>/<name>.crt`` with ``.key``
    (and ``.json`` metadata, not needed here) beside it."""
    base = root / "certificates"
    if not base.is_dir():
        return [], [f"{root}: no certificates/ folder (not a Caddy storage folder?)"]
    pairs: list[tuple[Path, Path]] = []
    problems: list[str] = []
    for issuer in sorted(p for p in base.iterdir() if p.is_dir()):
        for folder in sorted(p for p in issuer.iterdir() if p.is_dir()):
            crt, key = folder / f"{folder.name}.crt", folder / f"{folder.name}.key"
            if not crt.is_file():
                problems.append(f"{crt}: missing")
            elif not key.is_file():
                problems.append(f"{key}: missing (the certificate beside it is skipped)")
            else:
                pairs.append((crt, key))
    return pairs, problems


async def import_pair(
    storage: Storage, records: list[CertRecord], *, now: float | None = None
) -> list[Imported]:
    """Store ``records`` (from ``read_pair``) and schedule them; StorageError propagates."""
    now = time.time() if now is None else now
    done = []
    for rec in records:
        key = cert_key(rec.name)
        raw = await storage.get(key)
        if raw is not None:
            try:
                current = CertRecord.from_json(raw)
            except RecordError:
                current = None  # a corrupt record: the import replaces it
            if current is not None and current.not_after >= rec.not_after:
                done.append(Imported(rec.name, current.not_after, stored=False))
                continue
        await storage.put(key, rec.to_json(), secret=True)
        await storage.set_due(rec.name, now)
        done.append(Imported(rec.name, rec.not_after, stored=True))
    return done
