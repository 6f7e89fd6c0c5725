"""Per-domain status: what state a name is in, what went wrong last, and how to fix it.

The status answers the operator's question "why doesn't shop.customer.com work?" without
reading logs. Hints are chosen from the failure's typed reason (``edgeproxy/reasons.py``: the
CA's problem type or subproblem type, or our own reason). Only where CAs use one type for
different failures (``unauthorized`` for a refused connection, a TLS alert and a wrong answer
alike; ``connection`` for refused and timed out) does ``validation_failure`` look at the
detail, for the wordings of Boulder (Let's Encrypt) and pebble; a detail it does not know
still gets the type's hint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import trio

from ..errors import StorageError
from ..issuers.base import IssuanceError
from ..reasons import Failure, Reason

State = Literal[
    "allowed",
    "denied",
    "issuing",
    "valid",
    "renewing",
    "failing",
    "removed",
    "account_paused",
    "rate_limited",
]

ValidationFailure = Literal["refused", "timeout", "alert", "incorrect", "connect"]

# The port each challenge type is validated on (RFC 8737 s3: 443; RFC 8555 s8.3: 80).
VALIDATION_PORTS = {"tls-alpn-01": 443, "http-01": 80}

_DOCTOR = " Run `edgeproxy doctor NAME` to check each."

# Keyed by the typed reason: a CA's problem type or our own reason.
HINTS: dict[Reason, str] = {
    Reason.DNS: (
        "the CA could not resolve the name: check the customer's CNAME/A record exists and has "
        "propagated."
    ),
    Reason.CAA: (
        "a CAA record on the domain forbids this CA: the customer must add a CAA record allowing "
        "it, or remove the restrictive one."
    ),
    Reason.REJECTED_IDENTIFIER: (
        "the CA will not issue for this name (policy or blocklist); nothing to retry until the name"
        " changes."
    ),
    Reason.RATE_LIMITED: (
        "the CA's rate limit was hit; edgeproxy retries after the CA's Retry-After."
    ),
    Reason.ACCOUNT_PAUSED: (
        "the CA rate-limited this ACME account (rateLimited, or 503 with Retry-After): no new "
        "order goes to it from any replica until the time in next_attempt, then this name is "
        "ordered by itself. Certificates already issued keep being served. If it recurs, spread "
        "orders out (on_demand.max_orders_per_minute) or ask the CA for a higher limit."
    ),
    # Our own [acme.limits] budgets (certs/budgets.py): no order was sent.
    Reason.BUDGET_EXHAUSTED: (
        "an [acme.limits] budget is used up, so no order was sent: the name waits and is "
        "ordered at its next attempt. To go sooner, raise that limit in [acme.limits] (only as "
        "far as your CA allows) or wait."
    ),
    Reason.SERVER_INTERNAL: "the CA had an internal error; edgeproxy retries with backoff.",
    Reason.EXTERNAL_ACCOUNT_REQUIRED: (
        "the CA requires External Account Binding: set acme.eab_kid and acme.eab_hmac_key."
    ),
    Reason.UNREACHABLE: (
        "the ACME server is unreachable from this node: check acme.directory, egress firewall rules"
        " and acme.trust."
    ),
    Reason.DENIED: (
        "the allow-check refused this name (on_demand.allow patterns / on_demand.ask endpoint); "
        "allow it there to get a certificate."
    ),
    Reason.ASK_UNAVAILABLE: (
        "the on_demand.ask endpoint did not answer in time or failed; names are refused until it "
        "answers."
    ),
    Reason.REMOVED: (
        "the hostname was removed from the registry (DELETE /v1/hostnames/NAME); add it again to "
        "serve it (within hostnames.removal_grace its certificate is reused)."
    ),
    Reason.INVALID_NAME: "the SNI is not a valid DNS hostname; clients must connect by name.",
    Reason.STORAGE: "storage failed: check the storage path/database is reachable and writable.",
    Reason.LOCK_TIMEOUT: "another process held the issuance lock too long; it will be retried.",
    Reason.TIMEOUT: "issuance did not finish in time; it is retried with backoff.",
    # DNS-01 (``[[acme.dns]]``, managed certificates): our side of the challenge failed.
    Reason.DNS_TSIG_REJECTED: (
        "the DNS server rejected edgeproxy's TSIG signature: check the zone's tsig_key_name, "
        "tsig_algorithm and the secret in the variable named by tsig_secret_env (e.g. "
        "EDGEPROXY_TSIG_SECRET) match the key the server has."
    ),
    Reason.DNS_UPDATE_REFUSED: (
        "the DNS server refused the update: check the TSIG key and the zone's update-policy (it "
        "must let this key write TXT records, e.g. `grant KEY zonesub TXT;`), and that [[acme.dns]]"
        " server is the zone's primary."
    ),
    Reason.DNS_UPDATE_FAILED: (
        "the DNS update could not be sent: check that the zone's [[acme.dns]] server is its primary"
        " and is reachable over TCP from this node."
    ),
    Reason.DNS_ZONE_NOT_FOUND: (
        "the challenge record (_acme-challenge.NAME, after its CNAMEs) is outside every configured "
        "[[acme.dns]] zone: add that zone with a TSIG key, or CNAME _acme-challenge.NAME into a "
        "zone that is configured."
    ),
    Reason.DNS_CNAME_LOOP: (
        "the CNAME chain from _acme-challenge.NAME loops or is too long: fix the records so it ends"
        " at a name inside one of the [[acme.dns]] zones."
    ),
    Reason.DNS_LOOKUP_FAILED: (
        "the CNAME of _acme-challenge.NAME could not be looked up: check acme.dns_resolver (or the "
        "zone's server) answers from this node."
    ),
    Reason.DNS_PROPAGATION_TIMEOUT: (
        "the TXT record was written, but the servers named in the error did not answer it within "
        "propagation_timeout: check those secondaries get the zone's updates (NOTIFY/transfer) and "
        "are the right check_servers, or raise propagation_timeout."
    ),
    Reason.CHALLENGE_UNAVAILABLE: (
        "the CA offers none of the challenge types in acme.challenges for this name (it lists the "
        "ones it offers); add one of them to acme.challenges."
    ),
}

_DNS01_VALIDATION = (
    "the CA looked up the TXT record at _acme-challenge.NAME and did not find edgeproxy's "
    "value: the servers the CA asks (the zone's NS records) must serve the zone edgeproxy "
    "updated; list every secondary in check_servers so edgeproxy waits for all of them, and "
    "check a _acme-challenge CNAME points into the configured zone."
)

# Problem types that mean "the CA tried to validate and it did not work".
_VALIDATION_TYPES = frozenset(
    {Reason.CONNECTION, Reason.TLS, Reason.INCORRECT_RESPONSE, Reason.UNAUTHORIZED}
)


def validation_failure(reason: Reason | None, detail: str | None) -> ValidationFailure | None:
    """What kind of validation failure an ACME error is, or None if it is not one."""
    if reason not in _VALIDATION_TYPES:
        return None
    text = (detail or "").lower()
    if reason is Reason.TLS:
        return "alert"
    if reason is Reason.INCORRECT_RESPONSE:
        return "incorrect"
    if "refused" in text or "no route to host" in text:
        return "refused"
    if "timeout" in text or "timed out" in text:
        return "timeout"
    if "remote error" in text or "alert" in text:
        return "alert"
    if reason is Reason.CONNECTION or "failed to connect" in text:
        return "connect"  # pebble says only this, whether refused or an alert
    return "incorrect"  # unauthorized with an answer the CA read and did not like


def _validation_hint(
    failure: ValidationFailure, challenge_type: str | None, listen_ports: Sequence[int]
) -> str:
    challenge = challenge_type or "the challenge"
    vport = VALIDATION_PORTS.get(challenge_type or "", 443)
    ours = ", ".join(str(p) for p in sorted(set(listen_ports))) or "?"
    forward = (
        f"the load balancer or firewall must pass TCP {vport} through to edgeproxy, which "
        f"listens on port {ours}"
    )
    if challenge_type == "http-01":
        forward += " of [http] listen"
    else:
        forward += " of [server] listen"
    if failure == "refused":
        text = (
            f"the CA's connection to port {vport} for {challenge} was refused: nothing "
            f"accepts it there for this name. {forward}, and the name's CNAME must point at "
            "this deployment."
        )
    elif failure == "timeout":
        text = (
            f"the CA's connection to port {vport} for {challenge} timed out: a firewall or "
            f"security group drops it, or the name points somewhere that never answers. "
            f"{forward}."
        )
    elif failure == "alert":
        text = (
            f"the CA reached port {vport} for {challenge} but was answered with a TLS alert: "
            "something in front of edgeproxy terminates TLS (a TLS listener on the load "
            f"balancer, a CDN, TLS inspection) or sends/expects a PROXY header edgeproxy does "
            f"not ([server] proxy_protocol). {forward}, untouched."
        )
    elif failure == "incorrect":
        text = (
            f"the CA reached port {vport} for {challenge}, but the answer was not edgeproxy's "
            "challenge response: another server, or an edgeproxy with other storage, answers "
            f"this name. The name's CNAME must point at this deployment and {forward}."
        )
    else:
        text = (
            f"the CA could not complete a connection to port {vport} for {challenge} "
            f"(refused, timed out, or rejected with a TLS alert). {forward}, untouched, and "
            "the name's CNAME must point at this deployment."
        )
    return text + _DOCTOR


def order_failure(exc: Exception, issue_timeout: float) -> Failure:
    """The failure an expected exception of an order means (``IssuanceError``, the order's
    deadline, storage, the lease), typed the same for on-demand and managed certificates."""
    if isinstance(exc, IssuanceError):
        return exc.failure
    if isinstance(exc, trio.TooSlowError):
        return Failure(Reason.TIMEOUT, f"issuance took longer than {issue_timeout:.0f}s")
    if isinstance(exc, StorageError):
        return Failure(Reason.STORAGE, str(exc))
    return Failure(Reason.LOCK_TIMEOUT, str(exc))


def hint_for(
    reason: Reason | None,
    detail: str | None = None,
    *,
    challenge_type: str | None = None,
    listen_ports: Sequence[int] = (443,),
    serving_until: float | None = None,
) -> str | None:
    """The operator's next step for an error.

    ``challenge_type`` is the challenge the CA tried when a validation failed;
    ``listen_ports`` the ports edgeproxy listens on for it; ``serving_until`` the expiry of
    the certificate still served while its renewal fails (a failed renewal says so).
    """
    if reason is None:
        return None
    failure = validation_failure(reason, detail)
    if challenge_type == "dns-01" and (failure is not None or reason is Reason.DNS):
        # No port is involved: the CA looked the TXT record up and did not get our value.
        hint: str | None = _DNS01_VALIDATION
    elif failure is not None:
        hint = _validation_hint(failure, challenge_type, listen_ports)
    else:
        hint = HINTS.get(reason)
    if serving_until is not None:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(serving_until))
        hint = (
            f"renewal failed; the current certificate is still served until {until} and "
            f"renewal is retried with backoff. {hint or 'See the last error.'}"
        )
    return hint


@dataclass(slots=True)
class DomainStatus:
    name: str
    state: State
    not_after: float | None = None
    renew_at: float | None = None
    renewal_source: str | None = None  # "ari" | "backstop" | "expiring" | "two-thirds"
    renewal_reason: str | None = None  # why that source (e.g. the CA's ARI error)
    ari_window: tuple[float, float] | None = None
    next_attempt: float | None = None
    failures: int = 0
    last_error: str | None = None
    last_error_type: str | None = None
    hint: str | None = None
    issuer: str | None = None
    challenge_type: str | None = None  # the ACME challenge that validated the current certificate
    names: list[str] | None = None  # a managed certificate's names (``name`` is the first)
    updated_at: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)
    # The typed cause of ``last_error_type`` (what the hint was chosen by); None with it.
    reason: Reason | None = None
