"""The CA budgets in storage (certs/budget_store.py), on the file backend and PostgreSQL: shared
by every handle on one store, kept across a restart, never overspent by concurrent admits,
bounded in size."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from edgeproxy.certs.budget_store import (
    Admitted,
    CaBudgets,
    account_key,
    domain_key,
    name_set_key,
)
from edgeproxy.certs.budgets import DAY, HOUR, Limits, Wait
from edgeproxy.storage import FileStorage, Storage
from edgeproxy.storage.postgres import PostgresStorage
from testkit import postgres as pg

postgres_server = pg.postgres_server
postgres_database = pg.postgres_database
postgres_dsn = pg.postgres_dsn

T0 = 1_800_000_000.0
ACCOUNT = "https://ca.test/directory"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["file", "postgres"])
async def open_storage(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Storage]]:
    """Opens handles on one shared store (as separate processes would)."""
    opened: list[Storage] = []
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")

        def make() -> Storage:
            opened.append(PostgresStorage(dsn))
            return opened[-1]
    else:

        def make() -> Storage:
            opened.append(FileStorage(tmp_path / "store"))
            return opened[-1]

    yield make
    for s in opened:
        await s.aclose()


def budgets(storage: Storage, clock: Clock, limits: Limits) -> CaBudgets:
    return CaBudgets(storage, limits, account=ACCOUNT, clock=clock)


async def test_handles_on_one_store_share_the_budget_and_a_restart_keeps_it(
    open_storage: Callable[[], Storage],
) -> None:
    clock = Clock()
    limits = Limits(new_orders_per_account=2)
    one, two = budgets(open_storage(), clock, limits), budgets(open_storage(), clock, limits)
    assert isinstance(await one.admit(["a.example.com"], "new"), Admitted)
    clock.now += 60
    assert isinstance(await two.admit(["b.example.org"], "new"), Admitted)
    clock.now += 60
    third = await one.admit(["c.example.net"], "new")
    assert isinstance(third, Wait)
    assert third.limit == "new_orders_per_account"
    assert third.until == T0 + 3 * HOUR
    restarted = budgets(open_storage(), clock, limits)
    assert isinstance(await restarted.admit(["c.example.net"], "new"), Wait)
    # The first order leaves the window: one fits again, and only one.
    clock.now = T0 + 3 * HOUR
    assert isinstance(await restarted.admit(["c.example.net"], "new"), Admitted)
    assert isinstance(await one.admit(["d.example.net"], "new"), Wait)


async def test_concurrent_admits_never_overspend(open_storage: Callable[[], Storage]) -> None:
    clock = Clock()
    limits = Limits(new_orders_per_account=3)
    handles = [budgets(open_storage(), clock, limits) for _ in range(3)]
    results: list[Admitted | Wait] = []

    async def order(i: int) -> None:
        results.append(await handles[i % 3].admit([f"n{i}.example.com"], "new"))

    async with trio.open_nursery() as nursery:
        for i in range(9):
            nursery.start_soon(order, i)
    assert sum(isinstance(r, Admitted) for r in results) == 3
    raw = await open_storage().get(account_key(ACCOUNT))
    assert raw is not None and len(json.loads(raw)["orders"]) == 3


async def test_registered_domain_is_shared_by_its_names_and_renewals_are_exempt(
    open_storage: Callable[[], Storage],
) -> None:
    clock = Clock()
    b = budgets(open_storage(), clock, Limits(certificates_per_registered_domain=2))
    assert isinstance(await b.admit(["a.shop.example.co.uk"], "new"), Admitted)
    assert isinstance(await b.admit(["b.example.co.uk"], "new"), Admitted)
    full = await b.admit(["c.x.example.co.uk"], "new")
    assert isinstance(full, Wait) and full.limit == "certificates_per_registered_domain"
    assert full.until == T0 + 7 * DAY
    # Another registered domain has its own budget; a renewal does not draw on it.
    assert isinstance(await b.admit(["c.example.org.uk"], "new"), Admitted)
    assert isinstance(await b.admit(["b.example.co.uk"], "renewal"), Admitted)


async def test_duplicates_and_failed_validations(open_storage: Callable[[], Storage]) -> None:
    clock = Clock()
    b = budgets(open_storage(), clock, Limits(duplicate_certificates=1))
    assert isinstance(await b.admit(["a.example.com"], "new"), Admitted)
    dup = await b.admit(["a.example.com"], "renewal")
    assert isinstance(dup, Wait) and dup.limit == "duplicate_certificates"
    # The failures come from the name's backoff record, passed in by the caller.
    failures = [T0 - 50 * i for i in range(1, 6)]
    failed = await b.admit(["z.example.com"], "new", failures)
    assert isinstance(failed, Wait) and failed.limit == "failed_validations_per_hostname"
    assert failed.until == T0 - 250 + HOUR


async def test_ari_renewals_pass_an_exhausted_budget_and_are_counted_apart(
    open_storage: Callable[[], Storage],
) -> None:
    clock = Clock()
    storage = open_storage()
    b = budgets(storage, clock, Limits(1, 1, 1, 1))
    assert isinstance(await b.admit(["a.example.com"], "new"), Admitted)
    assert isinstance(await b.admit(["b.example.com"], "new"), Wait)
    assert isinstance(await b.admit(["a.example.com"], "ari", [T0 - 1]), Admitted)
    raw = await storage.get(account_key(ACCOUNT))
    assert raw is not None
    record = json.loads(raw)
    assert record["orders"] == [T0] and record["ari"] == [T0]
    assert REGISTRY.get_sample_value("edgeproxy_acme_budget_exempt_orders") == 1.0


async def test_refund_gives_back_certificate_units_not_the_order(
    open_storage: Callable[[], Storage],
) -> None:
    clock = Clock()
    b = budgets(open_storage(), clock, Limits(2, 1, 5, 1))
    admitted = await b.admit(["a.example.com"], "new")
    assert isinstance(admitted, Admitted)
    await b.refund(["a.example.com"], admitted.at)
    clock.now += 1
    assert isinstance(await b.admit(["a.example.com"], "new"), Admitted)  # domain and dup back
    clock.now += 1
    left = await b.admit(["b.example.org"], "new")
    assert isinstance(left, Wait) and left.limit == "new_orders_per_account"  # orders stay spent


async def test_records_are_pruned_to_their_window(open_storage: Callable[[], Storage]) -> None:
    clock = Clock()
    storage = open_storage()
    b = budgets(storage, clock, Limits(new_orders_per_account=0, duplicate_certificates=0))
    step = 6 * HOUR
    for _ in range(40):  # ten days
        assert isinstance(await b.admit(["a.example.com"], "renewal"), Admitted)
        last = clock.now
        clock.now += step
    for key, field, window in (
        (account_key(ACCOUNT), "orders", 3 * HOUR),
        (name_set_key(["a.example.com"]), "certificates", 7 * DAY),
    ):
        raw = await storage.get(key)
        assert raw is not None
        times = json.loads(raw)[field]
        assert len(times) == -(-window // step)  # what the window holds, no more
        assert min(times) > last - window


async def test_unreadable_record_counts_as_empty_and_is_replaced(
    open_storage: Callable[[], Storage],
) -> None:
    clock = Clock()
    storage = open_storage()
    await storage.put(domain_key("a.example.com"), b"\x00not json")
    await storage.put(name_set_key(["a.example.com"]), b'{"certificates": ["x", true, 5]}')
    b = budgets(storage, clock, Limits())
    assert isinstance(await b.admit(["a.example.com"], "new"), Admitted)
    raw = await storage.get(domain_key("a.example.com"))
    assert raw is not None and json.loads(raw) == {"certificates": [T0]}


async def test_remaining_gauge_is_the_most_used_key(open_storage: Callable[[], Storage]) -> None:
    clock = Clock()
    b = budgets(open_storage(), clock, Limits(10, 3, 5, 0))
    await b.admit(["a.one.example"], "new")
    await b.admit(["b.one.example"], "new")
    await b.admit(["a.two.example"], "new")

    def value(limit: str) -> float | None:
        return REGISTRY.get_sample_value("edgeproxy_acme_budget_remaining", {"limit": limit})

    assert value("new_orders_per_account") == 7
    assert value("certificates_per_registered_domain") == 1  # one.example: 2 of 3 used
    assert value("duplicate_certificates") == float("inf")  # switched off
    # Windows empty with time, without any order.
    clock.now += 7 * DAY
    b.update_metrics()
    assert value("certificates_per_registered_domain") == 3
    assert value("new_orders_per_account") == 10


async def test_every_limit_off_keeps_nothing(open_storage: Callable[[], Storage]) -> None:
    storage = open_storage()
    b = budgets(storage, Clock(), Limits(0, 0, 0, 0))
    for _ in range(3):
        assert isinstance(await b.admit(["a.example.com"], "new", [T0] * 9), Admitted)
    assert await storage.list("budgets/") == []
    assert await storage.lock_info("budgets") is None
