"""Status page load times with 100,000 hostnames (a benchmark, not a test):
``python -m bench.status_page [--hostnames 100000] [--backends file,postgres]``.

``--hostnames`` registry entries on the file backend and on PostgreSQL, every 100th with a stored
"valid" status and every 1,000th "failing", then ``edgeproxy`` in-process with the registry
and the admin listener: the first response and when the counts by state are ready, then times
(median of 5) for ``GET /ui/``, a name search, a state filter, a page deep in the list, a
hostname's page, and page loads while the index is recounted in the background. Wall time of
whole HTTP responses over loopback with httpx.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.options import run_in_tmp, subset
from edgeproxy.admin.ui_index import REFRESH
from edgeproxy.certs import status_store
from edgeproxy.certs.status import DomainStatus
from edgeproxy.storage.base import HostnameEntry, Storage
from edgeproxy.storage.file import FileStorage
from edgeproxy.storage.postgres import PostgresStorage
from testkit.postgres import running_postgres
from testkit.proxy import base_config, running_proxy

BATCH = 5_000
BACKENDS = ("file", "postgres")


def name(i: int) -> str:
    return f"c{i:06d}.customer.test"


async def fill(storage: Storage, n: int) -> None:
    now = time.time()
    for start in range(0, n, BATCH):
        batch = [HostnameEntry(name(i), None, "{}", now) for i in range(start, min(start + BATCH, n))]
        await storage.add_hostnames(batch)
    for i in range(0, n, 100):
        failing = i % 1000 == 0
        st = DomainStatus(
            name(i),
            "failing" if failing else "valid",
            not_after=now + 80 * 86400,
            last_error_type="urn:ietf:params:acme:error:dns" if failing else None,
            hint="check DNS" if failing else None,
        )
        await status_store.write(storage, st)


async def timed(c: httpx.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    r = await c.get(url)
    took = time.perf_counter() - t0
    assert r.status_code == 200, r.text[:300]
    return took


async def measure(tmp_path: Path, storage_cfg: dict[str, Any], label: str, n: int) -> None:
    cfg = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
        admin={"listen": "127.0.0.1:0"},
        on_demand={"allow": [], "registry": True},
        storage=storage_cfg,
    )
    async with running_proxy(tmp_path, cfg) as p:
        with trio.fail_after(300):
            while not p.rt.hostnames.loaded:
                await trio.sleep(0.1)
        host, port = p.rt.admin_bound or ("", 0)
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", trust_env=False,
                                     timeout=300) as c:  # fmt: skip
            first = await timed(c, "/ui/")
            t0 = time.perf_counter()
            while 'id="counting"' in (page := await c.get("/ui/")).text:
                await trio.sleep(0.2)
            counted = time.perf_counter() - t0 + first
            assert f">{n}<" in page.text.replace("</span> all", "<")  # the total is counted
            rows: dict[str, list[float]] = {}
            for label_url in (
                ("first page", "/ui/"),
                ("search 'c0999'", "/ui/?q=c0999"),
                ("search, no match", "/ui/?q=zz"),
                ("state=failing", "/ui/?state=failing"),
                (f"page after c{n * 9 // 10:06d}", f"/ui/?after={name(n * 9 // 10)}"),
                ("hostname page", f"/ui/hostnames/{name(min(1000, n - 1))}"),
            ):
                rows[label_url[0]] = [await timed(c, label_url[1]) for _ in range(5)]
            await trio.sleep(REFRESH + 0.5)  # the next load starts a background recount
            rows["first page, recounting"] = [await timed(c, "/ui/") for _ in range(5)]
        print(f"status page, {n:,} hostnames, {label}: first response {first * 1000:.0f} ms, "
              f"counts by state ready after {counted:.1f} s")  # fmt: skip
        for what, times in rows.items():
            print(f"  {what:24s} median {statistics.median(times) * 1000:7.1f} ms "
                  f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")  # fmt: skip


async def status_page(tmp_path: Path, backend: str, n: int) -> None:
    if backend == "file":
        storage = FileStorage(tmp_path / "state")
        try:
            await fill(storage, n)
        finally:
            await storage.aclose()
        await measure(tmp_path, {"backend": "file", "path": str(tmp_path / "state")},
                      "file backend", n)  # fmt: skip
        return
    with running_postgres() as server:
        dsn = server.create_database()
        pg_storage = PostgresStorage(dsn)
        try:
            await fill(pg_storage, n)
        finally:
            await pg_storage.aclose()
        await measure(tmp_path, {"backend": "postgres", "dsn": dsn}, "PostgreSQL", n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.status_page", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--hostnames", type=int, default=100_000,
                        help="registry entries (default 100000)")  # fmt: skip
    parser.add_argument("--backends", type=subset(BACKENDS), default=list(BACKENDS),
                        help="comma-separated subset (default: both)")  # fmt: skip
    args = parser.parse_args(argv)
    for backend in args.backends:
        run_in_tmp("bench-status-page-", status_page, backend, args.hostnames)


if __name__ == "__main__":
    main()
