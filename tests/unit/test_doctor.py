"""The doctor's pure judgements: DNS matching, what a TLS answer means, rendering and JSON.

Observations here are built from real artefacts (RFC 8737 certificates from the data path's
own builder, trustme certificates, the alert bytes edgeproxy sends), never hand-typed DER.
"""

from __future__ import annotations

import json

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from edgeproxy.doctor import (
    Diagnosis,
    DnsAnswer,
    Finding,
    TlsAttempt,
    alert_from_openssl_reason,
    dns_fix,
    judge_dns,
    judge_silence,
    judge_tls,
    parse_nameserver,
)
from edgeproxy.tls.challenge_cert import ACME_TLS_ALPN, build_challenge_certificate
from edgeproxy.wire.tls_alert import HTTP_ON_TLS_PORT, AlertDescription, alert_record

NAME = "shop.customer.test"
TARGET = "edge.example.test"
KEY_AUTH = "doctor-abc.def"
KEY = ec.generate_private_key(ec.SECP256R1())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def challenge_der(name: str = NAME, key_auth: str = KEY_AUTH) -> bytes:
    cert, _ = build_challenge_certificate(name, key_auth, key=KEY)
    return der(cert)


def attempt(**kw: object) -> TlsAttempt:
    return TlsAttempt(address="192.0.2.10", port=443, **kw)  # type: ignore[arg-type]


TARGET_ANSWER = DnsAnswer(TARGET, (), ("192.0.2.10", "2001:db8::10"))


# --- DNS ---------------------------------------------------------------------------------


def test_cname_to_the_target_points_here_and_probes_the_names_addresses() -> None:
    answer = DnsAnswer(NAME, (TARGET,), ("192.0.2.10",))
    result = judge_dns(answer, [TARGET], {TARGET: TARGET_ANSWER})
    assert result.points_here is True
    assert result.finding.ok and result.finding.fix is None
    assert f"CNAME {TARGET}" in result.finding.detail
    assert result.probe_addresses == ("192.0.2.10",)
    assert result.probe_note == ""


def test_cname_straight_to_the_targets_own_cname_counts() -> None:
    # Customers often copy the load balancer's name instead of ours.
    lb = "lb-1234.elb.example"
    answer = DnsAnswer(NAME, (lb,), ("192.0.2.10",))
    target = DnsAnswer(TARGET, (lb,), ("192.0.2.10",))
    result = judge_dns(answer, [TARGET], {TARGET: target})
    assert result.points_here is True
    assert lb in result.finding.detail and f"target {TARGET}" in result.finding.detail


def test_target_spelling_is_normalised() -> None:
    answer = DnsAnswer(NAME, (TARGET,), ())
    result = judge_dns(answer, ["Edge.Example.TEST."], {TARGET: TARGET_ANSWER})
    assert result.points_here is True
    # No address in NAME's own answer (a mock server): probe the target's instead, and say so.
    assert result.probe_addresses == ("192.0.2.10", "2001:db8::10")
    assert "target" in result.probe_note


def test_cname_elsewhere_is_dns_not_here_with_the_record_to_create() -> None:
    answer = DnsAnswer(NAME, ("elsewhere.example",), ("198.51.100.7",))
    result = judge_dns(answer, [TARGET], {TARGET: TARGET_ANSWER})
    assert result.points_here is False
    f = result.finding
    assert not f.ok and f.fix is not None
    assert f"create a CNAME {NAME} -> {TARGET}" in f.fix
    assert "ALIAS/ANAME" in f.fix and "192.0.2.10, 2001:db8::10" in f.fix
    # The path is still probed, at the target, so the report says whether fixing DNS suffices.
    assert result.probe_addresses == ("192.0.2.10", "2001:db8::10")
    assert "DNS does not point here" in result.probe_note


def test_a_records_all_on_target_addresses_point_here() -> None:
    answer = DnsAnswer(NAME, (), ("192.0.2.10",))
    result = judge_dns(answer, ["192.0.2.10", "192.0.2.11"], {})
    assert result.points_here is True
    assert result.probe_addresses == ("192.0.2.10",)


def test_one_stray_address_fails_because_the_ca_may_pick_it() -> None:
    answer = DnsAnswer(NAME, (), ("192.0.2.10", "198.51.100.7"))
    result = judge_dns(answer, [TARGET], {TARGET: TARGET_ANSWER})
    assert result.points_here is False
    assert "198.51.100.7" in result.finding.detail
    assert result.finding.fix is not None and "remove the records for 198.51.100.7" in (
        result.finding.fix
    )
    assert result.probe_addresses == ("192.0.2.10",)


def test_ipv6_spellings_compare_equal() -> None:
    answer = DnsAnswer(NAME, (), ("2001:db8:0:0:0:0:0:10",))
    assert judge_dns(answer, [TARGET], {TARGET: TARGET_ANSWER}).points_here is True


