"""Errors of the TLS layer, and the one table that turns OpenSSL's error text into reason tokens.

Owns: ``TLSHandshakeError``, ``InvalidCertificate`` and
``reason_from_openssl`` (a pure function over the ``(library, function, reason)`` strings that
OpenSSL puts on its error queue). Must not know: streams, sockets, pyOpenSSL objects.

Reason tokens are a small closed vocabulary, safe as metric labels: every OpenSSL string we do
not recognise becomes ``protocol_error`` (the original text stays in ``detail``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import trio

from ..errors import EdgeproxyError, PeerError

PROTOCOL_ERROR: Final = "protocol_error"
PEER_CLOSED: Final = "peer_closed"
RENEGOTIATION_REFUSED: Final = "renegotiation_refused"


class TLSHandshakeError(PeerError, trio.BrokenResourceError):
    """The TLS handshake failed; ``reason`` is a short token, ``detail`` OpenSSL's own words.

    Also a ``trio.BrokenResourceError``: a stream whose handshake failed is broken, and generic
    stream code (``send_all`` / ``receive_some`` run the handshake lazily) expects that type.

    Typical reasons: ``no_shared_cipher``, ``unsupported_protocol`` (version floor or the peer's
    protocol_version alert), ``unknown_ca`` and other peer alerts by their RFC 8446 name,
    ``peer_closed`` (EOF or reset mid-handshake), ``bad_record`` (not TLS, or garbage),
    ``http_request`` (plain HTTP sent to the TLS port), ``no_application_protocol``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"TLS handshake failed: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


class InvalidCertificate(EdgeproxyError):
    """A certificate chain or key cannot be used to build a context.

    ``reason``: ``no_certificate`` (empty chain or no PEM block), ``bad_pem``, ``key_mismatch``
    (the key does not belong to the leaf), ``unsupported_key``, ``rejected`` (OpenSSL refused
    the certificate or key, e.g. too weak for its security level).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"unusable certificate: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


# OpenSSL reason strings (lower case, as ERR_reason_error_string gives them) -> token.
_REASONS: Final[Mapping[str, str]] = {
    "no shared cipher": "no_shared_cipher",
    "no cipher match": "no_shared_cipher",
    "no ciphers available": "no_shared_cipher",
    "no suitable key share": "no_shared_group",
    "no shared groups": "no_shared_group",
    "no suitable signature algorithm": "no_shared_sigalg",
    "no shared signature algorithms": "no_shared_sigalg",
    "unsupported protocol": "unsupported_protocol",
    "no protocols available": "unsupported_protocol",
    "version too low": "unsupported_protocol",
    "version too high": "unsupported_protocol",
    "wrong ssl version": "unsupported_protocol",
    "inappropriate fallback": "unsupported_protocol",
    "wrong version number": "bad_record",
    "unknown protocol": "bad_record",
    "packet length too long": "bad_record",
    "record layer failure": "bad_record",
    "record length mismatch": "bad_record",
    "bad record type": "bad_record",
    "bad record mac": "bad_record",
    "decryption failed or bad record mac": "bad_record",
    "decryption failed": "bad_record",
    "encrypted length too long": "bad_record",
    "data length too long": "bad_record",
    "record too small": "bad_record",
    "wrong version": "bad_record",
    "length mismatch": "bad_handshake_message",
    "length too short": "bad_handshake_message",
    "bad length": "bad_handshake_message",
    "bad packet length": "bad_handshake_message",
    "bad packet": "bad_handshake_message",
    "bad extension": "bad_handshake_message",
    "excessive message size": "bad_handshake_message",
    "parse tlsext": "bad_handshake_message",
    "bad key share": "bad_handshake_message",
    "bad handshake length": "bad_handshake_message",
    "unexpected message": "unexpected_message",
    "unexpected record": "unexpected_message",
    "unexpected ccs message": "unexpected_message",
    "ccs received early": "unexpected_message",
    "http request": "http_request",
    "https proxy request": "http_request",
    "unexpected eof while reading": PEER_CLOSED,
    "no renegotiation": RENEGOTIATION_REFUSED,
    "unsafe legacy renegotiation disabled": RENEGOTIATION_REFUSED,
    "renegotiation mismatch": RENEGOTIATION_REFUSED,
    "no application protocol": "no_application_protocol",
    "certificate verify failed": "certificate_verify_failed",
    "shutdown while in init": PEER_CLOSED,
    "protocol is shutdown": PEER_CLOSED,
}

# TLS alert descriptions (RFC 8446 section 6, RFC 5246 section 7.2) as OpenSSL spells them,
# minus its "sslv3 alert " / "tlsv1 alert " / "tlsv13 alert " / "tls alert " (OpenSSL 4)
# or "ssl/tls alert " prefix.
_ALERTS: Final[Mapping[str, str]] = {
    "close notify": PEER_CLOSED,
    "unexpected message": "unexpected_message",
    "bad record mac": "bad_record",
    "decryption failed": "bad_record",
    "record overflow": "bad_record",
    "decompression failure": "decompression_failure",
    "handshake failure": "handshake_failure",
    "no certificate": "no_certificate",
    "bad certificate": "bad_certificate",
    "unsupported certificate": "unsupported_certificate",
    "certificate revoked": "certificate_revoked",
    "certificate expired": "certificate_expired",
    "certificate unknown": "certificate_unknown",
    "illegal parameter": "illegal_parameter",
    "unknown ca": "unknown_ca",
    "access denied": "access_denied",
    "decode error": "decode_error",
    "decrypt error": "decrypt_error",
    "export restriction": "export_restriction",
    "protocol version": "unsupported_protocol",
    "insufficient security": "insufficient_security",
    "internal error": "internal_error",
    "inappropriate fallback": "inappropriate_fallback",
    "user cancelled": "user_canceled",
    "user canceled": "user_canceled",
    "no renegotiation": RENEGOTIATION_REFUSED,
    "missing extension": "missing_extension",
    "unsupported extension": "unsupported_extension",
    "certificate unobtainable": "certificate_unobtainable",
    "unrecognized name": "unrecognized_name",
    "bad certificate status response": "bad_certificate_status_response",
    "bad certificate hash value": "bad_certificate_hash_value",
    "unknown psk identity": "unknown_psk_identity",
    "certificate required": "certificate_required",
    "no application protocol": "no_application_protocol",
}

_ALERT_PREFIX: Final = re.compile(r"^(?:sslv3|tlsv1|tlsv13|tls|ssl/tls)(?: alert)? ")


def _classify_one(reason: str) -> str | None:
    text = reason.strip().lower()
    token = _REASONS.get(text)
    if token is not None:
        return token
    match = _ALERT_PREFIX.match(text)
    if match is not None:
        return _ALERTS.get(text[match.end() :])
    return None


def reason_from_openssl(entries: Iterable[Sequence[str]]) -> str:
    """The reason token for OpenSSL error-queue entries ``(library, function, reason)``.

    The first entry that maps to a known token wins (OpenSSL queues the root cause first);
    unknown text gives ``protocol_error``.
    """
    for entry in entries:
        if len(entry) >= 3 and isinstance(entry[2], str):
            token = _classify_one(entry[2])
            if token is not None:
                return token
    return PROTOCOL_ERROR


def describe_openssl(entries: Iterable[Sequence[str]]) -> str:
    """OpenSSL's reason strings joined for humans (the ``detail`` of our errors)."""
    return "; ".join(str(e[2]) for e in entries if len(e) >= 3 and e[2])
