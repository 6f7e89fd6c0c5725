"""Machinery shared by the hardening tests and ``bench/attacks.py``: a real edgeproxy process,
a normal client measured from its own process, the attackers, and small real servers.

What this owns and how the pieces meet:

- ``edgeproxy_process(workdir, cfg)`` writes ``cfg`` as TOML, runs ``python -m edgeproxy run``
  (optionally with a lowered ``RLIMIT_NOFILE``), waits until the proxy and admin ports accept,
  and always SIGKILLs and reaps it on exit. ``EdgeproxyProcess`` reads what an operator
  would: ``/metrics`` over the admin port, VmRSS and the fd table in ``/proc``, the log.
- ``NormalClient`` is a separate Python process doing one full request at a time (TCP, TLS
  with verification, a line echoed by the upstream) until told to stop, so the latency it
  records is what a bystander sees, not the attackers' own event-loop delay.
- The attackers (``open_idle`` + ``watch``, ``slowloris``, ``send_and_watch`` fed with
  ``garbage()`` or ``hello_record()`` payloads, ``establish``) run in the caller's trio loop,
  bounded in count and time, and report in an ``Outcome`` what the proxy did to each
  connection (closed, reset, answered with a TLS alert).
- ``serve_echo`` is the upstream (echoes until EOF, then half-closes), ``AskServer`` a real
  on-demand ``ask`` endpoint counting its hits.

Everything listens on, and connects to, 127.0.0.0/8 only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.file import FileStorage
from testkit import tlsbuild as tb
from testkit.procs import kill_process
from testkit.tomlw import toml_dumps

REPO_ROOT = Path(__file__).resolve().parents[1]
PING = b"normal client ping\n"
START_TIMEOUT = 30.0


# --- configuration ----------------------------------------------------------------------


def proxy_config(
    state: Path,
    port: int,
    upstream: str,
    *,
    admin_port: int | None = None,
    **sections: Mapping[str, Any],
) -> dict[str, Any]:
    """A config for a subprocess: internal issuer, ``*.example.test`` allowed, one route."""
    cfg: dict[str, Any] = {
        "server": {"listen": [f"127.0.0.1:{port}"], "handshake_timeout": 5},
        "admin": {"listen": f"127.0.0.1:{admin_port}" if admin_port else ""},
        "tls": {"issuer": "internal", "default_sni": "default.example.test"},
        "on_demand": {"allow": ["*.example.test"]},
        "storage": {"backend": "file", "path": str(state)},
        "log": {"level": "info"},
        "routes": [{"sni": ["*"], "default": True, "upstreams": [upstream]}],
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


async def make_internal_ca(state: Path) -> Path:
    """Create the internal CA in ``state`` before the proxy starts; returns its PEM path."""
    storage = FileStorage(state)
    try:
        pem = await InternalIssuer(storage).ca_certificate_pem()
    finally:
        await storage.aclose()
    path = state.parent / f"{state.name}-ca.pem"
    path.write_bytes(pem)
    return path


# --- the proxy process ------------------------------------------------------------------


@dataclass
class EdgeproxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int | None
    log_path: Path
    config_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def metrics_text(self) -> str:
        assert self.admin_port is not None, "start the process with an admin port"
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            r = await http.get(f"http://127.0.0.1:{self.admin_port}/metrics")
        r.raise_for_status()
        return r.text

    async def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        total = 0.0
        for family in text_string_to_metric_families(await self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


async def wait_accepting(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    with trio.move_on_after(START_TIMEOUT):
        while proc.poll() is None:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
    raise RuntimeError(f"edgeproxy did not accept on {port}; log:\n{log.read_text()[-4000:]}")


@asynccontextmanager
async def edgeproxy_process(
    workdir: Path,
    cfg: Mapping[str, Any],
    *,
    name: str = "edgeproxy",
    nofile: int | None = None,
    rlimit: tuple[int, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[EdgeproxyProcess]:
    """``edgeproxy run`` on ``cfg``; killed and reaped at exit, pass or fail."""
    config_path = workdir / f"{name}.toml"
    config_path.write_text(toml_dumps(cfg))
    log_path = workdir / f"{name}.log"
    port = int(cfg["server"]["listen"][0].rsplit(":", 1)[1])
    admin = cfg.get("admin", {}).get("listen") or ""
    admin_port = int(admin.rsplit(":", 1)[1]) if admin else None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "run", "-c", str(config_path)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        if nofile or rlimit:
            # prlimit(2) on the child (no preexec_fn: this process runs threads). It is still
            # importing Python at this point, long before it opens its listener. ``nofile``
            # sets the hard limit too: edgeproxy raises its soft limit to the hard one.
            limits = rlimit or (nofile, nofile)
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, limits)
        await wait_accepting(port, proc, log_path)
        if admin_port is not None:
            await wait_accepting(admin_port, proc, log_path)
        yield EdgeproxyProcess(proc, port, admin_port, log_path, config_path)
    finally:
        kill_process(proc)


_BAD_LOG_MARKS = (" ERROR ", " CRITICAL ", "Traceback", '"level": "error"', '"level": "critical"')


def unexpected_log_lines(text: str, allowed: Sequence[str] = ()) -> list[str]:
    """ERROR/CRITICAL lines and tracebacks, minus lines containing an ``allowed`` fragment."""
    bad = []
    for line in text.splitlines():
        flagged = any(mark in line for mark in _BAD_LOG_MARKS)
        if flagged and not any(fragment in line for fragment in allowed):
            bad.append(line)
    return bad


# --- the normal client ------------------------------------------------------------------


def client_context(ca: Path | None) -> ssl.SSLContext:
    if ca is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=str(ca))


def echo_request(
    port: int, name: str, ctx: ssl.SSLContext, *, source: str = "", timeout: float = 30.0
) -> float:
    """One full request, blocking: connect, verified TLS, a line echoed back. Seconds taken."""
    t0 = time.perf_counter()
    source_address = (source, 0) if source else None
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=source_address
    ) as sock:
        with ctx.wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(PING)
            got = b""
            while len(got) < len(PING):
                chunk = tls.recv(4096)
                if not chunk:
                    break
                got += chunk
    if got != PING:
        raise ConnectionError(f"upstream answered {got!r}")
    return time.perf_counter() - t0


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.seconds:
            return f"no successful request ({len(self.errors)} errors)"
        ms = sorted(s * 1000 for s in self.seconds)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        return (
            f"{len(ms)} requests, median {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, "
            f"max {ms[-1]:.1f} ms, {len(self.errors)} errors"
        )


def _normal_client_main(argv: Sequence[str]) -> None:
    """Child process: requests back to back (with a pause) until stdin closes.

    Prints ``ready``, then one line per request (``ok`` or ``error``) so the parent can wait
    for progress, and finally one JSON line with every latency and error.
    """
    port, name, ca, interval, source = int(argv[0]), argv[1], argv[2], float(argv[3]), argv[4]
    ctx = client_context(Path(ca) if ca else None)
    stop = threading.Event()

    def on_stdin_closed() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=on_stdin_closed, daemon=True).start()
    result = Latencies()
    print("ready", flush=True)
    while not stop.is_set():
        try:
            result.seconds.append(echo_request(port, name, ctx, source=source))
            print("ok", flush=True)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
            print("error", flush=True)
        stop.wait(interval)
    print(json.dumps({"seconds": result.seconds, "errors": result.errors}), flush=True)


async def _start_child(mode: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
    """``python -m testkit.hardening MODE ARGS``, once it has printed ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "testkit.hardening", mode, *args],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await trio.to_thread.run_sync(proc.stdout.readline)
    if line.strip() != b"ready":
        kill_process(proc)
        raise RuntimeError(f"{mode} did not start: {line!r}")
    return proc


