"""The certificate manager honours an account pause: the gate before each order, the
``account_paused`` status, and ordering again by itself when the pause ends.

Real FileStorage in tmp shared by several managers, each with its own ``AccountPauses`` (what
several replicas are); the issuer is the real internal CA, made to answer like an ACME issuer
whose CA said rateLimited (it records the pause and raises ``account_paused``, as
``AcmeIssuer`` does; the ACME side is covered by tests/cluster/test_account_pause.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from edgeproxy.admin.hostnames import hostname_state
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.record import backoff_key, cert_key
from edgeproxy.errors import CertificateUnavailable, OrderLimited
from edgeproxy.issuers.account_pause import (
    ACCOUNT_PAUSED,
    RATE_LIMITED,
    AccountPauses,
)
from edgeproxy.issuers.base import IssuanceError, IssuedCertificate, IssueRequest
from edgeproxy.reasons import Failure
from edgeproxy.storage.base import HostnameEntry
from edgeproxy.storage.file import FileStorage
from testkit.managers import HookedIssuer, manager_for

CA = "https://acme.example.test/directory"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class LimitedCA(HookedIssuer):
    """Issues, except while ``limited``: then it answers as AcmeIssuer does after the CA's
    rateLimited with Retry-After 60. Counts the orders that reached it."""

    limited = False
    orders: list[str] = []

    def __init__(self, storage: FileStorage, pauses: AccountPauses, clock: Clock) -> None:
        super().__init__(storage)
        self.pauses = pauses
        self.clock = clock

    async def issue(self, request: IssueRequest) -> IssuedCertificate:
        LimitedCA.orders.append(request.name)
        if LimitedCA.limited:
            pause = await self.pauses.record(
                CA, reason=RATE_LIMITED, detail="too many orders", retry_after=60.0
            )
            raise IssuanceError(
                Failure(ACCOUNT_PAUSED, "paused until later", retry_after=pause.until - self.clock())
            )
        return await super().issue(request)


def replica(storage: FileStorage, clock: Clock) -> CertificateManager:
    pauses = AccountPauses(storage, clock=clock)
    pauses.watch(CA, "ca")
    # A long handshake wait: a refusal must come from the pause, never from a loaded machine.
    return manager_for(storage, LimitedCA(storage, pauses, clock), "*.example.test", clock=clock,
                       account_pauses=pauses, wait=60)  # fmt: skip


async def refused(mgr: CertificateManager, name: str) -> None:
    with pytest.raises(CertificateUnavailable):
        await mgr.context_for(name)


async def test_a_paused_account_holds_every_replica_and_resumes_by_itself(
    tmp_path: Path,
) -> None:
    LimitedCA.orders, LimitedCA.limited = [], True
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    async with trio.open_nursery() as nursery:
        one, two = replica(storage, clock), replica(storage, clock)
        for mgr in (one, two):
            await nursery.start(mgr.run)
        LimitedCA.limited = False
        await two.context_for("old.example.test")  # issued before the CA's limit, cached
        LimitedCA.orders, LimitedCA.limited = [], True
        await refused(one, "a.example.test")
        assert LimitedCA.orders == ["a.example.test"]
        LimitedCA.limited = False  # only edgeproxy's own pause holds orders back from here
        st = one.status("a.example.test")
        assert st is not None and st.state == "account_paused"
        assert st.last_error_type == ACCOUNT_PAUSED and st.hint and "rate-limited" in st.hint
        assert st.failures == 0  # the account's wait is not the name's failure
        assert st.next_attempt is not None and abs(st.next_attempt - (clock.now + 60)) < 2
        assert await storage.get(backoff_key("a.example.test")) is None
        # The hostname registry's view (API, status page, CLI) says so too.
        entry = HostnameEntry("a.example.test", None, "{}", clock.now)
        assert hostname_state(entry, st, None, clock.now) == "account_paused"

        # Another replica, and one started after the pause: no order, the same status.
        three = replica(storage, clock)
        await nursery.start(three.run)
        for mgr, name in ((two, "b.example.test"), (three, "c.example.test")):
            await refused(mgr, name)
            got = mgr.status(name)
            assert got is not None and got.state == "account_paused", got
            assert got.next_attempt is not None and abs(got.next_attempt - st.next_attempt) < 1
        # A renewal waits too, and its certificate keeps being served meanwhile.
        renewing = await two._load("old.example.test")
        assert renewing is not None
        assert await two.obtain("old.example.test", old=renewing, force=True) is None
        held = two.status("old.example.test")
        assert held is not None and held.state == "account_paused", held
        assert held.hint and "still served until" in held.hint
        assert two.cached_context("old.example.test") is not None
        await refused(one, "a.example.test")  # asked again: still waiting, no order
        with pytest.raises(OrderLimited) as limited:  # the admin API's issue, forced or not
            await two.issue_now("d.example.test", force=True)
        assert limited.value.limit == "acme_account_paused"
        assert 58 < limited.value.retry_after <= 60 and "paused until" in limited.value.detail
        assert LimitedCA.orders == ["a.example.test"]
        due = {e.name: e.at for e in await storage.due_names(clock.now + 61, 10)}
        assert {"a.example.test", "b.example.test", "c.example.test"} <= set(due)
        assert due["old.example.test"] == held.next_attempt
        del due["old.example.test"]

        # The pause ends: a maintenance pass orders every waiting name, no visitor needed.
        clock.now += 61
        await three.maintenance_once()
        with trio.fail_after(60):
            while not all([await storage.get(cert_key(n)) for n in due]):
                await trio.sleep(0.05)
        assert sorted(LimitedCA.orders) == ["a.example.test", "a.example.test",
                                            "b.example.test", "c.example.test"]  # fmt: skip
        nursery.cancel_scope.cancel()
