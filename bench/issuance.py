"""Workload (e): on-demand issuance, from a new name's first ClientHello to the first response byte.

Owns the issuance setup and its clock: one pebble (Debian's, ``PEBBLE_VA_NOSLEEP=1``) per
system under test whose ``tlsPort`` is that system's listener, so every TLS-ALPN-01 validation
goes through the system's own data path; an ask endpoint both systems consult (allows
``*.bench.test``); and a client that, after the TCP connect, starts the clock, handshakes with
SNI = a name nobody has asked for before (the handshake waits while the system orders the
certificate), sends ``GET``, and stops the clock at the first response byte. The certificate is
verified against pebble's roots, so a fallback or self-signed certificate fails the name.

edgeproxy runs with ``issuer = "acme"`` and ``on_demand.ask``; Caddy (Debian's) with
``on_demand_tls`` and the same ask URL, HTTP-01 disabled so both solve TLS-ALPN-01 only, and
pebble's HTTPS CA trusted. Both are pinned to the terminators' CPU, pebble to the harness's.
One untimed warm-up name per system first registers the ACME account and fills connection
pools; then the timed names alternate between the systems (who goes first alternates too).
Must not know the throughput workloads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from testkit.pebble import Pebble, start_pebble
from testkit.ports import free_port

from .procs import Server, Supervisor
from .terminators import REPO_ROOT, render

__all__ = [
    "ALLOWED_SUFFIX",
    "AskServer",
    "IssuanceResult",
    "SystemUnderTest",
    "measure_issuance",
    "p90",
]

ALLOWED_SUFFIX: Final = ".bench.test"
SYSTEMS: Final = ("edgeproxy", "caddy")


class AskServer:
    """``GET /ask?domain=NAME``: 200 for ``*.bench.test``, 403 otherwise; counts the asks."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        lock = threading.Lock()
        asked = self.asked

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                domain = (query.get("domain") or [""])[0]
                with lock:
                    asked.append(domain)
                status = 200 if domain.endswith(ALLOWED_SUFFIX) else 403
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the harness prints its own summary

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/ask"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> AskServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@dataclass
class SystemUnderTest:
    name: str
    pebble: Pebble
    server: Server
    trust: ssl.SSLContext


