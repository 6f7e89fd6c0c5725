"""The admin API's issue endpoint against a real ACME CA: forced orders are rate limited.

Before, ``POST /v1/domains/{name}/issue?force=1`` ordered anew on every call (5 forced orders in
0.3 s with ``max_orders_per_minute = 2``). Here pebble is the CA and a ``FaultInjector``
between edgeproxy and pebble counts the newOrder requests that really left the process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from testkit.ondemand import NO_NONCE_CHAOS, acme_config, new_orders
from testkit.pebble import Pebble, injected_pebble_for_proxy
from testkit.proxy import running_proxy
from testkit.upstreams import http_handler, start_upstream

SCRIPTED = {"Edgeproxy-Request": "1"}


async def test_forced_admin_orders_obey_the_order_rate_limit(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble]
) -> None:
    port, pebble, inj = await injected_pebble_for_proxy(nursery, make_pebble, env=NO_NONCE_CHAOS)
    up = await start_upstream(nursery, http_handler(b"ok\n"))
    cfg = acme_config(
        tmp_path,
        port,
        inj.directory_url,
        pebble.ca_bundle_path,
        up.addr,
        admin={"listen": "127.0.0.1:0"},
        on_demand={"max_orders_per_minute": 2},
    )
    async with running_proxy(tmp_path, cfg) as p:
        assert p.rt.admin_bound is not None
        host, admin_port = p.rt.admin_bound
        async with httpx.AsyncClient(
            base_url=f"http://{host}:{admin_port}", trust_env=False, timeout=60
        ) as c:
            answers = [
                await c.post("/v1/domains/shop.example.test/issue?force=1", headers=SCRIPTED)
                for _ in range(5)
            ]
    assert [r.status_code for r in answers] == [200, 200, 429, 429, 429], [
        r.text for r in answers
    ]
    assert new_orders(inj) == 2
    for r in answers[2:]:
        assert r.json()["limit"] == "on_demand.max_orders_per_minute"
        assert int(r.headers["retry-after"]) >= 1