class NormalClient:
    """A bystander in its own process: ``async with NormalClient(...) as c: ...; c.result``.

    ``await c.wait_for(ok=n)`` waits (bounded) until ``n`` more requests succeeded, so a
    short attack cannot end before the bystander had its turn.
    """

    def __init__(
        self,
        port: int,
        name: str,
        ca: Path | None,
        *,
        interval: float = 0.05,
        source: str = "127.0.0.1",
        min_ok: int = 3,
    ) -> None:
        self.args = [str(port), name, str(ca or ""), str(interval), source]
        self.result = Latencies()
        self.ok = 0
        self.failed = 0
        self.min_ok = min_ok
        self._proc: subprocess.Popen[bytes] | None = None
        self._final = b""
        self._reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            word = line.strip()
            if word == b"ok":
                self.ok += 1
            elif word == b"error":
                self.failed += 1
            elif word.startswith(b"{"):
                self._final = word

    async def wait_for(self, *, ok: int, limit: float = 60.0) -> bool:
        target = self.ok + ok
        return await wait_until(lambda: self.ok >= target, limit)

    async def __aenter__(self) -> NormalClient:
        self._proc = await _start_child("normal-client", self.args)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        proc, reader = self._proc, self._reader
        assert proc is not None and reader is not None and proc.stdin is not None
        try:
            if exc_info[0] is None and self.min_ok:
                await self.wait_for(ok=0 if self.ok >= self.min_ok else self.min_ok - self.ok)
            proc.stdin.close()
            await trio.to_thread.run_sync(lambda: reader.join(60))
            if self._final:
                data = json.loads(self._final)
                self.result = Latencies(data["seconds"], data["errors"])
        finally:
            kill_process(proc)


