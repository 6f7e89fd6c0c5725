"""Every query of the Grafana dashboard answers, against a real Prometheus and a real fleet.

deploy/grafana/edgeproxy.json's panels are only worth shipping if each query names real
metrics and labels: a typo shows as an empty panel nobody notices until an incident. Here
Debian's ``prometheus`` scrapes an edgeproxy holding pebble-issued, failing and removed names
(``testkit.fleet``); after a first scrape, more traffic and one more issuance happen so
rates have something to measure; then every panel target (Grafana's ``$__rate_interval``
replaced by a fixed range) must return at least one series, and the traffic panels a value
above zero.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from testkit.fleet import ACTIVE, BROKEN, plain_http, start_fleet
from testkit.ondemand import curl, handshake_fails
from testkit.pebble import Pebble
from testkit.prometheus import (
    DEADLINE,
    Prometheus,
    acme_probe,
    needs_prometheus,
    wait_ready,
)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "edgeproxy.json"
LATE = "late.customer.test"
STRANGER = "stranger.customer.test"  # not registered: refused at the handshake
LATE_REFUSED = "refused-late.customer.test"
#: Panels the test's own traffic must move above zero (the rest may rightly stay at 0).
MOVED = {
    "Connections",
    "Connections closed by reason",
    "TLS handshakes by result",
    "Handshake failures by reason",
    "Handshake duration",
    "Bytes proxied",
    "ClientHellos by result",
    "Upstream connect failures",
    "Certificates by state",
    "Certificates in memory",
    "Maintenance passes",
    "Plain-HTTP listener",
    "Earliest expiry",
    "Issuance attempts",
    "ACME requests",
    "ACME errors",
    "Challenges",
    "On-demand decisions",
}


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"].replace("$__rate_interval", "2m"))
        for p in dashboard["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


@needs_prometheus
async def test_every_dashboard_query_returns_series(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
    start_prometheus: Callable[[int], Prometheus],
) -> None:
    queries = panel_queries()
    assert len(queries) >= 20
    async with start_fleet(tmp_path, nursery, make_pebble, roots_file) as fleet:
        port = int(fleet.admin_url.rsplit(":", 1)[1])
        prom = start_prometheus(port)
        async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE) as c:
            await wait_ready(c, prom)
            await prom.wait_for(c, 'up{job="edgeproxy"}', 1)
            # Traffic inside the rate window: visits, an upstream failure, a refused name, a
            # probe without a pending challenge, one more issuance from pebble and one
            # the CA refuses.
            p = fleet.proxy
            assert (await curl(p, ACTIVE, fleet.roots)).returncode == 0
            assert (await curl(p, BROKEN, fleet.roots)).returncode != 0
            assert await handshake_fails(p.port, STRANGER)
            await acme_probe(p.port, ACTIVE)
            await plain_http(fleet.http_port, ACTIVE)
            async with httpx.AsyncClient(
                base_url=fleet.admin_url, headers={"Edgeproxy-Request": "1"}
            ) as api:
                for name in (LATE, LATE_REFUSED):
                    body = {"hostname": name}
                    assert (await api.post("/v1/hostnames", json=body)).status_code == 201
            assert (await curl(p, LATE, fleet.roots)).returncode == 0

            empty: list[str] = []
            still_zero: set[str] = set(MOVED)
            with trio.move_on_after(DEADLINE):
                while True:
                    empty = []
                    for title, expr in queries:
                        result = await prom.query(c, expr)
                        if not result:
                            empty.append(f"{title}: {expr}")
                        if any(math.isfinite(v) and v != 0 for v in result.values()):
                            still_zero.discard(title)
                    if not empty and not still_zero:
                        break
                    await trio.sleep(0.5)
    assert empty == [], prom.logs()
    assert still_zero == set()
