"""At-rest encryption of secret values (private keys), shared by every storage backend.

Owns the sealed-value format and nothing else: a backend decides which values are secret and
where the sealed bytes go. AES-256-GCM, bound to the storage key. Format::

    0x01 | key id (8 bytes) | nonce (12 random bytes) | ciphertext + 16-byte GCM tag

The key id is the first 8 bytes of SHA-256("edgeproxy key id" + key): it tells "encrypted with
another key" apart from "damaged" without revealing the key. The associated data is the first 9
bytes (version and key id) plus the storage key, so a ciphertext copied under another key, or
under the same key with a different id, fails to decrypt. Such a value raises ``CorruptRecord``
(wrong key?). Telling a sealed value from a clear one is the backend's business (a row flag, a
file marker): values are arbitrary bytes, and a clear one may start with 0x01 too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeproxy.errors import CorruptRecord

__all__ = ["KEY_ID_LEN", "Sealer", "generate_encryption_key", "key_id_of"]

_FORMAT_V1 = b"\x01"
KEY_ID_LEN = 8
_NONCE_LEN = 12
_HEADER_LEN = len(_FORMAT_V1) + KEY_ID_LEN
_TAG_LEN = 16


def generate_encryption_key() -> str:
    """A fresh key in the form ``Sealer`` expects (base64url of 32 random bytes)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def _decode_key(text: str) -> bytes:
    padded = text.strip() + "=" * (-len(text.strip()) % 4)
    try:
        raw = base64.urlsafe_b64decode(padded.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if len(raw) != 32:
        # Never echo the text: it may be a real key with a typo.
        raise ValueError(
            "encryption key must be 32 random bytes, base64url-encoded "
            "(make one with edgeproxy.storage.sealing.generate_encryption_key())"
        )
    return raw


def key_id_of(blob: bytes) -> bytes:
    """The key id a sealed value names."""
    return blob[1:_HEADER_LEN]


class Sealer:
    """AES-256-GCM for secret values, bound to the storage key (format in the module doc)."""

    def __init__(self, key_text: str) -> None:
        key = _decode_key(key_text)
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"edgeproxy key id" + key).digest()[:KEY_ID_LEN]
        self._header = _FORMAT_V1 + self.key_id

    def seal(self, storage_key: str, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_LEN)
        aad = self._header + storage_key.encode()
        return self._header + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, storage_key: str, blob: bytes) -> bytes:
        if len(blob) < _HEADER_LEN + _NONCE_LEN + _TAG_LEN or blob[:1] != _FORMAT_V1:
            raise CorruptRecord(
                f"encrypted value {storage_key!r} is truncated or of unknown format"
            )
        key_id = key_id_of(blob)
        if key_id != self.key_id:
            raise CorruptRecord(
                f"value {storage_key!r} was encrypted with another key (key id {key_id.hex()}, "
                f"configured key {self.key_id.hex()}): wrong encryption key?"
            )
        nonce = blob[_HEADER_LEN : _HEADER_LEN + _NONCE_LEN]
        try:
            return self._aead.decrypt(
                nonce, blob[_HEADER_LEN + _NONCE_LEN :], self._header + storage_key.encode()
            )
        except InvalidTag:
            raise CorruptRecord(
                f"value {storage_key!r} failed to decrypt: it was altered or copied from "
                "another key, or the encryption key is wrong"
            ) from None
