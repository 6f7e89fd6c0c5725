"""The maintenance pass walks a large store in bounded steps, with the event loop free between them.

Issue 15: after a restart on 100,000 stored names the first pass listed every stored key at once
(storage sweep and schedule reconcile), holding the interpreter and feeding the collector while
the first handshakes waited. Here a real FileStorage in tmp holds a few thousand names; it
notes every trip to its worker thread (what was handed over, and how often a ticking task had
run by then). Counts, never timings: how many steps, how many items each, whether the loop ran
between them, and that the pass still repairs the index and still removes debris.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio
import trio.lowlevel

from edgeproxy.certs.maintenance import RECONCILE_PAGE
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.issuers.base import IssueRequest
from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.file import FileStorage
from edgeproxy.storage.file.storage import SWEEP_STEP
from edgeproxy.tls.contexts import generate_private_key

FLEET = 3_000
_T = TypeVar("_T")


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


class NotingStorage(FileStorage):
    """FileStorage noting each worker-thread trip while ``noting`` is set."""

    def __init__(self, root: Path, clock: Clock) -> None:
        super().__init__(root, clock=clock)
        self.noting = False
        self.ticks = 0
        self.trips: list[Trip] = []

    async def _run(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        result = await super()._run(op, fn, *args)
        if self.noting:
            handed = [*args, result, *(result if isinstance(result, tuple) else ())]
            items = max((len(x) for x in handed if isinstance(x, list)), default=0)
            self.trips.append(Trip(op, items, self.ticks))
        return result


async def _fleet(tmp_path: Path) -> tuple[NotingStorage, Clock]:
    """FLEET stored certificates, each with its time in the index, days on."""
    key = generate_private_key("ec256")
    clock = Clock(0.0)
    storage = NotingStorage(tmp_path / "state", clock)
    issued = await InternalIssuer(storage).issue(IssueRequest(("fleet.example.test",), key))  # type: ignore[arg-type]
    rec = CertRecord.build("fleet.example.test", issued.issuer_id, issued.chain_pem, key, 0)  # type: ignore[arg-type]
    clock.now = rec.not_before + 3600
    due = storage.root / "due"
    for i in range(FLEET):
        name = f"fleet-{i}.example.test"
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
    lost = [f"fleet-{i}.example.test" for i in range(0, FLEET, 300)]
    for name in lost:  # writers that died between the certificate and its index entry
        await storage.clear_due(name)
    old = [
        _plant_temp_file(storage.path_of(cert_key("x")).parent, "A", clock.now - 3600),
        _plant_temp_file(storage.root / "due" / "names", "B", clock.now - 3600),
    ]
    assert await storage.try_lock("fleet-1.example.test", "a-dead-writer", 60.0)
    clock.now += 600  # the lease expired
    young = _plant_temp_file(storage.root / "due" / "names", "C", clock.now - 60)  # in grace
    mgr = CertificateManager(
        storage=storage,
        issuer=InternalIssuer(storage),
        policy=OnDemandPolicy(allow=["*.example.test"]),
        clock=clock,
    )
    entries = _entries_below(storage.root)

    async def tick() -> None:
        while True:
            await trio.lowlevel.checkpoint()
            storage.ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        storage.noting = True
        await mgr.maintenance_once()  # the first pass of a process: sweep and reconcile
        storage.noting = False
        nursery.cancel_scope.cancel()

    # Still a repair: every stored certificate has its time again, the lost ones included.
    everyone = sorted(f"fleet-{i}.example.test" for i in range(FLEET))
    assert await storage.scheduled_names() == everyone
    # Still a sweep: the debris of crashed writers went, a live writer's temp file stayed.
    assert not any(path.exists() for path in old)
    assert young.exists()
    assert await storage.lock_info("fleet-1.example.test") is None

    trips = storage.trips
    ops = {trip.op for trip in trips}
    assert "list" not in ops and "scheduled_names" not in ops  # no listing of the whole fleet
    # Bounded steps: no trip handed over more than a page, however large the store ...
    assert max(trip.items for trip in trips) <= RECONCILE_PAGE < FLEET
    # ... so there were many: the certificates' keys a page at a time, each page asked about
    # once, and the sweep over every file of the store in steps of SWEEP_STEP entries.
    pages = [trip for trip in trips if trip.op == "key_pages"]
    assert len(pages) >= FLEET / RECONCILE_PAGE
    assert len([trip for trip in trips if trip.op == "unscheduled"]) == math.ceil(
        FLEET / RECONCILE_PAGE
    )
    assert len([trip for trip in trips if trip.op == "clean"]) >= entries / SWEEP_STEP > 3
    # The event loop ran other tasks between every two trips (here: the ticking task).
    ticks = [trip.ticks for trip in trips]
    assert all(later > earlier for earlier, later in itertools.pairwise(ticks))
