"""ARI (RFC 9773) pure functions: CertID, RenewalInfo parsing, the renewal instant."""

from __future__ import annotations

import base64
import email.utils
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.acme.ari import (
    RETRY_AFTER_DEFAULT,
    RETRY_AFTER_MAX,
    RETRY_AFTER_MIN,
    RenewalInfo,
    cert_id,
    choose_renewal_time,
    error_retry_delay,
    is_long_term_error,
    parse_renewal_info,
)
from edgeproxy.acme.errors import AcmeProtocolError

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
_KEY = ec.generate_private_key(ec.SECP256R1())
_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari.test")])


def _cert(serial: int, aki: x509.AuthorityKeyIdentifier | None) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_NAME)
        .issuer_name(_NAME)
        .public_key(_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=90))
    )
    if aki is not None:
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(_KEY, hashes.SHA256())


def _aki(key_id: bytes) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier(key_id, None, None)


def _unb64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _der_serial_octets(cert: x509.Certificate) -> bytes:
    """The serialNumber INTEGER's contents octets, read straight out of the TBS DER.

    An oracle independent of ari.py's arithmetic: TBSCertificate ::= SEQUENCE { [0] version,
    serialNumber INTEGER, ... } and every element here is short enough for a one-byte length
    or a 0x81/0x82 long form.
    """
    der = cert.tbs_certificate_bytes

    def header(pos: int) -> tuple[int, int, int]:  # tag, content length, content offset
        tag, first = der[pos], der[pos + 1]
        if first < 0x80:
            return tag, first, pos + 2
        n = first & 0x7F
        return tag, int.from_bytes(der[pos + 2 : pos + 2 + n], "big"), pos + 2 + n

    _, _, pos = header(0)  # TBSCertificate SEQUENCE
    tag, length, body = header(pos)
    assert tag == 0xA0  # [0] EXPLICIT version
    tag, length, body = header(body + length)
    assert tag == 0x02  # serialNumber INTEGER
    return der[body : body + length]


# --- CertID (RFC 9773 s4.1) ---------------------------------------------------------------


def test_cert_id_matches_rfc9773_appendix_a_example() -> None:
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = _cert(0x87654321, _aki(aki))

    assert cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_serial_without_high_bit_gets_no_leading_zero() -> None:
    cert = _cert(0x12345678, _aki(b"\x01\x02\x03"))

    assert cert_id(cert) == "AQID.EjRWeA"


@pytest.mark.parametrize(
    ("serial", "octets"),
    [
        (1, b"\x01"),
        (0x7F, b"\x7f"),
        (0x80, b"\x00\x80"),
        (0xFF, b"\x00\xff"),
        (0x0100, b"\x01\x00"),
        (0x7FFF, b"\x7f\xff"),
        (0x8000, b"\x00\x80\x00"),
    ],
)
def test_serial_octets_at_byte_boundaries(serial: int, octets: bytes) -> None:
    cert = _cert(serial, _aki(b"\xaa"))

    _, serial_part = cert_id(cert).split(".")

    assert _unb64url(serial_part) == octets == _der_serial_octets(cert)


@settings(max_examples=60, deadline=None)
@given(
    serial=st.integers(min_value=1, max_value=2**159 - 1),
    key_id=st.binary(min_size=1, max_size=32),
)
def test_cert_id_halves_are_the_aki_and_the_der_serial_octets(serial: int, key_id: bytes) -> None:
    cert = _cert(serial, _aki(key_id))

    ident = cert_id(cert)
    aki_part, serial_part = ident.split(".")

    assert "=" not in ident
    assert _unb64url(aki_part) == key_id
    assert _unb64url(serial_part) == _der_serial_octets(cert)


