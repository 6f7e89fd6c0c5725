"""Instructions per connection, per keep-alive request and per MiB: callgrind's deterministic counts.

    python -m bench.callgrind                               # this checkout, a, a2, b, b64 and c
    python -m bench.callgrind --src /tmp/before --src .     # two trees side by side
    python -m bench.callgrind --workloads a --connections 500

Wall-clock A/B runs on a shared VM drift by 15-25 %; instruction counts do not, so a change
that must not slow the data path down is checked here too (issue 18's "within 3 %"). Each
``--src`` (a directory holding an ``edgeproxy`` package) runs as ``edgeproxy run`` under
``valgrind --tool=callgrind``: one worker, a static certificate, one route to Debian's nginx
serving the bodies of ``bench.run``, tickets off (``OPENSSL_CONF`` with ``NumTickets = 0``), as
``bench.run`` configures it (a2 excepted). The client is this process, outside valgrind, with Python ``ssl``:

- **a**: ``--connections`` sequential connections, each a full TLS handshake and one
  ``Connection: close`` request for an empty body;
- **a2**: the same with session tickets on (edgeproxy started without ``NumTickets = 0``), each
  connection resuming the session of the one before it (as ``bench.run``'s (a2));
- **b**: one keep-alive connection, ``--requests`` sequential requests for 1 KiB;
- **b64**: the same ``--requests`` spread over 64 keep-alive connections at once (as
  ``bench.run``'s (b), which runs wrk with 64): a client thread per connection, each sequential.
  Under valgrind edgeproxy is the slow side, so many of the 64 are ready whenever it looks: the
  CPU-bound case, where one wake-up of the event loop serves several connections;
- **c**: one keep-alive connection, ``--mib`` sequential requests for 1 MiB.

After a warm-up (20 connections; for b and c ten requests on the measured connection), the
counters are read with ``callgrind_control`` before and after the measured part. Background
loops (the overload sweep every 0.25 s, timers) cost instructions per *second*, and valgrind on
a loaded machine stretches the seconds, so the idle rate is measured first (``--idle`` seconds
with no traffic) and the run's duration times that rate is subtracted. Sources given together
run at the same time, workload by workload, so they see the same machine. Needs ``valgrind``
and ``nginx``. A measurement, not a test: it prints two lines per source and workload, the
count and its split over shared objects per unit (OpenSSL: the ``cryptography`` wheel's
``_rust.abi3.so``; Python: ``libpython``, the interpreter and its extension modules, ``libffi``;
libc with the loader), read from a callgrind dump of the measured part, the idle part left in.

The counts are deterministic for one path through the code, but which path a connection takes
depends a little on timing (whether the ClientHello or the client's Finished has arrived when
we look: a wait more or less), so the same code measures about 1 % apart from run to run:
compare trees given together, and more ``--connections`` for small changes.
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from testkit.ports import free_port

from .pki import BenchPki, make_pki
from .procs import Supervisor
from .terminators import openssl_conf, render, start_origin

PATHS = {"a": "/empty.bin", "a2": "/empty.bin", "b": "/1k.bin", "b64": "/1k.bin", "c": "/1m.bin"}
UNITS = {"a": "connection", "a2": "connection", "b": "request", "b64": "request", "c": "MiB"}
_PARALLEL = {"b64": 64}  # keep-alive connections used at once (others: one)
_TICKETS = frozenset({"a2"})  # workloads run with session tickets on
_WARM_CONNECTIONS = 20
_WARM_REQUESTS = 10


@dataclass(frozen=True)
class Count:
    src: str
    workload: str
    n: int
    raw: int  # instructions counted during the measured part
    idle: float  # of those, what the same time costs with no traffic
    seconds: float
    split: dict[str, int]  # instructions in the measured part by shared object (idle included)

    @property
    def per_unit(self) -> float:
        return (self.raw - self.idle) / self.n

    def split_line(self) -> str:
        """Per unit by shared object, the idle part left in (it is small, and mostly Python)."""
        parts = sorted(self.split.items(), key=lambda kv: -kv[1])
        return "     " + ", ".join(f"{k} {v / self.n:,.0f}" for k, v in parts)

    def line(self) -> str:
        return (
            f"{self.workload:<3} {self.per_unit:>12,.0f} instructions per {UNITS[self.workload]}"
            f"  (n={self.n}, raw {self.raw / self.n:,.0f}, idle part {self.idle / self.n:,.0f},"
            f" {self.seconds:.0f} s)  {self.src}"
        )


def _instructions(pid: int) -> int:
    """The target's instruction count so far, all threads."""
    out = subprocess.run(
        ["callgrind_control", "-e", "Ir", str(pid)], capture_output=True, text=True, check=True
    ).stdout
    counts = re.findall(r"Th\s+\d+\s+([\d,]+)", out.split("Totals:", 1)[-1])
    if not counts:
        raise RuntimeError(f"no counters from callgrind_control: {out!r}")
    return sum(int(c.replace(",", "")) for c in counts)


