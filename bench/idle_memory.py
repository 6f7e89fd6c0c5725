"""Where edgeproxy's memory per idle TLS connection goes (workload (d) of ``bench.run``, taken apart).

    python -m bench.idle_memory                  # 10,000 idle connections (capped by RLIMIT_NOFILE)
    python -m bench.idle_memory --count 2000 --top 25

Starts edgeproxy as ``bench.run`` does for (d) (fresh, tickets on, one probe), opens N idle
TLS keep-alive connections through it with ``bench.idle_client`` (handshake, one request,
response headers read), and reads the process from the inside before and while they are held.
Twice: once plain, for the honest RSS and C heap figures, and once under ``tracemalloc``
(which costs memory of its own), for the Python side. Per connection it prints:

- **RSS**: ``VmRSS`` after minus before, over N (what ``bench.run`` reports as (d));
- **C heap (malloc)**: glibc ``mallinfo2()`` bytes in use (``uordblks + hblkhd``): OpenSSL's
  allocations (the ``SSL`` object, its record layer, the session, the handshake's leftovers)
  and Python objects bigger than 512 bytes, which pymalloc hands to ``malloc``;
- **Python (tracemalloc)**: every block the interpreter allocated, by source line;
  the **Python objects > 512 B** part of it is also inside the C heap figure, so
  **OpenSSL and other C** = C heap - that part;
- **objects per connection**: the growth of ``gc.get_objects()`` by type (tasks, coroutines,
  frames, sockets, ``SSL.Connection``, cffi handles...).

The rest of RSS (RSS - C heap - Python in pymalloc arenas) is allocator slack: pymalloc arena
and pool tails, malloc fragmentation and per-thread arenas. Kernel socket buffers are not in
RSS at all. The edgeproxy process is ``python -m bench.idle_memory --inside -- run -c
CONF``: a watcher thread answers snapshot requests (a file appearing in the work directory)
with a JSON file, so no signal handler or trio code of edgeproxy's is touched.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import runpy
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import probe_tls
from bench.pki import make_pki
from bench.procs import Server, Supervisor, pin_self, raise_nofile_limit
from bench.run import FD_HEADROOM, cpus
from bench.terminators import REPO_ROOT, Edgeproxy, Origin, Stage, openssl_conf, start_origin
from bench.workloads import measure_idle
from testkit.malloc import malloc_in_use
from testkit.ports import free_port

LARGE: Final = 512  # pymalloc's limit: bigger requests go to malloc
CONTROL_ENV: Final = "BENCH_IDLE_MEMORY_DIR"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _state(tracing: bool) -> dict[str, Any]:
    gc.collect()
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    state: dict[str, Any] = {
        "rss_kib": _rss_kib(),
        "malloc_in_use": malloc_in_use(),
        "types": dict(types),
    }
    if tracing:
        snap = tracemalloc.take_snapshot()
        state["traced"] = sum(t.size for t in snap.traces)
        state["traced_large"] = sum(t.size for t in snap.traces if t.size > LARGE)
        state["lines"] = {
            f"{s.traceback[0].filename}:{s.traceback[0].lineno}": s.size
            for s in snap.statistics("lineno")
        }
    return state


def _watch(control: Path, tracing: bool) -> None:
    """In the edgeproxy process: answer ``<label>.req`` with ``<label>.json``."""
    while True:
        time.sleep(0.2)
        for req in control.glob("*.req"):
            out = req.with_suffix(".json")
            tmp = req.with_suffix(".tmp")
            tmp.write_text(json.dumps(_state(tracing)))
            tmp.rename(out)
            req.unlink()


def inside(argv: list[str]) -> None:
    tracing = os.environ.get("PYTHONTRACEMALLOC") not in (None, "", "0")
    control = Path(os.environ[CONTROL_ENV])
    threading.Thread(target=_watch, args=(control, tracing), daemon=True).start()
    sys.argv = ["edgeproxy", *argv]
    runpy.run_module("edgeproxy", run_name="__main__", alter_sys=True)


def _request(control: Path, label: str, timeout: float = 120.0) -> dict[str, Any]:
    (control / f"{label}.req").write_text("")
    out = control / f"{label}.json"
    deadline = time.monotonic() + timeout
    while not out.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"edgeproxy did not answer the {label} snapshot")
        time.sleep(0.1)
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def measure(
    sup: Supervisor, stage: Stage, origin: Origin, count: int, cpu: int | None, *, trace: bool
) -> dict[str, Any]:
    label = "traced" if trace else "plain"
    control = stage.workdir / f"control-{label}"
    control.mkdir()
    port = free_port()
    conf = Edgeproxy().command(stage, port, f"edgeproxy-{label}", tickets=True)[-1]
    argv = [sys.executable, "-m", "bench.idle_memory", "--inside", "--", "run", "-c", conf]
    env = {
        "OPENSSL_CONF": str(openssl_conf(stage.workdir, tickets=True)),
        CONTROL_ENV: str(control),
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONTRACEMALLOC": "1" if trace else "0",
    }
    # tracemalloc slows the imports down a lot: a loaded machine needs more than the default.
    server: Server = sup.start(
        f"edgeproxy-{label}", argv, cpu=stage.cpu, env=env, port=port, start_timeout=180
    )
    try:
        pki = stage.pki
        probe_tls(port, pki.name, pki.ca_pem, stage.workdir / "s.pem", "/empty.bin")
        before = _request(control, "before")
        held: dict[str, Any] = {}
        idle = measure_idle(
            server,
            origin,
            pki,
            count=count,
            cpu=cpu,
            settle=2.0,
            while_held=lambda: held.update(_request(control, "held")),
        )
    finally:
        sup.stop(server)
    return {"before": before, "held": held, "opened": idle.opened, "failed": idle.failed}


def ssl_new_bytes(n: int = 2000) -> float | None:
    """C heap per fresh server ``SSL.Connection`` (``SSL_new``, before any handshake).

    Measured here, in the harness, with the same ``cryptography`` wheel's OpenSSL as edgeproxy:
    the fixed part of every connection's OpenSSL cost (in OpenSSL 3.2 and later, the
    ``SSL_CONNECTION`` and one record layer object each way).
    """
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    warm = [SSL.Connection(ctx, None) for _ in range(20)]
    gc.collect()
    before = malloc_in_use()
    conns = [SSL.Connection(ctx, None) for _ in range(n)]
    gc.collect()
    after = malloc_in_use()
    del conns, warm
    if before is None or after is None:
        return None
    return (after - before) / n


def report(plain: dict[str, Any], traced: dict[str, Any], top: int) -> str:
    n = plain["opened"]
    nt = traced["opened"]

    def per(run: dict[str, Any], key: str, div: int) -> float:
        return (run["held"][key] - run["before"][key]) / div

    rss = per(plain, "rss_kib", n) * 1024
    heap = per(plain, "malloc_in_use", n)
    py = per(traced, "traced", nt)
    py_large = per(traced, "traced_large", nt)
    lines = [
        f"edgeproxy, {n:,} idle TLS connections (plain run) / {nt:,} (tracemalloc run)",
        "",
        "| per idle connection | bytes | KiB |",
        "|---|---|---|",
    ]
    rows = [
        ("RSS (what bench.run reports)", rss),
        ("C heap in use (malloc)", heap),
        ("  of it Python objects > 512 B", py_large),
        ("  of it OpenSSL and other C (the rest)", heap - py_large),
        ("    of that a fresh SSL object (SSL_new, memory BIOs)", ssl_new_bytes() or 0.0),
        ("Python, all traced blocks", py),
        ("  of it in pymalloc (<= 512 B)", py - py_large),
        ("allocator slack (RSS - C heap - pymalloc blocks)", rss - heap - (py - py_large)),
    ]
    lines += [f"| {k} | {v:,.0f} | {v / 1024:.1f} |" for k, v in rows]
    lines += ["", f"Python by source line (tracemalloc), top {top}, bytes per connection:", ""]
    before, held = traced["before"]["lines"], traced["held"]["lines"]
    diffs = sorted(((held.get(k, 0) - before.get(k, 0)) / nt, k) for k in set(held) | set(before))
    for size, where in reversed(diffs[-top:]):
        lines.append(f"  {size:>8,.0f}  {_short(where)}")
    lines += ["", "Objects per connection (gc-tracked, growth by type):", ""]
    tb, th = plain["before"]["types"], plain["held"]["types"]
    grown = sorted(((th.get(k, 0) - tb.get(k, 0)) / n, k) for k in th)
    for count, name in reversed(grown[-top:]):
        if count >= 0.05:
            lines.append(f"  {count:>6.2f}  {name}")
    return "\n".join(lines)


def _short(where: str) -> str:
    for marker in ("/site-packages/", "/lib/python3", "/edgeproxy-src/", str(REPO_ROOT) + "/"):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--inside"]:
        inside(args_in[2:] if args_in[1:2] == ["--"] else args_in[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.idle_memory", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=10000, help="idle connections")
    parser.add_argument("--top", type=int, default=20, help="source lines and types shown")
    args = parser.parse_args(args_in)
    hard = raise_nofile_limit()
    count = min(args.count, (hard - FD_HEADROOM) // 2)
    term_cpu, load_cpu = cpus()
    pin_self(load_cpu)
    workdir = Path(tempfile.mkdtemp(prefix="edgeproxy-idle-memory-"))
    try:
        with Supervisor(workdir) as sup:
            origin = start_origin(sup, workdir, cpu=load_cpu, nofile=hard, connections=hard - 100)
            stage = Stage(
                workdir=workdir,
                pki=make_pki(workdir / "pki"),
                origin_port=origin.port,
                cpu=term_cpu,
                max_connections=count + 10,
                nofile=hard,
            )
            plain = measure(sup, stage, origin, count, load_cpu, trace=False)
            time.sleep(2)
            traced = measure(sup, stage, origin, count, load_cpu, trace=True)
        print(report(plain, traced, args.top))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
