"""The real CertificateManager over real storage and the real internal CA, for the manager tests.

``HookedIssuer`` is the internal CA with one overridable step in front of every issuance (wait on
a gate, count, raise an injected failure); ``manager_for`` builds the manager the way those tests
share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.issuers.base import IssuedCertificate, IssueRequest
from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.base import Storage
from edgeproxy.storage.file import FileStorage


class HookedIssuer(InternalIssuer):
    """The real internal CA; ``before_issue`` runs first and may wait, count or raise."""

    async def before_issue(self, name: str) -> None:
        """Nothing by default: subclasses add what their test observes or injects."""

    async def issue(self, request: IssueRequest) -> IssuedCertificate:
        await self.before_issue(request.name)
        return await super().issue(request)


def manager_for(
    storage: Storage, issuer: InternalIssuer, allow: str, **kw: Any
) -> CertificateManager:
    """A manager ordering for names matching ``allow``; a 5 s handshake wait and an hourly
    maintenance pass (tests drive renewals by hand) unless ``kw`` says otherwise."""
    args: dict[str, Any] = {"wait": 5, "renew_interval": 3600, **kw}
    return CertificateManager(
        storage=storage, issuer=issuer, policy=OnDemandPolicy(allow=[allow]), **args
    )


class CountingIssuer(HookedIssuer):
    """The real internal CA, counting how often it is asked to issue."""

    calls: int = 0

    async def before_issue(self, name: str) -> None:
        self.calls += 1
        await trio.sleep(0.05)  # let concurrent handshakes pile up on the single flight


def make_manager(
    tmp_path: Path, **kw: object
) -> tuple[CertificateManager, FileStorage, CountingIssuer]:
    storage = FileStorage(tmp_path / "state")
    issuer = CountingIssuer(storage)
    policy = OnDemandPolicy(allow=["*.example.test"])
    mgr = CertificateManager(storage=storage, issuer=issuer, policy=policy, **kw)  # type: ignore[arg-type]
    return mgr, storage, issuer
