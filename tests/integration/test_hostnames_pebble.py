"""The hostname registry against a real ACME CA (pebble + its challenge test DNS), real curl and
Python ssl clients: issuance before any visitor, the entry's own upstream, removal, re-adding
without a new order, and renewals that stop once nobody wants a name."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client import REGISTRY

from testkit.ask import ask_server
from testkit.ondemand import (
    NO_NONCE_CHAOS,
    curl,
    new_orders,
    refused_with_unrecognized_name,
    registry_config,
)
from testkit.pebble import Pebble, injected_pebble_for_proxy
from testkit.proxy import RunningProxy, running_proxy
from testkit.upstreams import http_handler, start_upstream

ROUTE_BODY = b"the SNI route's upstream\n"
ENTRY_BODY = b"the customer's own origin\n"
SCRIPTED = {"Edgeproxy-Request": "1"}


def admin(p: RunningProxy) -> httpx.AsyncClient:
    assert p.rt.admin_bound is not None
    host, port = p.rt.admin_bound
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", headers=SCRIPTED, timeout=30)






async def wait_state(api: httpx.AsyncClient, name: str, state: str, bound: float) -> Any:
    with trio.fail_after(bound):
        while (got := (await api.get(f"/v1/hostnames/{name}")).json())["state"] != state:
            await trio.sleep(0.05)
    return got


async def test_added_hostname_is_issued_before_a_visitor_and_served_from_its_upstream(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    port, pebble, inj = await injected_pebble_for_proxy(nursery, make_pebble, env=NO_NONCE_CHAOS)
    roots = roots_file(pebble)
    route_up = await start_upstream(nursery, http_handler(ROUTE_BODY))
    entry_up = await start_upstream(nursery, http_handler(ENTRY_BODY))
    name = "shop.customer.test"
    cfg = registry_config(tmp_path, port, inj.directory_url, pebble.ca_bundle_path, route_up.addr)
    async with running_proxy(tmp_path, cfg) as p, admin(p) as api:
        resp = await api.post(
            "/v1/hostnames",
            json={"hostname": name, "upstream": entry_up.addr, "metadata": {"customer": 7}},
        )
        assert resp.status_code == 201, resp.text
        active = await wait_state(api, name, "active", 60)
        assert active["certificate"]["issuer"] and active["certificate"]["serial"]
        assert route_up.connections == 0 and entry_up.connections == 0  # nobody visited
        res = await curl(p, name, roots)
        assert res.returncode == 0, res.stderr
        assert res.stdout == ENTRY_BODY
        assert new_orders(inj) == 1

        assert (await api.delete(f"/v1/hostnames/{name}")).status_code == 204
        assert await refused_with_unrecognized_name(port, name)
        assert (await api.get(f"/v1/hostnames/{name}")).json()["state"] == "removed"

        resp = await api.post("/v1/hostnames", json={"hostname": name})  # no upstream now
        assert resp.status_code == 201
        await wait_state(api, name, "active", 30)
        res = await curl(p, name, roots)
        assert res.returncode == 0 and res.stdout == ROUTE_BODY, res.stderr
    assert new_orders(inj) == 1  # re-added within the grace: the kept certificate, no order


async def test_renewal_after_removal_from_ask_or_registry_makes_no_order(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    # 10 s certificates: renewal is due after about 5 s, expiry after 10.
    port, pebble, inj = await injected_pebble_for_proxy(
        nursery, make_pebble, env=NO_NONCE_CHAOS, validity=10
    )
    roots = roots_file(pebble)
    up = await start_upstream(nursery, http_handler(ROUTE_BODY))
    allowed = {"asked.customer.test"}
    ask_url, _ = await ask_server(nursery, allowed)
    cfg = registry_config(tmp_path, port, inj.directory_url, pebble.ca_bundle_path, up.addr,
                          on_demand={"ask": ask_url, "allow_cache_ttl": 300})  # fmt: skip
    async with running_proxy(tmp_path, cfg) as p, admin(p) as api:
        assert (await api.post("/v1/hostnames", json={"hostname": "listed.customer.test"})
                ).status_code == 201  # fmt: skip
        res = await curl(p, "asked.customer.test", roots)  # the ask endpoint allows it
        assert res.returncode == 0, res.stderr
        await wait_state(api, "listed.customer.test", "active", 60)
        assert new_orders(inj) == 2
        # Both customers leave: one from the ask endpoint, one from the registry.
        allowed.clear()
        assert (await api.delete("/v1/hostnames/listed.customer.test")).status_code == 204
        with trio.fail_after(30):
            while (st := p.rt.certs.status("asked.customer.test")) is None or st.state != "denied":
                await trio.sleep(0.1)
        assert st.last_error_type == "denied" and "404" in (st.last_error or "")
        expires = max(c.not_after for c in p.rt.certs._cache.values())
        with trio.fail_after(30):
            while time.time() < expires + 2:
                await trio.sleep(0.2)
        gauge = REGISTRY.get_sample_value(
            "edgeproxy_certificate_earliest_expiry_timestamp_seconds"
        )
        assert gauge == 0  # nothing anyone still wants is managed: the expiry alert is quiet
        assert p.rt.certs.cached_context("asked.customer.test") is None  # dropped at expiry
    assert new_orders(inj) == 2
