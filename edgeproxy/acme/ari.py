"""ACME Renewal Information (ARI, RFC 9773): the pure decisions, no I/O.

This module owns four things: naming a certificate the way an ARI server expects (the CertID,
RFC 9773 s4.1), turning a RenewalInfo response into a checked value (s4.2, with the Retry-After
polling hint of s4.3), picking the moment to renew inside the suggested window (s4.2), and
the pace of asking again after a failed request (s4.3.3). Callers fetch the resource and
schedule the work; this module never touches the network or the clock: ``now`` and the random
source are arguments, so every case is a unit test with plain values. Reading the Retry-After
header itself is ``messages.parse_retry_after``'s job; this module only applies ARI's limits to
the result.

It must not know about httpx, the directory, storage or the certificate manager. The client
(``acme/client.py``) fetches ``GET {renewalInfo}/{cert_id}`` and calls ``parse_renewal_info``;
the certificate manager calls ``choose_renewal_time`` and sleeps until then.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from edgeproxy.acme.errors import AcmeProtocolError
from edgeproxy.acme.jws import b64url
from edgeproxy.acme.messages import parse_retry_after

__all__ = [
    "RETRY_AFTER_DEFAULT",
    "RETRY_AFTER_MAX",
    "RETRY_AFTER_MIN",
    "RenewalInfo",
    "cert_id",
    "choose_renewal_time",
    "error_retry_delay",
    "is_long_term_error",
    "parse_renewal_info",
]

# RFC 9773 s4.3: clients SHOULD treat Retry-After under one minute as one minute and over one
# day as one day, so a buggy or hostile server can neither make us hammer it nor go silent.
RETRY_AFTER_MIN = 60.0
RETRY_AFTER_MAX = 86400.0
# RFC 9773 s4.3 treats a missing or unreadable Retry-After as a long-term error and polls
# again after six hours; the window itself is still usable, so we keep it and use that pace.
RETRY_AFTER_DEFAULT = 6 * 3600.0
# RFC 9773 s4.3.3: after a long-term error (the CA does not know the CertID, or has no ARI
# for it) ask again after six hours; short-term errors back off exponentially from one
# minute up to the same six hours.
LONG_TERM_ERROR_RETRY = 6 * 3600.0
SHORT_TERM_ERROR_FIRST = 60.0

# RFC 3339 date-time (s5.6). fromisoformat alone would also take date-only and naive values,
# which RFC 9773 does not allow and which would silently mean "local time".
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)


def _der_integer_contents(value: int) -> bytes:
    # DER INTEGER contents are the minimal two's-complement octets, so a positive serial whose
    # top bit is set gains a leading 0x00 (RFC 9773 s4.1 uses exactly these octets, not the
    # bare magnitude). ``~value`` gives the right width for the (non-conformant, but seen in
    # the wild) negative serials.
    width = (value if value >= 0 else ~value).bit_length() // 8 + 1
    return value.to_bytes(width, "big", signed=True)


def cert_id(cert: x509.Certificate) -> str:
    """The ARI CertID of ``cert`` (RFC 9773 s4.1), also used for newOrder ``replaces`` (s5).

    ``base64url(AKI keyIdentifier) "." base64url(DER INTEGER contents of the serial)``, both
    without padding. Raises ``AcmeProtocolError`` if the certificate has no Authority Key
    Identifier with a keyIdentifier: such a certificate cannot be named to an ARI server.
    """
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise AcmeProtocolError(
            "certificate has no Authority Key Identifier extension; it has no ARI CertID"
        ) from None
    if aki.key_identifier is None:
        raise AcmeProtocolError(
            "certificate's Authority Key Identifier has no keyIdentifier; it has no ARI CertID"
        )
    return f"{b64url(aki.key_identifier)}.{b64url(_der_integer_contents(cert.serial_number))}"


@dataclass(frozen=True, slots=True)
class RenewalInfo:
    """A checked RenewalInfo response (RFC 9773 s4.2).

    ``start`` < ``end`` and both are timezone-aware UTC. ``retry_after`` is how many seconds to
    wait before asking again (s4.3), already clamped to [``RETRY_AFTER_MIN``,
    ``RETRY_AFTER_MAX``]. ``explanation_url`` is for humans (why the CA wants an early
    renewal); it never changes what the client does.
    """

    start: datetime
    end: datetime
    explanation_url: str | None
    retry_after: float


def _parse_timestamp(value: object, field: str) -> datetime:
    if not isinstance(value, str) or _RFC3339.fullmatch(value) is None:
        raise AcmeProtocolError(
            f"renewalInfo suggestedWindow.{field} is not an RFC 3339 date-time: {value!r}"
        )
    try:
        # ValueError: well-formed but impossible (month 13, second 60); OverflowError: an
        # offset that pushes year 1 or 9999 out of range once converted to UTC.
        return datetime.fromisoformat(value.upper()).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise AcmeProtocolError(
            f"renewalInfo suggestedWindow.{field} is not a valid date-time: {value!r}"
        ) from exc


def _retry_after_seconds(header: str | None, now: datetime) -> float:
    seconds = parse_retry_after(header, now)
    if seconds is None:
        return RETRY_AFTER_DEFAULT
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)


def parse_renewal_info(body: bytes, retry_after_header: str | None, now: datetime) -> RenewalInfo:
    """Check a ``GET {renewalInfo}/{certID}`` 200 response (RFC 9773 s4.2, s4.3).

    ``body`` is the JSON object ``{"suggestedWindow": {"start", "end"}, "explanationURL"?}``;
    ``retry_after_header`` is the raw Retry-After value (delta-seconds or HTTP-date) or None;
    ``now`` (timezone-aware) anchors an HTTP-date. A missing or unreadable Retry-After gives
    ``RETRY_AFTER_DEFAULT``; any value is clamped to [60 s, 1 day].

    Raises ``AcmeProtocolError`` when the body is not such an object, a timestamp is not
    RFC 3339 with an offset, or ``end`` is not after ``start``: s4.2 says to treat such a
    window as if no response had arrived, so the caller falls back to its own schedule.
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: too deep
        raise AcmeProtocolError(f"renewalInfo response is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise AcmeProtocolError("renewalInfo response is not a JSON object")
    window = doc.get("suggestedWindow")
    if not isinstance(window, dict):
        raise AcmeProtocolError("renewalInfo response has no suggestedWindow object")
    start = _parse_timestamp(window.get("start"), "start")
    end = _parse_timestamp(window.get("end"), "end")
    if end <= start:
        raise AcmeProtocolError(
            f"renewalInfo suggestedWindow ends ({end.isoformat()}) "
            f"at or before it starts ({start.isoformat()})"
        )
    explanation = doc.get("explanationURL")
    if explanation is not None and not isinstance(explanation, str):
        raise AcmeProtocolError("renewalInfo explanationURL is not a string")
    return RenewalInfo(
        start=start,
        end=end,
        explanation_url=explanation,
        retry_after=_retry_after_seconds(retry_after_header, now),
    )


def choose_renewal_time(
    info: RenewalInfo, now: datetime, rand: Callable[[], float] = random.random
) -> datetime:
    """When to renew: a uniformly random instant in the suggested window (RFC 9773 s4.2).

    ``rand`` returns a float in [0, 1] (``random.random`` by default; tests pass a constant).

    - window entirely ahead: uniform in [start, end];
    - ``end <= now`` (the CA wants the certificate replaced already): ``now``;
    - ``start < now < end``: uniform in [now, end]. s4.2 draws from the whole window and
      renews at once if the draw is in the past; that would send every client that learns of
      a window late (restart, a freshly shortened window for a mass revocation) to the CA in
      the same instant. Drawing from the part still ahead keeps the spread the CA asked for.
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if now >= info.end:
        return now
    lower = max(info.start, now)
    fraction = rand()
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rand() must return a value in [0, 1], got {fraction!r}")
    return lower + (info.end - lower) * fraction


def is_long_term_error(status: int) -> bool:
    """Is a renewalInfo failure with this HTTP status a long-term one (RFC 9773 s4.3.3)?

    ``status`` is the HTTP status of the CA's answer, 0 when none came (transport failure).
    A 4xx other than 429 says the CA will not have a window for this CertID any time soon
    (404 "Certificate not found" from a CA that does not know RFC 9773 CertIDs, 400
    malformed, 403); 429, 5xx and no answer at all are short-term.
    """
    return 400 <= status < 500 and status != 429


def error_retry_delay(long_term: bool, failures: int, retry_after: float | None = None) -> float:
    """Seconds until the next renewalInfo request after ``failures`` consecutive failures.

    Long-term: six hours. Short-term: 60 s doubling per failure (``failures`` >= 1), capped
    at six hours. A Retry-After from the CA lengthens either, within ARI's [1 min, 1 day].
    """
    if long_term:
        delay = LONG_TERM_ERROR_RETRY
    else:
        exponent = min(max(failures, 1) - 1, 16)
        delay = min(SHORT_TERM_ERROR_FIRST * 2.0**exponent, LONG_TERM_ERROR_RETRY)
    if retry_after is not None:
        delay = max(delay, min(max(retry_after, RETRY_AFTER_MIN), RETRY_AFTER_MAX))
    return delay
