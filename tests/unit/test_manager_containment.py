"""An unexpected exception in one name's background task is logged, counted and dropped.

The manager's nursery is shared by every name (and the process's nursery holds the manager): an
exception escaping one task once cancelled everything and ended the process. Each test injects
an exception nobody handles on purpose (``RuntimeError``, the "bug" stand-in) into one kind of
per-name task, then checks ``edgeproxy_background_task_errors_total{task}`` counted it and the
manager still issues, renews and answers afterwards. Real FileStorage and the real internal CA.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from edgeproxy.certs.manager import CertificateManager
from edgeproxy.errors import CertificateUnavailable
from edgeproxy.events import Events
from edgeproxy.issuers.base import IssuanceError
from edgeproxy.reasons import Failure
from edgeproxy.storage.base import OutboxEvent
from edgeproxy.storage.file import FileStorage
from testkit.managers import HookedIssuer, manager_for

METRIC = "edgeproxy_background_task_errors_total"


def errors(task: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"task": task}) or 0.0


class Bug(RuntimeError):
    """What no handler in the manager expects."""


class TrappedStorage(FileStorage):
    """Real file storage that raises ``Bug`` on the operations a test arms."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.put_prefix: str | None = None
        self.get_key: str | None = None

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        if self.put_prefix is not None and key.startswith(self.put_prefix):
            raise Bug(f"injected put failure for {key}")
        await super().put(key, value, secret=secret)

    async def get(self, key: str) -> bytes | None:
        if key == self.get_key:
            raise Bug(f"injected get failure for {key}")
        return await super().get(key)


class TrappedIssuer(HookedIssuer):
    """The real internal CA, raising ``Bug`` for the names in ``broken``."""

    def __init__(self, storage: FileStorage) -> None:
        super().__init__(storage)
        self.broken: set[str] = set()
        self.issued: list[str] = []

    async def before_issue(self, name: str) -> None:
        if name in self.broken:
            raise Bug(f"injected issuer failure for {name}")
        self.issued.append(name)


def make(tmp_path: Path, **kw: object) -> tuple[CertificateManager, TrappedStorage, TrappedIssuer]:
    storage = TrappedStorage(tmp_path / "state")
    issuer = TrappedIssuer(storage)
    return manager_for(storage, issuer, "*.example.test", **kw), storage, issuer


async def still_serves(mgr: CertificateManager, name: str) -> None:
    """The manager's nursery is alive: a fresh name is issued through a new background task."""
    with trio.fail_after(20):
        await mgr.context_for(name)
    assert mgr.cached_context(name) is not None


