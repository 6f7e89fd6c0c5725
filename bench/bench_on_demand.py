"""On-demand latency (a benchmark, not a test): run with
``pytest bench/bench_on_demand.py -s -p no:cacheprovider``.

Against Debian's pebble (PEBBLE_VA_NOSLEEP=1) with edgeproxy answering TLS-ALPN-01 itself:
time from connect to the first response byte for 20 new names (curl's time_starttransfer),
and the handshake time of an already cached name (time_appconnect - time_connect).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import trio

from testkit.pebble import Pebble
from testkit.ports import free_port
from testkit.proxy import running_proxy
from testkit.upstreams import http_handler, start_upstream
from tests.integration.conftest import make_pebble  # noqa: F401
from tests.integration.test_on_demand_acme import acme_config


async def curl_times(port: int, name: str, roots: Path) -> tuple[float, float, float]:
    res = await trio.run_process(
        [
            "curl",
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{time_connect} %{time_appconnect} %{time_starttransfer}",
            "--cacert",
            str(roots),
            "--resolve",
            f"{name}:{port}:127.0.0.1",
            f"https://{name}:{port}/",
        ],
        capture_stdout=True,
        check=True,
    )
    connect, app, first = (float(x) for x in res.stdout.split())
    return connect, app, first


async def test_on_demand_latency(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],  # noqa: F811
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    up = await start_upstream(nursery, http_handler(b"ok\n"))
    cfg = acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
    cfg["log"] = {"level": "warning"}
    async with running_proxy(tmp_path, cfg):
        await curl_times(port, "warmup.example.test", roots)  # the ACME account is created once
        first = []
        for i in range(20):
            connect, _, ttfb = await curl_times(port, f"new{i}.example.test", roots)
            first.append(ttfb - connect)
        cached = []
        for i in range(20):
            connect, app, _ = await curl_times(port, f"new{i}.example.test", roots)
            cached.append(app - connect)
    print(
        f"\nnew name, first request to first byte (20 names): median "
        f"{statistics.median(first) * 1000:.0f} ms, worst {max(first) * 1000:.0f} ms"
        f"\ncached name, TLS handshake (20): median {statistics.median(cached) * 1000:.2f} ms, "
        f"worst {max(cached) * 1000:.2f} ms"
    )
