"""Debian's ``prometheus`` scraping an edgeproxy's admin ``/metrics`` with the project's alert
rules loaded (``deploy/prometheus/edgeproxy-rules.yml``), and the probe that makes edgeproxy count
a validation handshake without a pending challenge."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from testkit.ports import free_port
from testkit.procs import stop_process

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "edgeproxy-rules.yml"
PROMETHEUS = shutil.which("prometheus")
DEADLINE = 20.0  # bound on any single wait; never a timing assertion

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus missing (Debian package prometheus)"
)


async def acme_probe(port: int, name: str) -> None:
    """A TLS-ALPN-01 validation handshake for a name with no pending challenge."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["acme-tls/1"])
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname=name)
    try:
        with pytest.raises((ssl.SSLError, trio.BrokenResourceError)):
            await tls.do_handshake()
    finally:
        await trio.aclose_forcefully(tls)


@dataclass
class Prometheus:
    url: str
    log_path: Path

    async def query(self, c: httpx.AsyncClient, promql: str) -> dict[frozenset[Any], float]:
        r = await c.get(f"{self.url}/api/v1/query", params={"query": promql})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        return {
            frozenset(item["metric"].items()): float(item["value"][1])
            for item in body["data"]["result"]
        }

    async def value(self, c: httpx.AsyncClient, promql: str) -> float | None:
        """The single value of ``promql``, None while it has no sample."""
        result = await self.query(c, promql)
        assert len(result) <= 1, (promql, result)
        return next(iter(result.values()), None)

    async def wait_for(self, c: httpx.AsyncClient, promql: str, expected: float) -> None:
        with trio.move_on_after(DEADLINE):
            while True:
                if await self.value(c, promql) == expected:
                    return
                await trio.sleep(0.2)
        got = await self.value(c, promql)
        raise AssertionError(f"{promql} = {got}, waited for {expected}\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@contextmanager
def prometheus_servers(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """``start(admin_port)`` -> a Prometheus scraping it every second, with the edgeproxy rules
    loaded; every one started is stopped on leaving, pass or fail."""
    started: list[subprocess.Popen[bytes]] = []

    def start(admin_port: int) -> Prometheus:
        assert PROMETHEUS is not None
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        config = {  # JSON is YAML
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "edgeproxy",
                    "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config, indent=1))
        port = free_port()
        log_path = workdir / "prometheus.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        started.append(proc)
        return Prometheus(f"http://127.0.0.1:{port}", log_path)

    try:
        yield start
    finally:
        for proc in started:
            stop_process(proc, grace=10)


async def wait_ready(c: httpx.AsyncClient, prom: Prometheus) -> None:
    with trio.move_on_after(DEADLINE):
        while True:
            try:
                if (await c.get(f"{prom.url}/-/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)
    raise AssertionError(f"prometheus did not become ready\n{prom.logs()}")
