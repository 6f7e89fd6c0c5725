"""[acme.limits] against a real CA (Debian's pebble): a name over a budget is not ordered but
waits (state ``rate_limited``, with the time it can go), the budget is shared by proxies on one
storage and kept across a restart, the waiting name is ordered when its time comes, and an
ARI-timed renewal goes through an exhausted budget.

Orders are counted at a ``FaultInjector`` between edgeproxy and pebble (every newOrder POST).
The managers' clocks are real time plus an offset a test moves, so "three hours later" takes
no three hours.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from prometheus_client import REGISTRY

from edgeproxy.certs.budget_store import account_key
from edgeproxy.certs.record import cert_key
from edgeproxy.certs.status_store import status_key
from testkit.ondemand import served_der
from testkit.pebble import FaultInjector, Pebble
from testkit.ports import free_port
from testkit.proxy import RunningProxy, base_config, running_proxy
from testkit.upstreams import echo, start_upstream

# Nonce rejections would retry newOrder POSTs, and the test counts them.
NO_NONCE_CHAOS = {"PEBBLE_WFE_NONCEREJECT": "0"}
THREE_HOURS = 3 * 3600.0


class Clock:
    """Real time plus ``offset``: what the managers and budgets read."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def config(
    tmp_path: Path, port: int, pebble: Pebble, inj: FaultInjector, up: str, limits: dict[str, int]
) -> dict[str, Any]:
    # Every proxy of a test gets the same storage path: replicas of one deployment.
    return base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": [up]}],
        server={"listen": [f"127.0.0.1:{port}"]},
        tls={"issuer": "acme", "default_sni": None, "maintenance_interval": 1.0},
        acme={
            "directory": inj.directory_url,
            "trust": str(pebble.ca_bundle_path),
            "email": "ops@example.test",
            "limits": limits,
        },
        on_demand={"allow": ["*.example.test"], "wait": 20},
        storage={"lock_ttl": 5},
    )


@asynccontextmanager
async def proxy(tmp_path: Path, cfg: dict[str, Any], clock: Clock) -> AsyncIterator[RunningProxy]:
    async with running_proxy(tmp_path, cfg) as p:
        assert p.rt.certs.budgets is not None, "[acme.limits] is not wired into the manager"
        p.rt.certs.clock = clock
        p.rt.certs.budgets.clock = clock
        yield p


async def served_serial(port: int, name: str, roots: Path) -> int | None:
    """The serial of the certificate served for ``name`` (verified), None if refused."""
    der = await served_der(port, name, ssl.create_default_context(cafile=str(roots)))
    return None if der is None else x509.load_der_x509_certificate(der).serial_number


async def pebble_behind_injector(
    nursery: trio.Nursery, make_pebble: Callable[..., Pebble], tmp_path: Path, **inj: Any
) -> tuple[int, Pebble, FaultInjector, Path]:
    port = free_port()
    pebble = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
    injector = FaultInjector(pebble, **inj)
    await nursery.start(injector.serve)
    roots = tmp_path / "pebble-roots.pem"
    roots.write_bytes(pebble.roots_pem())
    return port, pebble, injector, roots


def remaining(limit: str) -> float | None:
    return REGISTRY.get_sample_value("edgeproxy_acme_budget_remaining", {"limit": limit})


