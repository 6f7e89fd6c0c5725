"""Plaintext TLS alert records, for refusing a ClientHello before any handshake state exists.

When we decide from the peeked ClientHello that we will not serve a name, there is no OpenSSL
connection yet; an alert is unencrypted at that point (RFC 8446 s5.1, RFC 5246 s7.2), so
writing the 7-byte record ourselves is both correct and cheap.
"""

from __future__ import annotations

from enum import IntEnum


class AlertDescription(IntEnum):
    """RFC 8446 s6 AlertDescription values (RFC 5246 s7.2, RFC 7301 s3.2): those edgeproxy
    sends, and those ``edgeproxy doctor`` names when a server sends them."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    MISSING_EXTENSION = 109
    UNSUPPORTED_EXTENSION = 110
    UNRECOGNIZED_NAME = 112
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


_FATAL = 2
ALERT_CONTENT_TYPE = 21  # the record layer's ContentType for alerts


def alert_record(description: AlertDescription) -> bytes:
    """A fatal alert record (record-layer version TLS 1.2, as TLS 1.3 also sends)."""
    return bytes((ALERT_CONTENT_TYPE, 3, 3, 0, 2, _FATAL, int(description)))


_HTTP_BODY = b"This port speaks TLS. Use https:// to connect here.\n"

# Sent when plain HTTP arrives on the TLS port: a human-readable answer beats a silent close.
HTTP_ON_TLS_PORT = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_HTTP_BODY)).encode() + b"\r\n"
    b"\r\n" + _HTTP_BODY
)
