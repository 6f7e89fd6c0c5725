"""Builds TLS ClientHello bytes for tests, from the handshake body up to TCP reads.

Three layers, each a plain function so a test can break exactly the layer it is about:

* extensions: ``server_name(...)``, ``alpn(...)``, ``supported_versions(...)``,
  ``key_share(...)``, ``padding(...)``, ``ech_outer(...)``, ``grease_extension(...)``,
  each returning ``(type, data)``; ``encode_extensions`` turns them into the wire block.
* messages: ``client_hello_body(...)`` (every field overridable, extensions may be omitted)
  wrapped by ``handshake_message(...)``; ``client_hello(...)`` is the convenient all-in-one.
* transport: ``to_records(message, sizes)`` fragments a handshake message into TLS records,
  ``split(data, cuts)`` cuts bytes into TCP reads.

Nothing here interprets a hello (``record_payloads`` only unwraps records, to re-fragment
captured hellos); tests compare the parser's output with what they asked this module to build.
The bytes are deterministic (fixed random, key shares filled with a pattern).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

TLS10 = 0x0301
TLS11 = 0x0302
TLS12 = 0x0303
TLS13 = 0x0304

GREASE = tuple(0x0A0A + 0x1010 * i for i in range(16))  # RFC 8701 s2

EXT_SERVER_NAME = 0
EXT_SUPPORTED_GROUPS = 10
EXT_SIGNATURE_ALGORITHMS = 13
EXT_ALPN = 16
EXT_PADDING = 21
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51
EXT_ECH_OUTER = 0xFE0D

X25519 = 0x001D
X25519MLKEM768 = 0x11EC  # 1216-byte client share, the reason modern hellos are big

DEFAULT_CIPHER_SUITES = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xCCA9)
MAX_FRAGMENT = 1 << 14

Extension = tuple[int, bytes]


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def vec8(data: bytes) -> bytes:
    return u8(len(data)) + data


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def _b(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


# --- extensions ---------------------------------------------------------------------------


def server_name(*names: str | bytes, entries: Sequence[tuple[int, bytes]] = ()) -> Extension:
    """server_name with one host_name entry per ``names``, then raw ``(name_type, data)``."""
    items = [(0, _b(n)) for n in names] + list(entries)
    return EXT_SERVER_NAME, vec16(b"".join(u8(t) + vec16(d) for t, d in items))


def alpn(*protocols: str | bytes) -> Extension:
    return EXT_ALPN, vec16(b"".join(vec8(_b(p)) for p in protocols))


def supported_versions(*versions: int) -> Extension:
    return EXT_SUPPORTED_VERSIONS, vec8(b"".join(u16(v) for v in versions))


def supported_groups(*groups: int) -> Extension:
    return EXT_SUPPORTED_GROUPS, vec16(b"".join(u16(g) for g in groups))


def signature_algorithms(*schemes: int) -> Extension:
    return EXT_SIGNATURE_ALGORITHMS, vec16(b"".join(u16(s) for s in schemes))


def key_share(*shares: tuple[int, int]) -> Extension:
    """key_share with ``(group, size)`` entries, each filled with a recognisable pattern."""
    body = b"".join(u16(group) + vec16(bytes([group & 0xFF]) * size) for group, size in shares)
    return EXT_KEY_SHARE, vec16(body)


def padding(length: int) -> Extension:
    """RFC 7685 padding: ``length`` zero bytes of extension data."""
    return EXT_PADDING, bytes(length)


def ech_outer(payload_size: int = 200) -> Extension:
    """An encrypted_client_hello outer extension with an opaque payload; the parser skips it."""
    data = (
        u8(0)  # ECHClientHelloType outer
        + u16(0x0001)  # KDF HKDF-SHA256
        + u16(0x0001)  # AEAD AES-128-GCM
        + u8(0x42)  # config_id
        + vec16(b"\x11" * 32)  # enc
        + vec16(b"\x22" * payload_size)
    )
    return EXT_ECH_OUTER, data


def grease_extension(value: int = GREASE[0], data: bytes = b"") -> Extension:
    return value, data


def encode_extensions(extensions: Iterable[Extension]) -> bytes:
    return vec16(b"".join(u16(t) + vec16(d) for t, d in extensions))


# --- messages -----------------------------------------------------------------------------


def client_hello_body(
    *,
    legacy_version: int = TLS12,
    random: bytes = bytes(range(32)),
    session_id: bytes = bytes(32),
    cipher_suites: Sequence[int] = DEFAULT_CIPHER_SUITES,
    compression_methods: bytes = b"\x00",
    extensions: Sequence[Extension] | None = (),
    trailing: bytes = b"",
) -> bytes:
    """The ClientHello body; ``extensions=None`` omits the block (legal for TLS 1.2)."""
    body = (
        u16(legacy_version)
        + random
        + vec8(session_id)
        + vec16(b"".join(u16(c) for c in cipher_suites))
        + vec8(compression_methods)
    )
    if extensions is not None:
        body += encode_extensions(extensions)
    return body + trailing


def handshake_message(body: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + u24(len(body)) + body


def client_hello(
    sni: str | bytes | None = "example.com",
    alpn_protocols: Sequence[str | bytes] = (),
    versions: Sequence[int] | None = (TLS13, TLS12),
    *,
    grease: bool = False,
    key_shares: Sequence[tuple[int, int]] = ((X25519, 32),),
    padding_length: int | None = None,
    extra_extensions: Sequence[Extension] = (),
    cipher_suites: Sequence[int] = DEFAULT_CIPHER_SUITES,
    legacy_version: int = TLS12,
) -> bytes:
    """A whole ClientHello handshake message, shaped like a modern browser's.

    With ``grease`` it puts GREASE values where Chrome does: first cipher suite, first and
    last extension, first supported version, first group.
    """
    ext: list[Extension] = []
    if grease:
        ext.append(grease_extension(GREASE[2]))
    if sni is not None:
        ext.append(server_name(sni))
    groups = [g for g, _ in key_shares] or [X25519]
    ext.append(supported_groups(*([GREASE[3]] if grease else []), *groups))
    ext.append(signature_algorithms(0x0403, 0x0804, 0x0401))
    if alpn_protocols:
        ext.append(alpn(*alpn_protocols))
    if versions is not None:
        ext.append(supported_versions(*([GREASE[5]] if grease else []), *versions))
    if key_shares:
        ext.append(key_share(*key_shares))
    ext.extend(extra_extensions)
    if grease:
        ext.append(grease_extension(GREASE[9], b"\x00"))
    if padding_length is not None:
        ext.append(padding(padding_length))
    suites = ([GREASE[1]] if grease else []) + list(cipher_suites)
    return handshake_message(
        client_hello_body(legacy_version=legacy_version, cipher_suites=suites, extensions=ext)
    )


# --- transport ----------------------------------------------------------------------------


def record(payload: bytes, content_type: int = 22, version: int = TLS10) -> bytes:
    return u8(content_type) + u16(version) + vec16(payload)


def to_records(
    message: bytes,
    sizes: Sequence[int] = (),
    *,
    content_type: int = 22,
    version: int = TLS10,
) -> bytes:
    """Fragment ``message`` into records of the given payload ``sizes``.

    Bytes left after ``sizes`` go into records of at most 2**14 bytes, as a real client would.
    """
    out: list[bytes] = []
    pos = 0
    for size in sizes:
        if pos >= len(message):
            break
        out.append(record(message[pos : pos + size], content_type, version))
        pos += size
    while pos < len(message):
        out.append(record(message[pos : pos + MAX_FRAGMENT], content_type, version))
        pos += MAX_FRAGMENT
    return b"".join(out)


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (any order, duplicates and out-of-range ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def record_payloads(data: bytes) -> list[tuple[int, bytes]]:
    """The ``(content_type, payload)`` of each complete record in ``data`` (for fixtures)."""
    out = []
    pos = 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        out.append((data[pos], data[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return out