def test_cert_id_of_a_ca_issued_leaf_uses_the_issuers_key_identifier() -> None:
    ca = trustme.CA()
    leaf = x509.load_pem_x509_certificate(ca.issue_cert("leaf.test").cert_chain_pems[0].bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    aki_part, _ = cert_id(leaf).split(".")

    assert _unb64url(aki_part) == ski


def test_cert_id_without_aki_is_an_error() -> None:
    with pytest.raises(AcmeProtocolError, match="Authority Key Identifier"):
        cert_id(_cert(1234, None))


def test_cert_id_with_aki_but_no_key_identifier_is_an_error() -> None:
    aki = x509.AuthorityKeyIdentifier(None, [x509.DirectoryName(_NAME)], 42)

    with pytest.raises(AcmeProtocolError, match="keyIdentifier"):
        cert_id(_cert(1234, aki))


# --- RenewalInfo parsing (RFC 9773 s4.2, s4.3) -------------------------------------------


def _body(
    start: object = "2025-06-20T00:00:00Z", end: object = "2025-06-22T00:00:00Z", **extra: object
) -> bytes:
    return json.dumps({"suggestedWindow": {"start": start, "end": end}, **extra}).encode()


def test_valid_window_with_explanation() -> None:
    body = _body(explanationURL="https://ca.test/incident/42")

    info = parse_renewal_info(body, "21600", NOW)

    assert info == RenewalInfo(
        start=datetime(2025, 6, 20, tzinfo=UTC),
        end=datetime(2025, 6, 22, tzinfo=UTC),
        explanation_url="https://ca.test/incident/42",
        retry_after=21600.0,
    )


def test_explanation_url_is_optional() -> None:
    assert parse_renewal_info(_body(), "3600", NOW).explanation_url is None


def test_offsets_and_long_fractions_are_normalised_to_utc() -> None:
    # Go servers (Boulder, pebble) print nanoseconds; offsets are legal RFC 3339.
    body = _body(start="2025-06-20T02:00:00.123456789+02:00", end="2025-06-21t23:30:00-00:30")

    info = parse_renewal_info(body, None, NOW)

    assert info.start == datetime(2025, 6, 20, 0, 0, 0, 123456, tzinfo=UTC)
    assert info.end == datetime(2025, 6, 22, 0, 0, tzinfo=UTC)
    assert info.start.tzinfo is UTC and info.end.tzinfo is UTC


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"{}",
        b'{"suggestedWindow": null}',
        b'{"suggestedWindow": "2025-06-20T00:00:00Z"}',
        b'{"suggestedWindow": {"start": "2025-06-20T00:00:00Z"}}',
        b'{"suggestedWindow": {"end": "2025-06-20T00:00:00Z"}}',
    ],
    ids=[
        "not-json",
        "not-utf8",
        "array",
        "no-window",
        "null-window",
        "string-window",
        "no-end",
        "no-start",
    ],
)
def test_malformed_body_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(AcmeProtocolError):
        parse_renewal_info(body, None, NOW)


@pytest.mark.parametrize(
    "bad",
    [
        "2025-13-01T00:00:00Z",
        "2025-02-30T00:00:00Z",
        "2025-06-20T24:00:00Z",
        "2025-06-20T23:59:60Z",
        "0001-01-01T00:00:00+01:00",
        "2025-06-20",
        "2025-06-20T00:00:00",
        "20250620T000000Z",
        "next tuesday",
        "",
        1750377600,
        None,
    ],
)
def test_bad_start_date_is_a_protocol_error(bad: object) -> None:
    with pytest.raises(AcmeProtocolError, match="start"):
        parse_renewal_info(_body(start=bad), None, NOW)


def test_bad_end_date_is_a_protocol_error() -> None:
    with pytest.raises(AcmeProtocolError, match="end"):
        parse_renewal_info(_body(end="2025-06-22 noon"), None, NOW)


def test_window_ending_before_it_starts_is_a_protocol_error() -> None:
    with pytest.raises(AcmeProtocolError, match="before it starts"):
        parse_renewal_info(
            _body(start="2025-06-22T00:00:00Z", end="2025-06-20T00:00:00Z"), None, NOW
        )


