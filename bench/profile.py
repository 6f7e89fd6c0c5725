"""Where a full TLS handshake's CPU goes: the terminator's own code, OpenSSL, the kernel.

    python -m bench.profile                       # edgeproxy and HAProxy, 10 s each
    python -m bench.profile --terminators edgeproxy,haproxy,caddy --duration 20

Runs workload (a) of ``bench.run`` (a new connection and a full TLS handshake per request,
tickets off, empty body; wrk ``-c16 -H "Connection: close"``) against each terminator in turn,
started and pinned exactly as ``bench.run`` starts them, with ``perf record -e cpu-clock``
sampling every thread of the terminator's process tree, user and kernel space. ``perf report
--sort dso`` then gives each shared object's share of the samples, and those shares split the
terminator's CPU seconds (``/proc/PID/stat``, as in ``bench.run``) per handshake:

- **own code**: for edgeproxy the Python interpreter (``libpython``, the ``python`` binary and
  the interpreter's C extension modules such as ``_socket``, ``select``, ``_cffi_backend``),
  for the others their own binary;
- **OpenSSL**: ``libssl`` and ``libcrypto`` (the C terminators and wrk use Debian's), or the
  ``cryptography`` wheel's ``_rust.abi3.so`` into which its OpenSSL is linked statically (what
  edgeproxy uses through pyOpenSSL; the wheel's own Rust code is not on the handshake path);
- **kernel**: ``[kernel.kallsyms]`` (TCP, epoll, syscalls, the scheduler);
- **libc, other**: libc (malloc, memcpy), the dynamic loader, vDSO, anything else.

The ``kernel (/proc)`` column is the kernel's share by the process's own accounting (``stime``
over ``utime + stime``), a check on the sampled one. Needs ``perf`` (Debian ``linux-perf``)
and permission to sample kernel space (root, or ``kernel.perf_event_paranoid`` <= 1);
software ``cpu-clock`` sampling works in VMs without hardware counters. A measurement, not a
test: it prints the table and writes nothing else. Run it when the machine is quiet; the
shares are steadier than the absolute microseconds on a shared VM.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import probe_tls
from bench.pki import make_pki
from bench.procs import CLK_TCK, Server, Supervisor, pin_self, raise_nofile_limit, tree_pids
from bench.run import cpus, probe_ok
from bench.terminators import TERMINATORS, Stage, snapshot_edgeproxy, start_origin
from bench.workloads import WORKLOADS, run_throughput

BUCKETS: Final = ("own code", "OpenSSL", "kernel", "libc, other")
SAMPLE_HZ: Final = 997  # not a multiple of the scheduler tick, so samples don't alias with it
_PERCENT_DSO = re.compile(r"^\s*([\d.]+)%\s+(\S.*?)\s*$")


class SetupError(RuntimeError):
    pass


def bucket(dso: str, terminator: str) -> str:
    """Which column a shared object's samples belong to."""
    name = dso.rsplit("/", 1)[-1]
    if name.startswith("[kernel") or name.startswith("[guest.kernel"):
        return "kernel"
    if name.startswith(("libssl", "libcrypto", "_rust.abi3", "_openssl")):
        return "OpenSSL"
    if terminator == "edgeproxy":
        if name.startswith(("libpython", "python")) or ".cpython-" in name:
            return "own code"
        if name in ("_cffi_backend.so",) or name.startswith("_cffi_backend"):
            return "own code"
    elif name == TERMINATORS[terminator].programs[0]:
        return "own code"
    return "libc, other"


