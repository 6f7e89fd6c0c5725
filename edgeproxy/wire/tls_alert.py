"""Plaintext TLS alert records, for refusing a ClientHello before any handshake state exists.

When we decide from the peeked ClientHello that we will not serve a name, there is no OpenSSL
connection yet; an alert is unencrypted at that point (RFC 8446 s5.1, RFC 5246 s7.2), so
writing the 7-byte record ourselves is both correct and cheap.
"""

from __future__ import annotations

from enum import IntEnum


class AlertDescription(IntEnum):
    """RFC 8446 s6 AlertDescription values edgeproxy itself sends."""

    UNEXPECTED_MESSAGE = 10
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    ILLEGAL_PARAMETER = 47
    DECODE_ERROR = 50
    PROTOCOL_VERSION = 70
    INTERNAL_ERROR = 80
    UNRECOGNIZED_NAME = 112
    NO_APPLICATION_PROTOCOL = 120


_FATAL = 2
_ALERT_CONTENT_TYPE = 21


def alert_record(description: AlertDescription) -> bytes:
    """A fatal alert record (record-layer version TLS 1.2, as TLS 1.3 also sends)."""
    return bytes((_ALERT_CONTENT_TYPE, 3, 3, 0, 2, _FATAL, int(description)))


_HTTP_BODY = b"This port speaks TLS. Use https:// to connect here.\n"

# Sent when plain HTTP arrives on the TLS port: a human-readable answer beats a silent close.
HTTP_ON_TLS_PORT = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_HTTP_BODY)).encode() + b"\r\n"
    b"\r\n" + _HTTP_BODY
)
