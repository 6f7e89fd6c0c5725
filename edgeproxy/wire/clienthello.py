"""Incremental, sans-IO parser for the first thing a TLS client sends: its ClientHello.

This module owns the peek that happens before any TLS state exists: bytes in, then "need more",
a :class:`ClientHello` (SNI, ALPN, versions, cipher suites, extension types) or a typed
:class:`ClientHelloError` saying what the peer did wrong. It must not know about sockets, OpenSSL,
certificates or routing: it never answers the client, it only reads what the client said.

Theory of operation
-------------------
A ClientHello is one handshake message (type 1, 24-bit length) carried in one or more TLS
records (content type 22, 16-bit length, at most 2**14 bytes each, RFC 8446 s5.1). Real clients
put it in one record, but a post-quantum key share or a client that fragments on purpose can
spread it over several, and TCP can cut anywhere. So the parser keeps every byte it is fed in
one ``bytearray`` and only does work when a *whole record* has arrived: the record's payload is
appended to the handshake buffer, and once that buffer holds the announced message length the
body is parsed in a single pass with ``struct``/``int.from_bytes`` (no per-byte Python loops,
no re-parsing of partial data, so feeding one byte at a time stays linear).

Sizes are refused as early as the headers allow: a record header whose end lies beyond
``max_size``, or a handshake header whose message is longer than OpenSSL would read
(:data:`MAX_CLIENT_HELLO_BODY`) or cannot fit in ``max_size`` even in maximal records, raises
:class:`ClientHelloTooLarge` without waiting for the bytes themselves.

Before the first record header, the first bytes are classified: ``0x16 0x03`` is TLS; an HTTP
method, an HTTP/2 preface or a PROXY protocol signature (a proxy_protocol setting mismatch)
raise :class:`NotTLS` as soon as the bytes are known to match, anything else as soon as they
can no longer match. An SSLv2-compatible ClientHello (high bit set, message type 1) is
reported as ``NotTLS(reason="sslv2_hello")``: it is not a TLS record, and a server that speaks
TLS 1.2+ only could not complete such a handshake anyway.

The bytes contract
------------------
:attr:`ClientHelloParser.buffered` is authoritative: it is *everything* fed so far, including
bytes that arrived after the hello in the same read (a TLS 1.3 client may send
ChangeCipherSpec or early data right behind it). The proxy primes OpenSSL with ``buffered``.
:attr:`ClientHello.raw` is the prefix of ``buffered`` up to and including the last byte of the
record that completed the hello, i.e. exactly the records that carry it; it is what fuzz corpora
and fixtures store. Feeding a parser after it produced a hello only extends ``buffered``.

Strictness
----------
We refuse what OpenSSL would refuse anyway and what would make our reading ambiguous (two
``server_name`` extensions, two ``host_name`` entries, a hello that does not end on a record
boundary, RFC 8446 s5.1): the proxy then decides from what OpenSSL will also see. GREASE values
(RFC 8701) are kept where we report the wire faithfully (``cipher_suites``, ``extensions``) and
removed where callers compare values (``supported_versions``, ``alpn_protocols``). The SNI is
checked to be printable ASCII, lower-cased and stripped of one trailing dot; whether it is a
valid DNS name is the name policy's decision (``edgeproxy.names``), not this module's.

Error reasons (``ClientHelloError.reason``, a :class:`Reason`, stable tokens for metrics)
---------------------------------------------------------------------------------------
* NotTLS: ``http``, ``proxy_protocol``, ``sslv2_hello``, ``not_tls``
* ClientHelloTooLarge: ``too_large``
* MalformedClientHello: records ``unexpected_alert``, ``unexpected_content_type``,
  ``bad_record_version``, ``empty_record``, ``record_overflow``; handshake
  ``not_client_hello``, ``hello_too_short``, ``trailing_handshake_data``; body
  ``bad_legacy_version``, ``bad_session_id``, ``bad_cipher_suites``,
  ``bad_compression_methods``, ``bad_extensions``, ``trailing_data``, ``duplicate_extension``,
  ``bad_server_name`` (its lengths), ``bad_host_name`` (its characters), ``two_host_names``,
  ``bad_alpn``, ``bad_supported_versions``

Every reason has the fatal alert the caller answers with in :data:`REJECTION_ALERTS` (also
``ClientHelloError.alert``): the RFC's alert for the fault, or none for bytes that are not TLS.
Which alert is protocol knowledge, so it lives here; sending it is the caller's job.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, NoReturn

from edgeproxy.errors import PeerError

from .tls_alert import AlertDescription

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_CLIENT_HELLO_BODY",
    "NEED_DATA",
    "REJECTION_ALERTS",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloParser",
    "ClientHelloTooLarge",
    "MalformedClientHello",
    "NeedData",
    "NotTLS",
    "Reason",
    "is_grease",
    "parse_client_hello",
]


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel (an enum so ``is NEED_DATA`` narrows for mypy)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class Reason(enum.StrEnum):
    """Why a hello was refused: stable tokens for metrics and logs (a ``str``)."""

    HTTP = "http"
    PROXY_PROTOCOL = "proxy_protocol"
    SSLV2_HELLO = "sslv2_hello"
    NOT_TLS = "not_tls"
    TOO_LARGE = "too_large"
    UNEXPECTED_ALERT = "unexpected_alert"
    UNEXPECTED_CONTENT_TYPE = "unexpected_content_type"
    BAD_RECORD_VERSION = "bad_record_version"
    EMPTY_RECORD = "empty_record"
    RECORD_OVERFLOW = "record_overflow"
    NOT_CLIENT_HELLO = "not_client_hello"
    HELLO_TOO_SHORT = "hello_too_short"
    TRAILING_HANDSHAKE_DATA = "trailing_handshake_data"
    BAD_LEGACY_VERSION = "bad_legacy_version"
    BAD_SESSION_ID = "bad_session_id"
    BAD_CIPHER_SUITES = "bad_cipher_suites"
    BAD_COMPRESSION_METHODS = "bad_compression_methods"
    BAD_EXTENSIONS = "bad_extensions"
    TRAILING_DATA = "trailing_data"
    DUPLICATE_EXTENSION = "duplicate_extension"
    BAD_SERVER_NAME = "bad_server_name"
    BAD_HOST_NAME = "bad_host_name"
    TWO_HOST_NAMES = "two_host_names"
    BAD_ALPN = "bad_alpn"
    BAD_SUPPORTED_VERSIONS = "bad_supported_versions"


_A = AlertDescription
# The fatal alert each refusal ends with: the one RFC 8446 (s4, s5, s6) names, or where it
# names none, the one OpenSSL sends for the same fault, so a client sees what it would see from
# OpenSSL (and HAProxy, nginx) behind the same port. None: no TLS alert. Bytes that are not a
# TLS record get none (OpenSSL sends none either: the peer would not understand it; HTTP gets
# a plain-text 400 instead), and a peer that sent an alert has already given up.
REJECTION_ALERTS: Final[Mapping[Reason, AlertDescription | None]] = MappingProxyType(
    {
        Reason.HTTP: None,
        Reason.PROXY_PROTOCOL: None,
        Reason.SSLV2_HELLO: None,
        Reason.NOT_TLS: None,
        Reason.UNEXPECTED_ALERT: None,
        # s5: an unexpected record type MUST be answered with unexpected_message.
        Reason.UNEXPECTED_CONTENT_TYPE: _A.UNEXPECTED_MESSAGE,
        # A later record that is not TLS at all (OpenSSL: wrong version number).
        Reason.BAD_RECORD_VERSION: _A.PROTOCOL_VERSION,
        # s5.1: zero-length handshake fragments MUST NOT be sent.
        Reason.EMPTY_RECORD: _A.UNEXPECTED_MESSAGE,
        # s5.1/s5.2: a record over 2**14 bytes MUST be answered with record_overflow.
        Reason.RECORD_OVERFLOW: _A.RECORD_OVERFLOW,
        # Beyond MAX_CLIENT_HELLO_BODY: OpenSSL's "excessive message size" alert.
        Reason.TOO_LARGE: _A.ILLEGAL_PARAMETER,
        # s4: a handshake message out of order is an unexpected_message.
        Reason.NOT_CLIENT_HELLO: _A.UNEXPECTED_MESSAGE,
        # s5.1: handshake data after the hello would span the key change.
        Reason.TRAILING_HANDSHAKE_DATA: _A.UNEXPECTED_MESSAGE,
        # s4.2.1/D.5: a legacy_version below TLS 1.0's major number is a version problem.
        Reason.BAD_LEGACY_VERSION: _A.PROTOCOL_VERSION,
        # s6.2 decode_error: a field out of its range or a length that does not add up.
        Reason.HELLO_TOO_SHORT: _A.DECODE_ERROR,
        Reason.BAD_SESSION_ID: _A.DECODE_ERROR,
        Reason.BAD_CIPHER_SUITES: _A.DECODE_ERROR,
        Reason.BAD_COMPRESSION_METHODS: _A.DECODE_ERROR,
        Reason.BAD_EXTENSIONS: _A.DECODE_ERROR,
        Reason.TRAILING_DATA: _A.DECODE_ERROR,
        Reason.BAD_SERVER_NAME: _A.DECODE_ERROR,
        Reason.BAD_ALPN: _A.DECODE_ERROR,
        Reason.BAD_SUPPORTED_VERSIONS: _A.DECODE_ERROR,
        # s6.2 illegal_parameter: well-formed, but inconsistent or not allowed (s4.2: one
        # extension of each type; RFC 6066 s3: one name per type, a host_name is a DNS name).
        Reason.DUPLICATE_EXTENSION: _A.ILLEGAL_PARAMETER,
        Reason.BAD_HOST_NAME: _A.ILLEGAL_PARAMETER,
        Reason.TWO_HOST_NAMES: _A.ILLEGAL_PARAMETER,
    }
)

_CONTENT_HANDSHAKE: Final = 22
_CONTENT_ALERT: Final = 21
_HANDSHAKE_CLIENT_HELLO: Final = 1
_MAX_FRAGMENT: Final = 1 << 14
_RECORD_HEADER_LEN: Final = 5
_HANDSHAKE_HEADER_LEN: Final = 4

# The largest ClientHello body OpenSSL itself reads (CLIENT_HELLO_MAX_LENGTH in its
# statem_srvr.c: every field at its maximum, the extensions block at 2**16-1 bytes). The same
# bound as the OpenSSL behind us, so no hello it would complete is refused here first, and one
# it would refuse is refused before we buffer it (the README's "ClientHello size" says why).
MAX_CLIENT_HELLO_BODY: Final = 131396
# Wire bytes of that hello in full-size records: the default buffer bound.
DEFAULT_MAX_SIZE: Final = (
    _HANDSHAKE_HEADER_LEN
    + MAX_CLIENT_HELLO_BODY
    + _RECORD_HEADER_LEN * -(-(_HANDSHAKE_HEADER_LEN + MAX_CLIENT_HELLO_BODY) // _MAX_FRAGMENT)
)
# legacy_version(2) random(32) session_id(1+0) cipher_suites(2+2) compression_methods(1+1)
_MIN_BODY_LEN: Final = 41

_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16
_EXT_SUPPORTED_VERSIONS: Final = 43
_EXT_SESSION_TICKET: Final = 35  # RFC 5077: TLS 1.2 ticket (empty: "send me one")
_EXT_PRE_SHARED_KEY: Final = 41  # RFC 8446 s4.2.11: TLS 1.3 tickets are PSK identities
_SNI_HOST_NAME: Final = 0

_RECORD_HEADER = struct.Struct(">BBBH")
_EXT_HEADER = struct.Struct(">HH")

# Bytes a host_name may contain here: printable ASCII without space. Anything finer (LDH
# labels, IDNA, IP literals) is the name policy's call, not the wire parser's.
_PRINTABLE_NO_SPACE: Final = bytes(range(0x21, 0x7F))

# First bytes of things people send to a TLS port by mistake, with the NotTLS reason each
# gets. None of them starts with 0x16, so they never compete with a real TLS record.
_NOT_TLS_SIGNATURES: Final[tuple[tuple[bytes, Reason, bool], ...]] = (
    *(
        (method + b" ", Reason.HTTP, True)
        for method in (
            b"GET",
            b"HEAD",
            b"POST",
            b"PUT",
            b"DELETE",
            b"OPTIONS",
            b"CONNECT",
            b"TRACE",
            b"PATCH",
        )
    ),
    (b"PRI * HTTP/2.0", Reason.HTTP, True),
    (b"PROXY ", Reason.PROXY_PROTOCOL, False),
    (b"\r\n\r\n\x00\r\nQUIT\n", Reason.PROXY_PROTOCOL, False),
)
_LONGEST_SIGNATURE: Final = max(len(sig) for sig, _, _ in _NOT_TLS_SIGNATURES)


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE code point: 0x?A?A with both bytes equal."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


# Every GREASE value (RFC 8701 s2), as integers and as 2-byte ALPN names: one set lookup
# per value on the per-connection path instead of a function call.
_GREASE: Final = frozenset(0x0A0A + 0x1010 * i for i in range(16))
_GREASE_ALPN: Final = frozenset(v.to_bytes(2, "big") for v in _GREASE)


# --- results and errors -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the client offered, as far as routing and certificate choice need to know."""

    sni: str | None
    alpn_protocols: tuple[str, ...]
    supported_versions: tuple[int, ...]
    legacy_version: int
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    raw: bytes = field(repr=False)
    # The session ticket offered for resumption: the first TLS 1.3 PSK identity, else the TLS
    # 1.2 SessionTicket; None when there is none. Only read to pick the ticket keys
    # (tls/tickets.py): OpenSSL judges it, so a malformed one is ignored here, never refused.
    ticket: bytes | None = field(default=None, repr=False)

    @property
    def offers_only_acme_tls(self) -> bool:
        """True for an RFC 8737 validation connection: ALPN offers exactly ``acme-tls/1``."""
        return self.alpn_protocols == ("acme-tls/1",)


