"""Fleet figures (measurements, not tests): what one more stored or cached name costs.

``python -m bench.fleet [--sizes 1000,10000,100000] [--backends file,postgres]``

Per backend and fleet size: a fleet of certificates from a local CA (P-256 leaves with one
intermediate, as Let's Encrypt's) is written to storage the way an import does (the record,
then its next-action time weeks ahead: nothing due). edgeproxy then runs on it in a process of
its own (pinned to CPU 0, its GC tuned as ``edgeproxy run`` tunes it), driven over a command
pipe; the client is this process (pinned to CPU 1, blocking sockets, Python ``ssl`` verifying
the chain), so the latencies are edgeproxy's, not a shared event loop's. We measure:

* **KiB per cached name**: the server's RSS with every name cached (loaded through the
  manager's cold path, every task it spawned finished), minus its RSS before, over N. The
  **marginal** figure is the second half's cost alone, (RSS(N) - RSS(N/2)) / (N/2): what one
  more name costs once fixed costs (dict resizes, allocator arenas, thread stacks) are paid;
* **idle pass CPU**: the server's CPU time (all its threads) for one maintenance pass with
  nothing due (median of 5);
* **restart to first handshake**: from starting the server process on the stored fleet
  (interpreter start and imports included) to the end of the first TLS handshake for a
  stored name;
* **cold handshake**: full handshakes for stored names not yet cached (median, p99 of 500);
* **warm handshake**: the same names again, now cached (full handshakes, no resumption).

PostgreSQL runs on a throwaway local server (Debian's postgresql binaries), as in the tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import gc
import json
import os
import random
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from edgeproxy.app import Runtime, run_process, tune_gc_for_serving
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.config import load_config_data
from edgeproxy.storage.base import Storage
from edgeproxy.storage.file import FileStorage
from edgeproxy.storage.postgres import PostgresStorage

SAMPLE = 500  # names per cold / warm handshake sample
PUT_BATCH = 64  # concurrent writes while building a fleet
SERVER_CPU, CLIENT_CPU = 0, 1


def _name(i: int) -> str:
    return f"n{i}.fleet.example.test"


class _CA:
    """A root and an intermediate; leaves signed by the intermediate."""

    def __init__(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        root_key = ec.generate_private_key(ec.SECP384R1())
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.root = self._ca("bench fleet root", root_key, root_key, now)
        self.intermediate = self._ca("bench fleet intermediate", self.key, root_key, now)
        self.now = now

    def _ca(self, cn: str, key: Any, signer: Any, now: datetime.datetime) -> x509.Certificate:
        issuer = "bench fleet root"
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer, hashes.SHA384())
        )

    def record(self, name: str) -> CertRecord:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(hours=1))
            .not_valid_after(self.now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        chain = leaf.public_bytes(Encoding.PEM) + self.intermediate.public_bytes(Encoding.PEM)
        return CertRecord.build(name, "imported", chain, key, time.time())


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


async def _build(storage: Storage, ca: _CA, n: int) -> float:
    """Write ``n`` records and their next-action times; returns the seconds it took."""
    t0 = time.monotonic()
    later = time.time() + 30 * 86400
    limit = trio.CapacityLimiter(PUT_BATCH)

    async def one(i: int) -> None:
        async with limit:
            rec = ca.record(_name(i))
            await storage.put(cert_key(rec.name), rec.to_json(), secret=True)
            await storage.set_due(rec.name, later + random.uniform(0, 30 * 86400))

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return time.monotonic() - t0


def _config(storage_cfg: dict[str, Any], acme: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serving a stored fleet (nothing is ordered: every name comes from storage), or with
    ``acme`` (``port``, ``directory``, ``trust``) issuing every fleet name on demand."""
    cfg: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "handshake_timeout": 10},
        "admin": {"listen": None},
        "tls": {"issuer": "internal", "cache_size": 1_000_000, "session_tickets": False},
        "on_demand": {"allow": []},
        "storage": storage_cfg,
        "log": {"level": "error"},  # the upstream is a closed port: handshakes only
        "routes": [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
    }
    if acme is not None:
        cfg["server"] = {"listen": [f"127.0.0.1:{acme['port']}"], "handshake_timeout": 300}
        cfg["tls"]["issuer"] = "acme"
        cfg["acme"] = {
            "directory": acme["directory"],
            "trust": acme["trust"],
            "email": "ops@example.test",
            # pebble is the CA under test, not Let's Encrypt: its budgets are not ours to keep.
            "limits": {
                "new_orders_per_account": 0,
                "certificates_per_registered_domain": 0,
                "failed_validations_per_hostname": 0,
                "duplicate_certificates": 0,
            },
        }
        cfg["on_demand"] = {
            "allow": ["*.fleet.example.test"],
            "wait": 300,
            "max_orders_per_minute": 1_000_000,
        }
    return cfg