# Shared objects grouped as bench/README's "Profile split" names them.
_GROUPS = (
    ("OpenSSL", ("_rust.abi3.so", "libssl", "libcrypto")),
    ("Python", ("libpython", "/python3", "cpython-3", "libffi")),
    ("libc", ("libc.so", "libc-", "ld-linux", "libm.so")),
)


def _group(obj: str) -> str:
    for name, needles in _GROUPS:
        if any(n in obj for n in needles):
            return name
    return "other"


def _split(dump: Path) -> dict[str, int]:
    """A callgrind dump's self instructions summed per object group (``_GROUPS``).

    Reads the file itself (``callgrind_annotate`` sums by function, not by object): every cost
    line counts for the current ``ob=``, except the one after ``calls=``, which is the
    inclusive cost of a call and belongs to the callee's own lines.
    """
    names: dict[str, str] = {}
    totals: dict[str, int] = {}
    group = "other"
    after_call = False
    with dump.open() as lines:
        for line in lines:
            if line.startswith(("ob=", "cob=")):  # one name table for both
                key, _, rest = line.partition("=")
                ref, _, name = rest.strip().partition(" ")
                if name:
                    names[ref] = name
                if key == "ob":
                    group = _group(names.get(ref, ref))
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                    continue
                fields = line.split()
                if len(fields) >= 2:
                    totals[group] = totals.get(group, 0) + int(fields[1])
    return totals


