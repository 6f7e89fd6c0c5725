"""Maintenance does work proportional to what is due: the next-action index, not a sweep.

Real FileStorage in tmp, wrapped to count what the manager reads; certificates from the real
internal CA. The 20,000-name fleet is written straight to storage (the same record bytes for
every name: what is measured here is the reads, not the certificates).
"""

from __future__ import annotations

import builtins
import dataclasses
from pathlib import Path
from typing import Any

from edgeproxy.certs.maintenance import RECONCILE_INTERVAL
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.issuers.base import IssueRequest
from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.base import StoredItem
from edgeproxy.storage.file import FileStorage
from edgeproxy.tls.contexts import generate_private_key

FLEET = int(__import__("os").environ.get("FLEET", 20_000))


class CountingStorage:
    """FileStorage with a count of every value read, by key prefix."""

    def __init__(self, inner: FileStorage) -> None:
        self.inner = inner
        self.reads: dict[str, int] = {}

    async def get(self, key: str) -> bytes | None:
        prefix = key.split("/", 1)[0]
        self.reads[prefix] = self.reads.get(prefix, 0) + 1
        return await self.inner.get(key)

    async def list(self, prefix: str = "") -> builtins.list[StoredItem]:
        return await self.inner.list(prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _fleet(tmp_path: Path) -> tuple[CountingStorage, Clock]:
    """20,000 stored certificates, already planned: each has its time in the index, days on."""
    files = FileStorage(tmp_path / "state")
    key = generate_private_key("ec256")
    issued = await InternalIssuer(files).issue(IssueRequest(("fleet.example.test",), key))  # type: ignore[arg-type]
    rec = CertRecord.build("fleet.example.test", issued.issuer_id, issued.chain_pem, key, 0)  # type: ignore[arg-type]
    clock = Clock(rec.not_before + 3600)
    for i in range(FLEET):
        name = f"fleet-{i}.example.test"
        # Written where FileStorage.put writes, without 20,000 fsyncs (test set-up only).
        path = files.path_of(cert_key(name))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(dataclasses.replace(rec, name=name).to_json())
        path.chmod(0o600)
        _write_due(files, name, clock.now + 86400 + i)
    return CountingStorage(files), clock


def _write_due(files: FileStorage, name: str, at: float) -> None:
    """What ``set_due`` writes (due/names/<name> and due/t<hour>/<name>), minus its per-call
    lock and temp files: set-up speed only. The layout is checked against set_due below."""
    for folder in ("names", f"t{int(at // 3600):010d}"):
        path = files.root / "due" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(repr(at).encode())


async def test_the_set_up_writes_what_set_due_writes(tmp_path: Path) -> None:
    direct, api = FileStorage(tmp_path / "a"), FileStorage(tmp_path / "b")
    _write_due(direct, "x.example.test", 1_800_000_000.5)
    await api.set_due("x.example.test", 1_800_000_000.5)
    assert await direct.due_names(2e9, 10) == await api.due_names(2e9, 10)
    assert await direct.scheduled_names() == await api.scheduled_names() == ["x.example.test"]


def _manager(storage: CountingStorage, clock: Clock) -> CertificateManager:
    return CertificateManager(
        storage=storage,  # type: ignore[arg-type]
        issuer=InternalIssuer(storage.inner),
        policy=OnDemandPolicy(allow=["*.example.test"]),
        clock=clock,
    )


async def test_a_pass_with_nothing_due_reads_no_certificate(tmp_path: Path) -> None:
    storage, clock = await _fleet(tmp_path)  # one fleet for all three phases: set-up is slow
    mgr = _manager(storage, clock)
    # Passes called directly (no run loop): exactly these passes, nothing concurrent.
    await mgr.maintenance_once()  # the first one reconciles the index with the stored keys
    await mgr.maintenance_once()
    assert storage.reads.get("certs", 0) == 0
    assert storage.reads.get("ari", 0) == 0
    # When one certificate's time comes, it alone is read, and it gets its next time.
    await storage.inner.set_due("fleet-7.example.test", clock.now - 1)
    await mgr.maintenance_once()
    assert storage.reads.get("certs", 0) == 1
    assert await storage.inner.due_names(clock.now, 10) == []
    # Stored certificates missing from the index (a store from before it, a writer that died
    # between its writes) are found by the periodic reconciliation, which reads none of the
    # others, and planned once.
    for i in range(0, FLEET, 1000):
        await storage.inner.clear_due(f"fleet-{i}.example.test")
    storage.reads.clear()
    clock.now += RECONCILE_INTERVAL
    await mgr.maintenance_once()
    assert storage.reads.get("certs", 0) == FLEET // 1000
    assert len(await storage.inner.scheduled_names()) == FLEET
    storage.reads.clear()
    await mgr.maintenance_once()
    assert storage.reads.get("certs", 0) == 0
