"""Hostname registry figures (a benchmark, not a test): run with
``pytest bench/bench_hostnames.py -s -p no:cacheprovider``.

* POST /v1/hostnames to a served certificate: against Debian's pebble (PEBBLE_VA_NOSLEEP=1)
  with edgeproxy answering TLS-ALPN-01 itself, the time from sending the POST to the end of
  the first TLS handshake (Python ssl, verifying the pebble chain) after the API says
  ``active``; ten names, median and spread.
* ``edgeproxy hostnames import`` of 10,000 names, on the file backend and on PostgreSQL.
* A fresh replica's first full load of a 100,000-entry registry, both backends: time, and the
  memory the loaded registry holds (tracemalloc).
"""

from __future__ import annotations

import gc
import ssl
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from edgeproxy.storage import FileStorage, HostnameEntry
from edgeproxy.storage.base import Storage
from testkit import postgres as pg
from testkit.pebble import Pebble
from testkit.ports import free_port
from testkit.proxy import running_proxy
from testkit.tomlw import toml_dumps
from testkit.upstreams import http_handler, start_upstream
from tests.integration.conftest import make_pebble  # noqa: F401
from tests.integration.test_hostnames_pebble import registry_config
from tests.integration.test_on_demand_acme import NO_NONCE_CHAOS

postgres_server = pg.postgres_server
postgres_dsn = pg.postgres_dsn
postgres_database = pg.postgres_database


async def handshake(port: int, name: str, roots: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(roots))
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    await tls.do_handshake()
    await trio.aclose_forcefully(tls)


async def test_post_to_served_certificate(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],  # noqa: F811
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    up = await start_upstream(nursery, http_handler(b"ok\n"))
    cfg = registry_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
    times = []
    async with running_proxy(tmp_path, cfg) as p:
        host, aport = p.rt.admin_bound or ("", 0)
        async with httpx.AsyncClient(base_url=f"http://{host}:{aport}",
                                     headers={"Edgeproxy-Request": "1"}) as api:  # fmt: skip
            for i in range(10):
                name = f"bench{i}.customer.test"
                t0 = time.monotonic()
                assert (await api.post("/v1/hostnames", json={"hostname": name})).status_code == 201
                while (await api.get(f"/v1/hostnames/{name}")).json()["state"] != "active":
                    await trio.sleep(0.005)
                await handshake(port, name, roots)
                times.append(time.monotonic() - t0)
    print(f"\nPOST /v1/hostnames -> served certificate, 10 names (pebble): median "
          f"{statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms")  # fmt: skip


def _import(tmp_path: Path, storage: dict[str, str], env: dict[str, str]) -> float:
    cfg = {"tls": {"issuer": "internal"}, "storage": storage,
           "routes": [{"sni": ["*"], "upstreams": ["127.0.0.1:9"]}]}  # fmt: skip
    config = tmp_path / f"import-{storage['backend']}.toml"
    config.write_text(toml_dumps(cfg))
    names = tmp_path / "names.txt"
    names.write_text("".join(f"c{i:05d}.customer.test\n" for i in range(10_000)))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "edgeproxy", "hostnames", "import", str(names),
                          "-c", str(config)], capture_output=True, env=env, check=False)  # fmt: skip
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert b"10000 added" in res.stdout
    return took


def test_import_rate(tmp_path: Path, postgres_dsn: str) -> None:
    import os

    file_s = _import(tmp_path, {"backend": "file", "path": str(tmp_path / "state")},
                     dict(os.environ))  # fmt: skip
    pg_s = _import(tmp_path, {"backend": "postgres", "dsn_env": "BENCH_DSN"},
                   {**os.environ, "BENCH_DSN": postgres_dsn})  # fmt: skip
    print(f"\nhostnames import, 10,000 names: file backend {file_s:.1f} s "
          f"({10_000 / file_s:.0f}/s), PostgreSQL {pg_s:.1f} s ({10_000 / pg_s:.0f}/s)")


async def _registry_load(storage: Storage, label: str) -> str:
    """Fill ``storage`` with 100,000 entries, then time a fresh replica's first full load and
    measure what the loaded registry holds (tracemalloc, on a second fresh load)."""
    from edgeproxy.hostnames.registry import HostnameRegistry

    batch = 1000
    for start in range(0, 100_000, batch):
        await storage.add_hostnames([
            HostnameEntry(f"c{i:06d}.customer.test", "10.0.0.1:8080" if i % 10 == 0 else None,
                          f'{{"customer": {i}}}', 1.75e9)
            for i in range(start, start + batch)
        ])  # fmt: skip
    registry = HostnameRegistry(storage)
    t0 = time.monotonic()
    await registry.reload()
    took = time.monotonic() - t0
    assert len(registry) == 100_000
    # The periodic resync (every resync_interval) of an unchanged registry: the longest time
    # the event loop, i.e. every handshake of this process, waited meanwhile.
    stall = 0.0

    async def ticker() -> None:
        nonlocal stall
        while True:
            t = time.monotonic()
            await trio.sleep(0.001)
            stall = max(stall, time.monotonic() - t - 0.001)

    async def resync_stall() -> tuple[float, float]:
        nonlocal stall
        stall = 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            t0 = time.monotonic()
            await registry.reload()
            took = time.monotonic() - t0
            nursery.cancel_scope.cancel()
        return took, stall

    resync, unfrozen = await resync_stall()
    # As a serving process does (app.tune_gc_for_serving, then again once the registry loaded).
    gc.collect()
    gc.freeze()
    try:
        _, frozen = await resync_stall()
    finally:
        gc.unfreeze()
    tracemalloc.start()
    fresh = HostnameRegistry(storage)
    await fresh.reload()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(fresh) == 100_000
    return (f"{label}: first load {took:.2f} s, {held / 2**20:.0f} MiB held "
            f"(peak {peak / 2**20:.0f} MiB while loading); resync {resync:.2f} s, longest "
            f"event-loop stall {unfrozen * 1000:.0f} ms, {frozen * 1000:.0f} ms with the "
            "loaded registry frozen out of the collector")


async def test_registry_load_100k(tmp_path: Path, postgres_dsn: str) -> None:
    from edgeproxy.storage.postgres import PostgresStorage

    lines = [await _registry_load(FileStorage(tmp_path / "state"), "file backend")]
    pg_storage = PostgresStorage(postgres_dsn)
    try:
        lines.append(await _registry_load(pg_storage, "PostgreSQL"))
    finally:
        await pg_storage.aclose()
    print("\nhostname registry, 100,000 entries, one replica's initial load:\n  "
          + "\n  ".join(lines))
