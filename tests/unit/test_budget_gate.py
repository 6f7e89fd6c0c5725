"""The [acme.limits] gate in the certificate manager, with the real internal CA made to fail:
failed validations per hostname come from the shared backoff record (only validations count),
the admin API's issue answers a spent budget with its limit, and the hostname API says
``rate_limited``. Real FileStorage, real CertificateManager, an injected clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from edgeproxy.admin.hostnames import hostname_state
from edgeproxy.certs.budget_store import CaBudgets
from edgeproxy.certs.budgets import HOUR, Limits
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import Backoff, backoff_key
from edgeproxy.errors import CertificateUnavailable, OrderLimited
from edgeproxy.issuers.base import IssuanceError
from edgeproxy.reasons import Failure
from edgeproxy.storage.base import HostnameEntry
from edgeproxy.storage.file import FileStorage
from testkit.managers import HookedIssuer

NAME = "dead.example.test"
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FailingIssuer(HookedIssuer):
    """Fails every order; ``challenge`` set: the CA's validation failed (else a CA error)."""

    def __init__(self, storage: FileStorage, challenge: str | None) -> None:
        super().__init__(storage)
        self.challenge = challenge
        self.attempts = 0

    async def before_issue(self, name: str) -> None:
        self.attempts += 1
        if self.challenge is None:
            raise IssuanceError(
                Failure.problem("urn:ietf:params:acme:error:serverInternal", "CA trouble")
            )
        raise IssuanceError(
            Failure.problem(
                "urn:ietf:params:acme:error:unauthorized", "wrong answer", challenge_type=self.challenge
            )
        )


class CountingIssuer(HookedIssuer):
    orders = 0

    async def before_issue(self, name: str) -> None:
        CountingIssuer.orders += 1


def manager(
    storage: FileStorage, clock: Clock, issuer: HookedIssuer, limits: Limits
) -> CertificateManager:
    budgets = CaBudgets(storage, limits, account="internal", clock=clock)
    return CertificateManager(storage=storage, issuer=issuer, clock=clock, budgets=budgets,
                              policy=OnDemandPolicy(allow=["*.example.test"]),
                              backoff_base=10.0, wait=10.0, renew_interval=3600)  # fmt: skip


async def fail_until_refused(mgr: CertificateManager, storage: FileStorage, clock: Clock) -> int:
    """Visit NAME after each backoff until a visit sends no order; the orders sent."""
    issuer = mgr.issuer
    assert isinstance(issuer, FailingIssuer)
    for _ in range(20):
        before = issuer.attempts
        with pytest.raises(CertificateUnavailable):
            await mgr.context_for(NAME)
        if issuer.attempts == before:
            break
        clock.now = await after_backoff(mgr, storage)
    return issuer.attempts


async def after_backoff(mgr: CertificateManager, storage: FileStorage) -> float:
    """A moment when both the shared backoff and this process's status let NAME go again."""
    raw = await storage.get(backoff_key(NAME))
    st = mgr.status(NAME)
    assert raw is not None and st is not None and st.next_attempt is not None
    return max(Backoff.from_json(raw).next_attempt, st.next_attempt) + 1


@pytest.mark.parametrize("limit", [3, 5])
async def test_failed_validations_per_hostname_per_hour(tmp_path: Path, limit: int) -> None:
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    issuer = FailingIssuer(storage, "tls-alpn-01")
    mgr = manager(storage, clock, issuer, Limits(failed_validations_per_hostname=limit))
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        assert await fail_until_refused(mgr, storage, clock) == limit
        st = mgr.status(NAME)
        assert st is not None and st.state == "rate_limited"
        assert st.extra["limit"] == "acme.limits.failed_validations_per_hostname"
        # The backoff record keeps the times; the first leaves the hour first.
        raw = await storage.get(backoff_key(NAME))
        assert raw is not None
        times = Backoff.from_json(raw).validations
        assert len(times) == limit and st.next_attempt == times[0] + HOUR
        # A restarted process reads the same record: still no order.
        again = manager(storage, clock, issuer, Limits(failed_validations_per_hostname=limit))
        await nursery.start(again.run)
        with pytest.raises(CertificateUnavailable) as refused:
            await again.context_for(NAME)
        assert refused.value.reason == "rate_limited"
        assert issuer.attempts == limit
        # An hour after the first failure: one more attempt.
        clock.now = times[0] + HOUR + 1
        with pytest.raises(CertificateUnavailable):
            await again.context_for(NAME)
        assert issuer.attempts == limit + 1
        nursery.cancel_scope.cancel()


async def test_failures_that_are_not_validations_do_not_count(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    issuer = FailingIssuer(storage, None)
    mgr = manager(storage, clock, issuer, Limits(failed_validations_per_hostname=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        for _ in range(4):
            with pytest.raises(CertificateUnavailable):
                await mgr.context_for(NAME)
            raw = await storage.get(backoff_key(NAME))
            assert raw is not None and Backoff.from_json(raw).validations == ()
            clock.now = await after_backoff(mgr, storage)
        assert issuer.attempts == 4
        nursery.cancel_scope.cancel()


async def test_admin_issue_answers_a_spent_budget_with_its_limit(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    CountingIssuer.orders = 0
    limits = Limits(new_orders_per_account=1)
    one = manager(storage, clock, CountingIssuer(storage), limits)
    two = manager(storage, clock, CountingIssuer(storage), limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(one.run)
        await nursery.start(two.run)
        assert await one.issue_now("a.example.test") is not None
        # The other process spent nothing itself: the budget in storage says wait.
        with pytest.raises(OrderLimited) as first:
            await two.issue_now("b.example.test")
        assert first.value.limit == "acme.limits.new_orders_per_account"
        assert 3 * HOUR - 1 <= first.value.retry_after <= 3 * HOUR
        # Asked again: answered from the status, without the lease or storage.
        with pytest.raises(OrderLimited) as second:
            await two.issue_now("b.example.test", force=True)
        assert second.value.limit == first.value.limit
        assert CountingIssuer.orders == 1
        st = two.status("b.example.test")
        entry = HostnameEntry("b.example.test", None, "{}", T0)
        assert hostname_state(entry, st, None, clock.now) == "rate_limited"
        nursery.cancel_scope.cancel()
