"""ACME messages, sans-IO: literal bytes and headers in, typed values and problems out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from edgeproxy.acme.errors import (
    PROBLEM_TYPES,
    AcmeProblem,
    AcmeProtocolError,
    BadNonce,
    Compound,
    RateLimited,
    RejectedIdentifier,
    ServerInternal,
    Unauthorized,
)
from edgeproxy.acme.messages import (
    build_csr,
    new_account_payload,
    new_order_payload,
    parse_authorization,
    parse_directory,
    parse_links,
    parse_order,
    parse_retry_after,
    poll_wait,
    problem_from_json,
    problem_from_response,
    revoke_payload,
    select_chain,
    split_pem_chain,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
ACME = "urn:ietf:params:acme:error:"


def _body(doc: object) -> bytes:
    return json.dumps(doc).encode()


# --- problems ---------------------------------------------------------------------------


@pytest.mark.parametrize(("short", "cls"), sorted(PROBLEM_TYPES.items()))
def test_every_acme_error_type_gets_its_class(short: str, cls: type[AcmeProblem]) -> None:
    problem = problem_from_response(
        400, {"Content-Type": "application/problem+json"}, _body({"type": ACME + short})
    )
    assert type(problem) is cls
    assert problem.acme_type == short
    assert problem.status == 400


def test_rate_limited_carries_retry_after_and_detail() -> None:
    problem = problem_from_response(
        429,
        {"retry-after": "3600", "Content-Type": "application/problem+json"},
        _body({"type": ACME + "rateLimited", "detail": "too many certificates", "status": 429}),
    )
    assert isinstance(problem, RateLimited)
    assert problem.retry_after == 3600.0
    assert problem.detail == "too many certificates"
    assert "too many certificates" in str(problem) and "429" in str(problem)


def test_subproblems_keep_their_identifiers() -> None:
    doc = {
        "type": ACME + "compound",
        "detail": "some identifiers were rejected",
        "subproblems": [
            {
                "type": ACME + "rejectedIdentifier",
                "detail": "policy forbids",
                "identifier": {"type": "dns", "value": "bad.example"},
            },
            {"type": ACME + "caa", "detail": "CAA forbids"},
            "garbage",  # skipped, not fatal: the outer problem is still the news
        ],
    }
    problem = problem_from_response(403, {}, _body(doc))

    assert isinstance(problem, Compound)
    assert [(s.acme_type, s.identifier) for s in problem.subproblems] == [
        ("rejectedIdentifier", "bad.example"),
        ("caa", None),
    ]


def test_unknown_and_non_acme_types_stay_generic() -> None:
    unknown = problem_from_response(400, {}, _body({"type": ACME + "somethingNew"}))
    foreign = problem_from_response(400, {}, _body({"type": "https://ca.example/oops"}))
    untyped = problem_from_response(500, {}, _body({"detail": "boom"}))

    assert type(unknown) is AcmeProblem and unknown.acme_type == "somethingNew"
    assert type(foreign) is AcmeProblem and foreign.acme_type is None
    assert untyped.type == "about:blank" and untyped.detail == "boom" and untyped.status == 500


def test_non_json_503_still_surfaces_status_and_retry_after() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    problem = problem_from_response(503, {"Retry-After": when}, b"<html>Service Unavailable</html>")

    assert type(problem) is AcmeProblem
    assert problem.status == 503
    assert problem.retry_after is not None and 100 < problem.retry_after <= 120
    assert "Service Unavailable" in problem.detail


def test_problem_status_falls_back_to_the_body() -> None:
    problem = problem_from_json({"type": ACME + "serverInternal", "status": 500})
    assert isinstance(problem, ServerInternal) and problem.status == 500


# --- Retry-After ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        ("Sun, 01 Jun 2025 12:01:00 GMT", 60.0),
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),  # past: go now
        (None, None),
        ("", None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("١٢", None),  # non-ASCII digits are not delta-seconds
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    ("delay", "retry_after", "expected"),
    [
        (0.02, None, 0.02),  # no hint: our own short schedule
        (0.02, 3.0, 3.0),  # never sooner than the CA asked
        (0.5, 0.1, 0.5),  # a shorter hint does not make us hurry
        (0.02, 3600.0, 10.0),  # but an absurd one is clamped
    ],
)
def test_poll_wait(delay: float, retry_after: float | None, expected: float) -> None:
    assert poll_wait(delay, retry_after, cap=10.0) == expected


# --- resources --------------------------------------------------------------------------

PEBBLE_DIRECTORY = {
    "keyChange": "https://127.0.0.1:14000/rollover-account-key",
    "meta": {
        "externalAccountRequired": True,
        "termsOfService": "data:text/plain,Do%20what%20thou%20wilt",
        "profiles": {"classic": "90 days", "shortlived": "6 days"},
    },
    "newAccount": "https://127.0.0.1:14000/sign-me-up",
    "newNonce": "https://127.0.0.1:14000/nonce-plz",
    "newOrder": "https://127.0.0.1:14000/order-plz",
    "revokeCert": "https://127.0.0.1:14000/revoke-cert",
    "renewalInfo": "https://127.0.0.1:14000/draft-ietf-acme-ari-03/renewalInfo",
}


def test_parse_directory() -> None:
    directory = parse_directory("https://127.0.0.1:14000/dir", _body(PEBBLE_DIRECTORY))

    assert directory.new_order == "https://127.0.0.1:14000/order-plz"
    assert directory.key_change.endswith("/rollover-account-key")
    assert directory.renewal_info is not None and directory.renewal_info.endswith("renewalInfo")
    assert directory.external_account_required is True
    assert directory.terms_of_service is not None
    assert dict(directory.profiles) == {"classic": "90 days", "shortlived": "6 days"}


def test_directory_without_optional_parts() -> None:
    minimal = {k: PEBBLE_DIRECTORY[k] for k in ("newAccount", "newNonce", "newOrder")}
    directory = parse_directory("https://ca/dir", _body(minimal))

    assert directory.renewal_info is None
    assert directory.profiles == {}
    assert directory.external_account_required is False
    assert directory.revoke_cert == ""


@pytest.mark.parametrize("body", [b"not json", b"[]", _body({"newAccount": "x", "newOrder": "y"})])
def test_bad_directory_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(AcmeProtocolError, match="directory"):
        parse_directory("https://ca/dir", body)


def test_parse_invalid_authorization_keeps_the_challenge_problem() -> None:
    body = _body(
        {
            "status": "invalid",
            "identifier": {"type": "dns", "value": "liar.example"},
            "challenges": [
                {
                    "type": "tls-alpn-01",
                    "url": "https://ca/chal/1",
                    "token": "tok",
                    "status": "invalid",
                    "error": {"type": ACME + "unauthorized", "detail": "bad acmeValidation"},
                },
                {"type": "http-01", "url": "https://ca/chal/2", "token": "t2", "status": "pending"},
            ],
        }
    )
    authz = parse_authorization("https://ca/authz/1", body)

    assert authz.identifier.value == "liar.example"
    failed = authz.failed_challenge()
    assert failed is not None and isinstance(failed.error, Unauthorized)
    assert authz.challenge("http-01") is not None
    assert authz.challenge("dns-01") is None


def test_parse_order() -> None:
    body = _body(
        {
            "status": "invalid",
            "identifiers": [{"type": "dns", "value": "a.example"}],
            "authorizations": ["https://ca/authz/1"],
            "finalize": "https://ca/finalize/1",
            "error": {"type": ACME + "rejectedIdentifier", "detail": "no"},
            "replaces": "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE",
            "profile": "classic",
        }
    )
    order = parse_order("https://ca/order/1", body)

    assert order.url == "https://ca/order/1"
    assert isinstance(order.error, RejectedIdentifier)
    assert order.replaces == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    assert order.profile == "classic"
    assert order.certificate is None


def test_order_without_finalize_is_a_protocol_error() -> None:
    with pytest.raises(AcmeProtocolError, match="finalize"):
        parse_order("https://ca/order/1", _body({"status": "pending", "authorizations": []}))


# --- payloads ---------------------------------------------------------------------------


def test_new_order_payload_only_carries_what_was_asked() -> None:
    assert new_order_payload(["a.example"]) == {
        "identifiers": [{"type": "dns", "value": "a.example"}]
    }
    full = new_order_payload(["a.example"], profile="classic", replaces="x.y")
    assert full["profile"] == "classic" and full["replaces"] == "x.y"


def test_new_account_payloads() -> None:
    assert new_account_payload(only_return_existing=True) == {"onlyReturnExisting": True}
    payload = new_account_payload(contact=["mailto:a@b"], agree_tos=True, eab={"protected": "p"})
    assert payload == {
        "termsOfServiceAgreed": True,
        "contact": ["mailto:a@b"],
        "externalAccountBinding": {"protected": "p"},
    }


def test_revoke_payload_is_base64url_der() -> None:
    payload = revoke_payload(b"\xfb\xff\x00", 4)
    assert payload == {"certificate": "-_8A", "reason": 4}


def test_build_csr_names_and_signature() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_der_x509_csr(build_csr(["a.example", "b.example"], key))

    assert csr.is_signature_valid
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["a.example", "b.example"]
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a.example"
    assert csr.public_key() == key.public_key()


def test_build_csr_long_name_has_no_cn_and_other_key_types_work() -> None:
    long_name = "x" * 60 + ".example.com"
    rsa_csr = x509.load_der_x509_csr(build_csr([long_name], rsa.generate_private_key(65537, 2048)))
    ed_csr = x509.load_der_x509_csr(build_csr(["a.example"], ed25519.Ed25519PrivateKey.generate()))

    assert rsa_csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    assert rsa_csr.is_signature_valid and ed_csr.is_signature_valid
    with pytest.raises(ValueError):
        build_csr([], ec.generate_private_key(ec.SECP256R1()))


# --- links and chains -------------------------------------------------------------------


def test_parse_links_keeps_every_alternate_and_resolves_relative_urls() -> None:
    values = [
        '<https://ca/cert/1/alt/1>;rel="alternate", <https://ca/dir>;rel="index"',
        "</cert/1/alt/2>; rel=alternate",
        '<https://ca/tos>; title="x;y"; rel="terms-of-service up"',
    ]
    links = parse_links(values, "https://ca/cert/1")

    assert [url for url, rel in links if rel == "alternate"] == [
        "https://ca/cert/1/alt/1",
        "https://ca/cert/1/alt/2",
    ]
    assert ("https://ca/dir", "index") in links
    assert ("https://ca/tos", "terms-of-service") in links and ("https://ca/tos", "up") in links


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: str) -> bytes:
    """A certificate with the given names; its signature is irrelevant to chain selection."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_select_chain_prefers_the_top_issuer() -> None:
    leaf = _cert("leaf.example", "Int A")
    default = leaf + _cert("Int A", "Root X")
    alt_y = leaf + _cert("Int A", "Root Y")
    alt_z = leaf + _cert("Int A", "Cross Z") + _cert("Cross Z", "Root Z")

    assert select_chain(default, [alt_y, alt_z], None).pem == default
    picked = select_chain(default, [alt_y, alt_z], "Root Y")
    assert picked.pem == alt_y and picked.alternates == (default, alt_z)
    assert select_chain(default, [alt_y, alt_z], "Root Z").pem == alt_z
    # Not the top issuer anywhere, but an issuer deeper in one chain: that chain.
    assert select_chain(default, [alt_y, alt_z], "Cross Z").pem == alt_z
    # No match at all: the CA's default.
    nobody = select_chain(default, [alt_y], "Nobody")
    assert nobody.pem == default and nobody.alternates == (alt_y,)


def test_split_pem_chain() -> None:
    a, b = _cert("a", "b"), _cert("b", "c")
    assert split_pem_chain(a + b"\n" + b) == [a, b]
    assert split_pem_chain(b"no certificates here") == []


def test_problem_classes_are_distinct_exceptions() -> None:
    # The certificate manager catches by type: the tree must keep them apart.
    problem = problem_from_response(400, {}, _body({"type": ACME + "badNonce"}))
    assert isinstance(problem, BadNonce) and not isinstance(problem, RateLimited)