def check_perf(workdir: Path) -> None:
    if shutil.which("perf") is None:
        raise SetupError("perf is missing: apt-get install -y linux-perf")
    out = workdir / "check.data"
    proc = subprocess.run(
        ["perf", "record", "-q", "-e", "cpu-clock", "-o", str(out), "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SetupError(f"perf record does not work here: {proc.stderr.strip()[-500:]}")


def tree_user_system(root: int) -> tuple[float, float]:
    """utime and stime seconds over the live tree (what ``bench.procs`` sums as one)."""
    user = system = 0
    for pid in tree_pids(root):
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        user += int(fields[11])  # utime: field 14 of proc(5)
        system += int(fields[12])  # stime: field 15
    return user / CLK_TCK, system / CLK_TCK


def dso_shares(data: Path) -> dict[str, float]:
    proc = subprocess.run(
        [
            "perf",
            "report",
            "-i",
            str(data),
            "--stdio",
            "--sort",
            "dso",
            "-q",
            "--percent-limit",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    shares: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        m = _PERCENT_DSO.match(line)
        if m:
            shares[m.group(2)] = shares.get(m.group(2), 0.0) + float(m.group(1)) / 100
    return shares


@dataclass(frozen=True)
class Split:
    terminator: str
    handshakes: int
    cpu_s: float
    kernel_proc_share: float  # stime / (utime + stime)
    buckets: dict[str, float]  # share of the samples per column
    top: list[tuple[str, float]]  # the largest shared objects

    @property
    def us_per_handshake(self) -> float:
        return self.cpu_s / self.handshakes * 1e6 if self.handshakes else 0.0


def profile_one(
    server: Server, name: str, host: str, duration: int, cpu: int | None, out: Path
) -> Split:
    workload = WORKLOADS["a"]
    run_throughput(server, workload, name=host, duration=1, cpu=cpu)  # warm caches and pools
    pids = ",".join(str(p) for p in tree_pids(server.pid))
    data = out / f"{name}.perf.data"
    perf = subprocess.Popen(
        [
            "perf",
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            str(SAMPLE_HZ),
            "-p",
            pids,
            "-o",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # perf attaches to every thread before the load starts
    user0, sys0 = tree_user_system(server.pid)
    result = run_throughput(server, workload, name=host, duration=duration, cpu=cpu)
    user1, sys1 = tree_user_system(server.pid)
    perf.send_signal(signal.SIGINT)
    _out, err = perf.communicate(timeout=60)
    if perf.returncode not in (0, -signal.SIGINT):
        raise RuntimeError(f"perf record failed for {name}: {err.decode(errors='replace')}")
    shares = dso_shares(data)
    columns = dict.fromkeys(BUCKETS, 0.0)
    for dso, share in shares.items():
        columns[bucket(dso, name)] += share
    total = sum(columns.values()) or 1.0
    user, system = user1 - user0, sys1 - sys0
    return Split(
        terminator=name,
        handshakes=result.wrk.requests,
        cpu_s=result.cpu_s,
        kernel_proc_share=system / (user + system) if user + system else 0.0,
        buckets={k: v / total for k, v in columns.items()},
        top=sorted(shares.items(), key=lambda kv: -kv[1])[:6],
    )


def format_table(splits: Sequence[Split]) -> str:
    head = "| terminator | handshakes | CPU us per handshake | " + " | ".join(
        f"{b} us (%)" for b in BUCKETS
    )
    lines = [head + " | kernel (/proc) |", "|---" * (4 + len(BUCKETS)) + "|"]
    for s in splits:
        cells = [
            f"{s.us_per_handshake * s.buckets[b]:.0f} ({100 * s.buckets[b]:.0f} %)" for b in BUCKETS
        ]
        lines.append(
            f"| {s.terminator} | {s.handshakes:,} | {s.us_per_handshake:.0f} | "
            + " | ".join(cells)
            + f" | {100 * s.kernel_proc_share:.0f} % |"
        )
    lines.append("")
    for s in splits:
        top = ", ".join(f"{dso.rsplit('/', 1)[-1]} {100 * share:.1f} %" for dso, share in s.top)
        lines.append(f"- {s.terminator}, largest objects: {top}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--terminators",
        default="edgeproxy,haproxy",
        help=f"comma-separated subset of {','.join(TERMINATORS)} (default edgeproxy,haproxy)",
    )
    parser.add_argument("--duration", type=int, default=10, help="profiled seconds each")
    parser.add_argument("--keep-workdir", action="store_true", help="keep perf data and logs")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.terminators.split(",") if n.strip()]
    unknown = [n for n in names if n not in TERMINATORS]
    if unknown:
        parser.error(f"unknown terminators {unknown}; choose from {', '.join(TERMINATORS)}")
    missing = [p for n in names for p in TERMINATORS[n].missing()]
    missing += [p for p in ("wrk", "nginx", "taskset", "openssl") if shutil.which(p) is None]
    workdir = Path(tempfile.mkdtemp(prefix="edgeproxy-profile-"))
    try:
        if missing:
            raise SetupError(f"missing: {', '.join(sorted(set(missing)))}")
        check_perf(workdir)
    except SetupError as exc:
        print(f"bench.profile: {exc}", file=sys.stderr)
        return 2
    hard = raise_nofile_limit()
    term_cpu, load_cpu = cpus()
    pin_self(load_cpu)
    splits = []
    with Supervisor(workdir) as sup:
        pki = make_pki(workdir / "pki")
        root, _source = snapshot_edgeproxy(workdir)
        origin = start_origin(sup, workdir, cpu=load_cpu, nofile=hard, connections=1000)
        stage = Stage(
            workdir=workdir,
            pki=pki,
            origin_port=origin.port,
            cpu=term_cpu,
            max_connections=1000,
            nofile=hard,
            edgeproxy_root=root,
        )
        for name in names:
            server = TERMINATORS[name]().start(sup, stage, tickets=False)
            try:
                assert server.port is not None
                probe = probe_tls(
                    server.port, pki.name, pki.ca_pem, workdir / "s.pem", "/empty.bin"
                )
                if not probe_ok(probe, tickets=False):
                    raise RuntimeError(f"{name}: tickets are not off or no answer: {probe}")
                splits.append(profile_one(server, name, pki.name, args.duration, load_cpu, workdir))
                print(f"  {name}: {splits[-1].handshakes} handshakes profiled", file=sys.stderr)
            finally:
                sup.stop(server)
    print(format_table(splits))
    if args.keep_workdir:
        print(f"perf data and logs in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
