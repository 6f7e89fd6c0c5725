"""Fleet figures (measurements, not tests): what one more stored or cached name costs.

``python -m bench.fleet [--sizes 1000,10000,100000] [--backends file,postgres]``

Per backend and fleet size: a fleet of certificates from a local CA (P-256 leaves with one
intermediate, as Let's Encrypt's) is written to storage the way an import does (the record,
then its next-action time weeks ahead: nothing due), then edgeproxy runs on it in-process and
we measure:

* **KiB per cached name**: process RSS with every name cached, minus before, over N (a
  child process loads them all through the manager's cold path);
* **idle pass CPU**: process CPU time of one maintenance pass with nothing due (median of 5);
* **restart to first handshake**: from starting the runtime on the stored fleet to the end of
  the first TLS handshake for a stored name (Python ssl client, verifying the chain);
* **cold handshake**: full handshakes for 200 stored names not yet cached (median, p99);
* **warm handshake**: the same names again, now cached (full handshakes, no resumption).

PostgreSQL runs on a throwaway local server (Debian's postgresql binaries), as in the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import random
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from edgeproxy.app import Runtime, run_process
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.config import load_config_data
from edgeproxy.storage.base import Storage
from edgeproxy.storage.file import FileStorage
from edgeproxy.storage.postgres import PostgresStorage

SAMPLE = 200  # names per cold / warm handshake sample
PUT_BATCH = 64  # concurrent writes while building a fleet


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


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


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


def _config(storage_cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"listen": ["127.0.0.1:0"], "handshake_timeout": 10},
        "admin": {"listen": None},
        "tls": {"issuer": "internal", "cache_size": 1_000_000, "session_tickets": False},
        "on_demand": {"allow": []},  # nothing is ordered: every name comes from storage
        "storage": storage_cfg,
        "log": {"level": "error"},  # the upstream is a closed port: handshakes only
        "routes": [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
    }


async def _handshake(port: int, name: str, ctx: ssl.SSLContext) -> float:
    t0 = time.perf_counter()
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        await tls.do_handshake()
    finally:
        await trio.aclose_forcefully(tls)
    return time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(storage_cfg: dict[str, Any], ca: _CA, n: int, roots: Path) -> dict[str, Any]:
    cfg = load_config_data(_config(storage_cfg))
    ctx = ssl.create_default_context(cafile=str(roots))
    names = random.sample(range(n), min(SAMPLE + 1, n))
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        rt: Runtime = await nursery.start(functools.partial(run_process, cfg))
        port = rt.proxy.bound[0][1]
        await _handshake(port, _name(names[0]), ctx)
        out["restart_to_first_handshake_s"] = time.perf_counter() - t0
        cold = [await _handshake(port, _name(i), ctx) for i in names[1:]]
        warm = [await _handshake(port, _name(i), ctx) for i in names[1:]]
        out["cold_ms"] = (statistics.median(cold) * 1e3, _pct(cold, 0.99) * 1e3)
        out["warm_ms"] = (statistics.median(warm) * 1e3, _pct(warm, 0.99) * 1e3)
        cpu = []
        for _ in range(5):
            c0 = time.process_time()
            await rt.certs.maintenance_once()
            cpu.append(time.process_time() - c0)
        out["idle_pass_cpu_ms"] = statistics.median(cpu) * 1e3
        nursery.cancel_scope.cancel()
    return out


async def _rss_child(storage_cfg: dict[str, Any], n: int) -> None:
    """In a fresh process: cache every name through the manager, print KiB per name."""
    cfg = load_config_data(_config(storage_cfg))
    async with trio.open_nursery() as nursery:
        rt: Runtime = await nursery.start(functools.partial(run_process, cfg))
        before = _rss_kib()
        for i in range(n):
            rec = await rt.certs._load(_name(i))
            assert rec is not None
            rt.certs._install(rec)
        after = _rss_kib()
        print(json.dumps({"kib_per_name": (after - before) / n, "cached": len(rt.certs._cache)}))
        nursery.cancel_scope.cancel()


def _rss(storage_cfg: dict[str, Any], n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--rss-child", json.dumps(storage_cfg), str(n)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["kib_per_name"])


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


async def _one(kind: str, n: int, workdir: Path) -> dict[str, Any]:
    ca = _CA()
    roots = workdir / "roots.pem"
    roots.write_bytes(ca.root.public_bytes(Encoding.PEM))
    with _backend(kind, workdir) as (storage, storage_cfg):
        if isinstance(storage, PostgresStorage):
            await storage.migrate()
        build_s = await _build(storage, ca, n)
        await storage.aclose()
        row = await _measure(storage_cfg, ca, n, roots)
        row["kib_per_cached_name"] = await trio.to_thread.run_sync(_rss, storage_cfg, n)
    row.update(backend=kind, names=n, build_s=build_s)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| backend | names | KiB per cached name | idle pass CPU (ms) | restart to first "
        "handshake (s) | cold handshake median / p99 (ms) | warm handshake median / p99 (ms) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['names']:,} | {r['kib_per_cached_name']:.1f} | "
            f"{r['idle_pass_cpu_ms']:.1f} | {r['restart_to_first_handshake_s']:.2f} | "
            f"{r['cold_ms'][0]:.1f} / {r['cold_ms'][1]:.1f} | "
            f"{r['warm_ms'][0]:.1f} / {r['warm_ms'][1]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="fleet sizes, comma separated")
    parser.add_argument("--backends", default="file,postgres", help="file and/or postgres")
    parser.add_argument("--rss-child", nargs=2, metavar=("STORAGE_JSON", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        trio.run(_rss_child, json.loads(args.rss_child[0]), int(args.rss_child[1]))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeproxy-fleet-") as tmp:
        for kind in args.backends.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                print(f"{kind}, {size:,} names ...", file=sys.stderr, flush=True)
                row = trio.run(_one, kind, size, Path(tmp))
                print(f"  built in {row['build_s']:.0f}s: {row}", file=sys.stderr, flush=True)
                rows.append(row)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
