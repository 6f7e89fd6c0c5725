"""The ``Issuer`` seam: something that turns (name, private key) into a certificate chain.

Implementations: ``InternalIssuer`` (a local CA kept in storage, for the demo, dev and private
names) and ``AcmeIssuer`` (any RFC 8555 CA). The certificate manager drives them and owns
caching, locking and renewal; an issuer only issues.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from ..reasons import Failure


def private_key_pem(key: CertificateIssuerPrivateKeyTypes) -> str:
    """The one form in which edgeproxy stores private keys: unencrypted PKCS#8 PEM (storage
    records are secret: 0600 files, or encrypted rows in PostgreSQL)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """One certificate to issue: for every name of ``names`` (the first is the subject), with
    the public half of ``private_key``.

    ``replacing`` is the PEM chain of the certificate this one renews, when that one came
    from this same issuer: an ACME issuer turns it into an ARI ``replaces`` CertID.
    ``prefer`` is the challenge type that validated for these names last time: tried first.
    """

    names: tuple[str, ...]
    private_key: CertificateIssuerPrivateKeyTypes
    replacing: bytes | None = None
    prefer: str | None = None

    @property
    def name(self) -> str:
        """The subject (and, for the on-demand manager, the only name)."""
        return self.names[0]


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    chain_pem: bytes  # leaf first, then intermediates
    issuer_id: str  # stable id of who issued it (ACME directory URL, or "internal")
    challenge_type: str | None = None  # the ACME challenge that validated (None: no ACME)


@dataclass(frozen=True, slots=True)
class RenewalWindow:
    """A CA-suggested renewal window (ARI, RFC 9773 section 4.2)."""

    start: datetime
    end: datetime
    explanation_url: str | None = None
    retry_after: float | None = None  # seconds until we should ask again


class Issuer(Protocol):
    @property
    def id(self) -> str:
        """Stable identifier stored with each certificate (which CA issued it)."""

    async def issue(self, request: IssueRequest) -> IssuedCertificate:
        """Issue the certificate ``request`` describes."""

    async def renewal_window(self, chain_pem: bytes) -> RenewalWindow | None:
        """The CA's suggested renewal window, or None when the CA offers no ARI at all.

        Raises ``RenewalInfoError`` when the CA offers ARI but gave no window for this
        certificate (``long_term`` says whether asking again soon could help).
        """


class IssuanceError(Exception):
    """Issuance failed: ``failure`` says why, typed (the CA's problem type and detail, or one
    of our reasons), with ``retry_after`` and the challenge type tried.

    The certificate manager decides retries and hints from ``failure.reason`` and
    ``retry_after``, never from the message text.
    """

    def __init__(self, failure: Failure) -> None:
        super().__init__(f"{failure.type}: {failure.detail}")
        self.failure = failure


class RenewalInfoError(IssuanceError):
    """The CA's renewal window could not be had for one certificate (RFC 9773 s4.3.3).

    ``long_term`` is True when the CA answered that it has none (a 4xx such as 404 "not
    found" from a CA that does not recognise the CertID): the caller renews by its own
    schedule, without ``replaces``, and asks again only after the long-term interval.
    False for short-term trouble (no answer, 429, 5xx): ask again with backoff. ``status``
    is the HTTP status (0: no answer).
    """

    def __init__(self, failure: Failure, *, long_term: bool, status: int = 0) -> None:
        super().__init__(failure)
        self.long_term = long_term
        self.status = status