def test_empty_window_is_a_protocol_error() -> None:
    # RFC 9773 s4.2: end equal to start is as invalid as end before start.
    with pytest.raises(AcmeProtocolError):
        parse_renewal_info(
            _body(start="2025-06-20T00:00:00Z", end="2025-06-20T00:00:00Z"), None, NOW
        )


def test_non_string_explanation_is_a_protocol_error() -> None:
    with pytest.raises(AcmeProtocolError, match="explanationURL"):
        parse_renewal_info(_body(explanationURL=["https://ca.test/"]), None, NOW)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_renewal_info(_body(), "60", NOW.replace(tzinfo=None))


def _http_date(when: datetime) -> str:
    return email.utils.format_datetime(when, usegmt=True)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, RETRY_AFTER_DEFAULT),
        ("3600", 3600.0),
        (" 120 ", 120.0),
        ("60", RETRY_AFTER_MIN),
        ("86400", RETRY_AFTER_MAX),
        ("0", RETRY_AFTER_MIN),
        ("5", RETRY_AFTER_MIN),
        ("86401", RETRY_AFTER_MAX),
        ("31536000", RETRY_AFTER_MAX),
        (_http_date(NOW + timedelta(hours=2)), 7200.0),
        (_http_date(NOW + timedelta(seconds=10)), RETRY_AFTER_MIN),
        (_http_date(NOW - timedelta(days=1)), RETRY_AFTER_MIN),
        (_http_date(NOW + timedelta(days=3)), RETRY_AFTER_MAX),
        ("Sunday, 01-Jun-25 14:00:00 GMT", 7200.0),  # RFC 850 form, obsolete but legal
        ("Sun, 01 Jun 2025 14:00:00 -0000", 7200.0),  # parses as a naive datetime
        ("-5", RETRY_AFTER_DEFAULT),
        ("1.5", RETRY_AFTER_DEFAULT),
        ("soon", RETRY_AFTER_DEFAULT),
        ("", RETRY_AFTER_DEFAULT),
    ],
)
def test_retry_after_is_clamped_to_a_minute_and_a_day(header: str | None, expected: float) -> None:
    assert parse_renewal_info(_body(), header, NOW).retry_after == expected


def test_retry_after_date_is_measured_from_the_given_now() -> None:
    header = _http_date(NOW + timedelta(hours=5))
    later = NOW + timedelta(hours=1)

    assert parse_renewal_info(_body(), header, later).retry_after == 4 * 3600.0


def test_retry_after_date_with_numeric_zone_is_understood() -> None:
    header = "Sun, 01 Jun 2025 16:00:00 +0200"  # 14:00 UTC, two hours after NOW

    assert parse_renewal_info(_body(), header, NOW).retry_after == 7200.0


# --- choose_renewal_time (RFC 9773 s4.2) --------------------------------------------------


def _info(start: datetime, end: datetime) -> RenewalInfo:
    return RenewalInfo(start=start, end=end, explanation_url=None, retry_after=3600.0)


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        (0.0, datetime(2025, 6, 20, tzinfo=UTC)),
        (0.5, datetime(2025, 6, 21, tzinfo=UTC)),
        (1.0, datetime(2025, 6, 22, tzinfo=UTC)),
        (0.25, datetime(2025, 6, 20, 12, tzinfo=UTC)),
    ],
)
def test_future_window_maps_the_random_fraction_linearly(
    fraction: float, expected: datetime
) -> None:
    info = _info(datetime(2025, 6, 20, tzinfo=UTC), datetime(2025, 6, 22, tzinfo=UTC))

    assert choose_renewal_time(info, NOW, lambda: fraction) == expected


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_past_window_means_renew_now(fraction: float) -> None:
    info = _info(NOW - timedelta(days=3), NOW - timedelta(days=1))

    assert choose_renewal_time(info, NOW, lambda: fraction) == NOW


