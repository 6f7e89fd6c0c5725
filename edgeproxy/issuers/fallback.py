"""``FallbackIssuer``: several ACME CAs in order of preference (``[[acme.issuers]]``).

Owns the order only. ``issue`` asks each member in turn and returns the first certificate; a
member that cannot issue for the name (validation failing with every challenge type, a rate
limit, the CA unreachable or answering 5xx, any other refusal) hands over to the next at once,
within the same handshake wait. Every order starts with the first member again, so renewals go
back to the preferred CA as soon as it works. Each member keeps its own account (accounts are
stored by directory URL) and the certificate record names the member that issued it
(``issuer_id`` is its directory), which is how ARI and ``replaces`` find their way back to the
right CA (``issuer_for``).

Must not know: ACME itself, storage, the certificate manager's schedule.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

from .. import metrics
from .base import IssuanceError, IssuedCertificate, Issuer, IssueRequest, RenewalWindow

log = logging.getLogger("edgeproxy.acme")


class Member(Issuer, Protocol):
    @property
    def label(self) -> str:
        """Short name for metrics and logs."""

    async def aclose(self) -> None: ...


class FallbackIssuer:
    def __init__(self, members: Sequence[Member]) -> None:
        if not members:
            raise ValueError("FallbackIssuer needs at least one issuer")
        self.members = tuple(members)

    @property
    def id(self) -> str:
        """The preferred member's id (what a certificate "issued here" usually says)."""
        return self.members[0].id

    def member(self, issuer_id: str) -> Member | None:
        return next((m for m in self.members if m.id == issuer_id), None)

    async def issue(self, request: IssueRequest) -> IssuedCertificate:
        failed: list[str] = []
        for i, member in enumerate(self.members):
            # ``replacing`` goes to every member: a CA that did not issue the old certificate
            # refuses `replaces`, and the client orders again without it (acme/client.py).
            try:
                issued = await member.issue(request)
            except IssuanceError as exc:
                metrics.ISSUER_ORDERS.labels(member.label, "failed").inc()
                said = exc.failure
                if i + 1 == len(self.members):
                    raise IssuanceError(
                        dataclasses.replace(said, earlier=(*failed, *said.earlier))
                    ) from None
                following = self.members[i + 1].label
                log.warning(
                    "issuer %s could not issue for %s (%s: %s); trying issuer %s",
                    member.label,
                    request.name,
                    said.short_type,
                    said.detail,
                    following,
                )
                metrics.ISSUER_FALLBACKS.labels(member.label, following).inc()
                failed.append(f"issuer {member.label}: {said.short_type}: {said.detail}")
                continue
            metrics.ISSUER_ORDERS.labels(member.label, "valid").inc()
            return issued
        raise AssertionError("unreachable: the last member's failure is raised above")

    async def renewal_window(self, chain_pem: bytes) -> RenewalWindow | None:
        """Not asked directly: ARI goes to the member that issued (``issuer_for``)."""
        return None

    async def aclose(self) -> None:
        for member in self.members:
            await member.aclose()


def issuer_for(issuer: Issuer, issuer_id: str) -> Issuer | None:
    """The issuer (or member of a ``FallbackIssuer``) that made certificates with
    ``issuer_id``, or None when none of ours did (another CA, or the config changed)."""
    if isinstance(issuer, FallbackIssuer):
        return issuer.member(issuer_id)
    return issuer if issuer.id == issuer_id else None
