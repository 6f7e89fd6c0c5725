"""The per-name backoff after a failed order is shared through storage: other workers and
replicas on the same storage, and a restarted process, wait as the one that failed does.

Real FileStorage in tmp shared by several managers (what several workers or replicas are);
the issuer is the real internal CA made to fail validation, counting its attempts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import Backoff, backoff_key
from edgeproxy.errors import CertificateUnavailable
from edgeproxy.issuers.base import IssuanceError
from edgeproxy.reasons import Failure
from edgeproxy.storage.file import FileStorage
from testkit.managers import HookedIssuer

NAME = "dead-cname.example.test"


class FailingIssuer(HookedIssuer):
    """Every validation fails, as for a name whose DNS points elsewhere."""

    attempts = 0

    async def before_issue(self, name: str) -> None:
        FailingIssuer.attempts += 1
        raise IssuanceError(Failure.problem("urn:ietf:params:acme:error:unauthorized", "wrong answer"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def manager(
    storage: FileStorage, clock: Clock, issuer: type[FailingIssuer] = FailingIssuer
) -> CertificateManager:
    return CertificateManager(storage=storage, issuer=issuer(storage), clock=clock,
                              policy=OnDemandPolicy(allow=["*.example.test"]),
                              backoff_base=60.0, wait=10.0)  # fmt: skip


async def handshake(mgr: CertificateManager) -> None:
    with pytest.raises(CertificateUnavailable):
        await mgr.context_for(NAME)


async def stored(storage: FileStorage) -> Backoff:
    raw = await storage.get(backoff_key(NAME))
    assert raw is not None
    return Backoff.from_json(raw)


async def test_backoff_is_shared_by_processes_and_kept_across_restarts(tmp_path: Path) -> None:
    FailingIssuer.attempts = 0
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    async with trio.open_nursery() as nursery:
        workers = [manager(storage, clock) for _ in range(3)]
        for mgr in workers:
            await nursery.start(mgr.run)
        for _ in range(3):  # visitors keep coming, to every worker
            for mgr in workers:
                await handshake(mgr)
        assert FailingIssuer.attempts == 1
        first = await stored(storage)
        assert first.failures == 1 and first.next_attempt > clock.now
        # A restart of all of them: the backoff is in storage, not in their memory.
        restarted = [manager(storage, clock) for _ in range(3)]
        for mgr in restarted:
            await nursery.start(mgr.run)
            await handshake(mgr)
        assert FailingIssuer.attempts == 1
        st = restarted[0].status(NAME)
        assert st is not None and st.next_attempt == first.next_attempt
        # Once the time has come, one more attempt, and the next wait is longer.
        clock.now = first.next_attempt + 1
        for mgr in restarted:
            await handshake(mgr)
        assert FailingIssuer.attempts == 2
        second = await stored(storage)
        assert second.failures == 2
        assert second.next_attempt - clock.now > (first.next_attempt - 1_800_000_000.0) / 2
        nursery.cancel_scope.cancel()


class SlowFailingIssuer(FailingIssuer):
    """Fails only once every worker has started its own order for the name (and so waits on
    the lease, or has already looked at storage before it)."""

    workers: list[CertificateManager] = []

    async def before_issue(self, name: str) -> None:
        while FailingIssuer.attempts == 0 and not all(
            (st := mgr.status(name)) is not None and st.state == "issuing"
            for mgr in SlowFailingIssuer.workers
        ):
            await trio.sleep(0.01)
        if FailingIssuer.attempts == 0:
            await trio.sleep(0.2)  # what they read before the lease (if anything) is read now
        await super().before_issue(name)


async def test_workers_waiting_on_the_lease_read_the_backoff_it_leaves(tmp_path: Path) -> None:
    """Visitors reach three workers at once: one orders and fails, the two waiting on its lease
    must see the backoff it stored when they get the lease, not what storage held before."""
    FailingIssuer.attempts = 0
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    workers = [manager(storage, clock, SlowFailingIssuer) for _ in range(3)]
    SlowFailingIssuer.workers = workers
    async with trio.open_nursery() as nursery:
        for mgr in workers:
            await nursery.start(mgr.run)
        with trio.fail_after(30):
            async with trio.open_nursery() as visitors:
                for mgr in workers:
                    visitors.start_soon(handshake, mgr)
        assert FailingIssuer.attempts == 1
        assert (await stored(storage)).failures == 1
        nursery.cancel_scope.cancel()