class _Client:
    """Sequential HTTPS requests with Python ``ssl``: without ``resume`` no tickets, so every
    connection is full; with it, each connection offers the session of the one before."""

    def __init__(self, port: int, pki: BenchPki, *, resume: bool = False) -> None:
        self.port = port
        self.name = pki.name
        self.ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
        if not resume:
            self.ctx.options |= ssl.OP_NO_TICKET
        self.resume = resume
        self.session: ssl.SSLSession | None = None
        self.resumed = 0

    def connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port))
        return self.ctx.wrap_socket(raw, server_hostname=self.name, session=self.session)

    def request(self, tls: ssl.SSLSocket, path: str, *, close: bool = False) -> None:
        head = f"GET {path} HTTP/1.1\r\nHost: {self.name}\r\n"
        tls.sendall((head + ("Connection: close\r\n\r\n" if close else "\r\n")).encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._receive(tls)
        header, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length:\s*(\d+)", header)
        length = int(match.group(1)) if match else 0
        while len(body) < length:
            body += self._receive(tls)
        if close:
            while tls.recv(65536):
                pass

    def one_connection(self, path: str) -> None:
        with self.connect() as tls:
            self.request(tls, path, close=True)
            if self.resume:
                # TLS 1.3 tickets come after the handshake: the session is complete only now.
                self.resumed += tls.session_reused
                self.session = tls.session

    @staticmethod
    def _receive(tls: ssl.SSLSocket) -> bytes:
        chunk = tls.recv(262144)
        if not chunk:
            raise RuntimeError("the proxy closed the connection mid-response")
        return chunk


def measure(src: Path, workload: str, n: int, idle_seconds: float) -> Count:
    """One ``edgeproxy run`` from ``src`` under callgrind, one workload."""
    work = Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    pki = make_pki(work / "pki")
    with Supervisor(work) as sup:
        origin = start_origin(sup, work, cpu=None, nofile=4096, connections=1024)
        port = free_port()
        conf = render(
            "edgeproxy.toml",
            work / "edgeproxy.toml",
            port=port,
            admin_port=free_port(),
            maxconn=1000,
            workdir=work,
            log_level="warning",
            upstream_port=origin.port,
            cert_pem=pki.cert_pem,
            key_pem=pki.key_pem,
        )
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={work}/callgrind.out",
            sys.executable,
            "-m",
            "edgeproxy",
            "run",
            "-c",
            str(conf),
        ]
        tickets = workload in _TICKETS
        env = {"OPENSSL_CONF": str(openssl_conf(work, tickets=tickets)), "PYTHONHASHSEED": "0"}
        server = sup.start(
            "edgeproxy", argv, cpu=None, env=env, port=port, cwd=src, start_timeout=600
        )
        client = _Client(port, pki, resume=tickets)
        path = PATHS[workload]
        for _ in range(_WARM_CONNECTIONS):
            client.one_connection(path)
        conns: list[ssl.SSLSocket] = []
        if workload not in ("a", "a2"):
            conns = [client.connect() for _ in range(_PARALLEL.get(workload, 1))]
            for tls in conns:
                for _ in range(_WARM_REQUESTS):
                    client.request(tls, path)
        n -= n % max(1, len(conns))  # the same number on each connection
        time.sleep(1)
        i0, t0 = _instructions(server.pid), time.monotonic()
        time.sleep(idle_seconds)
        i1, t1 = _instructions(server.pid), time.monotonic()
        rate = (i1 - i0) / (t1 - t0)
        # Zeroed here and dumped after: the dump holds the measured part alone, for the split.
        subprocess.run(
            ["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True
        )
        start, began = _instructions(server.pid), time.monotonic()
        if not conns:
            for _ in range(n):
                client.one_connection(path)
        else:

            def requests(tls: ssl.SSLSocket) -> None:
                for _ in range(n // len(conns)):
                    client.request(tls, path)

            with ThreadPoolExecutor(len(conns)) as clients:
                list(clients.map(requests, conns))
        end, ended = _instructions(server.pid), time.monotonic()
        subprocess.run(
            ["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True
        )
        dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        split = _split(dumps[-1]) if dumps else {}
        for tls in conns:
            tls.close()
        sup.stop(server)
    if tickets and client.resumed < n:
        raise RuntimeError(f"{workload}: only {client.resumed} of {n + _WARM_CONNECTIONS} resumed")
    return Count(str(src), workload, n, end - start, rate * (ended - began), ended - began, split)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", type=Path, help="holds an edgeproxy package")
    parser.add_argument("--workloads", default="a,a2,b,b64,c")
    parser.add_argument("--connections", type=int, default=200, help="for (a) and (a2)")
    parser.add_argument("--requests", type=int, default=1500, help="for (b) and (b64)")
    parser.add_argument("--mib", type=int, default=60, help="for (c)")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle-rate probe")
    args = parser.parse_args(argv)
    sources = [s.resolve() for s in (args.src or [Path.cwd()])]
    for src in sources:
        if not (src / "edgeproxy" / "__init__.py").is_file():
            parser.error(f"{src} holds no edgeproxy package")
    sizes = {
        "a": args.connections,
        "a2": args.connections,
        "b": args.requests,
        "b64": args.requests,
        "c": args.mib,
    }
    with ThreadPoolExecutor(len(sources)) as pool:
        for workload in args.workloads.split(","):
            runs = [
                pool.submit(measure, src, workload, sizes[workload], args.idle) for src in sources
            ]
            for run in runs:
                count = run.result()
                print(count.line(), flush=True)
                print(count.split_line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