def test_nxdomain_is_not_here() -> None:
    result = judge_dns(DnsAnswer(NAME, nxdomain=True), [TARGET], {TARGET: TARGET_ANSWER})
    assert result.points_here is False
    assert "NXDOMAIN" in result.finding.detail


def test_resolver_failure_is_undecided_not_a_wrong_answer() -> None:
    result = judge_dns(
        DnsAnswer(NAME, error="The DNS operation timed out."), [TARGET], {TARGET: TARGET_ANSWER}
    )
    assert result.points_here is None
    assert "timed out" in result.finding.detail


def test_no_targets_configured_is_undecided_and_says_which_key() -> None:
    result = judge_dns(DnsAnswer(NAME, (), ("192.0.2.10",)), [], {})
    assert result.points_here is None
    assert result.finding.fix is not None and "onboarding.target" in result.finding.fix


def test_unresolvable_target_is_mentioned() -> None:
    answer = DnsAnswer(NAME, ("elsewhere.example",), ("198.51.100.7",))
    result = judge_dns(answer, [TARGET], {TARGET: DnsAnswer(TARGET, nxdomain=True)})
    assert result.points_here is False
    assert f"targets not resolved: {TARGET} (NXDOMAIN)" in result.finding.detail


def test_dns_fix_with_only_address_targets() -> None:
    assert dns_fix(NAME, ["192.0.2.11", "192.0.2.10"], ["192.0.2.11", "192.0.2.10"]) == (
        f"create A/AAAA records {NAME} -> 192.0.2.10, 192.0.2.11"
    )


# --- TLS ---------------------------------------------------------------------------------


def test_our_digest_over_acme_tls_is_ok() -> None:
    verdict, f = judge_tls(
        NAME, KEY_AUTH, attempt(handshake_ok=True, alpn=ACME_TLS_ALPN, certificate=challenge_der())
    )
    assert verdict == "ok" and f.ok and f.fix is None


def test_another_digest_is_not_edgeproxy() -> None:
    other = challenge_der(key_auth="someone-else.entirely")
    verdict, f = judge_tls(
        NAME, KEY_AUTH, attempt(handshake_ok=True, alpn=ACME_TLS_ALPN, certificate=other)
    )
    assert verdict == "not_edgeproxy" and not f.ok
    assert "digest" in f.detail and f.fix is not None and "storage" in f.fix


def test_our_digest_for_another_name_is_an_error_not_ok() -> None:
    cert = challenge_der(name="other.customer.test")
    verdict, f = judge_tls(
        NAME, KEY_AUTH, attempt(handshake_ok=True, alpn=ACME_TLS_ALPN, certificate=cert)
    )
    assert verdict == "error"
    assert "other.customer.test" in f.detail


def test_an_ordinary_certificate_without_alpn_means_tls_terminated_in_front() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert(NAME)
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    verdict, f = judge_tls(NAME, KEY_AUTH, attempt(handshake_ok=True, certificate=der(cert)))
    assert verdict == "tls_terminated_in_front"
    assert "negotiated ALPN none" in f.detail and "no acmeIdentifier extension" in f.detail
    assert f.fix is not None and "TCP" in f.fix


def test_the_challenge_certificate_without_negotiated_alpn_is_still_not_enough() -> None:
    verdict, _ = judge_tls(
        NAME, KEY_AUTH, attempt(handshake_ok=True, alpn=None, certificate=challenge_der())
    )
    assert verdict == "tls_terminated_in_front"


@pytest.mark.parametrize(
    "observed",
    [
        {"received": alert_record(AlertDescription.INTERNAL_ERROR), "closed": True},
        {"received": alert_record(AlertDescription.HANDSHAKE_FAILURE), "closed": True},
        # TLS 1.3: an alert after the ServerHello is encrypted; OpenSSL names it.
        {"received": b"\x16\x03\x03\x00\x7a", "tls_error": "TLSV1_ALERT_INTERNAL_ERROR"},
    ],
)
def test_internal_error_or_handshake_failure_means_tls_terminated_in_front(
    observed: dict[str, object],
) -> None:
    verdict, f = judge_tls(NAME, KEY_AUTH, attempt(**observed))
    assert verdict == "tls_terminated_in_front"
    assert "TLS alert" in f.detail


def test_unrecognized_name_is_an_edgeproxy_without_our_storage() -> None:
    a = attempt(received=alert_record(AlertDescription.UNRECOGNIZED_NAME), closed=True)
    assert a.alert == "unrecognized_name"
    verdict, f = judge_tls(NAME, KEY_AUTH, a)
    assert verdict == "not_edgeproxy"
    assert "storage" in f.detail


def test_plain_text_answer_is_reported_with_its_first_bytes() -> None:
    verdict, f = judge_tls(NAME, KEY_AUTH, attempt(received=HTTP_ON_TLS_PORT[:64], closed=True))
    assert verdict == "not_edgeproxy"
    assert "HTTP/1.1 400" in f.detail