# ---------------------------------------------------------------------------- server process


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _settle(rt: Runtime) -> None:
    """Wait until the manager's spawned tasks (status writes of freshly loaded names) end."""
    nursery = rt.certs._nursery
    while nursery is not None and len(nursery.child_tasks) > 1:
        await trio.sleep(0.05)


class _Probe:
    """In the server process: its CPU time, its garbage collector's pauses and how long each
    certificate lookup of a handshake took (``CertificateManager.context_for``), since the last
    ``take()``. Where a cold handshake's time goes, without a profiler's overhead."""

    def __init__(self, rt: Runtime) -> None:
        self.lookups: list[float] = []
        self.gc_pauses: list[float] = []
        self._gc_start = 0.0
        self._cpu = time.process_time()
        gc.callbacks.append(self._on_gc)
        certs = rt.certs
        inner = certs.context_for

        async def timed(name: str | None) -> Any:
            t0 = time.perf_counter()
            try:
                return await inner(name)
            finally:
                self.lookups.append(time.perf_counter() - t0)

        certs.context_for = timed  # type: ignore[method-assign]

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_start)

    def take(self) -> dict[str, Any]:
        cpu, self._cpu = time.process_time() - self._cpu, time.process_time()
        out = {
            "cpu_s": cpu,
            "lookups": len(self.lookups),
            "lookup_ms": _summary(self.lookups),
            "gc_pauses": len(self.gc_pauses),
            "gc_ms": _summary(self.gc_pauses),
        }
        self.lookups, self.gc_pauses = [], []
        return out


def _summary(values: list[float]) -> tuple[float, float, float] | None:
    """(median, p99, max) in ms."""
    if not values:
        return None
    return (statistics.median(values) * 1e3, _pct(values, 0.99) * 1e3, max(values) * 1e3)


async def _command(rt: Runtime, probe: _Probe, cmd: str, args: list[str]) -> dict[str, Any]:
    if cmd == "probe":
        return probe.take()
    if cmd == "idle":
        cpu = []
        for _ in range(5):
            c0 = time.process_time()
            await rt.certs.maintenance_once()
            cpu.append(time.process_time() - c0)
        return {"idle_pass_cpu_ms": statistics.median(cpu) * 1e3}
    if cmd == "load":
        for i in range(int(args[0]), int(args[1])):
            rec = await rt.certs._load(_name(i))
            assert rec is not None
            rt.certs._install(rec)
        await _settle(rt)
        return {"cached": len(rt.certs._cache)}
    if cmd == "gc":
        t0, c0 = time.perf_counter(), time.thread_time()
        gc.collect()
        return {
            "full_gc_ms": (time.perf_counter() - t0) * 1e3,
            "full_gc_cpu_ms": (time.thread_time() - c0) * 1e3,
            "tracked": len(gc.get_objects()),
        }
    if cmd == "rss":
        await _settle(rt)
        gc.collect()
        return {
            "rss_kib": _proc_status("VmRSS"),
            "threads": _proc_status("Threads"),
            "cached": len(rt.certs._cache),
        }
    raise ValueError(f"unknown command {cmd!r}")


async def _serve(storage_cfg: dict[str, Any], acme: dict[str, Any] | None) -> None:
    """The server process: edgeproxy on the stored fleet, answering commands on stdin."""
    cfg = load_config_data(_config(storage_cfg, acme))
    async with trio.open_nursery() as nursery:
        rt: Runtime = await nursery.start(functools.partial(run_process, cfg))
        probe = _Probe(rt)
        _say({"port": rt.proxy.bound[0][1]})
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        pending = b""
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                cmd, *args = line.decode().split()
                if cmd == "quit":
                    nursery.cancel_scope.cancel()
                    return
                _say(await _command(rt, probe, cmd, args))
        nursery.cancel_scope.cancel()


