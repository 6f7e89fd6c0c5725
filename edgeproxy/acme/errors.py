"""The ACME error tree: every way an ACME conversation can fail, as a type.

Owns: the exception classes and the table from RFC 8555 problem types to them. Parsing a
response into one of these lives in ``messages.py`` (sans-IO); mapping httpx failures into
``AcmeTransportError`` lives at exactly one place in ``client.py``.

Must not know: HTTP libraries, the proxy, the certificate manager. Callers decide from the
*type* of an error (and ``retry_after``), never from its text.

The shape follows certbot's ``acme/errors.py`` (a generic root, transport vs protocol vs
server-said-no), with the server's problem documents (RFC 8555 s6.7, RFC 7807) as one class
per ``urn:ietf:params:acme:error:<x>`` type so ``except RateLimited`` just works.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeproxy.errors import EdgeproxyError
from edgeproxy.reasons import ACME_ERROR_PREFIX, Reason


class AcmeError(EdgeproxyError):
    """Base of everything the ACME client raises on purpose."""


class AcmeTransportError(AcmeError):
    """The CA could not be reached or did not answer in time (connect, TLS, read, timeout).

    Always worth retrying later; says nothing about the request itself. ``request_sent`` is
    False when the connection never came up, so even a non-idempotent request is safe to
    repeat.
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class AcmeTimeout(AcmeTransportError):
    """The caller's deadline passed before the CA finished (polling, or the whole flow)."""


class AcmeProtocolError(AcmeError):
    """The CA sent something we cannot understand (bad JSON, missing field, wrong status).

    This is the CA's fault or a bug in our reading of the RFC, never the caller's.
    """


class ChallengeUnavailable(AcmeError):
    """An authorization offers no challenge of the type our solver can answer."""

    def __init__(self, identifier: str, wanted: str, offered: tuple[str, ...]) -> None:
        super().__init__(
            f"no {wanted} challenge for {identifier!r} (CA offered: {', '.join(offered) or 'none'})"
        )
        self.identifier = identifier
        self.wanted = wanted
        self.offered = offered


class SolverError(AcmeError):
    """A challenge solver could not put its answer in place (before the CA was asked).

    ``reason`` types it for the status and its hint (e.g. ``Reason.DNS_TSIG_REJECTED``), so
    the operator is told what to fix without the hint parsing the message.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Subproblem:
    """One entry of a problem's ``subproblems`` (RFC 8555 s6.7.1): which identifier failed how."""

    type: str
    detail: str
    identifier: str | None = None

    @property
    def acme_type(self) -> str | None:
        """The short ACME error name (``rejectedIdentifier``), or None for non-ACME types."""
        return _short_type(self.type)


class AcmeProblem(AcmeError):
    """The CA answered with a problem document (RFC 8555 s6.7, RFC 7807).

    ``retry_after`` is in seconds, from the Retry-After header (RFC 8555 s6.6 for
    ``rateLimited``; also sent with 503), or None when the CA gave none.
    """

    def __init__(
        self,
        type: str,
        detail: str = "",
        status: int = 0,
        subproblems: tuple[Subproblem, ...] = (),
        retry_after: float | None = None,
        instance: str | None = None,
    ) -> None:
        message = f"{type}: {detail}" if detail else type
        if status:
            message = f"{message} (HTTP {status})"
        super().__init__(message)
        self.type = type
        self.detail = detail
        self.status = status
        self.subproblems = subproblems
        self.retry_after = retry_after
        self.instance = instance

    @property
    def acme_type(self) -> str | None:
        """The short ACME error name (``badNonce``), or None for non-ACME problem types."""
        return _short_type(self.type)


# One class per RFC 8555 s6.7 error type (plus RFC 9773 alreadyReplaced and the
# non-standard ``conflict`` some CAs send with 409). The names follow the brief's agreed API.
class AccountDoesNotExist(AcmeProblem):
    """The key has no account and ``onlyReturnExisting`` was set (RFC 8555 s7.3.1)."""


class AlreadyReplaced(AcmeProblem):
    """The certificate named in ``replaces`` was already replaced (RFC 9773 s5)."""


class AlreadyRevoked(AcmeProblem):
    """The certificate is already revoked (RFC 8555 s7.6)."""


class BadCSR(AcmeProblem):
    """The CSR is unacceptable (e.g. a weak key)."""


class BadNonce(AcmeProblem):
    """The JWS nonce was unacceptable; retry with a fresh one (RFC 8555 s6.5)."""


class BadPublicKey(AcmeProblem):
    """The JWS was signed by a public key the CA does not support."""