def test_window_ending_exactly_now_means_renew_now() -> None:
    info = _info(NOW - timedelta(days=1), NOW)

    assert choose_renewal_time(info, NOW, lambda: 0.0) == NOW


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.0, NOW), (0.5, NOW + timedelta(hours=6)), (1.0, NOW + timedelta(hours=12))],
)
def test_window_straddling_now_draws_from_what_is_left(fraction: float, expected: datetime) -> None:
    info = _info(NOW - timedelta(hours=12), NOW + timedelta(hours=12))

    assert choose_renewal_time(info, NOW, lambda: fraction) == expected


def test_window_starting_exactly_now_uses_the_whole_window() -> None:
    info = _info(NOW, NOW + timedelta(hours=2))

    assert choose_renewal_time(info, NOW, lambda: 0.5) == NOW + timedelta(hours=1)


def test_other_timezones_in_now_compare_as_instants() -> None:
    info = _info(datetime(2025, 6, 20, tzinfo=UTC), datetime(2025, 6, 22, tzinfo=UTC))
    tokyo_now = NOW.astimezone(timezone(timedelta(hours=9)))

    assert choose_renewal_time(info, tokyo_now, lambda: 0.0) == info.start


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_random_source_out_of_range_is_refused(fraction: float) -> None:
    info = _info(NOW + timedelta(days=1), NOW + timedelta(days=2))

    with pytest.raises(ValueError, match="rand"):
        choose_renewal_time(info, NOW, lambda: fraction)


def test_naive_now_is_refused_when_choosing() -> None:
    info = _info(NOW + timedelta(days=1), NOW + timedelta(days=2))

    with pytest.raises(ValueError, match="timezone-aware"):
        choose_renewal_time(info, NOW.replace(tzinfo=None), lambda: 0.5)


@settings(max_examples=200)
@given(
    start_offset=st.integers(min_value=-(10**7), max_value=10**7),
    length=st.integers(min_value=1, max_value=10**7),
    fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_chosen_time_is_never_before_now_nor_after_the_window(
    start_offset: int, length: int, fraction: float
) -> None:
    start = NOW + timedelta(seconds=start_offset)
    info = _info(start, start + timedelta(seconds=length))

    chosen = choose_renewal_time(info, NOW, lambda: fraction)

    if info.end <= NOW:
        assert chosen == NOW
    else:
        assert max(info.start, NOW) <= chosen <= info.end


def test_default_random_source_stays_in_the_window() -> None:
    info = _info(NOW + timedelta(days=1), NOW + timedelta(days=2))

    draws = {choose_renewal_time(info, NOW) for _ in range(50)}

    assert all(info.start <= d <= info.end for d in draws)
    assert len(draws) > 1  # it is really random, not pinned to an edge


# --- RFC 9773 s4.3.3: how soon to ask again after a failed renewalInfo request -------------


@pytest.mark.parametrize(
    ("status", "long_term"),
    [
        (404, True),
        (400, True),
        (403, True),
        (410, True),
        (429, False),
        (500, False),
        (503, False),
        (0, False),
        (200, False),
        (301, False),
    ],
)
def test_4xx_except_429_is_a_long_term_error(status: int, long_term: bool) -> None:
    assert is_long_term_error(status) is long_term


def test_long_term_error_waits_six_hours_whatever_the_count() -> None:
    assert [error_retry_delay(True, n) for n in (1, 2, 50)] == [6 * 3600.0] * 3


def test_short_term_errors_back_off_from_a_minute_to_six_hours() -> None:
    delays = [error_retry_delay(False, n) for n in range(1, 12)]
    assert delays[:4] == [60.0, 120.0, 240.0, 480.0]
    assert delays[-1] == 6 * 3600.0
    assert delays == sorted(delays)
    assert error_retry_delay(False, 10**6) == 6 * 3600.0  # no overflow on a long outage


def test_retry_after_lengthens_but_stays_within_a_day() -> None:
    assert error_retry_delay(False, 1, retry_after=600.0) == 600.0
    assert error_retry_delay(False, 1, retry_after=1.0) == 60.0  # never sooner than asked min
    assert error_retry_delay(True, 1, retry_after=10**9) == RETRY_AFTER_MAX