async def test_a_name_over_the_order_budget_waits_shared_by_replicas_and_restarts(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble]
) -> None:
    port, pebble, inj, roots = await pebble_behind_injector(nursery, make_pebble, tmp_path)
    up = await start_upstream(nursery, echo)
    limits = {"new_orders_per_account": 2}
    clock = Clock()
    waiting = "third.example.test"
    # Replica A listens where pebble validates; B's challenges are answered by A from storage.
    async with proxy(tmp_path, config(tmp_path, port, pebble, inj, up.addr, limits), clock) as a:
        other = config(tmp_path, free_port(), pebble, inj, up.addr, limits)
        async with proxy(tmp_path, other, clock) as b:
            assert await served_serial(a.port, "first.example.test", roots) is not None
            assert await served_serial(b.port, "second.example.test", roots) is not None
            assert inj.count("newOrder") == 2
            # The third distinct name, on either replica: refused at once, nothing ordered.
            assert await served_serial(b.port, waiting, roots) is None
            assert await served_serial(a.port, waiting, roots) is None
            assert inj.count("newOrder") == 2
            raw = await a.rt.storage.get(account_key(inj.directory_url))
            assert raw is not None
            first_order = min(json.loads(raw)["orders"])
            for replica in (a, b):
                st = replica.rt.certs.status(waiting)
                assert st is not None and st.state == "rate_limited", st
                assert st.last_error_type == "rate_limited"
                assert st.next_attempt == first_order + THREE_HOURS
                assert st.last_error is not None and "new_orders_per_account" in st.last_error
                assert st.hint is not None and "acme.limits.new_orders_per_account" in st.hint
            # What the admin API and `certs status` read for names not in their memory.
            stored = await a.rt.storage.get(status_key(waiting))
            assert stored is not None and json.loads(stored)["state"] == "rate_limited"
            assert remaining("new_orders_per_account") == 0
        # B restarts (as C) on the same storage: the budget is still spent.
        async with proxy(tmp_path, other, clock) as c:
            assert await served_serial(c.port, waiting, roots) is None
            assert inj.count("newOrder") == 2
            st = c.rt.certs.status(waiting)
            assert st is not None and st.state == "rate_limited"
            # Three hours later (by the managers' clocks) the first order has left the window:
            # maintenance (every second here) orders the queued name without any visitor.
            clock.offset += THREE_HOURS + 1
            with trio.fail_after(60):
                while await a.rt.storage.get(cert_key(waiting)) is None:
                    await trio.sleep(0.2)
            assert inj.count("newOrder") == 3
            assert await served_serial(a.port, waiting, roots) is not None
            assert await served_serial(c.port, waiting, roots) is not None
    assert inj.count("newOrder") == 3, pebble.logs()[-2000:]


async def test_an_ari_renewal_goes_through_an_exhausted_budget(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble]
) -> None:
    # ARI asked again a minute later (RFC 9773's shortest Retry-After); the window starts
    # far away.
    port, pebble, inj, roots = await pebble_behind_injector(
        nursery,
        make_pebble,
        tmp_path,
        renewal_window=(timedelta(days=60), timedelta(days=61)),
        renewal_retry_after=60,
    )
    up = await start_upstream(nursery, echo)
    # One order per 3 hours and one certificate per name set per 7 days: both used up by the
    # first certificate, so only the ARI exemption lets its renewal through.
    limits = {"new_orders_per_account": 1, "duplicate_certificates": 1}
    clock = Clock()
    name = "ari.example.test"
    async with proxy(tmp_path, config(tmp_path, port, pebble, inj, up.addr, limits), clock) as p:
        first = await served_serial(p.port, name, roots)
        assert first is not None
        assert await served_serial(p.port, "blocked.example.test", roots) is None
        st = p.rt.certs.status("blocked.example.test")
        assert st is not None and st.state == "rate_limited"
        with trio.fail_after(20):
            while (st := p.rt.certs.status(name)) is None or st.renewal_source != "ari":
                await trio.sleep(0.1)
        # The CA's window moves into the past, and a minute later (by the manager's clock,
        # well inside the budgets' windows) it asks again: renew now, at the CA's ARI moment.
        inj.renewal_window = (timedelta(days=-2), timedelta(days=-1))
        clock.offset += 61
        with trio.fail_after(30):
            while await served_serial(p.port, name, roots) == first:
                await trio.sleep(0.2)
        assert inj.count("newOrder") == 2
        raw = await p.rt.storage.get(account_key(inj.directory_url))
        assert raw is not None
        record = json.loads(raw)
        # Counted apart: the budget's order count did not move, the exempt count did.
        assert len(record["orders"]) == 1 and len(record["ari"]) == 1
        assert REGISTRY.get_sample_value("edgeproxy_acme_budget_exempt_orders") == 1
        assert remaining("new_orders_per_account") == 0
