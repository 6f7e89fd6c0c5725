"""Side-by-side load benchmark: edgeproxy vs HAProxy (also with big buffers), nginx stream, hitch, Caddy.

    python -m bench.run            # everything, 3 repetitions (25 minutes or so)
    python -m bench.run --smoke    # edgeproxy + HAProxy, ~1 s per workload (CI)

Assembles one run: checks the tools, raises the descriptor limit, makes the certificate,
starts the origin, then for each repetition starts every terminator fresh with tickets off
for (a), and fresh again with tickets on for (d), (a2), (b), (c); finally (e). Within a
repetition the terminators of a workload are measured in short slices taken in turn (see
``Runner.throughput``). Everything is on loopback and stopped on the way out, whatever happens.
Results go to ``--out`` (default ``bench/results/``, git-ignored) as Markdown, JSON and PNG.
bench/README.md explains the workloads and the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.issuance import measure_issuance
from bench.loadgen import TlsProbe, probe_tls
from bench.pki import BenchPki, make_pki
from bench.procs import Server, Supervisor, pin_self, raise_nofile_limit
from bench.report import format_tables, summarize, write_chart, write_json
from bench.terminators import (
    TERMINATORS,
    Origin,
    Stage,
    Terminator,
    snapshot_edgeproxy,
    start_origin,
)
from bench.workloads import WORKLOADS, ThroughputResult, combine, measure_idle, run_throughput

THROUGHPUT_KEYS: Final = ("a", "a2", "b", "c")
ALL_WORKLOADS: Final = (*THROUGHPUT_KEYS, "d", "e")
DEFAULT_RESULTS: Final = Path(__file__).resolve().parent / "results"
APT_PACKAGES: Final = "haproxy nginx libnginx-mod-stream hitch caddy wrk pebble"
# Descriptors a terminator needs besides two per idle connection (listeners, logs, admin...).
FD_HEADROOM: Final = 100


# A terminator started for a phase: its server, and what the probe saw right after the start.
Started = tuple[Terminator, Server, TlsProbe]


class SetupError(RuntimeError):
    """Something the benchmark needs is missing; the message says how to install it."""


@dataclass(frozen=True)
class Plan:
    terminators: tuple[str, ...]
    workloads: tuple[str, ...]
    reps: int
    duration: int
    slices: int
    warmup: int
    idle: int
    settle: float
    names: int
    issuance_systems: tuple[str, ...]
    edgeproxy_log_level: str
    smoke: bool


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="CI mode: seconds, not minutes")
    parser.add_argument(
        "--terminators", type=_csv, help=f"subset of {','.join(TERMINATORS)} (default: all)"
    )
    parser.add_argument("--workloads", type=_csv, help=f"subset of {','.join(ALL_WORKLOADS)}")
    parser.add_argument("--reps", type=int, help="repetitions of the rotation (default 3)")
    parser.add_argument(
        "--duration", type=int, help="measured seconds per terminator and workload (default 10)"
    )
    parser.add_argument(
        "--slices",
        type=int,
        help="wrk runs that make up --duration (each rounded to whole seconds), taken in turn "
        "with the other terminators' (default 5)",
    )
    parser.add_argument("--warmup", type=int, help="untimed wrk seconds before each (default 1)")
    parser.add_argument("--idle", type=int, help="idle TLS connections for (d) (default 10000)")
    parser.add_argument("--names", type=int, help="new names per system for (e) (default 20)")
    parser.add_argument(
        "--edgeproxy-log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="info adds edgeproxy's per-connection access line; the C terminators log none "
        "(default warning)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results directory")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    smoke = bool(args.smoke)
    terminators = args.terminators or (("edgeproxy", "haproxy") if smoke else tuple(TERMINATORS))
    unknown = [t for t in terminators if t not in TERMINATORS]
    if unknown:
        parser.error(f"unknown terminators {unknown}; choose from {', '.join(TERMINATORS)}")
    workloads = args.workloads or ALL_WORKLOADS
    bad = [w for w in workloads if w not in ALL_WORKLOADS]
    if bad:
        parser.error(f"unknown workloads {bad}; choose from {', '.join(ALL_WORKLOADS)}")
    if args.slices is not None and args.slices < 1:
        parser.error("--slices must be at least 1")
    plan = Plan(
        terminators=tuple(terminators),
        workloads=tuple(w for w in ALL_WORKLOADS if w in workloads),
        reps=args.reps or (1 if smoke else 3),
        duration=args.duration or (1 if smoke else 10),
        slices=args.slices or (1 if smoke else 5),
        warmup=args.warmup if args.warmup is not None else (0 if smoke else 1),
        idle=args.idle or (200 if smoke else 10000),
        settle=0.5 if smoke else 2.0,
        names=args.names or (2 if smoke else 20),
        # Caddy is (e)'s reference; the smoke run keeps to edgeproxy and HAProxy.
        issuance_systems=("edgeproxy",) if smoke else ("edgeproxy", "caddy"),
        edgeproxy_log_level=args.edgeproxy_log_level,
        smoke=smoke,
    )
    return plan, args


def check_tools(plan: Plan) -> None:
    missing: list[str] = []
    for name in plan.terminators:
        missing += TERMINATORS[name].missing()
    needed = ["taskset", "openssl"]
    if any(w in plan.workloads for w in THROUGHPUT_KEYS):
        needed.append("wrk")
    needed.append("nginx")  # the origin, for every workload
    if "e" in plan.workloads:
        needed += ["pebble", "pebble-challtestsrv"]
        if "caddy" in plan.issuance_systems:
            needed.append("caddy")
    missing += [p for p in needed if shutil.which(p) is None]
    if missing:
        raise SetupError(
            f"missing: {', '.join(sorted(set(missing)))}. Install the Debian packages with:\n"
            f"  apt-get install -y {APT_PACKAGES}\n"
            "(they may start their own services on install: stop them, the benchmark runs its "
            "own instances on free loopback ports)"
        )


def cpus() -> tuple[int | None, int | None]:
    """(terminator CPU, load CPU): the first two CPUs this process may use, or no pinning."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return allowed[0], allowed[1]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def probe_ok(probe: TlsProbe, *, tickets: bool) -> bool:
    if not probe.http_ok:
        return False
    if tickets:
        return probe.resumed
    return probe.tickets == 0 and not probe.resumed


