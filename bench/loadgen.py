"""Load and probes against a terminator: ``wrk`` runs and an ``openssl s_client`` resumption check.

Owns the command lines and the parsing of what ``wrk`` and ``s_client`` print. Must not know
which terminator is on the other end or how results are aggregated.

wrk reports through ``configs/report.lua``: one JSON line with its exact counters (requests,
bytes, duration, latency percentiles, errors), so nothing depends on wrk's human output.

Why the resumption probe is not ``s_client -reconnect``: ``-reconnect`` only handshakes, it
never sends or reads application data. edgeproxy holds its TLS 1.3 NewSessionTicket messages
back until its first response bytes (see ``edgeproxy/tls/server.py``), so ``-reconnect``
would report "New" for edgeproxy even with tickets on, and a tickets-off check built on it
could not fail. The probe instead does what wrk does: one request with ``-sess_out``, then a
second connection offering that session with ``-sess_in``, and reads "New"/"Reused" from it.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .terminators import CONFIGS

__all__ = ["TlsProbe", "WrkError", "WrkResult", "probe_tls", "run_wrk"]

REPORT_LUA: Final = CONFIGS / "report.lua"


class WrkError(RuntimeError):
    """wrk failed or printed no report line."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    bytes: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0  # wrk's own CPU time: near the run's length means wrk was the limit

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def mbps(self) -> float:
        """Megabytes (10**6) per second read by the client, headers included."""
        return self.bytes / self.duration_s / 1e6 if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: int,
    close: bool,
    cpu: int | None,
    timeout_s: int = 10,
) -> WrkResult:
    """One single-threaded wrk run; ``close`` sends ``Connection: close`` (a new TCP and TLS
    connection per request)."""
    argv = ["taskset", "-c", str(cpu)] if cpu is not None else []
    argv += ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"--timeout={timeout_s}s"]
    argv += ["-s", str(REPORT_LUA)]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise WrkError(f"wrk exited {proc.returncode}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    data = json.loads(lines[-1])
    return WrkResult(
        requests=int(data["requests"]),
        bytes=int(data["bytes"]),
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors={k: int(v) for k, v in data["errors"].items()},
        client_cpu_s=client_cpu,
    )


@dataclass(frozen=True)
class TlsProbe:
    """What two sequential connections with ``openssl s_client`` saw."""

    tickets: int  # NewSessionTicket messages on the first connection
    resumed: bool  # the second connection, offering the first one's session, resumed it
    protocol: str
    cipher: str
    group: str  # key exchange group, e.g. X25519
    http_ok: bool  # both connections got an HTTP 200 through the terminator


_SESSION_LINE = re.compile(r"^(New|Reused), (\S+), Cipher is (\S+)", re.M)
_TEMP_KEY = re.compile(r"^(?:Server Temp Key|Negotiated TLS1\.3 group): ([^,\s]+)", re.M)
_TICKET = "Post-Handshake New Session Ticket arrived"


def _s_client(port: int, name: str, ca_pem: Path, path: str, session: list[str]) -> str:
    request = f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    argv = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        name,
        "-CAfile",
        str(ca_pem),
        "-verify_return_error",
        "-ign_eof",
        *session,
    ]
    proc = subprocess.run(argv, input=request, capture_output=True, text=True, timeout=30)
    return proc.stdout + proc.stderr


def probe_tls(port: int, name: str, ca_pem: Path, session_file: Path, path: str) -> TlsProbe:
    """Two requests through the terminator; the second offers the first one's session."""
    session_file.unlink(missing_ok=True)
    first = _s_client(port, name, ca_pem, path, ["-sess_out", str(session_file)])
    # In TLS 1.3 s_client writes the session only when a ticket arrives: no file, no offer.
    offer = ["-sess_in", str(session_file)] if session_file.exists() else []
    second = _s_client(port, name, ca_pem, path, offer)
    m1, m2 = _SESSION_LINE.search(first), _SESSION_LINE.search(second)
    group = _TEMP_KEY.search(first)
    return TlsProbe(
        tickets=first.count(_TICKET),
        resumed=bool(m2 and m2.group(1) == "Reused"),
        protocol=m1.group(2) if m1 else "?",
        cipher=m1.group(3) if m1 else "?",
        group=group.group(1) if group else "?",
        http_ok="HTTP/1.1 200" in first and "HTTP/1.1 200" in second,
    )
