"""The certificate manager's decisions, with real storage (FileStorage in tmp) and the real
internal CA as issuer."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.errors import CertificateUnavailable
from edgeproxy.reasons import Failure
from edgeproxy.storage.file import FileStorage
from testkit.managers import CountingIssuer, make_manager


async def test_single_flight_one_issuance_for_many_handshakes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, issuer = make_manager(tmp_path)
    await nursery.start(mgr.run)
    contexts = []

    async def ask() -> None:
        contexts.append(await mgr.context_for("many.example.test"))

    async with trio.open_nursery() as n:
        for _ in range(30):
            n.start_soon(ask)
    assert issuer.calls == 1
    assert len({id(c) for c in contexts}) == 1
    rec = CertRecord.from_json((await storage.get(cert_key("many.example.test"))) or b"")
    assert rec.name == "many.example.test"
    st = mgr.status("many.example.test")
    assert st is not None and st.state == "valid" and st.renewal_source == "backstop"


async def test_denied_and_invalid_names_never_reach_the_issuer(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, _, issuer = make_manager(tmp_path)
    await nursery.start(mgr.run)
    for name, reason in (
        ("x.other.test", "denied"),
        ("1.2.3.4", "invalid_name"),
        ("bad_.example.test", "invalid_name"),
    ):
        with pytest.raises(CertificateUnavailable) as ei:
            await mgr.context_for(name)
        assert ei.value.reason == reason
    assert issuer.calls == 0
    st = mgr.status("x.other.test")
    assert st is not None and st.state == "denied" and st.hint and "allow" in st.hint


async def test_stored_certificates_are_loaded_not_reissued(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, issuer = make_manager(tmp_path)
    await nursery.start(mgr.run)
    await mgr.context_for("keep.example.test")
    assert issuer.calls == 1
    # A second process (fresh manager, same storage) loads it.
    mgr2 = CertificateManager(storage=storage, issuer=issuer, policy=OnDemandPolicy(allow=[]))
    await nursery.start(mgr2.run)
    await mgr2.context_for("keep.example.test")  # policy allows nothing: must come from storage
    assert issuer.calls == 1


async def test_no_sni_uses_default_name(tmp_path: Path, nursery: trio.Nursery) -> None:
    mgr, _, _ = make_manager(tmp_path, default_sni="default.example.test")
    await nursery.start(mgr.run)
    ctx = await mgr.context_for(None)
    assert ctx is mgr.cached_context("default.example.test")
    mgr2, _, _ = make_manager(tmp_path / "b")
    await nursery.start(mgr2.run)
    with pytest.raises(CertificateUnavailable) as ei:
        await mgr2.context_for(None)
    assert ei.value.reason == "no_sni"


async def test_corrupt_record_is_quarantined_and_reissued(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, issuer = make_manager(tmp_path)
    await storage.put(cert_key("torn.example.test"), b'{"format": 1, "name": "to', secret=True)
    await nursery.start(mgr.run)
    await mgr.context_for("torn.example.test")
    assert issuer.calls == 1
    assert list((tmp_path / "state" / "quarantine").iterdir())


async def test_renewal_by_another_process_is_picked_up(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, storage, issuer = make_manager(tmp_path)
    await nursery.start(mgr.run)
    first = await mgr.context_for("swap.example.test")
    old = CertRecord.from_json((await storage.get(cert_key("swap.example.test"))) or b"")
    # "Another replica" renews: force a fresh issuance through a second manager.
    other = CertificateManager(storage=storage, issuer=issuer, policy=OnDemandPolicy(allow=["*"]))
    await nursery.start(other.run)
    new = await other.obtain("swap.example.test", old=old, force=True)
    assert new is not None and new.serial != old.serial
    await mgr.maintenance_once()
    assert mgr.cached_context("swap.example.test") is not first


async def test_issuer_failure_is_recorded_with_backoff(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from edgeproxy.issuers.base import IssuanceError

    class FailingIssuer(CountingIssuer):
        async def before_issue(self, name: str) -> None:
            self.calls += 1
            raise IssuanceError(
                Failure.problem("urn:ietf:params:acme:error:connection", "could not connect to 127.0.0.1:443")
            )

    storage = FileStorage(tmp_path / "state")
    issuer = FailingIssuer(storage)
    mgr = CertificateManager(
        storage=storage, issuer=issuer, policy=OnDemandPolicy(allow=["*.example.test"]), wait=5
    )
    await nursery.start(mgr.run)
    with pytest.raises(CertificateUnavailable) as ei:
        await mgr.context_for("fail.example.test")
    assert ei.value.reason == "connection"
    st = mgr.status("fail.example.test")
    assert st is not None and st.state == "failing" and st.failures == 1
    assert st.next_attempt is not None and st.hint and "load balancer" in st.hint
    # In backoff: the next handshake fails fast without another attempt.
    with pytest.raises(CertificateUnavailable):
        await mgr.context_for("fail.example.test")
    assert issuer.calls == 1


async def test_a_failed_renewal_carries_a_hint_saying_the_old_certificate_serves(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from edgeproxy.issuers.base import IssuanceError

    class RenewalFails(CountingIssuer):
        async def before_issue(self, name: str) -> None:
            if self.calls:
                self.calls += 1
                raise IssuanceError(Failure.problem("urn:ietf:params:acme:error:malformed", "no renewal for you"))
            await super().before_issue(name)

    storage = FileStorage(tmp_path / "state")
    mgr = CertificateManager(
        storage=storage,
        issuer=RenewalFails(storage),
        policy=OnDemandPolicy(allow=["*.example.test"]),
        listen_ports=(8443,),
    )
    await nursery.start(mgr.run)
    await mgr.context_for("renew.example.test")
    rec = CertRecord.from_json((await storage.get(cert_key("renew.example.test"))) or b"")
    assert await mgr.obtain("renew.example.test", old=rec, force=True) is None
    st = mgr.status("renew.example.test")
    assert st is not None and st.state == "renewing" and st.hint is not None
    assert st.hint.startswith("renewal failed; the current certificate is still served until")
    # The old certificate keeps serving.
    assert mgr.cached_context("renew.example.test") is not None


async def test_per_domain_expiry_metric_is_opt_in(tmp_path: Path, nursery: trio.Nursery) -> None:
    from prometheus_client import REGISTRY

    mgr, _, _ = make_manager(tmp_path)
    await nursery.start(mgr.run)
    await mgr.context_for("quiet.example.test")
    value = REGISTRY.get_sample_value(
        "edgeproxy_certificate_expiry_timestamp_seconds", {"name": "quiet.example.test"}
    )
    assert value is None
    (tmp_path / "b").mkdir()
    mgr2, _, _ = make_manager(tmp_path / "b", per_domain_metrics=True)
    await nursery.start(mgr2.run)
    await mgr2.context_for("loud.example.test")
    rec = mgr2.status("loud.example.test")
    assert rec is not None
    value = REGISTRY.get_sample_value(
        "edgeproxy_certificate_expiry_timestamp_seconds", {"name": "loud.example.test"}
    )
    assert value == rec.not_after


async def test_cache_is_bounded_and_cold_names_load_from_storage(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    mgr, _, issuer = make_manager(tmp_path, cache_size=2)
    await nursery.start(mgr.run)
    for n in ("a", "b", "c"):
        await mgr.context_for(f"{n}.example.test")
    assert mgr.cached_context("a.example.test") is None  # evicted (LRU)
    await mgr.context_for("a.example.test")  # back from storage
    assert issuer.calls == 3  # never re-issued


async def test_cache_and_maintenance_metrics(tmp_path: Path, nursery: trio.Nursery) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    mgr, _, _ = make_manager(tmp_path, cache_size=2, renew_interval=3600.0)
    await nursery.start(mgr.run)  # runs a first pass over empty storage
    for n in ("a", "b", "c"):
        await mgr.context_for(f"{n}.example.test")
    assert sample("edgeproxy_certificates_cached") == 2  # the bound, not the three stored
    mgr.invalidate("c.example.test")
    assert sample("edgeproxy_certificates_cached") == 1
    passes = sample("edgeproxy_maintenance_pass_duration_seconds_count")
    examined = sample("edgeproxy_maintenance_names_examined_total")
    await mgr.maintenance_once()
    assert sample("edgeproxy_maintenance_pass_duration_seconds_count") == passes + 1
    assert sample("edgeproxy_maintenance_names_examined_total") == examined + 3