@dataclass
class Recorder:
    throughput: list[dict[str, Any]] = field(default_factory=list)
    idle: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)


class Runner:
    def __init__(
        self, plan: Plan, sup: Supervisor, stage: Stage, origin: Origin, load_cpu: int | None
    ) -> None:
        self.plan = plan
        self.sup = sup
        self.stage = stage
        self.origin = origin
        self.load_cpu = load_cpu
        self.rec = Recorder()

    @property
    def pki(self) -> BenchPki:
        return self.stage.pki

    def _probe(self, server: Server, name: str, rep: int, *, tickets: bool) -> TlsProbe:
        assert server.port is not None
        probe = probe_tls(
            server.port,
            self.pki.name,
            self.pki.ca_pem,
            self.stage.workdir / "session.pem",
            "/empty.bin",
        )
        ok = probe_ok(probe, tickets=tickets)
        self.rec.probes.append(
            {"rep": rep, "terminator": name, "tickets_on": tickets, "ok": ok, **probe.__dict__}
        )
        if not probe.http_ok:
            raise RuntimeError(f"{name}: no HTTP 200 through the terminator:\n{server.log_tail()}")
        if not ok:
            want = "resumed" if tickets else "no ticket and no resumption"
            _log(f"  WARNING {name}: expected {want}, probe saw {probe}")
        return probe

    def throughput(self, key: str, servers: list[Started], rep: int) -> None:
        """One workload on every terminator of the round, in short slices taken in turn.

        This is a shared VM: its speed drifts by 15-25 % over tens of seconds, and one 10 s
        run per terminator let that drift land on one side of a ratio. Taking the measured
        time as ``plan.slices`` wrk runs per terminator, interleaved (the order rotating per
        slice), puts every terminator through the same stretches of machine time; its
        figures are the sums over its slices (latency percentiles: the median slice's).
        """
        workload = WORKLOADS[key]
        plan = self.plan
        n = max(1, plan.slices)
        seconds = max(1, round(plan.duration / n))
        if plan.warmup:
            for _term, server, _probe in servers:
                run_throughput(
                    server, workload, name=self.pki.name, duration=plan.warmup, cpu=self.load_cpu
                )
        slices: dict[str, list[ThroughputResult]] = {term.name: [] for term, _, _ in servers}
        reuses: dict[str, float | None] = {}
        for i in range(n):
            turn = servers[i % len(servers) :] + servers[: i % len(servers)]
            for term, server, _probe in turn:
                slices[term.name].append(
                    run_throughput(
                        server, workload, name=self.pki.name, duration=seconds, cpu=self.load_cpu
                    )
                )
                if i == n - 1 and workload.close:
                    # Only meaningful where every request is a handshake, and read at once:
                    # the server counts over the last second.
                    reuses[term.name] = term.session_reuse_pct(self.stage, server)
        for term, _server, probe in servers:
            name = term.name
            result = combine(slices[name])
            reuse = reuses.get(name)
            row = {
                "rep": rep,
                "terminator": name,
                "workload": key,
                "probe_ok": probe_ok(probe, tickets=workload.tickets),
                "tls": f"{probe.protocol} {probe.cipher} {probe.group}",
                "server_reuse_pct": reuse,
                "slices": n,
                **result.as_dict(),
            }
            self.rec.throughput.append(row)
            errors = sum(row["errors"].values())
            _log(
                f"  {name:<12} {key:<2} {row['rps']:>9.1f} req/s {row['mbps']:>8.2f} MB/s "
                f"p99 {row['p99_ms']:>8.2f} ms  cpu {row['proxy_cpu_s']:>6.2f} s  "
                f"{row['requests_per_cpu_s'] or 0:>9.1f} req/cpu-s  errors {errors}"
                + (f"  server-side reuse {reuse:.0f}%" if reuse is not None else "")
            )

    @contextlib.contextmanager
    def started(
        self, terms: list[Terminator], rep: int, *, tickets: bool
    ) -> Iterator[list[Started]]:
        """Every terminator started fresh, probed, and stopped again on the way out."""
        servers: list[Started] = []
        stop: list[Server] = []
        try:
            for term in terms:
                server = term.start(self.sup, self.stage, tickets=tickets)
                stop.append(server)
                servers.append((term, server, self._probe(server, term.name, rep, tickets=tickets)))
            yield servers
        finally:
            for server in reversed(stop):
                self.sup.stop(server)

    def handshake_phase(self, rep: int, terms: list[Terminator]) -> None:
        """(a): fresh starts with tickets off."""
        if "a" not in self.plan.workloads:
            return
        with self.started(terms, rep, tickets=False) as servers:
            self.throughput("a", servers, rep)

    def tickets_phase(self, rep: int, terms: list[Terminator]) -> None:
        """(d), (a2), (b), (c): fresh starts with tickets on."""
        wanted = self.plan.workloads
        rest = [k for k in ("a2", "b", "c") if k in wanted]
        if not rest and "d" not in wanted:
            return
        with self.started(terms, rep, tickets=True) as servers:
            if "d" in wanted:
                # First, on the fresh processes: earlier traffic would have grown heaps that
                # idle connections then fill for free, hiding their cost.
                for term, server, _probe in servers:
                    idle = measure_idle(
                        server,
                        self.origin,
                        self.pki,
                        count=self.plan.idle,
                        cpu=self.load_cpu,
                        settle=self.plan.settle,
                    )
                    self.rec.idle.append({"rep": rep, "terminator": term.name, **idle.as_dict()})
                    _log(
                        f"  {term.name:<12} d  {idle.opened}/{idle.requested} idle, origin sees "
                        f"{idle.origin_connections}, {idle.kib_per_connection or 0:.2f} KiB/conn"
                    )
                    time.sleep(self.plan.settle)  # let the closed connections drain
            for key in rest:
                self.throughput(key, servers, rep)

    def run(self) -> None:
        names = list(self.plan.terminators)
        for rep in range(self.plan.reps):
            # Rotate who starts first so no terminator always has the same place.
            order = names[rep % len(names) :] + names[: rep % len(names)]
            _log(f"round {rep + 1}/{self.plan.reps}: {', '.join(order)}")
            terms = [TERMINATORS[name]() for name in order]
            self.handshake_phase(rep, terms)
            self.tickets_phase(rep, terms)


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "-"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0] if text else "?"