async def test_persist_status_failure_is_counted_and_contained(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    mgr, storage, _ = make(tmp_path)
    await nursery.start(mgr.run)
    storage.put_prefix = "status/"
    before = errors("persist_status")
    with caplog.at_level(logging.ERROR, logger="edgeproxy.certs"):
        await mgr.context_for("first.example.test")
        await trio.testing.wait_all_tasks_blocked()
    assert errors("persist_status") > before
    assert any("persist_status" in r.getMessage() and r.exc_info for r in caplog.records)
    storage.put_prefix = None
    await still_serves(mgr, "second.example.test")


async def test_acquire_failure_is_counted_and_contained(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, _, issuer = make(tmp_path)
    await nursery.start(mgr.run)
    issuer.broken.add("boom.example.test")
    before = errors("acquire")
    with pytest.raises(CertificateUnavailable):
        await mgr.context_for("boom.example.test")
    assert errors("acquire") == before + 1
    await still_serves(mgr, "after.example.test")


async def test_reload_failure_is_counted_and_contained(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, _ = make(tmp_path)
    await nursery.start(mgr.run)
    await mgr.context_for("cached.example.test")
    storage.get_key = "certs/cached.example.test.json"
    before = errors("reload")
    mgr.on_storage_change("certs/cached.example.test.json")  # a NOTIFY from another replica
    await trio.testing.wait_all_tasks_blocked()
    assert errors("reload") == before + 1
    storage.get_key = None
    await still_serves(mgr, "other.example.test")


async def test_one_renewal_failing_does_not_stop_the_others(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, _, issuer = make(tmp_path)
    await nursery.start(mgr.run)
    # "a-boom" sorts first: without containment its exception ends the pass before "z-fine".
    for name in ("a-boom.example.test", "z-fine.example.test"):
        await mgr.context_for(name)
    issuer.broken.add("a-boom.example.test")
    issuer.issued.clear()
    mgr.clock = lambda: time.time() + 29 * 86400  # both certificates are now due
    before = errors("renew")
    await mgr.maintenance_once()
    assert errors("renew") == before + 1
    assert issuer.issued == ["z-fine.example.test"]
    # The run loop's pass goes on too: the manager still issues new names.
    mgr.clock = time.time
    await still_serves(mgr, "later.example.test")


async def test_the_metric_is_exported_at_zero_for_every_task() -> None:
    # increase() in an alert needs a sample before the first failure after a restart.
    for task in ("acquire", "renew", "reload", "persist_status", "maintenance", "event"):
        assert REGISTRY.get_sample_value(METRIC, {"task": task}) is not None


class TrappedOutbox(FileStorage):
    """Real file storage whose first event write raises ``Bug``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.trap = True
        self.queued: list[OutboxEvent] = []

    async def enqueue_event(self, event: OutboxEvent) -> None:
        if self.trap:
            self.trap = False
            raise Bug("injected outbox failure")
        await super().enqueue_event(event)
        self.queued.append(event)


async def test_an_event_failing_to_queue_is_counted_and_contained(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    storage = TrappedOutbox(tmp_path / "state")
    # Nothing listens on port 9: delivery keeps failing and retrying, which is not tested here.
    events = Events(storage, url="http://127.0.0.1:9/hook", secret=b"s" * 32, poll=3600)
    await nursery.start(events.run)
    before = errors("event")
    events.emit("certificate.issued", "a.example.test", {"hostname": "a.example.test"})
    events.emit("certificate.issued", "b.example.test", {"hostname": "b.example.test"})
    with trio.fail_after(10):  # the writes run in a worker thread
        while not storage.queued:
            await trio.sleep(0.01)
    assert errors("event") == before + 1
    # The writer carried on with the next event.
    assert [b"b.example.test" in e.body for e in storage.queued] == [True]


class SlowFirstStatusStorage(FileStorage):
    """Real file storage whose first status write for a name is slow (a loaded disk or
    database), so a later change of that name's status is made while it is in flight."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.slowed: set[str] = set()
        self.status_puts: list[str] = []

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        if key.startswith("status/") and key not in self.slowed:
            self.slowed.add(key)
            await trio.sleep(0.5)
        if key.startswith("status/"):
            self.status_puts.append(key)
        await super().put(key, value, secret=secret)


class RefusedIssuer(HookedIssuer):
    """The real internal CA refusing every order the way a CA does (a problem document)."""

    async def before_issue(self, name: str) -> None:
        raise IssuanceError(Failure.problem("urn:ietf:params:acme:error:caa", "CAA forbids it"))


async def test_stored_status_is_the_newest_when_writes_overlap(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Each status change once spawned its own put: the slow first one ("issuing") landed
    after the quick later one ("failing") and stayed stored for good."""
    storage = SlowFirstStatusStorage(tmp_path / "state")
    issuer = RefusedIssuer(storage)
    mgr = manager_for(storage, issuer, "*.example.test")
    await nursery.start(mgr.run)
    name = "late.example.test"
    with pytest.raises(CertificateUnavailable):
        await mgr.context_for(name)
    st = mgr.status(name)
    assert st is not None and st.state == "failing"
    # Both writes happened (the slow first and the later one), then nothing more is written.
    with trio.fail_after(10):
        while len(storage.status_puts) < 2:
            await trio.sleep(0.05)
    await trio.sleep(1.0)
    raw = await storage.get(f"status/{name}.json")
    assert raw is not None
    assert json.loads(raw)["state"] == "failing"
