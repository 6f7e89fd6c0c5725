"""Why a name has no certificate, as values: the reason hints are keyed by, and the failure
that carries a CA's problem (its ``urn:ietf:params:acme:error:...`` type and detail) from the
CA's answer to the status, the hint, the event and the handshake's refusal.

Owns: ``Reason`` (every problem type of RFC 8555 s6.7 and RFC 9773 by its ACME name, and our
own reason tokens), ``Failure`` (reason, detail, the CA's problem type as sent, and what the
manager needs to decide a retry: ``retry_after``, the challenge type tried, the failures of
other challenge types or issuers before it). A problem type URN is read once, here
(``Reason.of_problem``); nothing downstream splits strings.
Must not know: hint texts (``certs/status.py``), HTTP, storage. A leaf: imports nothing of
edgeproxy, so ``acme/`` may use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"


class Reason(StrEnum):
    """The typed cause of a refusal or a failed attempt. Values are the tokens statuses,
    metrics and connection results have always used: the ACME name for a CA's problem
    (``dns``), our own token otherwise (``storage``)."""

    # Problems a CA reports (RFC 8555 s6.7, RFC 9773 alreadyReplaced, the non-standard
    # ``conflict`` some CAs send with 409), by their ACME name.
    ACCOUNT_DOES_NOT_EXIST = "accountDoesNotExist"
    ALREADY_REPLACED = "alreadyReplaced"
    ALREADY_REVOKED = "alreadyRevoked"
    BAD_CSR = "badCSR"
    BAD_NONCE = "badNonce"
    BAD_PUBLIC_KEY = "badPublicKey"
    BAD_REVOCATION_REASON = "badRevocationReason"
    BAD_SIGNATURE_ALGORITHM = "badSignatureAlgorithm"
    CAA = "caa"
    COMPOUND = "compound"
    CONFLICT = "conflict"
    CONNECTION = "connection"
    DNS = "dns"
    EXTERNAL_ACCOUNT_REQUIRED = "externalAccountRequired"
    INCORRECT_RESPONSE = "incorrectResponse"
    INVALID_CONTACT = "invalidContact"
    MALFORMED = "malformed"
    ORDER_NOT_READY = "orderNotReady"
    RATE_LIMITED = "rateLimited"
    REJECTED_IDENTIFIER = "rejectedIdentifier"
    SERVER_INTERNAL = "serverInternal"
    TLS = "tls"
    UNAUTHORIZED = "unauthorized"
    UNSUPPORTED_CONTACT = "unsupportedContact"
    UNSUPPORTED_IDENTIFIER = "unsupportedIdentifier"
    USER_ACTION_REQUIRED = "userActionRequired"
    # An order that became invalid without a problem saying why (RFC 8555 s7.1.6).
    ORDER_INVALID = "orderInvalid"
    # Any other problem type: not an ACME one, or one this version does not know.
    PROBLEM = "problem"

    # The CA: unreachable, its answer unreadable, no challenge type we can answer.
    UNREACHABLE = "unreachable"
    ACME = "acme"
    CHALLENGE_UNAVAILABLE = "challenge_unavailable"
    # DNS-01: our side of the challenge (certs/dns01.py).
    DNS_TSIG_REJECTED = "dns_tsig_rejected"
    DNS_UPDATE_REFUSED = "dns_update_refused"
    DNS_UPDATE_FAILED = "dns_update_failed"
    DNS_ZONE_NOT_FOUND = "dns_zone_not_found"
    DNS_CNAME_LOOP = "dns_cname_loop"
    DNS_LOOKUP_FAILED = "dns_lookup_failed"
    DNS_PROPAGATION_TIMEOUT = "dns_propagation_timeout"
    # The on-demand policy (certs/policy.py); ALLOWED is its "yes", never a failure.
    ALLOWED = "allowed"
    DENIED = "denied"
    REMOVED = "removed"
    INVALID_NAME = "invalid_name"
    ASK_UNAVAILABLE = "ask_unavailable"
    ASK_RATE_LIMITED = "ask_rate_limited"
    # The certificate manager's own limits and failures.
    ORDER_RATE_LIMITED = "order_rate_limited"
    # An [acme.limits] budget is used up (certs/budgets.py): no order was sent, the name waits.
    BUDGET_EXHAUSTED = "rate_limited"
    # The CA account's new orders are paused after a rateLimited (issuers/account_pause.py).
    ACCOUNT_PAUSED = "account_paused"
    BACKOFF = "backoff"
    STORAGE = "storage"
    LOCK_TIMEOUT = "lock_timeout"
    TIMEOUT = "timeout"

    @classmethod
    def of_problem(cls, type_: str) -> Reason:
        """The reason for a problem document's ``type`` (a URN); PROBLEM when it is not one of
        the ACME types this version knows."""
        if type_.startswith(ACME_ERROR_PREFIX):
            short = type_[len(ACME_ERROR_PREFIX) :]
            if short in _ACME_NAMES:
                return cls(short)
        return cls.PROBLEM

    @classmethod
    def of_type(cls, type_: str) -> Reason:
        """The reason for a recorded error type: a problem type URN, or our own token (how
        statuses, histories and older versions' stored records name it)."""
        if ":" in type_:
            return cls.of_problem(type_)
        try:
            return cls(type_)
        except ValueError:
            return cls.PROBLEM

    @property
    def from_ca(self) -> bool:
        """Is this a problem type a CA reports (rather than one of our own reasons)?"""
        return self.value in _ACME_NAMES or self is Reason.PROBLEM


def _acme_names() -> frozenset[str]:
    """The ACME names: the members declared before PROBLEM (declaration order is kept)."""
    names = []
    for reason in Reason:
        if reason is Reason.PROBLEM:
            break
        names.append(reason.value)
    return frozenset(names)


_ACME_NAMES = _acme_names()


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one attempt at a certificate failed, or why it was not attempted.

    ``problem_type`` is the CA's problem type exactly as sent (None for our own reasons);
    ``type`` is what statuses, histories and events record: that URN, else the reason's token.
    """

    reason: Reason
    detail: str
    problem_type: str | None = None
    # Seconds the CA asked us to wait (Retry-After), if it did.
    retry_after: float | None = None
    # When a validation failed: which challenge type the CA tried (for the hint).
    challenge_type: str | None = None
    # Failures of other challenge types or issuers tried before this one, for the status.
    earlier: tuple[str, ...] = ()

    @classmethod
    def problem(
        cls,
        type_: str,
        detail: str,
        *,
        retry_after: float | None = None,
        challenge_type: str | None = None,
        earlier: tuple[str, ...] = (),
    ) -> Failure:
        """A failure the CA reported as a problem document of type ``type_``."""
        return cls(Reason.of_problem(type_), detail, type_, retry_after, challenge_type, earlier)

    @property
    def type(self) -> str:
        return self.problem_type or self.reason.value

    @property
    def short_type(self) -> str:
        """The problem's ACME name (``dns``; a type that is no ACME one whole), or our token:
        for log lines and the text of a fallback's earlier failures."""
        return short_name(self.problem_type) if self.problem_type else self.reason.value


def short_name(type_: str) -> str:
    """A problem type as people read it: ``dns`` for ``urn:ietf:params:acme:error:dns``, any
    other type whole."""
    return type_[len(ACME_ERROR_PREFIX) :] if type_.startswith(ACME_ERROR_PREFIX) else type_