def versions() -> dict[str, str]:
    from OpenSSL import SSL

    import edgeproxy

    return {
        "edgeproxy": edgeproxy.__version__,
        "python": platform.python_version(),
        "edgeproxy_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "haproxy": _version(["haproxy", "-v"]),
        "nginx": _version(["nginx", "-v"]),
        "hitch": _version(["hitch", "--version"]),
        "caddy": _version(["caddy", "version"]),
        "wrk": _version(["wrk", "-v"]),
        "openssl": _version(["openssl", "version"]),
        "kernel": platform.release(),
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``finally``: servers get stopped


def main(argv: Sequence[str] | None = None) -> int:
    plan, args = parse_args(argv)
    try:
        check_tools(plan)
    except SetupError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    hard = raise_nofile_limit()
    idle_n = min(plan.idle, (hard - FD_HEADROOM) // 2)
    if idle_n < plan.idle:
        _log(
            f"note: RLIMIT_NOFILE hard limit {hard} caps (d) at {idle_n} idle connections "
            "(a terminator holds two descriptors per connection: client and origin)"
        )
    plan = replace(plan, idle=idle_n)
    term_cpu, load_cpu = cpus()
    pin_self(load_cpu)
    started = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="edgeproxy-bench-"))
    ok = False
    try:
        with Supervisor(workdir) as sup:
            pki = make_pki(workdir / "pki")
            edgeproxy_root, edgeproxy_source = snapshot_edgeproxy(workdir)
            origin = start_origin(
                sup, workdir, cpu=load_cpu, nofile=hard, connections=hard - FD_HEADROOM
            )
            stage = Stage(
                workdir=workdir,
                pki=pki,
                origin_port=origin.port,
                cpu=term_cpu,
                max_connections=idle_n + 10,
                nofile=hard,
                edgeproxy_root=edgeproxy_root,
                edgeproxy_log_level=plan.edgeproxy_log_level,
            )
            runner = Runner(plan, sup, stage, origin, load_cpu)
            runner.run()
            issuance = []
            if "e" in plan.workloads:
                _log(f"(e) on-demand issuance: {', '.join(plan.issuance_systems)}")
                results = measure_issuance(
                    sup,
                    workdir,
                    systems=plan.issuance_systems,
                    names=plan.names,
                    cpu=term_cpu,
                    origin_port=origin.port,
                    log_level=plan.edgeproxy_log_level,
                    edgeproxy_root=edgeproxy_root,
                )
                issuance = [r.as_dict() for r in results]
        summary = summarize(
            runner.rec.throughput, runner.rec.idle, issuance, list(plan.terminators)
        )
        tables = format_tables(summary)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        args.out.mkdir(parents=True, exist_ok=True)
        base = args.out / f"bench-{'smoke-' if plan.smoke else ''}{stamp}"
        document = {
            "meta": {
                "started": started.isoformat(),
                "finished": dt.datetime.now(dt.UTC).isoformat(),
                "plan": plan.__dict__,
                "cpus": {"terminators": term_cpu, "load": load_cpu},
                "nofile": hard,
                "versions": versions(),
                "edgeproxy_source": edgeproxy_source,
                "workloads": {k: w.__dict__ for k, w in WORKLOADS.items()},
            },
            "summary": summary,
            "throughput": runner.rec.throughput,
            "idle": runner.rec.idle,
            "probes": runner.rec.probes,
            "issuance": issuance,
        }
        write_json(base.with_suffix(".json"), document)
        base.with_suffix(".md").write_text(tables)
        write_chart(base.with_suffix(".png"), summary, list(plan.terminators))
        print(tables)
        print(f"results: {base}.json, {base}.md, {base}.png")
        ok = True
    finally:
        if ok and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            _log(f"configs and logs kept in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