def test_tls_bytes_then_a_hang_up_without_alert_is_an_error() -> None:
    verdict, f = judge_tls(NAME, KEY_AUTH, attempt(received=b"\x16\x03\x03\x00\x7a", closed=True))
    assert verdict == "error"
    assert "connection closed" in f.detail


@pytest.mark.parametrize(
    ("reason", "alert"),
    [
        ("TLSV1_ALERT_INTERNAL_ERROR", "internal_error"),
        ("SSLV3_ALERT_HANDSHAKE_FAILURE", "handshake_failure"),
        ("TLSV1_UNRECOGNIZED_NAME", "unrecognized_name"),
        ("TLSV1_ALERT_NO_APPLICATION_PROTOCOL", "no_application_protocol"),
        ("WRONG_VERSION_NUMBER", None),
        (None, None),
    ],
)
def test_alert_names_from_openssl_reasons(reason: str | None, alert: str | None) -> None:
    assert alert_from_openssl_reason(reason) == alert


def test_silent_plain_attempt_but_tls_after_proxy_v2_is_a_mismatch() -> None:
    plain = attempt(closed=True)
    assert plain.silent
    v2 = attempt(prefix="v2", handshake_ok=True, alpn=ACME_TLS_ALPN, certificate=challenge_der())
    verdict, findings = judge_silence(NAME, KEY_AUTH, plain, [v2])
    assert verdict == "proxy_protocol_mismatch"
    checks = [f.check for f in findings]
    assert checks == ["tls", "proxy_protocol", "tls+proxy_v2"]
    fix = findings[1].fix
    assert fix is not None
    assert "enable proxy protocol v2 on the target group" in fix
    assert 'server.proxy_protocol = "off"' in fix
    assert findings[2].ok  # behind the header, it is us


def test_proxy_v1_mismatch_names_v1() -> None:
    v1 = attempt(prefix="v1", received=alert_record(AlertDescription.UNRECOGNIZED_NAME))
    verdict, findings = judge_silence(
        NAME, KEY_AUTH, attempt(closed=True), [attempt(prefix="v2", closed=True), v1]
    )
    assert verdict == "proxy_protocol_mismatch"
    assert "PROXY v1" in findings[1].detail
    assert not findings[2].ok


def test_silence_with_and_without_headers_names_both_explanations() -> None:
    verdict, findings = judge_silence(
        NAME,
        KEY_AUTH,
        attempt(closed=True),
        [attempt(prefix="v2", closed=True), attempt(prefix="v1", closed=True)],
        proxy_protocol="off",
    )
    assert verdict == "error"
    detail = findings[-1].detail
    assert "load balancer sends PROXY headers" in detail
    assert "nothing healthy" in detail
    assert "after a PROXY v2 header: closed without a byte" in detail
    assert "after a PROXY v1 header: closed without a byte" in detail
    assert 'server.proxy_protocol = "off"' in detail
    assert findings[-1].fix is not None and 'server.proxy_protocol = "v2"' in findings[-1].fix


# --- rendering ---------------------------------------------------------------------------

DIAG = Diagnosis(
    NAME,
    "tls_terminated_in_front",
    (
        Finding("dns", True, "shop -> CNAME edge -> 192.0.2.10"),
        Finding("tls", False, "got someone else's certificate", "make the listener TCP"),
    ),
)


def test_render_has_one_line_per_check_and_the_fix_under_the_failure() -> None:
    lines = DIAG.render().splitlines()
    assert lines[0] == f"edgeproxy doctor {NAME} (port 443)"
    assert lines[1].startswith("  OK   dns ")
    assert lines[2].startswith("  FAIL tls ")
    assert lines[3].strip() == "fix: make the listener TCP"
    assert lines[-1].startswith("verdict: FAIL: tls_terminated_in_front: ")
    assert len(lines) == 5


def test_render_ok() -> None:
    ok = Diagnosis(NAME, "ok", (Finding("dns", True, "fine"),))
    assert ok.ok
    assert ok.render().splitlines()[-1].startswith("verdict: OK: ok: the CA can reach")
    assert "fix:" not in ok.render()


def test_json_shape_is_stable_and_serialisable() -> None:
    doc = DIAG.to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert set(doc) == {"name", "port", "verdict", "ok", "summary", "findings"}
    assert doc["verdict"] == "tls_terminated_in_front" and doc["ok"] is False
    assert doc["findings"][0] == {
        "check": "dns",
        "ok": True,
        "detail": "shop -> CNAME edge -> 192.0.2.10",
        "fix": None,
    }
    assert doc["findings"][1]["fix"] == "make the listener TCP"


# --- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:8053", ("127.0.0.1", 8053)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
    ],
)
def test_parse_nameserver(text: str, parsed: tuple[str, int]) -> None:
    assert parse_nameserver(text) == parsed


@pytest.mark.parametrize("text", ["ns.example:53", "127.0.0.1:x", "127.0.0.1:0", "[::1"])
def test_parse_nameserver_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)