# --- servers ----------------------------------------------------------------------------


async def serve_echo(
    port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """The upstream: echoes everything, half-closes after the client's EOF."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            while chunk := await stream.receive_some(65536):
                await stream.send_all(chunk)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@dataclass
class AskServer:
    """A real ``on_demand.ask`` endpoint: 200 for ``allowed`` names, 404 otherwise."""

    allowed: set[str] = field(default_factory=set)
    hits: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/allowed"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def handle(stream: trio.SocketStream) -> None:
            data = b""
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                target = data.split(b" ", 2)[1].decode()
                name = target.split("domain=", 1)[1].split("&", 1)[0] if "domain=" in target else ""
                self.hits.append(name)
                status = b"200 OK" if name in self.allowed else b"404 Not Found"
                await stream.send_all(
                    b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            await trio.aclose_forcefully(stream)

        task_status.started()
        await trio.serve_listeners(handle, listeners)


# --- attackers --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the proxy did to each attacking connection."""

    opened: int = 0
    connect_failed: int = 0
    closed: int = 0  # EOF from the proxy
    reset: int = 0  # RST from the proxy (refusals abort with SO_LINGER 0)
    answered: list[bytes] = field(default_factory=list)  # first bytes the proxy sent, if any
    still_open: int = 0

    @property
    def ended_by_proxy(self) -> int:
        return self.closed + self.reset

    def __str__(self) -> str:
        alerts = sum(1 for a in self.answered if a.startswith(b"\x15\x03"))
        return (
            f"{self.opened} opened, {self.connect_failed} connect failed, {self.closed} closed, "
            f"{self.reset} reset, {len(self.answered)} answered ({alerts} TLS alerts), "
            f"{self.still_open} left open"
        )


async def _connect(port: int, source: str | None = None) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_counted(
    port: int, outcome: Outcome, source: str | None = None
) -> trio.socket.SocketType | None:
    """``_connect``, counted in ``outcome``; None when there is no socket to use.

    A reset before ``connect`` returns is the proxy accepting and refusing at once: opened
    and reset, not a failed connect.
    """
    try:
        sock = await _connect(port, source)
    except ConnectionResetError:
        outcome.opened += 1
        outcome.reset += 1
        return None
    except OSError:
        outcome.connect_failed += 1
        return None
    outcome.opened += 1
    return sock


async def _until_closed(sock: trio.socket.SocketType, outcome: Outcome) -> None:
    """Read until the proxy ends the connection; record how and what it sent first."""
    first = b""
    try:
        while True:
            data = await sock.recv(65536)
            if not data:
                outcome.closed += 1
                break
            if not first:
                first = data[:16]
    except OSError as exc:
        if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
            raise
        outcome.reset += 1
    if first:
        outcome.answered.append(first)


async def open_idle(
    port: int, n: int, *, source: str | None = None, parallel: int = 256
) -> tuple[list[trio.socket.SocketType], Outcome]:
    """``n`` TCP connections that never send a byte (connecting ``parallel`` at a time).

    A refusal can arrive before ``connect`` even returns (the proxy accepts and resets at
    once): such a connection counts as opened and reset in the returned ``Outcome``.
    """
    socks: list[trio.socket.SocketType] = []
    outcome = Outcome()
    limiter = trio.CapacityLimiter(parallel)

    async def one() -> None:
        async with limiter:
            sock = await _connect_counted(port, outcome, source)
            if sock is not None:
                socks.append(sock)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return socks, outcome


def watch(
    nursery: trio.Nursery, socks: Sequence[trio.socket.SocketType], outcome: Outcome
) -> Outcome:
    """Start watching ``socks`` in ``nursery``; ``outcome`` fills in live."""
    for sock in socks:
        nursery.start_soon(_until_closed, sock, outcome)
    return outcome


async def wait_until(predicate: Callable[[], bool], limit: float) -> bool:
    """Poll ``predicate`` every 50 ms for at most ``limit`` s (a bound, not a measurement)."""
    with trio.move_on_after(limit):
        while not predicate():
            await trio.sleep(0.05)
        return True
    return False


async def watch_until_closed(
    socks: Sequence[trio.socket.SocketType], outcome: Outcome, limit: float
) -> Outcome:
    """Wait (at most ``limit`` s) for the proxy to end each connection; then close ours."""
    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:
            watch(nursery, socks, outcome)
    outcome.still_open = outcome.opened - outcome.ended_by_proxy
    for sock in socks:
        sock.close()
    return outcome


async def slowloris(
    port: int, n: int, hello: bytes, *, interval: float = 0.5, limit: float = 60.0
) -> tuple[Outcome, int]:
    """``n`` clients each sending ``hello`` one byte per ``interval``; returns the outcome and
    the most bytes any client got in before being cut off."""
    outcome = Outcome()
    sent_max = 0

    async def one() -> None:
        nonlocal sent_max
        sock = await _connect_counted(port, outcome)
        if sock is None:
            return
        sent = 0
        with sock:
            async with trio.open_nursery() as nursery:

                async def dribble() -> None:
                    nonlocal sent
                    with contextlib.suppress(OSError):
                        for i in range(len(hello)):
                            await sock.send(hello[i : i + 1])
                            sent += 1
                            await trio.sleep(interval)

                async def watch() -> None:
                    await _until_closed(sock, outcome)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(dribble)
                nursery.start_soon(watch)
        sent_max = max(sent_max, sent)

    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
                await trio.sleep(0.002)  # ramp up over ~1 s rather than one SYN storm
    outcome.still_open = outcome.opened - outcome.ended_by_proxy
    return outcome, sent_max


async def send_and_watch(
    port: int,
    payloads: Iterable[bytes],
    *,
    parallel: int = 64,
    limit: float = 60.0,
    source: str | None = None,
) -> Outcome:
    """One connection per payload: send it, then read until the proxy ends the connection."""
    outcome = Outcome()
    limiter = trio.CapacityLimiter(parallel)

    async def one(payload: bytes) -> None:
        async with limiter:
            sock = await _connect_counted(port, outcome, source)
            if sock is None:
                return
            with sock:
                try:
                    await sock.send(payload)
                except OSError:
                    outcome.reset += 1
                    return
                await _until_closed(sock, outcome)

    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:
            for payload in payloads:
                nursery.start_soon(one, payload)
    outcome.still_open = outcome.opened - outcome.ended_by_proxy
    return outcome


def garbage(n: int, size: int = 4096) -> Iterable[bytes]:
    for _ in range(n):
        yield os.urandom(size)


def hello_record(name: str, alpn: Sequence[str] = ()) -> bytes:
    """A modern ClientHello (GREASE, X25519) for ``name``, as one TLS record."""
    return tb.record(tb.client_hello(name, list(alpn), grease=True))


def random_names(n: int, suffix: str) -> list[str]:
    return [f"{os.urandom(6).hex()}.{suffix}" for _ in range(n)]


async def establish(
    port: int,
    n: int,
    name: str,
    ctx: ssl.SSLContext,
    *,
    proxy_header: bytes = b"",
    parallel: int = 32,
) -> list[trio.SSLStream[trio.SocketStream]]:
    """``n`` connections with a finished TLS handshake and one echoed line, kept open."""
    streams: list[trio.SSLStream[trio.SocketStream]] = []
    limiter = trio.CapacityLimiter(parallel)

    async def one() -> None:
        async with limiter:
            streams.append(await tls_connect(port, name, ctx, proxy_header=proxy_header))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return streams


async def tls_connect(
    port: int,
    name: str,
    ctx: ssl.SSLContext,
    *,
    proxy_header: bytes = b"",
    source: str | None = None,
) -> trio.SSLStream[trio.SocketStream]:
    sock = await _connect(port, source)
    tcp = trio.SocketStream(sock)
    if proxy_header:
        await tcp.send_all(proxy_header)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        await tls.send_all(PING)
        assert await receive_exactly(tls, len(PING)) == PING
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


async def still_echoes(streams: Sequence[trio.SSLStream[trio.SocketStream]]) -> int:
    """How many of ``streams`` still carry a request and its answer."""
    ok = 0
    for tls in streams:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await tls.send_all(PING)
            if await receive_exactly(tls, len(PING)) == PING:
                ok += 1
    return ok


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit in this (test) process; returns the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _silent_holder_main(argv: Sequence[str]) -> None:
    """Child process: hold ``n`` connections that never send a byte, re-opening each one the
    proxy ends, until stdin closes. Prints ``ready`` once ``n`` are open, then a JSON summary.

    Plain non-blocking sockets on epoll: tens of thousands of connections a second cost
    this process little, so it is the proxy that is measured, not the attacker.
    """
    port, n = int(argv[0]), int(argv[1])
    raise_nofile_limit()
    sel = selectors.DefaultSelector()
    stop = threading.Event()
    counts = {"opened": 0, "ended_by_proxy": 0, "connect_failed": 0}

    def on_stdin_closed() -> None:
        sys.stdin.read()
        stop.set()

    def open_one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
            sock.close()
            counts["connect_failed"] += 1
            return
        sel.register(sock, selectors.EVENT_READ)
        counts["opened"] += 1

    threading.Thread(target=on_stdin_closed, daemon=True).start()
    ready = False
    while not stop.is_set():
        # Top up in slices, so closed ones are noticed (and re-opened) while opening.
        for _ in range(min(1000, n - len(sel.get_map()))):
            open_one()
        if not ready and len(sel.get_map()) >= n:
            print("ready", flush=True)
            ready = True
        for key, _ in sel.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if sock.recv(1):
                    continue  # the proxy never speaks first; if it did, keep holding
                counts["ended_by_proxy"] += 1
            except BlockingIOError:
                continue
            except ConnectionRefusedError:
                counts["connect_failed"] += 1
            except OSError:
                counts["ended_by_proxy"] += 1  # reset
            sel.unregister(sock)
            sock.close()
    counts["held_at_end"] = len(sel.get_map())
    print(json.dumps(counts), flush=True)


class SilentHolder:
    """``async with SilentHolder(port, n) as h:`` keeps ``n`` silent connections open (in its
    own process); ``h.counts`` has what happened to them once the block ends."""

    def __init__(self, port: int, n: int) -> None:
        self.args = [str(port), str(n)]
        self.counts: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> SilentHolder:
        self._proc = await _start_child("silent-holder", self.args)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.close()
            with trio.move_on_after(60):
                out = await trio.to_thread.run_sync(proc.stdout.read)
                self.counts = json.loads(out.strip().splitlines()[-1])
        finally:
            kill_process(proc)


def main(argv: Sequence[str]) -> None:
    if argv[:1] == ["normal-client"]:
        _normal_client_main(argv[1:])
    elif argv[:1] == ["silent-holder"]:
        _silent_holder_main(argv[1:])
    elif argv[:1] == ["echo-upstream"]:

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_echo, int(argv[1]) if argv[1:] else 0)
                print(port, flush=True)

        trio.run(run)
    else:
        raise SystemExit(
            "usage: python -m testkit.hardening normal-client|silent-holder|echo-upstream"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
