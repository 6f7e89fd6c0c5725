"""Workloads (a)-(d) against one running terminator, and what each one measured.

Owns the workload definitions (body, connection reuse, tickets, wrk connections, target ratio
to HAProxy) and the two measurements: a wrk run with the terminator's CPU seconds around it,
and the idle-connection memory probe. Must not know how terminators are started or how runs
are aggregated into a table.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from testkit.procs import kill_process

from .loadgen import WrkResult, run_wrk
from .pki import BenchPki
from .procs import Server
from .terminators import BODIES, REPO_ROOT, Origin

__all__ = [
    "IDLE_TARGET_KIB",
    "WORKLOADS",
    "IdleResult",
    "ThroughputResult",
    "Workload",
    "combine",
    "measure_idle",
    "run_throughput",
]


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    body: str  # a key of terminators.BODIES
    close: bool  # Connection: close, so every request is a new TCP + TLS connection
    tickets: bool  # the terminator issues TLS session tickets (wrk resumes with them)
    connections: int  # wrk connections
    # edgeproxy's requests per proxy CPU-second over ``target_vs``'s in the same round, at
    # least, in every round (issue 19's targets)
    target: float | None
    target_vs: str = "haproxy"

    @property
    def path(self) -> str:
        return BODIES[self.body][0]


WORKLOADS: Final = {
    w.key: w
    for w in (
        Workload("a", "handshake, full (no tickets)", "empty", True, False, 16, 0.80),
        Workload("a2", "handshake, resumed (tickets)", "empty", True, True, 16, 0.80),
        Workload("b", "keep-alive, 1 KiB", "1k", False, True, 64, 0.70),
        # Against HAProxy with bulk-sized buffers, so like is compared with like.
        Workload("c", "bulk, 1 MiB", "1m", False, True, 16, 1.0, "haproxy-bigbuf"),
    )
}
IDLE_TARGET_KIB: Final = 20.0  # edgeproxy's RSS per idle TLS connection, at most, every round


@dataclass(frozen=True)
class ThroughputResult:
    wrk: WrkResult
    cpu_s: float  # the terminator's CPU seconds (all its threads and processes) during the run

    @property
    def requests_per_cpu_s(self) -> float | None:
        return self.wrk.requests / self.cpu_s if self.cpu_s > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.wrk.requests,
            "bytes": self.wrk.bytes,
            "duration_s": round(self.wrk.duration_s, 3),
            "rps": round(self.wrk.rps, 1),
            "mbps": round(self.wrk.mbps, 2),
            "p50_ms": round(self.wrk.p50_ms, 3),
            "p99_ms": round(self.wrk.p99_ms, 3),
            "max_ms": round(self.wrk.max_ms, 3),
            "errors": self.wrk.errors,
            "client_cpu_s": round(self.wrk.client_cpu_s, 3),
            "proxy_cpu_s": round(self.cpu_s, 3),
            "requests_per_cpu_s": _round(self.requests_per_cpu_s),
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def combine(slices: Sequence[ThroughputResult]) -> ThroughputResult:
    """One terminator's slices of a workload as one result: counts, seconds and CPU seconds
    summed, so requests per CPU-second is over all of them; latency percentiles are the
    median slice's (percentiles of different runs do not add), the maximum is the maximum."""
    if not slices:
        raise ValueError("no slices to combine")
    wrks = [r.wrk for r in slices]
    errors: dict[str, int] = {}
    for w in wrks:
        for k, v in w.errors.items():
            errors[k] = errors.get(k, 0) + v
    wrk = WrkResult(
        requests=sum(w.requests for w in wrks),
        bytes=sum(w.bytes for w in wrks),
        duration_s=sum(w.duration_s for w in wrks),
        p50_ms=statistics.median(w.p50_ms for w in wrks),
        p99_ms=statistics.median(w.p99_ms for w in wrks),
        max_ms=max(w.max_ms for w in wrks),
        errors=errors,
        client_cpu_s=sum(w.client_cpu_s for w in wrks),
    )
    return ThroughputResult(wrk, sum(r.cpu_s for r in slices))


def run_throughput(
    server: Server, workload: Workload, *, name: str, duration: int, cpu: int | None
) -> ThroughputResult:
    url = f"https://{name}:{server.port}{workload.path}"
    before = server.cpu_seconds()
    wrk = run_wrk(
        url, connections=workload.connections, duration=duration, close=workload.close, cpu=cpu
    )
    return ThroughputResult(wrk, server.cpu_seconds() - before)


@dataclass(frozen=True)
class IdleResult:
    requested: int
    opened: int
    failed: int
    rss_before_kib: int
    rss_after_kib: int
    origin_connections: int  # connections the origin saw open while they were held

    @property
    def kib_per_connection(self) -> float | None:
        if not self.opened:
            return None
        return (self.rss_after_kib - self.rss_before_kib) / self.opened

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kib_per_connection": _round(self.kib_per_connection, 2)}


_ACTIVE = re.compile(rb"Active connections:\s*(\d+)")


def origin_connections(origin: Origin) -> int:
    """Open client connections at the origin, not counting this status request."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{origin.status_port}/status", timeout=10
    ) as response:
        body = response.read()
    m = _ACTIVE.search(body)
    return int(m.group(1)) - 1 if m else -1


def measure_idle(
    server: Server,
    origin: Origin,
    pki: BenchPki,
    *,
    count: int,
    cpu: int | None,
    settle: float,
    timeout: float = 300.0,
    while_held: Callable[[], object] | None = None,
) -> IdleResult:
    """RSS of the terminator before and after ``count`` idle TLS connections are opened.

    ``while_held`` runs once the connections are open and settled, before they are closed
    (``bench.idle_memory`` takes its heap snapshot there).
    """
    before = server.rss_kib()
    argv = ["taskset", "-c", str(cpu)] if cpu is not None else []
    argv += [sys.executable, "-m", "bench.idle_client", "--port", str(server.port)]
    argv += ["--name", pki.name, "--cafile", str(pki.ca_pem), "--count", str(count)]
    client = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        line = _read_line(client, timeout)
        fields = line.split()
        if len(fields) < 3 or fields[0] != "READY":
            raise RuntimeError(f"idle client did not get ready: {line!r}")
        opened, failed = int(fields[1]), int(fields[2])
        time.sleep(settle)  # let allocators and the kernel settle before reading RSS
        after = server.rss_kib()
        at_origin = origin_connections(origin)
        if while_held is not None:
            while_held()
        client.stdin.close()
        client.wait(timeout=60)
    finally:
        kill_process(client)
        with contextlib.suppress(Exception):
            if client.stdin is not None:
                client.stdin.close()
    return IdleResult(count, opened, failed, before, after, at_origin)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"idle client printed nothing in {timeout:.0f}s")
    return proc.stdout.readline()