class _Server:
    """``python -m bench.fleet --serve``: started pinned to SERVER_CPU, its log to a file."""

    def __init__(
        self, storage_cfg: dict[str, Any], log: Path, acme: dict[str, Any] | None = None
    ) -> None:
        pin = _pinned()
        self._log = log.open("ab")
        serve = json.dumps({"storage": storage_cfg, "acme": acme})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", "--serve", serve],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, {SERVER_CPU})) if pin else None,
        )
        self.port = int(self._read()["port"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process exited ({self.proc.wait()}); see {self._log.name}")
        return dict(json.loads(line))

    def ask(self, *words: object) -> dict[str, Any]:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(" ".join(str(w) for w in words) + "\n")
        stdin.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _pinned() -> bool:
    return len(os.sched_getaffinity(0)) >= 2 and {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)


# ---------------------------------------------------------------------------- client side


def _handshake(port: int, name: str, ctx: ssl.SSLContext) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with ctx.wrap_socket(sock, server_hostname=name):
            pass  # the handshake is done on wrap; closing sends close_notify
    return time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency(storage_cfg: dict[str, Any], n: int, roots: Path, log: Path) -> dict[str, Any]:
    """Restart, cold and warm handshakes and the idle pass, on a server started for them."""
    ctx = ssl.create_default_context(cafile=str(roots))
    names = random.sample(range(n), min(SAMPLE + 1, n))
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    server = _Server(storage_cfg, log)
    try:
        _handshake(server.port, _name(names[0]), ctx)
        out["restart_to_first_handshake_s"] = time.perf_counter() - t0
        server.ask("probe")
        cold = [_handshake(server.port, _name(i), ctx) for i in names[1:]]
        out["cold_server"] = {**server.ask("probe"), "handshakes": len(cold)}
        warm = [_handshake(server.port, _name(i), ctx) for i in names[1:]]
        out["warm_server"] = {**server.ask("probe"), "handshakes": len(warm)}
        out["cold_ms"] = (statistics.median(cold) * 1e3, _pct(cold, 0.99) * 1e3)
        out["warm_ms"] = (statistics.median(warm) * 1e3, _pct(warm, 0.99) * 1e3)
        out.update(server.ask("idle"))
    finally:
        server.close()
    return out


def _memory(storage_cfg: dict[str, Any], n: int, log: Path) -> dict[str, Any]:
    """A fresh server: RSS before, with half and with all of the fleet cached."""
    out: dict[str, Any] = {}
    server = _Server(storage_cfg, log)
    try:
        before = server.ask("rss")["rss_kib"]
        half = n // 2
        server.ask("load", 0, half)
        mid = server.ask("rss")["rss_kib"]
        server.ask("load", half, n)
        after = server.ask("rss")
        out["with_all_cached"] = server.ask("gc")
    finally:
        server.close()
    assert after["cached"] == n, after
    out["kib_per_cached_name"] = (after["rss_kib"] - before) / n
    out["marginal_kib_per_name"] = (after["rss_kib"] - mid) / (n - half)
    return out


@contextlib.contextmanager
def _backend(kind: str, workdir: Path) -> Iterator[tuple[Storage, dict[str, Any]]]:
    if kind == "file":
        path = workdir / f"state-{secrets.token_hex(3)}"
        yield FileStorage(path), {"backend": "file", "path": str(path)}
        return
    from testkit.postgres import running_postgres

    with running_postgres() as server:
        name = f"fleet_{secrets.token_hex(4)}"
        server.create_database(name)
        dsn = server.dsn_for(name)
        yield PostgresStorage(dsn), {"backend": "postgres", "dsn": dsn}


def _one(kind: str, n: int, workdir: Path) -> dict[str, Any]:
    ca = _CA()
    roots = workdir / "roots.pem"
    roots.write_bytes(ca.root.public_bytes(Encoding.PEM))
    with _backend(kind, workdir) as (storage, storage_cfg):

        async def build() -> float:
            if isinstance(storage, PostgresStorage):
                await storage.migrate()
            try:
                return await _build(storage, ca, n)
            finally:
                await storage.aclose()

        build_s = trio.run(build)
        row = _latency(storage_cfg, n, roots, workdir / "server.log")
        row.update(_memory(storage_cfg, n, workdir / "server.log"))
    row.update(backend=kind, names=n, build_s=build_s)
    return row


def _issue(port: int, n: int, roots: Path, concurrency: int) -> dict[str, Any]:
    """Handshakes for fleet names 0..n-1, ``concurrency`` at a time, each waiting for its
    certificate to be issued on demand; a failed one is tried again (up to 3 times)."""
    ctx = ssl.create_default_context(cafile=str(roots))
    # The ACME account is made by the first order: not an issuance cost.
    _handshake(port, _name(n), ctx)
    failures = 0

    def issue(i: int) -> float:
        nonlocal failures
        for attempt in range(3):
            try:
                return _handshake(port, _name(i), ctx)
            except (OSError, ssl.SSLError):
                failures += 1
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        times = list(pool.map(issue, range(n)))
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "issue_wall_s": wall,
        "issue_ms_per_name": wall / n * 1e3,
        "issue_handshake_ms": (statistics.median(times) * 1e3, _pct(times, 0.99) * 1e3),
        "issue_failures": failures,
    }


def _pebble_one(kind: str, n: int, workdir: Path, concurrency: int) -> dict[str, Any]:
    """``n`` names issued on demand through Debian's pebble, validated (TLS-ALPN-01) against
    edgeproxy itself; then the fleet figures on what pebble issued."""
    from testkit.pebble import start_pebble
    from testkit.ports import free_port

    port = free_port()
    log = workdir / "server.log"
    with (
        start_pebble(workdir, tls_port=port, env={"PEBBLE_WFE_NONCEREJECT": "0"}) as pebble,
        _backend(kind, workdir) as (storage, storage_cfg),
    ):
        roots = workdir / "pebble-roots.pem"
        roots.write_bytes(pebble.roots_pem())
        if isinstance(storage, PostgresStorage):
            trio.run(storage.migrate)
        trio.run(storage.aclose)
        acme = {"port": port, "directory": pebble.directory_url, "trust": str(pebble.ca_bundle_path)}
        server = _Server(storage_cfg, log, acme)
        try:
            row = _issue(server.port, n, roots, concurrency)
        finally:
            server.close()
        row.update(_latency(storage_cfg, n, roots, log))
        row.update(_memory(storage_cfg, n, log))
    row.update(backend=f"{kind} (pebble)", names=n)
    return row


def _pebble_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backend | names | concurrent clients | wall (s) | per issuance (ms) | handshake with "
        "issuance median / p99 (ms) | failed handshakes (retried) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['names']:,} | {r['concurrency']} | {r['issue_wall_s']:.0f} | "
            f"{r['issue_ms_per_name']:.0f} | {r['issue_handshake_ms'][0]:.0f} / "
            f"{r['issue_handshake_ms'][1]:.0f} | {r['issue_failures']} |"
        )
    return "\n".join(lines)


