"""Hostname registry figures (a benchmark, not a test):
``python -m bench.hostnames [--names 10] [--import-names 10000] [--registry 100000] [--only post,import,registry]``.

* post: POST /v1/hostnames to a served certificate: against Debian's pebble
  (PEBBLE_VA_NOSLEEP=1) with edgeproxy answering TLS-ALPN-01 itself, the time from sending the
  POST to the end of the first TLS handshake (Python ssl, verifying the pebble chain) after the
  API says ``active``; ``--names`` names, median and spread.
* import: ``edgeproxy hostnames import`` of ``--import-names`` names, on the file backend and
  on PostgreSQL.
* registry: a fresh replica's first full load of a ``--registry``-entry registry, both
  backends: time, and the memory the loaded registry holds (tracemalloc).
"""

from __future__ import annotations

import argparse
import gc
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import httpx
import trio

from bench.options import subset
from edgeproxy.storage import FileStorage, HostnameEntry
from edgeproxy.storage.base import Storage
from testkit.ondemand import NO_NONCE_CHAOS, registry_config
from testkit.pebble import pebbles
from testkit.ports import free_port
from testkit.postgres import PostgresServer, running_postgres
from testkit.proxy import running_proxy
from testkit.tomlw import toml_dumps
from testkit.upstreams import http_handler, start_upstream

MEASUREMENTS = ("post", "import", "registry")


async def handshake(port: int, name: str, roots: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(roots))
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    await tls.do_handshake()
    await trio.aclose_forcefully(tls)


async def post_to_served_certificate(tmp_path: Path, names: int) -> None:
    port = free_port()
    times = []
    with pebbles(tmp_path) as make_pebble:
        pebble = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
        roots = tmp_path / "roots.pem"
        roots.write_bytes(pebble.roots_pem())
        async with trio.open_nursery() as nursery:
            up = await start_upstream(nursery, http_handler(b"ok\n"))
            cfg = registry_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path,
                                  up.addr)  # fmt: skip
            async with running_proxy(tmp_path, cfg) as p:
                host, aport = p.rt.admin_bound or ("", 0)
                async with httpx.AsyncClient(base_url=f"http://{host}:{aport}",
                                             headers={"Edgeproxy-Request": "1"}) as api:  # fmt: skip
                    for i in range(names):
                        name = f"bench{i}.customer.test"
                        t0 = time.monotonic()
                        created = await api.post("/v1/hostnames", json={"hostname": name})
                        assert created.status_code == 201, created.text
                        while (await api.get(f"/v1/hostnames/{name}")).json()["state"] != "active":
                            await trio.sleep(0.005)
                        await handshake(port, name, roots)
                        times.append(time.monotonic() - t0)
            nursery.cancel_scope.cancel()
    print(f"POST /v1/hostnames -> served certificate, {names} names (pebble): median "
          f"{statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms")  # fmt: skip


def _import(tmp_path: Path, storage: dict[str, str], env: dict[str, str], n: int) -> float:
    cfg = {"tls": {"issuer": "internal"}, "storage": storage,
           "routes": [{"sni": ["*"], "upstreams": ["127.0.0.1:9"]}]}  # fmt: skip
    config = tmp_path / f"import-{storage['backend']}.toml"
    config.write_text(toml_dumps(cfg))
    names = tmp_path / "names.txt"
    names.write_text("".join(f"c{i:05d}.customer.test\n" for i in range(n)))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "edgeproxy", "hostnames", "import", str(names),
                          "-c", str(config)], capture_output=True, env=env, check=False)  # fmt: skip
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert f"{n} added".encode() in res.stdout, res.stdout
    return took


def import_rate(tmp_path: Path, server: PostgresServer, n: int) -> None:
    file_s = _import(tmp_path, {"backend": "file", "path": str(tmp_path / "state")},
                     dict(os.environ), n)  # fmt: skip
    dsn = server.create_database()
    pg_s = _import(tmp_path, {"backend": "postgres", "dsn_env": "BENCH_DSN"},
                   {**os.environ, "BENCH_DSN": dsn}, n)  # fmt: skip
    print(f"hostnames import, {n:,} names: file backend {file_s:.1f} s "
          f"({n / file_s:.0f}/s), PostgreSQL {pg_s:.1f} s ({n / pg_s:.0f}/s)")


async def _registry_load(storage: Storage, label: str, n: int) -> str:
    """Fill ``storage`` with ``n`` entries, then time a fresh replica's first full load and
    measure what the loaded registry holds (tracemalloc, on a second fresh load)."""
    from edgeproxy.hostnames.registry import HostnameRegistry

    batch = 1000
    for start in range(0, n, batch):
        await storage.add_hostnames([
            HostnameEntry(f"c{i:06d}.customer.test", "10.0.0.1:8080" if i % 10 == 0 else None,
                          f'{{"customer": {i}}}', 1.75e9)
            for i in range(start, min(start + batch, n))
        ])  # fmt: skip
    registry = HostnameRegistry(storage)
    t0 = time.monotonic()
    await registry.reload()
    took = time.monotonic() - t0
    assert len(registry) == n
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
    assert len(fresh) == n
    return (f"{label}: first load {took:.2f} s, {held / 2**20:.0f} MiB held "
            f"(peak {peak / 2**20:.0f} MiB while loading); resync {resync:.2f} s, longest "
            f"event-loop stall {unfrozen * 1000:.0f} ms, {frozen * 1000:.0f} ms with the "
            "loaded registry frozen out of the collector")


async def registry_load(tmp_path: Path, server: PostgresServer, n: int) -> None:
    from edgeproxy.storage.postgres import PostgresStorage

    lines = [await _registry_load(FileStorage(tmp_path / "registry"), "file backend", n)]
    pg_storage = PostgresStorage(server.create_database())
    try:
        lines.append(await _registry_load(pg_storage, "PostgreSQL", n))
    finally:
        await pg_storage.aclose()
    print(f"hostname registry, {n:,} entries, one replica's initial load:\n  "
          + "\n  ".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostnames", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--names", type=int, default=10, help="POSTed names (default 10)")
    parser.add_argument("--import-names", type=int, default=10_000,
                        help="names imported per backend (default 10000)")  # fmt: skip
    parser.add_argument("--registry", type=int, default=100_000,
                        help="registry entries loaded per backend (default 100000)")  # fmt: skip
    parser.add_argument("--only", type=subset(MEASUREMENTS), default=list(MEASUREMENTS),
                        help="comma-separated subset (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    only = args.only
    with tempfile.TemporaryDirectory(prefix="bench-hostnames-") as tmp:
        if "post" in only:
            (Path(tmp) / "post").mkdir()
            trio.run(post_to_served_certificate, Path(tmp) / "post", args.names)
        if "import" in only or "registry" in only:
            with running_postgres() as server:
                if "import" in only:
                    (Path(tmp) / "import").mkdir()
                    import_rate(Path(tmp) / "import", server, args.import_names)
                if "registry" in only:
                    (Path(tmp) / "registry").mkdir()
                    trio.run(registry_load, Path(tmp) / "registry", server, args.registry)


if __name__ == "__main__":
    main()