@dataclass
class IssuanceResult:
    system: str
    times_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def p90_ms(self) -> float | None:
        return p90(self.times_ms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "names": len(self.times_ms) + len(self.failures),
            "ok": len(self.times_ms),
            "median_ms": _round(self.median_ms),
            "p90_ms": _round(self.p90_ms),
            "times_ms": [round(t, 1) for t in self.times_ms],
            "failures": self.failures,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def p90(values: list[float]) -> float | None:
    """The 90th percentile, linear between closest ranks (``statistics.quantiles`` inclusive)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def time_to_first_byte(port: int, name: str, trust: ssl.SSLContext, timeout: float) -> float:
    """Seconds from the ClientHello (right after the TCP connect) to the first response byte."""
    request = f"GET /empty.bin HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        start = time.perf_counter()
        with trust.wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(request)
            first = tls.recv(1)
            elapsed = time.perf_counter() - start
    if first != b"H":
        raise ConnectionError(f"no HTTP response (got {first!r})")
    return elapsed


def _trust(pebble: Pebble, path: Path) -> ssl.SSLContext:
    path.write_bytes(pebble.roots_pem())
    return ssl.create_default_context(cafile=str(path))


def _start_edgeproxy(
    sup: Supervisor,
    workdir: Path,
    cpu: int | None,
    origin_port: int,
    ask_url: str,
    log_level: str,
    source: Path,
) -> SystemUnderTest:
    port = free_port()
    pebble = start_pebble(workdir, tls_port=port)
    try:
        conf = render(
            "edgeproxy-acme.toml",
            workdir / "edgeproxy-acme.toml",
            port=port,
            admin_port=free_port(),
            directory=pebble.directory_url,
            trust=pebble.ca_bundle_path,
            ask_url=ask_url,
            workdir=workdir,
            log_level=log_level,
            upstream_port=origin_port,
        )
        argv = [sys.executable, "-m", "edgeproxy", "run", "-c", str(conf)]
        server = sup.start("edgeproxy-acme", argv, cpu=cpu, port=port, cwd=source)
        return SystemUnderTest("edgeproxy", pebble, server, _trust(pebble, workdir / "e-roots.pem"))
    except BaseException:
        pebble.stop()
        raise


def _start_caddy(
    sup: Supervisor, workdir: Path, cpu: int | None, origin_port: int, ask_url: str
) -> SystemUnderTest:
    port = free_port()
    pebble = start_pebble(workdir, tls_port=port)
    try:
        home = workdir / "caddy-home"
        home.mkdir(exist_ok=True)
        conf = render(
            "caddy.json",
            workdir / "caddy.json",
            port=port,
            http_port=free_port(),
            directory=pebble.directory_url,
            trust=pebble.ca_bundle_path,
            ask_url=ask_url,
            workdir=workdir,
            upstream_port=origin_port,
        )
        # Caddy keeps state under $HOME/$XDG_*: keep it inside the run's directory.
        env = {
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"),
        }
        server = sup.start(
            "caddy", ["caddy", "run", "--config", str(conf)], cpu=cpu, port=port, env=env
        )
        return SystemUnderTest("caddy", pebble, server, _trust(pebble, workdir / "c-roots.pem"))
    except BaseException:
        pebble.stop()
        raise


@contextlib.contextmanager
def _systems(
    sup: Supervisor,
    workdir: Path,
    systems: tuple[str, ...],
    cpu: int | None,
    origin_port: int,
    ask_url: str,
    log_level: str,
    source: Path,
) -> Iterator[list[SystemUnderTest]]:
    started: list[SystemUnderTest] = []
    try:
        for name in systems:
            sub = workdir / f"issuance-{name}"
            sub.mkdir(parents=True, exist_ok=True)
            if name == "edgeproxy":
                started.append(
                    _start_edgeproxy(sup, sub, cpu, origin_port, ask_url, log_level, source)
                )
            elif name == "caddy":
                started.append(_start_caddy(sup, sub, cpu, origin_port, ask_url))
            else:
                raise ValueError(f"unknown issuance system {name!r}")
        yield started
    finally:
        for system in started:
            with contextlib.suppress(Exception):
                sup.stop(system.server)
            system.pebble.stop()


def measure_issuance(
    sup: Supervisor,
    workdir: Path,
    *,
    systems: tuple[str, ...],
    names: int,
    cpu: int | None,
    origin_port: int,
    log_level: str = "warning",
    edgeproxy_root: Path = REPO_ROOT,
    timeout: float = 90.0,
) -> list[IssuanceResult]:
    """Time ``names`` first requests per system (after one untimed warm-up name each)."""
    results = {s: IssuanceResult(s) for s in systems}
    run_id = os.urandom(3).hex()
    with (
        AskServer() as ask,
        _systems(
            sup, workdir, systems, cpu, origin_port, ask.url, log_level, edgeproxy_root
        ) as started,
    ):
        for system in started:
            name = f"warmup-{run_id}-{system.name}{ALLOWED_SUFFIX}"
            try:
                time_to_first_byte(system.server.port or 0, name, system.trust, timeout)
            except (OSError, ssl.SSLError) as exc:
                results[system.name].failures.append(f"warm-up {name}: {exc}")
        for i in range(names):
            order = started if i % 2 == 0 else list(reversed(started))
            for system in order:
                name = f"n{i}-{run_id}-{system.name}{ALLOWED_SUFFIX}"
                try:
                    seconds = time_to_first_byte(
                        system.server.port or 0, name, system.trust, timeout
                    )
                except (OSError, ssl.SSLError) as exc:
                    results[system.name].failures.append(f"{name}: {exc}")
                    continue
                results[system.name].times_ms.append(seconds * 1000)
    return [results[s] for s in systems]
