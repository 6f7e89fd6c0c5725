"""Run edgeproxy in-process (trio nursery) or as a real subprocess, for integration tests."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from edgeproxy.app import Runtime, run_process
from edgeproxy.config import load_config_data
from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.base import Storage


@dataclass
class RunningProxy:
    rt: Runtime
    host: str
    port: int
    ca_path: Path | None

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port


def base_config(tmp_path: Path, routes: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "handshake_timeout": 5},
        "admin": {"listen": None},
        "tls": {"issuer": "internal", "default_sni": "default.example.test"},
        "on_demand": {"allow": ["*.example.test"]},
        "storage": {"backend": "file", "path": str(tmp_path / "state")},
        "routes": routes,
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


@asynccontextmanager
async def running_proxy(
    tmp_path: Path, cfg_data: dict[str, Any], *, storage: Storage | None = None
) -> AsyncIterator[RunningProxy]:
    """``run_process`` in this trio run; ``storage`` replaces the configured one (a test's
    instrumented wrapper around a real backend)."""
    cfg = load_config_data(cfg_data)
    async with trio.open_nursery() as nursery:
        rt: Runtime = await nursery.start(functools.partial(run_process, cfg, storage=storage))
        host, port = rt.proxy.bound[0]
        ca_path = None
        if isinstance(rt.issuer, InternalIssuer):
            ca_path = tmp_path / "ca.pem"
            ca_path.write_bytes(await rt.issuer.ca_certificate_pem())
        try:
            yield RunningProxy(rt, host, port, ca_path)
        finally:
            nursery.cancel_scope.cancel()


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


@contextmanager
def edgeproxy_subprocess(
    config_path: Path, *, host: str, port: int, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``edgeproxy run`` as a real process; always killed at exit."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "run", "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    try:
        try:
            wait_port(host, port)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(
                f"edgeproxy did not start; log:\n{log_path.read_text()[-3000:]}"
            ) from None
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
