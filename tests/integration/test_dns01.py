"""DNS-01 with a real bind9 and pebble (issue 16): managed certificates, wildcards included.

bind9 is the authoritative server of ``wild.test``, ``customer.test`` and ``deleg.test``
(TSIG key made at test time); pebble resolves through it. edgeproxy updates the zones with
RFC 2136 + TSIG. ``*.wild.test`` + ``wild.test`` is one certificate through DNS-01 (both
authorizations share ``_acme-challenge.wild.test``), served for SNI ``a.wild.test``;
``shop.customer.test`` delegates its challenge name by CNAME into ``deleg.test``, a zone
edgeproxy may update while ``customer.test`` is not one of its zones. Afterwards no TXT is
left in bind.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from prometheus_client import REGISTRY

from edgeproxy.app import assemble, build_managed
from edgeproxy.certs.budgets import Wait
from edgeproxy.config import load_config_data
from edgeproxy.storage.file import FileStorage
from testkit.bind import KEY_NAME, Named, named_available, start_named
from testkit.cli import cli
from testkit.ondemand import BODY, acme_config, curl, peer_cert
from testkit.pebble import FaultInjector, Pebble
from testkit.ports import free_port
from testkit.proxy import running_proxy
from testkit.tomlw import toml_dumps
from testkit.upstreams import http_handler, start_upstream

pytestmark = pytest.mark.skipif(
    not named_available(), reason="Debian bind9 not installed (tests/run installs it)"
)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def cli_config(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    """The config file the CLI reads statuses with: the same storage (our TOML writer has no
    arrays of tables, and the CLI does not need [[acme.dns]] / [[acme.managed]])."""
    acme = {k: v for k, v in cfg["acme"].items() if k not in ("dns", "managed")}
    path = tmp_path / "edgeproxy.toml"
    path.write_text(toml_dumps({**cfg, "acme": acme}))
    return path


DELEGATED = "_acme-challenge.shop.customer.test"
TARGET = "shop.acme.deleg.test"


@pytest.fixture
def named(tmp_path: Path) -> Iterator[Named]:
    server = start_named(
        tmp_path,
        {
            "wild.test": [],
            "customer.test": [f"{DELEGATED}. IN CNAME {TARGET}."],
            "deleg.test": [],
        },
    )
    try:
        yield server
    finally:
        server.stop()


def tsig_zone(named: Named) -> dict[str, Any]:
    """An [[acme.dns]] zone's server and TSIG settings for ``named`` (add ``zone``)."""
    return {
        "server": named.address,
        "tsig_key_name": KEY_NAME,
        "tsig_secret_env": "EP_TEST_TSIG",
        "propagation_timeout": 10,
    }


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return set(ext.value.get_values_for_type(x509.DNSName))


