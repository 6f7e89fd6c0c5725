"""Hints that match the failure (issue 16): a refused connection, a TLS alert and a wrong answer
get three different hints naming the port edgeproxy listens on; a failed renewal says the old
certificate still serves. The details are the CAs' own wordings (Boulder for Let's Encrypt,
pebble), so a change in our matching shows up here."""

from __future__ import annotations

import pytest

from edgeproxy.certs.status import hint_for, validation_failure
from edgeproxy.reasons import Reason

ACME = "urn:ietf:params:acme:error:"


def acme(kind: str) -> Reason:
    """The reason of a CA's problem of type ``urn:ietf:params:acme:error:<kind>``."""
    return Reason.of_problem(ACME + kind)

# (problem type, detail as the CA words it, expected kind)
CASES = [
    ("connection", "127.0.0.1: Connection refused", "refused"),
    ("connection", "192.0.2.1: Timeout during connect (likely firewall problem)", "timeout"),
    ("connection", "Error getting validation data", "connect"),
    ("tls", "192.0.2.1: Error getting validation data: remote error: tls: internal error", "alert"),
    ("unauthorized", "Incorrect validation certificate for tls-alpn-01 challenge. "
     "Invalid acmeValidation extension value.", "incorrect"),
    ("unauthorized", "The key authorization file from the server did not match this challenge",
     "incorrect"),
    ("incorrectResponse", "", "incorrect"),
    ("unauthorized", "Failed to connect to 127.0.0.1:5001 for the tls-alpn-01 challenge",
     "connect"),
    ("unauthorized", "dial tcp 127.0.0.1:80: connect: connection refused", "refused"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "detail", "expected"), CASES)
def test_validation_failures_are_told_apart(kind: str, detail: str, expected: str) -> None:
    assert validation_failure(acme(kind), detail) == expected


@pytest.mark.parametrize("kind", ["dns", "caa", "rateLimited", "malformed", "badNonce"])
def test_other_problems_are_not_validation_failures(kind: str) -> None:
    assert validation_failure(acme(kind), "connection refused") is None


def test_refused_alert_and_incorrect_get_three_different_hints() -> None:
    refused = hint_for(acme("connection"), "Connection refused", challenge_type="tls-alpn-01")
    alert = hint_for(
        acme("tls"), "remote error: tls: internal error", challenge_type="tls-alpn-01"
    )
    wrong = hint_for(acme("incorrectResponse"), "", challenge_type="tls-alpn-01")
    assert refused and alert and wrong
    assert len({refused, alert, wrong}) == 3
    assert "refused" in refused
    assert "TLS alert" in alert and "terminates TLS" in alert
    assert "not edgeproxy's challenge response" in wrong


def test_hint_names_the_port_edgeproxy_listens_on_and_the_validation_port() -> None:
    hint = hint_for(
        acme("connection"),
        "Connection refused",
        challenge_type="tls-alpn-01",
        listen_ports=(8443, 8443, 9443),
    )
    assert hint is not None
    assert "port 443" in hint  # where the CA connects
    assert "listens on port 8443, 9443" in hint  # where it must end up
    http = hint_for(acme("connection"), "Connection refused", challenge_type="http-01",
                    listen_ports=(8080,))  # fmt: skip
    assert http is not None and "port 80 " in http and "8080" in http and "[http] listen" in http


def test_a_failed_renewal_says_the_old_certificate_still_serves() -> None:
    hint = hint_for(acme("rateLimited"), "too many", serving_until=1_900_000_000)
    assert hint is not None
    assert hint.startswith("renewal failed; the current certificate is still served until ")
    assert "2030-03-17T17:46:40Z" in hint
    assert "Retry-After" in hint  # the type's own hint follows
    # Even an error with no hint of its own gets one on a renewal.
    bare = hint_for(acme("malformed"), "odd", serving_until=1_900_000_000)
    assert bare is not None and "still served" in bare


def test_no_error_no_hint() -> None:
    assert hint_for(None) is None


def test_a_ca_offering_none_of_our_challenge_types_says_so() -> None:
    hint = hint_for(Reason.CHALLENGE_UNAVAILABLE, "no http-01 challenge for 'a' (CA offered: dns-01)")
    assert hint is not None and "acme.challenges" in hint


def test_dns01_failures_get_hints_about_the_dns_setup() -> None:
    assert "tsig_secret_env" in (hint_for(Reason.DNS_TSIG_REJECTED) or "")
    assert "update-policy" in (hint_for(Reason.DNS_UPDATE_REFUSED) or "")
    assert "outside every configured" in (hint_for(Reason.DNS_ZONE_NOT_FOUND) or "")
    assert "loops" in (hint_for(Reason.DNS_CNAME_LOOP) or "")
    assert "propagation_timeout" in (hint_for(Reason.DNS_PROPAGATION_TIMEOUT) or "")


@pytest.mark.parametrize("kind", ["unauthorized", "incorrectResponse", "dns", "connection"])
def test_a_failed_dns01_validation_is_about_the_txt_record_not_a_port(kind: str) -> None:
    hint = hint_for(acme(kind), "No TXT records found", challenge_type="dns-01") or ""
    assert "TXT record" in hint and "check_servers" in hint
    assert "port" not in hint
    # The same problem for an on-demand challenge still points at the ports.
    assert "port 443" in (hint_for(acme("unauthorized"), "x", challenge_type="tls-alpn-01") or "")