def _cpu_per_handshake(probe: dict[str, Any]) -> str:
    return f"{probe['cpu_s'] / probe['handshakes'] * 1e3:.1f}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| backend | names | KiB per cached name (marginal) | idle pass CPU (ms) | restart to "
        "first handshake (s) | cold handshake median / p99 (ms) | warm handshake median / p99 (ms) "
        "| server CPU per cold / warm handshake (ms) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['names']:,} | {r['kib_per_cached_name']:.1f} "
            f"({r['marginal_kib_per_name']:.1f}) | "
            f"{r['idle_pass_cpu_ms']:.1f} | {r['restart_to_first_handshake_s']:.2f} | "
            f"{r['cold_ms'][0]:.1f} / {r['cold_ms'][1]:.1f} | "
            f"{r['warm_ms'][0]:.1f} / {r['warm_ms'][1]:.1f} | "
            f"{_cpu_per_handshake(r['cold_server'])} / {_cpu_per_handshake(r['warm_server'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="fleet sizes, comma separated")
    parser.add_argument("--backends", default="file,postgres", help="file and/or postgres")
    parser.add_argument(
        "--pebble",
        type=int,
        default=0,
        metavar="N",
        help="instead of the local-CA fleets: N names issued on demand through pebble (per backend)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="clients at a time for --pebble (default 8)"
    )
    parser.add_argument("--serve", metavar="STORAGE_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        tune_gc_for_serving()  # as ``edgeproxy run`` does
        serve = json.loads(args.serve)
        trio.run(_serve, serve["storage"], serve["acme"])
        return 0
    if _pinned():
        os.sched_setaffinity(0, {CLIENT_CPU})
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeproxy-fleet-") as tmp:
        for kind in args.backends.split(","):
            if args.pebble:
                print(f"{kind}, {args.pebble:,} names through pebble ...", file=sys.stderr)
                rows.append(_pebble_one(kind, args.pebble, Path(tmp), args.concurrency))
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
                continue
            for size in (int(s) for s in args.sizes.split(",")):
                print(f"{kind}, {size:,} names ...", file=sys.stderr, flush=True)
                row = _one(kind, size, Path(tmp))
                print(f"  built in {row['build_s']:.0f}s: {row}", file=sys.stderr, flush=True)
                rows.append(row)
    if args.pebble:
        print(_pebble_table(rows) + "\n")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