async def test_wildcard_and_delegated_cname_via_dns01(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    named: Named,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EP_TEST_TSIG", named.key_secret)
    pebble = make_pebble(tls_port=free_port(), dns_server=named.address)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    up = await start_upstream(nursery, http_handler(BODY))
    zone = tsig_zone(named)
    cfg = acme_config(
        tmp_path,
        free_port(),
        pebble.directory_url,
        pebble.ca_bundle_path,
        up.addr,
        acme={
            "challenges": ["tls-alpn-01"],  # on-demand names; managed ones use dns-01 only
            "dns": [{"zone": "wild.test", **zone}, {"zone": "deleg.test.", **zone}],
            "dns_resolver": named.address,  # customer.test is not ours: look its CNAME up
            "managed": [
                {"names": ["*.wild.test", "wild.test"]},
                {"names": ["shop.customer.test"]},
            ],
        },
    )
    started = time.monotonic()
    async with running_proxy(tmp_path, cfg) as p:
        managed = p.rt.managed
        assert managed is not None
        with trio.fail_after(90):
            while managed.match("shop.customer.test") is None or managed.match("wild.test") is None:
                assert not managed.errors, str(managed.errors) + pebble.logs()[-3000:]
                await trio.sleep(0.1)
        took = time.monotonic() - started
        print(f"\ntime to two managed certificates via DNS-01 (3 names): {took:.2f}s")

        # One wildcard certificate serves any one-label subdomain, and the apex.
        for sni in ("a.wild.test", "b.wild.test", "wild.test"):
            res = await curl(p, sni, roots)
            assert res.returncode == 0, res.stderr.decode()
            assert res.stdout == BODY
            assert sans(await peer_cert(p.port, sni, roots)) == {"*.wild.test", "wild.test"}
        assert sans(await peer_cert(p.port, "shop.customer.test", roots)) == {"shop.customer.test"}
        # Nothing was ordered on demand for them: the managed certificate answered.
        assert p.rt.certs.status("a.wild.test") is None

        config = cli_config(tmp_path, cfg)
        res = await cli("certs", "status", "*.wild.test", "--json", "-c", str(config))
        assert res.returncode == 0, res.stderr.decode()
        wild = json.loads(res.stdout)
        leaf = await peer_cert(p.port, "a.wild.test", roots)
        assert (wild["state"], wild["names"]) == ("valid", ["*.wild.test", "wild.test"]), wild
        assert wild["not_after"] == leaf.not_valid_after_utc.timestamp()
        assert wild["renewal_source"] == "two-thirds" and wild["issuer"]
        assert wild["renew_at"] < wild["not_after"] and wild["last_error"] is None

        # Renewal: once two thirds of the lifetime have passed, the next pass orders anew and
        # the new certificate is served.
        first = await peer_cert(p.port, "a.wild.test", roots)
        life = first.not_valid_after_utc.timestamp() - first.not_valid_before_utc.timestamp()
        managed._clock = lambda: first.not_valid_before_utc.timestamp() + life * 0.7
        renewals = sample("edgeproxy_certificate_renewals_total", outcome="renewed")
        assert not await managed.maintain_once(), managed.errors
        renewed = await peer_cert(p.port, "a.wild.test", roots)
        assert renewed.serial_number != first.serial_number
        assert sans(renewed) == {"*.wild.test", "wild.test"}
        # Both entries renewed, counted like on-demand renewals; the status follows the new one.
        assert sample("edgeproxy_certificate_renewals_total", outcome="renewed") == renewals + 2
        st = managed.status(("*.wild.test", "wild.test"))
        assert st is not None and st.state == "valid"
        assert st.not_after == renewed.not_valid_after_utc.timestamp()

    # The challenge records are gone (the delegated one from the CNAME's target zone).
    for name in ("_acme-challenge.wild.test", DELEGATED, TARGET):
        assert await trio.to_thread.run_sync(named.txt, name) == []
    # ... and were written where the CNAME pointed, not beside it.
    journal = (named.workdir / "deleg.test.db.jnl").exists()
    assert journal, "no update ever reached deleg.test"
    assert not (named.workdir / "customer.test.db.jnl").exists()


async def test_bad_dns_setups_fail_with_their_reason(
    tmp_path: Path, make_pebble: Callable[..., Pebble], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong TSIG secret, a CNAME loop, a challenge name outside every zone and a secondary
    that never answers the TXT: each entry fails with its own typed reason and hint in its
    status, counted as a failed order, nothing is issued, and no TXT is left behind."""
    server = start_named(
        tmp_path,
        {
            "wild.test": [
                "_acme-challenge.loop IN CNAME hop.wild.test.",
                "hop IN CNAME _acme-challenge.loop.wild.test.",
            ],
            "other.test": [],
        },
    )
    try:
        pebble = make_pebble(tls_port=free_port(), dns_server=server.address)
        monkeypatch.setenv("EP_TEST_TSIG", server.key_secret)
        monkeypatch.setenv("EP_WRONG_TSIG", base64.b64encode(b"w" * 32).decode())
        zone = {"server": server.address, "tsig_key_name": KEY_NAME, "propagation_timeout": 5}
        silent = f"127.0.0.1:{free_port()}"
        cfg = acme_config(
            tmp_path,
            free_port(),
            pebble.directory_url,
            pebble.ca_bundle_path,
            "127.0.0.1:9",
            acme={
                "dns": [
                    # A secondary that never answers: the TXT is written, never seen there.
                    {
                        "zone": "wild.test",
                        "tsig_secret_env": "EP_TEST_TSIG",
                        **zone,
                        "check_servers": [silent],
                        "propagation_timeout": 1,
                    },
                    {"zone": "bad.wild.test", "tsig_secret_env": "EP_WRONG_TSIG", **zone},
                ],
                "dns_resolver": server.address,
                "managed": [
                    {"names": ["*.bad.wild.test"]},
                    {"names": ["loop.wild.test"]},
                    {"names": ["www.other.test"]},
                    {"names": ["slow.wild.test"]},
                ],
            },
        )
        managed = build_managed(load_config_data(cfg), FileStorage(tmp_path / "state"))
        assert managed is not None
        orders_failed = sample("edgeproxy_acme_orders_total", outcome="failed")
        bugs = sample("edgeproxy_background_task_errors_total", task="managed")
        assert await managed.maintain_once()
        # Setup mistakes are failed orders, not bugs.
        assert sample("edgeproxy_acme_orders_total", outcome="failed") == orders_failed + 4
        assert sample("edgeproxy_background_task_errors_total", task="managed") == bugs
        errors = {names[0]: text for names, text in managed.errors.items()}
        assert "rejected our TSIG key" in errors["*.bad.wild.test"], errors
        assert "CNAME loop" in errors["loop.wild.test"], errors
        assert "none of the [[acme.dns]] zones" in errors["www.other.test"], errors
        for sni in ("a.bad.wild.test", "loop.wild.test", "www.other.test"):
            assert managed.match(sni) is None
        # The per-domain status says what is wrong and how to fix it, keyed by the first name.
        config = cli_config(tmp_path, cfg)
        res = await cli("certs", "status", "*.bad.wild.test", "--json", "-c", str(config))
        assert res.returncode == 0, res.stderr.decode()
        bad = json.loads(res.stdout)
        assert (bad["state"], bad["last_error_type"]) == ("failing", "dns_tsig_rejected"), bad
        assert bad["names"] == ["*.bad.wild.test"] and bad["failures"] == 1
        assert "tsig_key_name" in bad["hint"] and "secret" in bad["hint"], bad
        assert bad["not_after"] is None
        res = await cli("certs", "list", "--json", "-c", str(config))
        rows = {r["name"]: r for r in json.loads(res.stdout)}
        assert rows["loop.wild.test"]["last_error_type"] == "dns_cname_loop"
        assert "CNAME chain" in rows["loop.wild.test"]["hint"]
        assert rows["www.other.test"]["last_error_type"] == "dns_zone_not_found"
        assert "outside every configured" in rows["www.other.test"]["hint"]
        slow = rows["slow.wild.test"]
        assert slow["last_error_type"] == "dns_propagation_timeout", slow
        assert silent in slow["last_error"] and "propagation_timeout" in slow["hint"]
        for name in (
            "_acme-challenge.bad.wild.test",
            "_acme-challenge.www.other.test",
            "_acme-challenge.slow.wild.test",
        ):
            assert await trio.to_thread.run_sync(server.txt, name) == []
    finally:
        server.stop()


async def test_managed_orders_count_in_the_ca_budgets(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    named: Named,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[[acme.managed]] orders go through the on-demand names' CA account, so they spend the
    same [acme.limits] budgets: with one order per account per 3 h, the first entry is
    ordered, the second is not sent to the CA (state ``rate_limited``, the limit and the time
    it may go in its status), and the on-demand names' next order would wait too."""
    monkeypatch.setenv("EP_TEST_TSIG", named.key_secret)
    pebble = make_pebble(
        tls_port=free_port(), dns_server=named.address, env={"PEBBLE_WFE_NONCEREJECT": "0"}
    )
    injector = FaultInjector(pebble)
    await nursery.start(injector.serve)
    zone = tsig_zone(named)
    cfg = acme_config(
        tmp_path,
        free_port(),
        injector.directory_url,
        pebble.ca_bundle_path,
        "127.0.0.1:9",
        acme={
            "dns": [{"zone": "wild.test", **zone}],
            "managed": [{"names": ["a.wild.test"]}, {"names": ["b.wild.test"]}],
            "limits": {"new_orders_per_account": 1},
        },
    )
    rt = assemble(load_config_data(cfg), FileStorage(tmp_path / "state"))
    assert rt.managed is not None and rt.certs.budgets is not None
    assert await rt.managed.maintain_once(), "the second entry was ordered over the budget"
    assert injector.count("newOrder") == 1
    assert rt.managed.match("a.wild.test") is not None
    assert rt.managed.match("b.wild.test") is None
    held = rt.managed.status(("b.wild.test",))
    assert held is not None and held.state == "rate_limited", held
    assert held.extra["limit"] == "acme.limits.new_orders_per_account", held
    assert held.next_attempt is not None and held.next_attempt > time.time() + 2.9 * 3600
    assert "acme.limits.new_orders_per_account" in (held.hint or ""), held
    # Another pass asks the budget again and still sends nothing.
    assert await rt.managed.maintain_once()
    assert injector.count("newOrder") == 1
    # The on-demand side counts under the same account: its next order would wait too.
    decision = await rt.certs.budgets.admit(["shop.example.test"], "new")
    assert isinstance(decision, Wait) and decision.limit == "new_orders_per_account", decision
