"""Per-name state an unauthenticated client can create is bounded, and only orders write storage.

Anyone who can send a ClientHello picks the names: a flood of random names under an allowed
wildcard once left a status file and an in-memory entry per name even when the order rate
limit stopped every one of them. Real FileStorage and the real internal CA; the bounds are set
small so the tests can reach them.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio
import trio.testing

from edgeproxy.certs.manager import CertificateManager
from edgeproxy.errors import CertificateUnavailable
from edgeproxy.storage.file import FileStorage
from testkit.managers import HookedIssuer, manager_for


class GatedIssuer(HookedIssuer):
    """The real internal CA; with ``gate`` set, every issuance waits for it."""

    gate: trio.Event | None = None

    async def before_issue(self, name: str) -> None:
        if self.gate is not None:
            await self.gate.wait()


def make(tmp_path: Path, **kw: object) -> tuple[CertificateManager, FileStorage, GatedIssuer]:
    storage = FileStorage(tmp_path / "state")
    issuer = GatedIssuer(storage)
    return manager_for(storage, issuer, "*.allowed.test", **kw), storage, issuer


def random_names(n: int) -> list[str]:
    return [f"r{secrets.token_hex(6)}.allowed.test" for _ in range(n)]


async def stored(storage: FileStorage, prefix: str) -> list[str]:
    return [item.key for item in await storage.list(prefix)]


async def test_rate_limited_names_write_nothing_and_are_remembered_boundedly(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, _ = make(tmp_path, max_orders_per_minute=1, unordered_size=4)
    await nursery.start(mgr.run)
    names = random_names(15)
    reasons = []
    for name in names:
        try:
            await mgr.context_for(name)
            reasons.append("issued")
        except CertificateUnavailable as exc:
            reasons.append(exc.reason)
    assert reasons == ["issued"] + ["order_rate_limited"] * 14
    await trio.testing.wait_all_tasks_blocked()  # status persistence runs in the background
    # Storage: the one name that reached an order, nothing for the 14 others.
    assert await stored(storage, "status/") == [f"status/{names[0]}.json"]
    assert await stored(storage, "certs/") == [f"certs/{names[0]}.json"]
    assert [st.name for st in mgr.statuses()] == [names[0]]
    # Memory: the operator still sees why the latest ones failed, at most 4 of them.
    remembered = [n for n in names[1:] if mgr.status(n) is not None]
    assert remembered == names[-4:]
    st = mgr.status(names[-1])
    assert st is not None and st.last_error_type == "order_rate_limited"


async def test_refused_names_are_bounded_too(tmp_path: Path, nursery: trio.Nursery) -> None:
    mgr, storage, _ = make(tmp_path, unordered_size=3)
    await nursery.start(mgr.run)
    names = [f"r{secrets.token_hex(6)}.elsewhere.test" for _ in range(10)]
    for name in names:
        with pytest.raises(CertificateUnavailable):
            await mgr.context_for(name)
    await trio.testing.wait_all_tasks_blocked()
    assert await stored(storage, "status/") == []
    assert [n for n in names if mgr.status(n) is not None] == names[-3:]


async def test_statuses_of_ordered_names_are_bounded_in_memory_not_in_storage(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, _ = make(tmp_path, status_size=3)
    await nursery.start(mgr.run)
    names = sorted(random_names(5))
    for name in names:
        await mgr.context_for(name)
    await trio.testing.wait_all_tasks_blocked()
    assert len(mgr.statuses()) == 3
    # Each of them reached an order: all five statuses are stored (the admin API reads them).
    assert await stored(storage, "status/") == [f"status/{n}.json" for n in names]


async def test_acquisitions_in_flight_are_bounded(tmp_path: Path, nursery: trio.Nursery) -> None:
    mgr, _, issuer = make(tmp_path, max_inflight=2)
    issuer.gate = trio.Event()
    await nursery.start(mgr.run)
    results: dict[str, str] = {}

    async def handshake(name: str) -> None:
        try:
            await mgr.context_for(name)
            results[name] = "issued"
        except CertificateUnavailable as exc:
            results[name] = exc.reason

    names = random_names(3)
    async with trio.open_nursery() as n:
        for name in names[:2]:
            n.start_soon(handshake, name)
        await trio.testing.wait_all_tasks_blocked()
        await handshake(names[2])  # both slots taken: refused at once, nothing queued
        assert results == {names[2]: "busy"}
        issuer.gate.set()
    assert results == {names[0]: "issued", names[1]: "issued", names[2]: "busy"}
    await mgr.context_for(names[2])  # a slot is free again
