"""The maintenance pass walks a large store in bounded steps, with the event loop free between them.

Issue 15: after a restart on 100,000 stored names the first pass listed every stored key at once
(storage sweep and schedule reconcile), holding the interpreter and feeding the collector while
the first handshakes waited. Here a real FileStorage in tmp (and a real PostgreSQL, for the
reconcile) holds a few thousand names and notes every trip to its worker thread (what was
handed over, and how often a ticking task had run by then). Counts, never timings: how many steps, how many items each, whether the loop ran
between them, and that the pass still repairs the index and still removes debris.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import trio
import trio.lowlevel

from edgeproxy.certs.maintenance import RECONCILE_PAGE
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.issuers.base import IssueRequest
from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.base import Storage
from edgeproxy.storage.file import FileStorage
from edgeproxy.storage.file.storage import SWEEP_STEP
from edgeproxy.storage.postgres import PostgresStorage
from edgeproxy.tls.contexts import generate_private_key
from testkit import postgres as pg

FLEET = 3_000
_T = TypeVar("_T")

postgres_server = pg.postgres_server
postgres_database = pg.postgres_database
postgres_dsn = pg.postgres_dsn


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Trip:
    op: str
    items: int  # the longest list handed to or back from the worker thread
    ticks: int  # how many times the ticking task had run when the trip ended


class Noting:
    """Notes each worker-thread trip of the storage it is mixed into, while ``noting`` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noting = False
        self.ticks = 0
        self.trips: list[Trip] = []

    async def _run(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        result: _T = await super()._run(op, fn, *args)  # type: ignore[misc]
        if self.noting:
            handed = [*args, result, *(result if isinstance(result, tuple) else ())]
            items = max((len(x) for x in handed if isinstance(x, list)), default=0)
            self.trips.append(Trip(op, items, self.ticks))
        return result


class NotingFiles(Noting, FileStorage):
    pass


class NotingPostgres(Noting, PostgresStorage):
    pass


async def _record(storage: Storage) -> CertRecord:
    """One real certificate record (from the internal CA), to be stored under many names."""
    key = generate_private_key("ec256")
    issued = await InternalIssuer(storage).issue(IssueRequest(("fleet.example.test",), key))  # type: ignore[arg-type]
    return CertRecord.build("fleet.example.test", issued.issuer_id, issued.chain_pem, key, 0)  # type: ignore[arg-type]


def _names() -> list[str]:
    return [f"fleet-{i}.example.test" for i in range(FLEET)]


async def _first_pass(storage: Noting, mgr: CertificateManager) -> None:
    """The first maintenance pass of a process, with a task ticking beside it."""

    async def tick() -> None:
        while True:
            await trio.lowlevel.checkpoint()
            storage.ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        storage.noting = True
        await mgr.maintenance_once()
        storage.noting = False
        nursery.cancel_scope.cancel()


def _manager(storage: Storage, clock: Clock) -> CertificateManager:
    return CertificateManager(
        storage=storage,
        issuer=InternalIssuer(storage),
        policy=OnDemandPolicy(allow=["*.example.test"]),
        clock=clock,
    )


def _check_reconciled_in_pages(trips: list[Trip]) -> None:
    ops = {trip.op for trip in trips}
    assert "list" not in ops and "scheduled_names" not in ops  # no listing of the whole fleet
    # Bounded steps: no trip handed over more than a page, however large the store ...
    assert max(trip.items for trip in trips) <= RECONCILE_PAGE < FLEET
    # ... so there were many: the certificates' keys a page at a time, each page asked about
    # once.
    assert len([trip for trip in trips if trip.op == "key_pages"]) >= FLEET / RECONCILE_PAGE
    unscheduled = [trip for trip in trips if trip.op == "unscheduled"]
    assert len(unscheduled) == math.ceil(FLEET / RECONCILE_PAGE)
    # The event loop ran other tasks between every two trips (here: the ticking task).
    ticks = [trip.ticks for trip in trips]
    assert all(later > earlier for earlier, later in itertools.pairwise(ticks))


async def _fleet(tmp_path: Path) -> tuple[NotingFiles, Clock]:
    """FLEET stored certificates, each with its time in the index, days on."""
    clock = Clock(0.0)
    storage = NotingFiles(tmp_path / "state", clock=clock)
    rec = await _record(storage)
    clock.now = rec.not_before + 3600
    due = storage.root / "due"
    for i, name in enumerate(_names()):
        # What put and set_due write, without thousands of fsyncs (set-up speed only; the
        # layout is the one test_maintenance_due_index checks against set_due).
        path = storage.path_of(cert_key(name))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(dataclasses.replace(rec, name=name).to_json())
        at = clock.now + 86400 + i
        for folder in ("names", f"t{int(at // 3600):010d}"):
            (due / folder).mkdir(parents=True, exist_ok=True, mode=0o700)
            (due / folder / name).write_bytes(repr(at).encode())
    return storage, clock


def _plant_temp_file(folder: Path, letter: str, mtime: float) -> Path:
    """What a writer killed between create and rename leaves (``atomic``'s temp naming)."""
    path = folder / (".tmp-" + letter * 16)
    path.write_bytes(b"half a write")
    os.utime(path, (mtime, mtime))
    return path


def _entries_below(root: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


async def test_the_first_pass_reconciles_and_sweeps_in_bounded_steps(tmp_path: Path) -> None:
    storage, clock = await _fleet(tmp_path)
    lost = _names()[::300]
    for name in lost:  # writers that died between the certificate and its index entry
        await storage.clear_due(name)
    old = [
        _plant_temp_file(storage.path_of(cert_key("x")).parent, "A", clock.now - 3600),
        _plant_temp_file(storage.root / "due" / "names", "B", clock.now - 3600),
    ]
    assert await storage.try_lock("fleet-1.example.test", "a-dead-writer", 60.0)
    clock.now += 600  # the lease expired
    young = _plant_temp_file(storage.root / "due" / "names", "C", clock.now - 60)  # in grace
    entries = _entries_below(storage.root)

    await _first_pass(storage, _manager(storage, clock))

    # Still a repair: every stored certificate has its time again, the lost ones included.
    assert await storage.scheduled_names() == sorted(_names())
    # Still a sweep: the debris of crashed writers went, a live writer's temp file stayed.
    assert not any(path.exists() for path in old)
    assert young.exists()
    assert await storage.lock_info("fleet-1.example.test") is None
    _check_reconciled_in_pages(storage.trips)
    # The sweep went over every file of the store in steps of SWEEP_STEP entries.
    sweep = [trip for trip in storage.trips if trip.op == "clean"]
    assert len(sweep) >= entries / SWEEP_STEP > 3


async def test_the_reconcile_pages_through_postgresql_too(postgres_dsn: str) -> None:
    clock = Clock(0.0)
    storage = NotingPostgres(postgres_dsn, clock=clock)
    try:
        await storage.migrate()
        rec = await _record(storage)
        clock.now = rec.not_before + 3600
        # Written in one COPY each (set-up speed only): the values as put writes them, and
        # every name's time days on.
        with psycopg.connect(postgres_dsn, autocommit=True) as conn, conn.cursor() as cur:
            with cur.copy(
                "COPY edgeproxy_values (key, value, size, secret, encrypted, modified) FROM STDIN"
            ) as copy:
                for name in _names():
                    value = dataclasses.replace(rec, name=name).to_json()
                    copy.write_row((cert_key(name), value, len(value), True, False, clock.now))
            with cur.copy("COPY edgeproxy_due (name, at) FROM STDIN") as copy:
                for i, name in enumerate(_names()):
                    copy.write_row((name, clock.now + 86400 + i))
        for name in _names()[::300]:
            await storage.clear_due(name)

        await _first_pass(storage, _manager(storage, clock))

        assert await storage.scheduled_names() == sorted(_names())
        _check_reconciled_in_pages(storage.trips)
    finally:
        await storage.aclose()
