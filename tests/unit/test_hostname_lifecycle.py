"""Registered hostnames through the certificate manager and policy: renewal re-checks the
policy, removal stops serving at once, re-adding within the grace reuses the certificate, the
grace ends in a purge. Real FileStorage, the real internal CA, a clock the test moves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from edgeproxy.app import route_table
from edgeproxy.certs.maintenance import expiring_key
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.config import RouteConfig
from edgeproxy.errors import CertificateUnavailable, StorageError
from edgeproxy.events import Events
from edgeproxy.hostnames.registry import HostnameRegistry
from edgeproxy.reasons import Failure
from edgeproxy.storage import FileStorage, HostnameEntry
from edgeproxy.storage.base import OutboxEvent
from testkit.events_receiver import Receiver
from testkit.managers import CountingIssuer

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def earliest_expiry() -> float:
    value = REGISTRY.get_sample_value(
        "edgeproxy_certificate_earliest_expiry_timestamp_seconds"
    )
    assert value is not None
    return value


async def setup(
    tmp_path: Path, *, allow: list[str], registry_allows: bool = False
) -> tuple[CertificateManager, FileStorage, CountingIssuer, HostnameRegistry, Clock]:
    clock = Clock()
    storage = FileStorage(tmp_path / "state")
    registry = HostnameRegistry(storage, clock=clock)
    issuer = CountingIssuer(storage)
    policy = OnDemandPolicy(allow=allow, registry=registry, registry_allows=registry_allows)
    mgr = CertificateManager(
        storage=storage, issuer=issuer, policy=policy, registry=registry, clock=clock,
        renew_interval=3600, removal_grace=7 * DAY,
    )  # fmt: skip
    return mgr, storage, issuer, registry, clock


async def register(storage: FileStorage, registry: HostnameRegistry, name: str) -> None:
    entry, _ = await storage.add_hostname(HostnameEntry(name, None, "{}", time.time()))
    registry.apply(name, entry)


async def remove(storage: FileStorage, registry: HostnameRegistry, name: str, at: float) -> None:
    await storage.remove_hostname(name, at)
    registry.apply(name, await storage.get_hostname(name))


async def test_renewal_rechecks_policy_and_a_refused_name_leaves_the_expiry_gauge(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, issuer, _, clock = await setup(tmp_path, allow=["*.example.test"])
    await nursery.start(mgr.run)
    await mgr.context_for("gone.example.test")
    await mgr.context_for("kept.example.test")
    assert issuer.calls == 2
    # The customer of gone.example.test left: the allow-check no longer lets it through.
    mgr.policy = OnDemandPolicy(allow=["kept.example.test"])
    clock.offset = 25 * DAY  # past the 2/3 backstop of the 30-day certificates
    await mgr.maintenance_once()
    assert issuer.calls == 3  # kept renewed; gone not
    gone = mgr.status("gone.example.test")
    assert gone is not None and gone.state == "denied"
    assert gone.last_error_type == "denied" and gone.last_error == "no allow pattern matches"
    kept = CertRecord.from_json((await storage.get(cert_key("kept.example.test"))) or b"")
    assert earliest_expiry() == kept.not_after  # the older, unwanted one is not watched
    # Served until expiry ...
    assert mgr.cached_context("gone.example.test") is not None
    gone_record = await storage.get(cert_key("gone.example.test"))
    await mgr.maintenance_once()
    # (The internal CA dates certificates by the real clock, so "kept" is due again on every
    # pass of this shifted clock; only "gone" is watched from here on.)
    assert await storage.get(cert_key("gone.example.test")) == gone_record  # still not renewed
    # ... then dropped.
    clock.offset = 31 * DAY
    await mgr.maintenance_once()
    assert mgr.cached_context("gone.example.test") is None
    assert await storage.get(cert_key("gone.example.test")) == gone_record


async def test_removal_stops_serving_and_readding_reuses_the_certificate(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, issuer, registry, clock = await setup(tmp_path, allow=[], registry_allows=True)
    await nursery.start(mgr.run)
    with pytest.raises(CertificateUnavailable) as ei:
        await mgr.context_for("cust.example.com")
    assert ei.value.reason == "denied"  # not registered yet
    await register(storage, registry, "cust.example.com")
    mgr.policy._cache.clear()  # the deny above is remembered briefly; a new name is new
    await mgr.context_for("cust.example.com")
    assert issuer.calls == 1

    await remove(storage, registry, "cust.example.com", clock())
    assert mgr.cached_context("cust.example.com") is None
    with pytest.raises(CertificateUnavailable) as ei:
        await mgr.context_for("cust.example.com")
    assert ei.value.reason == "removed"
    st = mgr.status("cust.example.com")
    assert st is not None and st.state == "removed"
    assert await storage.get(cert_key("cust.example.com")) is not None  # kept for the grace

    await register(storage, registry, "cust.example.com")
    await mgr.context_for("cust.example.com")
    assert issuer.calls == 1  # served again from the kept record: no new order


async def test_removed_names_are_not_renewed_and_purged_after_the_grace(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, issuer, registry, clock = await setup(tmp_path, allow=[], registry_allows=True)
    await nursery.start(mgr.run)
    await register(storage, registry, "old.example.com")
    await mgr.context_for("old.example.com")
    # Its renewal had been failing: a certificate.expiring notice was given and remembered.
    mgr.events = Events(storage, url="http://127.0.0.1:9/hooks", secret=b"k")
    rec = CertRecord.from_json((await storage.get(cert_key("old.example.com"))) or b"")
    await mgr._expiring(rec, rec.not_after - 3600)
    assert await storage.get(expiring_key("old.example.com")) == rec.serial.encode()
    await remove(storage, registry, "old.example.com", clock())
    clock.offset = 6 * DAY
    await mgr.maintenance_once()
    assert await storage.get(cert_key("old.example.com")) is not None
    assert earliest_expiry() == 0  # nothing wanted is managed
    clock.offset = 26 * DAY  # past renewal time and past the 7-day grace
    await mgr.maintenance_once()
    assert issuer.calls == 1
    assert await storage.get(cert_key("old.example.com")) is None
    assert await storage.list("expiring/") == []  # nothing of it is left behind
    assert await storage.get_hostname("old.example.com") is None
    assert not registry.is_removed("old.example.com")


async def test_policy_order_invalid_then_registry_then_allow_then_ask(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "s")
    registry = HostnameRegistry(storage)
    await register(storage, registry, "reg.example.net")
    await register(storage, registry, "was.example.net")
    await remove(storage, registry, "was.example.net", 1.0)
    on = OnDemandPolicy(allow=["*.example.net"], registry=registry, registry_allows=True)
    off = OnDemandPolicy(allow=[], registry=registry, registry_allows=False)
    assert (await on.check("1.2.3.4")).reason == "invalid_name"
    reg = await on.check("REG.example.net.")
    assert reg.allowed and reg.source == "registry"
    was = await on.check("was.example.net")  # the allow pattern would match: removal wins
    assert not was.allowed and was.reason == "removed"
    assert (await on.check("other.example.net")).source == "static"
    assert not (await off.check("reg.example.net")).allowed  # registry = false: not a rule


async def test_registry_follows_another_process_and_overrides_the_route(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mine, theirs = FileStorage(tmp_path / "s"), FileStorage(tmp_path / "s")
    registry = HostnameRegistry(mine, poll_interval=0.05)
    await nursery.start(registry.run)
    table = route_table(
        [RouteConfig(sni=["*.example.com"], upstreams=["10.0.0.1:80"], alpn=["http/1.1"])]
    )
    base = table.match("a.example.com")
    await theirs.add_hostname(HostnameEntry("a.example.com", "10.9.9.9:8080", "{}", 1.0))
    with trio.fail_after(5):
        while not registry.is_registered("a.example.com"):
            await trio.sleep(0.01)
    route = registry.route_for("a.example.com", base)
    assert route is not None and [str(u) for u in route.upstreams] == ["10.9.9.9:8080"]
    assert route.alpn == ("http/1.1",) and route.label == "*.example.com"
    assert registry.route_for("b.example.com", base) is base
    await theirs.remove_hostname("a.example.com", 2.0)
    with trio.fail_after(5):
        while not registry.is_removed("a.example.com"):
            await trio.sleep(0.01)
    assert registry.route_for("a.example.com", base) is base


async def test_failed_renewals_make_failed_events_and_one_expiring_event(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from edgeproxy.issuers.base import IssuanceError

    mgr, storage, issuer, _, clock = await setup(tmp_path, allow=["*.example.test"])
    # Nobody listens at this URL: events stay in the outbox, where the test reads them.
    # (Its clock is the real one: on the manager's shifted clock every event would look 28
    # days old and be dropped as undeliverable.)
    events = Events(storage, url="http://127.0.0.1:9/hooks", secret=b"k")
    await nursery.start(events.run)
    mgr.events = events
    await nursery.start(mgr.run)
    await mgr.context_for("late.example.test")

    async def refuse(*args: object, **kwargs: object) -> object:
        raise IssuanceError(Failure.problem("urn:ietf:params:acme:error:caa", "CAA forbids this CA"))

    issuer.issue = refuse  # type: ignore[method-assign]
    clock.offset = 28 * DAY  # 2 days left of 30: renewal overdue and failing
    await mgr.maintenance_once()
    clock.offset += 3600  # past the retry backoff: fails again, but "expiring" only once
    await mgr.maintenance_once()
    await trio.sleep(0.2)  # the emits are queued in the background
    kinds = []
    for event in await storage.due_events(time.time() + DAY, 100):
        doc = json.loads(event.body)
        assert doc["subject"] == "late.example.test"
        kinds.append(doc["type"].removeprefix("net.edgeproxy."))
        if doc["type"].endswith("failed"):
            assert doc["data"]["type"] == "urn:ietf:params:acme:error:caa"
            assert doc["data"]["detail"] == "CAA forbids this CA" and doc["data"]["hint"]
    assert kinds.count("certificate.issued") == 1
    assert kinds.count("certificate.failed") == 2
    assert kinds.count("certificate.expiring") == 1
    # One marker per name (not per serial, which would pile up over the years).
    assert [i.key for i in await storage.list("expiring/")] == ["expiring/late.example.test"]


class BlinkingStorage(FileStorage):
    """FileStorage whose outbox writes fail while ``down`` (a database restart, a full disk)."""

    down = False
    refused = 0

    async def enqueue_event(self, event: OutboxEvent) -> None:
        if self.down:
            self.refused += 1
            raise StorageError("enqueue_event: connection refused")
        await super().enqueue_event(event)


async def test_issued_and_renewed_events_arrive_signed_with_the_new_certificate(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, _, _, clock = await setup(tmp_path, allow=["*.example.test"])
    receiver = Receiver(b"k")
    await receiver.start(nursery)
    # The events' own clock is the real one (signatures are checked against real time).
    events = Events(storage, url=receiver.url, secret=b"k", source="edgeproxy/test", poll=0.05)
    await nursery.start(events.run)
    mgr.events = events
    await nursery.start(mgr.run)
    await mgr.context_for("renew.example.test")
    first = CertRecord.from_json((await storage.get(cert_key("renew.example.test"))) or b"")
    clock.offset = 25 * DAY  # past the 2/3 point of the 30-day certificate
    await mgr.maintenance_once()
    second = CertRecord.from_json((await storage.get(cert_key("renew.example.test"))) or b"")
    assert second.serial != first.serial
    with trio.fail_after(10):
        while len(receiver.events) < 2:
            await trio.sleep(0.02)
    assert receiver.bad_signatures == 0  # each verified: HMAC over "t.body", recent t
    issued, renewed = receiver.events
    for doc, rec in ((issued, first), (renewed, second)):
        assert doc["specversion"] == "1.0" and doc["source"] == "edgeproxy/test"
        assert doc["subject"] == "renew.example.test"
        assert doc["data"] == {"hostname": "renew.example.test", "serial": rec.serial,
                               "issuer": rec.issuer_id,
                               "not_after": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                          time.gmtime(rec.not_after))}  # fmt: skip
    assert issued["type"] == "net.edgeproxy.certificate.issued"
    assert renewed["type"] == "net.edgeproxy.certificate.renewed"
    assert issued["id"] < renewed["id"]


async def test_an_event_made_while_storage_is_down_is_stored_and_delivered_later(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    storage = BlinkingStorage(tmp_path / "state")
    receiver = Receiver(b"k")
    await receiver.start(nursery)
    events = Events(storage, url=receiver.url, secret=b"k", poll=0.05, max_pending=3)
    await nursery.start(events.run)
    lost = REGISTRY.get_sample_value("edgeproxy_events_lost_total") or 0.0
    storage.down = True
    for n in range(4):  # the fourth finds the queue full
        events.emit("hostname.created", f"n{n}.example.test", {"hostname": f"n{n}.example.test"})
    with trio.fail_after(5):
        while storage.refused < 3:  # retried, not given up after one failure
            await trio.sleep(0.02)
    assert receiver.events == []
    assert REGISTRY.get_sample_value("edgeproxy_events_lost_total") == lost + 1
    storage.down = False
    with trio.fail_after(10):
        while len(receiver.events) < 3:
            await trio.sleep(0.02)
    assert [e["subject"] for e in receiver.events] == [f"n{n}.example.test" for n in range(3)]
    # publish (the API's way) whose write fails hands the event to the same retrying queue.
    storage.down = True
    await events.publish("hostname.deleted", "n0.example.test", {"hostname": "n0.example.test"})
    await trio.sleep(0.3)
    storage.down = False
    with trio.fail_after(10):
        while len(receiver.events) < 4:
            await trio.sleep(0.02)
    assert receiver.events[-1]["type"] == "net.edgeproxy.hostname.deleted"


def name_expiry(name: str) -> float | None:
    return REGISTRY.get_sample_value(
        "edgeproxy_certificate_expiry_timestamp_seconds", {"name": name}
    )


async def test_denied_and_removed_names_leave_the_per_name_expiry_gauge(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    storage = FileStorage(tmp_path / "state")
    registry = HostnameRegistry(storage, clock=clock)
    allow = ["den.gauge.test", "kept.gauge.test"]
    mgr = CertificateManager(
        storage=storage, issuer=CountingIssuer(storage), clock=clock, registry=registry,
        policy=OnDemandPolicy(allow=allow, registry=registry, registry_allows=True),
        renew_interval=3600, removal_grace=7 * DAY, per_domain_metrics=True,
    )  # fmt: skip
    await nursery.start(mgr.run)
    await register(storage, registry, "rem.gauge.test")
    for name in ("den.gauge.test", "kept.gauge.test", "rem.gauge.test"):
        await mgr.context_for(name)
        assert name_expiry(name) is not None
    await remove(storage, registry, "rem.gauge.test", clock())
    assert name_expiry("rem.gauge.test") is None  # offboarded: the series is gone at once
    mgr.policy = OnDemandPolicy(allow=["kept.gauge.test"], registry=registry, registry_allows=True)
    clock.offset = 25 * DAY
    await mgr.maintenance_once()
    st = mgr.status("den.gauge.test")
    assert st is not None and st.state == "denied"
    assert name_expiry("den.gauge.test") is None
    assert name_expiry("kept.gauge.test") is not None
    # Still served until expiry: reloading its context (cache eviction, another worker's
    # renewal seen) must not bring the series back.
    mgr.invalidate("den.gauge.test")
    await mgr.context_for("den.gauge.test")
    assert name_expiry("den.gauge.test") is None
    st = mgr.status("den.gauge.test")
    assert st is not None and st.state == "denied"  # and it is still said to be denied
    # Re-added within the grace: wanted again, back in the gauge with its kept certificate.
    await register(storage, registry, "rem.gauge.test")
    await mgr.context_for("rem.gauge.test")
    st = mgr.status("rem.gauge.test")
    assert st is not None and st.state == "valid"
    assert name_expiry("rem.gauge.test") == st.not_after
    # With worker processes the series cannot be removed from the shared files: it reads 0,
    # which readers ignore like the earliest-expiry gauge's 0.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    await register(storage, registry, "kept.gauge.test")
    await remove(storage, registry, "kept.gauge.test", clock())
    assert name_expiry("kept.gauge.test") == 0


async def test_publish_without_a_running_writer_reports_the_storage_failure(
    tmp_path: Path,
) -> None:
    # The CLI publishes and exits: an event it could not store must not be "queued" in a
    # memory nobody will ever write from.
    storage = BlinkingStorage(tmp_path / "state")
    storage.down = True
    events = Events(storage, url="http://127.0.0.1:9/hooks", secret=None)
    with pytest.raises(StorageError):
        await events.publish("hostname.created", "a.example.test", {"hostname": "a.example.test"})
