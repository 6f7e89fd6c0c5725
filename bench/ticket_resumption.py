"""Session resumption through a real ``edgeproxy run``, with Python ``ssl`` clients (a measurement).

    python -m bench.ticket_resumption               # ~30 s
    python -m bench.ticket_resumption --attempts 500

Three figures, each for TLS 1.2 and TLS 1.3 (internal issuer, a ``python -m http.server``
upstream, certificates not verified: only resumption is measured):

1. one worker, ``tls.ticket_key_rotation`` of a few seconds: a ticket taken at start, offered
   again after one rotation (its key is now the previous one: resumes) and after two
   (dropped: full handshake);
2. one worker: N pairs of connections (a full handshake, then one offering its fresh ticket):
   how many resumed;
3. two workers sharing the port with SO_REUSEPORT: the same N pairs. Each worker has its own
   keys, so a resumption lands on the issuing worker about half of the time.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testkit.ports import free_port
from testkit.procs import stop_process
from testkit.proxy import wait_port

VERSIONS = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
NAME = "resume.example.test"


@contextmanager
def edgeproxy(work: Path, *, workers: int, rotation: float, upstream: int) -> Iterator[int]:
    """``edgeproxy run`` on a free port; yields the port."""
    port = free_port()
    config = work / f"edgeproxy-{port}.toml"
    config.write_text(
        f"""[server]
listen = ["127.0.0.1:{port}"]
workers = {workers}
[admin]
listen = "127.0.0.1:{free_port()}"
[tls]
issuer = "internal"
default_sni = "default.example.test"
ticket_key_rotation = {rotation}
[on_demand]
allow = ["*.example.test"]
[storage]
backend = "file"
path = "{work / f"state-{port}"}"
[log]
level = "warning"
[[routes]]
sni = ["*"]
default = true
upstreams = ["127.0.0.1:{upstream}"]
"""
    )
    with (work / f"edgeproxy-{port}.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        wait_port("127.0.0.1", port, timeout=60)
        yield port
    finally:
        stop_process(proc, grace=30)


def client(version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def fetch(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession]:
    """One request; whether the handshake resumed, and the session (with its new ticket)."""
    raw = socket.create_connection(("127.0.0.1", port))
    with ctx.wrap_socket(raw, server_hostname=NAME, session=session) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while s.recv(65536):
            pass  # TLS 1.3 tickets arrive after the handshake: read to the end
        assert s.session is not None
        return s.session_reused, s.session


def pairs(port: int, attempts: int) -> dict[str, str]:
    out = {}
    for version in VERSIONS:
        ctx = client(version)
        reused = sum(fetch(ctx, port, fetch(ctx, port)[1])[0] for _ in range(attempts))
        out[version.name] = f"{reused}/{attempts} resumed"
    return out


def rotation_figures(port: int, rotation: float) -> None:
    t0 = time.monotonic()
    ctxs = {v: client(v) for v in VERSIONS}
    # One session per later attempt: a TLS 1.3 client offers each ticket once.
    taken = {v: [fetch(ctxs[v], port)[1] for _ in range(2)] for v in VERSIONS}
    print(f"  tickets taken at t={time.monotonic() - t0:.1f}s (the first keys date from start)")
    for periods, index in ((1, 0), (2, 1)):
        time.sleep(max(0.0, periods * rotation + 0.5 - (time.monotonic() - t0)))
        resumed = {v.name: fetch(ctxs[v], port, taken[v][index])[0] for v in VERSIONS}
        print(f"  t={time.monotonic() - t0:.1f}s, after {periods} rotation(s): resumed {resumed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=200, help="connection pairs per figure")
    parser.add_argument("--rotation", type=float, default=4.0, help="seconds, for figure 1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeproxy-tickets-") as tmp:
        work = Path(tmp)
        upstream_port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(upstream_port), "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=work,
        )
        try:
            wait_port("127.0.0.1", upstream_port)
            with edgeproxy(work, workers=1, rotation=args.rotation, upstream=upstream_port) as p:
                print(f"1. one worker, tls.ticket_key_rotation = {args.rotation:g}s")
                rotation_figures(p, args.rotation)
                print(f"2. one worker: {pairs(p, args.attempts)}")
            with edgeproxy(work, workers=2, rotation=43200, upstream=upstream_port) as p:
                print(f"3. two workers (SO_REUSEPORT): {pairs(p, args.attempts)}")
        finally:
            stop_process(upstream, grace=10)


if __name__ == "__main__":
    main()