class ClientHelloError(PeerError, ValueError):
    """The peer's first bytes are not a ClientHello we accept.

    ``reason`` is a short, stable token for metrics and logs; the message has the details.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def alert(self) -> AlertDescription | None:
        """The fatal alert to answer with (``REJECTION_ALERTS``), None for no TLS alert."""
        return REJECTION_ALERTS[self.reason]


class NotTLS(ClientHelloError):
    """The first bytes are not a TLS handshake record at all.

    ``looks_like_http`` is true when they start with an HTTP request line (or the HTTP/2
    preface), so the caller can answer with a plain-text hint instead of a TLS alert.
    """

    def __init__(self, reason: Reason, message: str, *, looks_like_http: bool = False) -> None:
        super().__init__(reason, message)
        self.looks_like_http = looks_like_http


class ClientHelloTooLarge(ClientHelloError):
    """The hello is, or is announced to be, bigger than the parser's ``max_size``."""


class MalformedClientHello(ClientHelloError):
    """TLS records arrived, but their content is not a well-formed ClientHello."""


# --- the parser ---------------------------------------------------------------------------


class ClientHelloParser:
    """Feed it the connection's first bytes until it returns a :class:`ClientHello`.

    ``feed`` returns :data:`NEED_DATA` while the hello is incomplete and raises only
    :class:`ClientHelloError` subclasses. Once it has failed it raises the same error again;
    once it has succeeded it returns the same hello and only grows :attr:`buffered`.
    """

    __slots__ = ("_buf", "_error", "_hs", "_hs_len", "_is_tls", "_max_size", "_pos", "_result")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self._max_size = max_size
        self._buf = bytearray()  # everything received
        self._pos = 0  # offset in _buf of the next record header not yet consumed
        self._hs = bytearray()  # handshake bytes from consumed records
        self._hs_len: int | None = None  # full handshake message length (with its header)
        self._is_tls = False
        self._result: ClientHello | None = None
        self._error: ClientHelloError | None = None

    @property
    def buffered(self) -> bytes:
        """Every byte fed so far, including any that followed the hello."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> ClientHello | Literal[NeedData.NEED_DATA]:
        if self._error is not None:
            raise self._error
        if self._result is not None:
            self._buf += data
            return self._result
        try:
            if not self._buf:
                result = self._whole_first_record(data)
                if result is not None:
                    self._result = result
                    return result
            self._buf += data
            result = self._advance()
        except ClientHelloError as exc:
            self._error = exc
            raise
        if result is None:
            return NEED_DATA
        self._result = result
        return result

    def _whole_first_record(self, data: bytes) -> ClientHello | None:
        """The usual first read: one record carrying exactly the whole hello; None otherwise.

        Checks what ``_advance`` would check on such a record, in one go, and skips the
        record assembly; anything else (several records, a short read, a mistake) falls
        through to ``_advance``, which finds and names any error. Leaves the parser as
        ``_advance`` would.
        """
        if len(data) < _RECORD_HEADER_LEN + _HANDSHAKE_HEADER_LEN or data[0] != _CONTENT_HANDSHAKE:
            return None
        length = (data[3] << 8) | data[4]
        end = _RECORD_HEADER_LEN + length
        if (
            data[1] != 3
            or data[5] != _HANDSHAKE_CLIENT_HELLO
            or len(data) < end
            or length > _MAX_FRAGMENT
            or end > self._max_size
            or length < _HANDSHAKE_HEADER_LEN + _MIN_BODY_LEN
            or int.from_bytes(data[6:9], "big") != length - _HANDSHAKE_HEADER_LEN
        ):
            return None
        self._buf += data
        self._is_tls = True
        self._pos = end
        self._hs_len = length
        return _parse_body(data[_RECORD_HEADER_LEN + _HANDSHAKE_HEADER_LEN : end], raw=data[:end])

    # The steps below raise on the first problem; feed() remembers the error.

    def _advance(self) -> ClientHello | None:
        buf = self._buf
        if not self._is_tls:
            if not self._classify_first_bytes():
                return None
            self._is_tls = True
        while len(buf) - self._pos >= _RECORD_HEADER_LEN:
            pos = self._pos
            content_type, major, _minor, length = _RECORD_HEADER.unpack_from(buf, pos)
            self._check_record_header(pos, content_type, major, length)
            payload = pos + _RECORD_HEADER_LEN
            end = payload + length
            if self._hs_len is None:
                self._peek_handshake_header(payload, min(end, len(buf)))
            if self._hs_len is not None:
                self._check_budget(end, len(self._hs) + length)
            if len(buf) < end:
                break
            self._hs += buf[payload:end]
            self._pos = end
            if self._hs_len is not None and len(self._hs) >= self._hs_len:
                return self._finish()
        if len(buf) > self._max_size:
            # Only reachable with many small records: every header looked affordable.
            raise ClientHelloTooLarge(
                Reason.TOO_LARGE, f"no complete ClientHello within {self._max_size} bytes"
            )
        return None

    def _classify_first_bytes(self) -> bool:
        """True once the stream is known to start with a TLS record; raise NotTLS otherwise."""
        buf = self._buf
        if not buf:
            return False
        first = buf[0]
        if first == _CONTENT_HANDSHAKE:
            if len(buf) < 2:
                return False
            if buf[1] != 3:
                raise NotTLS(Reason.NOT_TLS, f"handshake byte followed by 0x{buf[1]:02x}, not 0x03")
            return True
        if first & 0x80:
            # SSLv2 record: 2-byte length with the high bit set, then message type 1.
            if len(buf) < 3:
                return False
            if buf[2] == 1:
                raise NotTLS(Reason.SSLV2_HELLO, "SSLv2-compatible ClientHello (not supported)")
            raise NotTLS(Reason.NOT_TLS, f"first byte 0x{first:02x} is not a TLS record type")
        head = bytes(buf[:_LONGEST_SIGNATURE])
        could_still_match = False
        for signature, reason, looks_like_http in _NOT_TLS_SIGNATURES:
            if head.startswith(signature):
                raise NotTLS(
                    reason, f"not TLS: starts with {signature!r}", looks_like_http=looks_like_http
                )
            could_still_match = could_still_match or signature.startswith(head)
        if could_still_match:
            return False
        raise NotTLS(Reason.NOT_TLS, f"first byte 0x{first:02x} is not a TLS handshake record")

    def _check_record_header(self, pos: int, content_type: int, major: int, length: int) -> None:
        if content_type != _CONTENT_HANDSHAKE:
            if content_type == _CONTENT_ALERT:
                raise MalformedClientHello(
                    Reason.UNEXPECTED_ALERT,
                    f"alert record at offset {pos} before the hello completed",
                )
            raise MalformedClientHello(
                Reason.UNEXPECTED_CONTENT_TYPE,
                f"record type {content_type} at offset {pos} before the hello completed",
            )
        if major != 3:
            raise MalformedClientHello(
                Reason.BAD_RECORD_VERSION, f"record at offset {pos} has major version {major}"
            )
        if length == 0:
            # RFC 8446 s5.1: zero-length handshake fragments MUST NOT be sent.
            raise MalformedClientHello(
                Reason.EMPTY_RECORD, f"empty handshake record at offset {pos}"
            )
        if length > _MAX_FRAGMENT:
            raise MalformedClientHello(
                Reason.RECORD_OVERFLOW,
                f"record at offset {pos} is {length} bytes (max {_MAX_FRAGMENT})",
            )
        end = pos + _RECORD_HEADER_LEN + length
        if end > self._max_size:
            raise ClientHelloTooLarge(
                Reason.TOO_LARGE, f"record at offset {pos} ends at byte {end} > {self._max_size}"
            )

    def _peek_handshake_header(self, payload: int, available_end: int) -> None:
        """Read the 4-byte handshake header as soon as it exists, even mid-record."""
        have = len(self._hs)  # < 4 here: _hs_len is set as soon as 4 bytes exist
        missing = _HANDSHAKE_HEADER_LEN - have
        if available_end - payload < missing:
            return
        header = bytes(self._hs) + bytes(self._buf[payload : payload + missing])
        msg_type = header[0]
        if msg_type != _HANDSHAKE_CLIENT_HELLO:
            raise MalformedClientHello(
                Reason.NOT_CLIENT_HELLO, f"first handshake message has type {msg_type}, not 1"
            )
        body_len = int.from_bytes(header[1:4], "big")
        if body_len > MAX_CLIENT_HELLO_BODY:
            raise ClientHelloTooLarge(
                Reason.TOO_LARGE,
                f"ClientHello body of {body_len} bytes (max {MAX_CLIENT_HELLO_BODY})",
            )
        if body_len < _MIN_BODY_LEN:
            raise MalformedClientHello(
                Reason.HELLO_TOO_SHORT,
                f"ClientHello body of {body_len} bytes (min {_MIN_BODY_LEN})",
            )
        self._hs_len = _HANDSHAKE_HEADER_LEN + body_len

    def _check_budget(self, record_end: int, covered: int) -> None:
        """Refuse when the rest of the hello cannot fit in max_size even in full records.

        ``covered`` handshake bytes are carried by records ending at ``record_end``.
        """
        assert self._hs_len is not None
        remaining = self._hs_len - covered
        if remaining <= 0:
            return
        records = -(-remaining // _MAX_FRAGMENT)
        least_total = record_end + remaining + records * _RECORD_HEADER_LEN
        if least_total > self._max_size:
            raise ClientHelloTooLarge(
                Reason.TOO_LARGE,
                f"ClientHello of {self._hs_len} bytes needs at least {least_total} bytes "
                f"on the wire (max {self._max_size})",
            )

    def _finish(self) -> ClientHello:
        assert self._hs_len is not None
        if len(self._hs) > self._hs_len:
            raise MalformedClientHello(
                Reason.TRAILING_HANDSHAKE_DATA,
                f"{len(self._hs) - self._hs_len} bytes follow the ClientHello in its record",
            )
        body = bytes(self._hs[_HANDSHAKE_HEADER_LEN:])
        return _parse_body(body, raw=bytes(self._buf[: self._pos]))


def parse_client_hello(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> ClientHello | None:
    """Parse a ClientHello from the start of ``data``; ``None`` means more bytes are needed."""
    result = ClientHelloParser(max_size).feed(data)
    return None if result is NEED_DATA else result


# --- the body -----------------------------------------------------------------------------


def _malformed(reason: Reason, message: str) -> MalformedClientHello:
    return MalformedClientHello(reason, message)


def _vector(data: bytes, pos: int, end: int, len_size: int, reason: Reason, what: str) -> int:
    """Return the end offset of the length-prefixed vector at ``pos``; bounds-checked."""
    if end - pos < len_size:
        raise _malformed(reason, f"{what}: length field truncated at offset {pos}")
    length = int.from_bytes(data[pos : pos + len_size], "big")
    vec_end = pos + len_size + length
    if vec_end > end:
        raise _malformed(
            reason, f"{what}: {length} bytes announced at offset {pos}, {end - pos - len_size} left"
        )
    return vec_end


def _bad_vector(
    data: bytes, pos: int, end: int, len_size: int, reason: Reason, what: str
) -> NoReturn:
    """Raise the error ``_vector`` names for a vector the fast checks found out of bounds."""
    _vector(data, pos, end, len_size, reason, what)
    raise AssertionError(f"{what} at offset {pos} is within bounds")  # pragma: no cover


def _raise_if_duplicate(types: list[int]) -> None:
    """RFC 8446 s4.2: at most one extension of each type. Names the first repeat in order."""
    if len(set(types)) != len(types):
        seen: set[int] = set()
        for ext_type in types:
            if ext_type in seen:
                raise _malformed(Reason.DUPLICATE_EXTENSION, f"extension {ext_type} appears twice")
            seen.add(ext_type)


_PARSED_EXTENSIONS: Final = frozenset(
    {_EXT_SERVER_NAME, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS, _EXT_SESSION_TICKET, _EXT_PRE_SHARED_KEY}
)


def _parse_body(body: bytes, *, raw: bytes) -> ClientHello:
    """One pass over the ClientHello body (RFC 8446 s4.1.2, RFC 5246 s7.4.1.2).

    Runs once per connection, so the bounds checks are inline and the error messages are
    built (by ``_vector``) only on the error path. Duplicate extensions are looked for when
    something else fails and once at the end, which names the same first error a check at
    every extension would.
    """
    end = len(body)  # at least _MIN_BODY_LEN: the handshake header check saw to that
    if body[0] != 3:
        legacy = (body[0] << 8) | body[1]
        raise _malformed(Reason.BAD_LEGACY_VERSION, f"legacy_version 0x{legacy:04x}")
    legacy_version = 0x300 | body[1]
    pos = 2 + 32  # legacy_version, random

    nxt = pos + 1 + body[pos]
    if nxt > end:
        _bad_vector(body, pos, end, 1, Reason.BAD_SESSION_ID, "legacy_session_id")
    if nxt - pos - 1 > 32:
        raise _malformed(Reason.BAD_SESSION_ID, f"legacy_session_id of {nxt - pos - 1} bytes")
    pos = nxt

    if end - pos < 2 or (nxt := pos + 2 + ((body[pos] << 8) | body[pos + 1])) > end:
        _bad_vector(body, pos, end, 2, Reason.BAD_CIPHER_SUITES, "cipher_suites")
    cs_len = nxt - pos - 2
    if cs_len < 2 or cs_len % 2:
        raise _malformed(Reason.BAD_CIPHER_SUITES, f"cipher_suites vector of {cs_len} bytes")
    cipher_suites = struct.unpack_from(f">{cs_len // 2}H", body, pos + 2)
    pos = nxt

    if pos >= end or (nxt := pos + 1 + body[pos]) > end:
        _bad_vector(body, pos, end, 1, Reason.BAD_COMPRESSION_METHODS, "compression_methods")
    if nxt - pos - 1 < 1:
        raise _malformed(Reason.BAD_COMPRESSION_METHODS, "empty compression_methods")
    pos = nxt

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] | None = None
    tls12_ticket: bytes | None = None
    psk_identity: bytes | None = None
    types: list[int] = []
    if pos < end:  # a TLS 1.2 hello may omit the extensions block entirely
        if end - pos < 2 or (ext_end := pos + 2 + ((body[pos] << 8) | body[pos + 1])) > end:
            _bad_vector(body, pos, end, 2, Reason.BAD_EXTENSIONS, "extensions")
        if ext_end != end:
            raise _malformed(Reason.TRAILING_DATA, f"{end - ext_end} bytes after the extensions")
        pos += 2
        unpack = _EXT_HEADER.unpack_from
        append = types.append
        while pos < ext_end:
            if ext_end - pos < 4:
                _raise_if_duplicate(types)
                raise _malformed(
                    Reason.BAD_EXTENSIONS, f"truncated extension header at offset {pos}"
                )
            ext_type, ext_len = unpack(body, pos)
            start = pos + 4
            pos = start + ext_len
            if pos > ext_end:
                _raise_if_duplicate(types)
                raise _malformed(
                    Reason.BAD_EXTENSIONS,
                    f"extension {ext_type} announces {ext_len} bytes, {ext_end - start} left",
                )
            append(ext_type)
            if ext_type in _PARSED_EXTENSIONS:
                try:
                    if ext_type == _EXT_SERVER_NAME:
                        sni = _parse_server_name(body, start, pos)
                    elif ext_type == _EXT_ALPN:
                        alpn = _parse_alpn(body, start, pos)
                    elif ext_type == _EXT_SUPPORTED_VERSIONS:
                        versions = _parse_supported_versions(body, start, pos)
                    elif ext_type == _EXT_SESSION_TICKET:
                        tls12_ticket = body[start:pos] or None
                    else:
                        psk_identity = _first_psk_identity(body, start, pos)
                except ClientHelloError:
                    _raise_if_duplicate(types)
                    raise
        _raise_if_duplicate(types)

    return ClientHello(
        sni=sni,
        alpn_protocols=alpn,
        supported_versions=versions if versions is not None else (legacy_version,),
        legacy_version=legacy_version,
        cipher_suites=cipher_suites,
        extensions=tuple(types),
        raw=raw,
        ticket=psk_identity if psk_identity is not None else tls12_ticket,
    )


def _first_psk_identity(body: bytes, pos: int, end: int) -> bytes | None:
    """RFC 8446 s4.2.11 OfferedPsks: the first identity, or None when it does not parse."""
    if end - pos < 4:
        return None
    identities_end = pos + 2 + ((body[pos] << 8) | body[pos + 1])
    identity_end = pos + 4 + ((body[pos + 2] << 8) | body[pos + 3])
    if identities_end > end or identity_end > identities_end:
        return None
    return body[pos + 4 : identity_end] or None


def _parse_server_name(body: bytes, pos: int, end: int) -> str | None:
    """RFC 6066 s3: the first (and only) host_name entry; other name types are skipped."""
    if end - pos < 2 or (list_end := pos + 2 + ((body[pos] << 8) | body[pos + 1])) > end:
        _bad_vector(body, pos, end, 2, Reason.BAD_SERVER_NAME, "server_name list")
    if list_end != end or list_end - pos == 2:
        raise _malformed(
            Reason.BAD_SERVER_NAME, "server_name list length does not fill the extension"
        )
    pos += 2
    host: bytes | None = None
    while pos < end:
        name_type = body[pos]
        if end - pos < 3 or (name_end := pos + 3 + ((body[pos + 1] << 8) | body[pos + 2])) > end:
            _bad_vector(body, pos + 1, end, 2, Reason.BAD_SERVER_NAME, "server_name entry")
        if name_type == _SNI_HOST_NAME:
            if host is not None:
                raise _malformed(Reason.TWO_HOST_NAMES, "more than one host_name entry")
            host = body[pos + 3 : name_end]
        pos = name_end
    if host is None:
        return None
    if not host:  # HostName<1..2^16-1>
        raise _malformed(Reason.BAD_SERVER_NAME, "empty host_name")
    if host.translate(None, _PRINTABLE_NO_SPACE):
        raise _malformed(Reason.BAD_HOST_NAME, f"host_name {host[:64]!r} is not printable ASCII")
    name = host.decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise _malformed(Reason.BAD_HOST_NAME, "host_name is just '.'")
    return name


def _parse_alpn(body: bytes, pos: int, end: int) -> tuple[str, ...]:
    """RFC 7301 s3.1 ProtocolNameList, in client order, GREASE names dropped."""
    if end - pos < 2 or (list_end := pos + 2 + ((body[pos] << 8) | body[pos + 1])) > end:
        _bad_vector(body, pos, end, 2, Reason.BAD_ALPN, "ALPN list")
    if list_end != end or list_end - pos == 2:
        raise _malformed(Reason.BAD_ALPN, "ALPN list length does not fill the extension")
    pos += 2
    names: list[str] = []
    while pos < end:
        name_end = pos + 1 + body[pos]  # pos < end here
        if name_end > end:
            _bad_vector(body, pos, end, 1, Reason.BAD_ALPN, "ALPN protocol name")
        name = body[pos + 1 : name_end]
        if not name:
            raise _malformed(Reason.BAD_ALPN, "empty ALPN protocol name")
        if name not in _GREASE_ALPN:
            names.append(name.decode("latin-1"))
        pos = name_end
    return tuple(names)


def _parse_supported_versions(body: bytes, pos: int, end: int) -> tuple[int, ...]:
    """RFC 8446 s4.2.1 client form, GREASE removed (may leave an empty tuple)."""
    list_end = _vector(body, pos, end, 1, Reason.BAD_SUPPORTED_VERSIONS, "supported_versions")
    list_len = list_end - pos - 1
    if list_end != end or list_len < 2 or list_len % 2:
        raise _malformed(
            Reason.BAD_SUPPORTED_VERSIONS, f"supported_versions list of {list_len} bytes"
        )
    values: tuple[int, ...] = struct.unpack_from(f">{list_len // 2}H", body, pos + 1)
    if _GREASE.isdisjoint(values):
        return values
    return tuple(v for v in values if v not in _GREASE)
