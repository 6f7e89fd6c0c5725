"""Typed failures (issue 18): a CA's problem keeps its type URN, detail and typed reason from
the issuer to the status, its hint and the handshake's refusal; nothing splits strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgeproxy.acme.errors import (
    PROBLEM_TYPES,
    AcmeProblem,
    AcmeTransportError,
    OrderInvalid,
    RateLimited,
    Subproblem,
)
from edgeproxy.certs import status_store
from edgeproxy.issuers.acme import AcmeIssuer
from edgeproxy.issuers.base import IssuanceError, IssuedCertificate, IssueRequest, RenewalWindow
from edgeproxy.issuers.fallback import FallbackIssuer
from edgeproxy.reasons import ACME_ERROR_PREFIX, Failure, Reason
from edgeproxy.storage.file import FileStorage


@pytest.mark.parametrize("short", sorted(PROBLEM_TYPES))
def test_every_acme_problem_type_has_its_reason(short: str) -> None:
    reason = Reason.of_problem(ACME_ERROR_PREFIX + short)
    assert reason.value == short and reason.from_ca


@pytest.mark.parametrize(
    "type_",
    [
        ACME_ERROR_PREFIX + "somethingNew",  # an ACME type this version does not know
        ACME_ERROR_PREFIX + "storage",  # our own token must not be reachable from a CA's URN
        "urn:example:error:dns",  # not an ACME type at all
        "about:blank",
        "",
    ],
)
def test_other_problem_types_are_one_bounded_reason(type_: str) -> None:
    failure = Failure.problem(type_, "odd")
    assert failure.reason is Reason.PROBLEM
    assert failure.type == type_ or (type_ == "" and failure.type == "problem")


def test_a_problem_keeps_its_urn_our_reasons_their_token() -> None:
    dns = Failure.problem(ACME_ERROR_PREFIX + "dns", "NXDOMAIN", retry_after=5.0)
    assert (dns.reason, dns.type, dns.short_type) == (Reason.DNS, ACME_ERROR_PREFIX + "dns", "dns")
    ours = Failure(Reason.STORAGE, "disk full")
    assert (ours.type, ours.short_type, ours.reason.from_ca) == ("storage", "storage", False)


def test_recorded_types_read_back_to_the_same_reason() -> None:
    for reason in Reason:
        assert Reason.of_type(Failure(reason, "").type) in (reason, Reason.PROBLEM)
        if not reason.from_ca:
            assert Reason.of_type(reason.value) is reason
    assert Reason.of_type(ACME_ERROR_PREFIX + "caa") is Reason.CAA
    assert Reason.of_type("no-such-token") is Reason.PROBLEM


class _Solver:
    challenge_type = "tls-alpn-01"


def _issuer(tmp_path: Path) -> AcmeIssuer:
    return AcmeIssuer(
        directory="https://ca.invalid/directory",
        storage=FileStorage(tmp_path / "state"),
        solvers=[_Solver()],  # type: ignore[list-item]
    )


def test_the_subproblem_about_the_name_travels_typed(tmp_path: Path) -> None:
    problem = AcmeProblem(
        ACME_ERROR_PREFIX + "compound",
        "several",
        400,
        subproblems=(
            Subproblem(ACME_ERROR_PREFIX + "caa", "CAA forbids", "other.example"),
            Subproblem(ACME_ERROR_PREFIX + "dns", "NXDOMAIN for a.example", "a.example"),
        ),
    )
    exc = _issuer(tmp_path)._translate(
        OrderInvalid("https://ca.invalid/o/1", problem, "a.example", "tls-alpn-01"), "a.example", []
    )
    assert exc.failure == Failure(
        Reason.DNS,
        "NXDOMAIN for a.example",
        ACME_ERROR_PREFIX + "dns",
        challenge_type="tls-alpn-01",
    )
    limited = _issuer(tmp_path)._translate(
        RateLimited(ACME_ERROR_PREFIX + "rateLimited", "slow down", 429, retry_after=3600.0),
        "a.example",
        ["http-01: refused"],
    )
    assert limited.failure.reason is Reason.RATE_LIMITED
    assert limited.failure.retry_after == 3600.0 and limited.failure.earlier == ("http-01: refused",)
    down = _issuer(tmp_path)._translate(AcmeTransportError("refused"), "a.example", [])
    assert down.failure.reason is Reason.UNREACHABLE and down.failure.problem_type is None
    bare = _issuer(tmp_path)._translate(OrderInvalid("https://ca.invalid/o/2", None), "a", [])
    assert bare.failure.reason is Reason.ORDER_INVALID
    assert bare.failure.type == ACME_ERROR_PREFIX + "orderInvalid"


class _Failing:
    def __init__(self, label: str, failure: Failure) -> None:
        self.label = label
        self.failure = failure

    @property
    def id(self) -> str:
        return self.label

    async def issue(self, request: IssueRequest) -> IssuedCertificate:
        raise IssuanceError(self.failure)

    async def renewal_window(self, chain_pem: bytes) -> RenewalWindow | None:
        return None

    async def aclose(self) -> None:
        pass


async def test_fallback_keeps_the_last_failure_typed_and_the_earlier_ones_in_words() -> None:
    first = Failure.problem(ACME_ERROR_PREFIX + "rejectedIdentifier", "not here")
    last = Failure.problem(ACME_ERROR_PREFIX + "caa", "CAA forbids", challenge_type="dns-01")
    issuer = FallbackIssuer([_Failing("one", first), _Failing("two", last)])  # type: ignore[list-item]
    with pytest.raises(IssuanceError) as ei:
        await issuer.issue(IssueRequest(("a.example",), ec.generate_private_key(ec.SECP256R1())))
    assert ei.value.failure.reason is Reason.CAA
    assert ei.value.failure.problem_type == ACME_ERROR_PREFIX + "caa"
    assert ei.value.failure.challenge_type == "dns-01"
    assert ei.value.failure.earlier == ("issuer one: rejectedIdentifier: not here",)


def test_a_status_stored_before_reasons_reads_its_reason_from_its_type() -> None:
    old = {"name": "a.example", "state": "failing", "last_error_type": ACME_ERROR_PREFIX + "dns"}
    assert status_store.decode(json.dumps(old).encode()).reason is Reason.DNS
    ours = {"name": "a.example", "state": "denied", "last_error_type": "ask_unavailable"}
    assert status_store.decode(json.dumps(ours).encode()).reason is Reason.ASK_UNAVAILABLE
    newer = {**ours, "reason": "a_reason_from_a_newer_version"}
    assert status_store.decode(json.dumps(newer).encode()).reason is Reason.ASK_UNAVAILABLE
    clean = {"name": "a.example", "state": "valid", "reason": "dns"}
    assert status_store.decode(json.dumps(clean).encode()).reason is None