class BadRevocationReason(AcmeProblem):
    """The revocation reason is not allowed."""


class BadSignatureAlgorithm(AcmeProblem):
    """The JWS algorithm is not supported; the problem may list ``algorithms`` (s6.2)."""


class CAA(AcmeProblem):
    """CAA records forbid this CA from issuing for the name."""


class Compound(AcmeProblem):
    """Several errors occurred; see ``subproblems``."""


class Conflict(AcmeProblem):
    """The request conflicts with the current state (non-standard type, HTTP 409)."""


class Connection(AcmeProblem):
    """The CA could not connect to the validation target."""


class DNSProblem(AcmeProblem):
    """The CA's DNS lookup for the name failed."""


class ExternalAccountRequired(AcmeProblem):
    """The CA requires external account binding for new accounts (RFC 8555 s7.3.4)."""


class IncorrectResponse(AcmeProblem):
    """The response to a challenge did not satisfy the CA."""


class InvalidContact(AcmeProblem):
    """A contact URL is invalid."""


class Malformed(AcmeProblem):
    """The request message was malformed."""


class OrderNotReady(AcmeProblem):
    """Finalize was sent before the order was ``ready`` (RFC 8555 s7.4)."""


class RateLimited(AcmeProblem):
    """A rate limit was hit; ``retry_after`` says when to try again."""


class RejectedIdentifier(AcmeProblem):
    """The CA will not issue for this identifier."""


class ServerInternal(AcmeProblem):
    """The CA had an internal error."""


class TLSProblem(AcmeProblem):
    """The CA got a TLS error during validation."""


class Unauthorized(AcmeProblem):
    """The client lacks authorization (includes failed challenge validation at some CAs)."""


class UnsupportedContact(AcmeProblem):
    """A contact URL uses an unsupported scheme."""


class UnsupportedIdentifier(AcmeProblem):
    """The identifier type is not supported."""


class UserActionRequired(AcmeProblem):
    """A human must visit ``instance`` (e.g. to accept new terms)."""


PROBLEM_TYPES: dict[str, type[AcmeProblem]] = {
    "accountDoesNotExist": AccountDoesNotExist,
    "alreadyReplaced": AlreadyReplaced,
    "alreadyRevoked": AlreadyRevoked,
    "badCSR": BadCSR,
    "badNonce": BadNonce,
    "badPublicKey": BadPublicKey,
    "badRevocationReason": BadRevocationReason,
    "badSignatureAlgorithm": BadSignatureAlgorithm,
    "caa": CAA,
    "compound": Compound,
    "conflict": Conflict,
    "connection": Connection,
    "dns": DNSProblem,
    "externalAccountRequired": ExternalAccountRequired,
    "incorrectResponse": IncorrectResponse,
    "invalidContact": InvalidContact,
    "malformed": Malformed,
    "orderNotReady": OrderNotReady,
    "rateLimited": RateLimited,
    "rejectedIdentifier": RejectedIdentifier,
    "serverInternal": ServerInternal,
    "tls": TLSProblem,
    "unauthorized": Unauthorized,
    "unsupportedContact": UnsupportedContact,
    "unsupportedIdentifier": UnsupportedIdentifier,
    "userActionRequired": UserActionRequired,
}
"""Short ACME error name -> class. Unknown or non-ACME types become plain ``AcmeProblem``."""


def problem_class(type_: str) -> type[AcmeProblem]:
    """The ``AcmeProblem`` subclass for a full problem type URN."""
    short = _short_type(type_)
    return PROBLEM_TYPES.get(short, AcmeProblem) if short else AcmeProblem


class OrderInvalid(AcmeError):
    """The order became ``invalid`` (RFC 8555 s7.1.6): the certificate will not be issued.

    ``problem`` is the most specific reason we found: the failing challenge's error when a
    validation failed, else the order's own ``error``, else None.
    """

    def __init__(
        self,
        order_url: str,
        problem: AcmeProblem | None,
        identifier: str | None = None,
        challenge_type: str | None = None,
    ):
        what = f"order {order_url} is invalid"
        if identifier:
            what += f" (authorization for {identifier!r} failed)"
        super().__init__(f"{what}: {problem}" if problem else what)
        self.order_url = order_url
        self.problem = problem
        self.identifier = identifier
        # The type of the challenge whose validation failed (``tls-alpn-01`` ...), if one did.
        self.challenge_type = challenge_type


def _short_type(type_: str) -> str | None:
    return type_[len(ACME_ERROR_PREFIX) :] if type_.startswith(ACME_ERROR_PREFIX) else None
