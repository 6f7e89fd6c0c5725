"""``[server] workers = 2``: a real supervisor with two real worker processes sharing one port.

Each scenario runs ``python -m edgeproxy run`` with JSON logs, so the story can be read back
from the log: which worker (pid) served each connection, who died, who restarted, who reloaded.
Clients are Python ``ssl`` (through ``trio.SSLStream``) verifying against the internal CA;
upstreams are tiny trio servers in the test's nursery.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.errors import ConfigError, config_errors
from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.file import FileStorage
from edgeproxy.workers import describe_exit, restart_delay
from testkit.ports import free_port
from testkit.procs import kill_process
from testkit.upstreams import Handler, http_handler, read_http_head, start_upstream

T = TypeVar("T")
Record = dict[str, Any]

NAME = "shop.example.test"
SLOW_NAME = "slow.example.test"
#: Upper bounds only, so a broken build fails instead of hanging; nothing is timed.
LOG_WAIT = 20.0
EXIT_WAIT = 30.0
FETCH_TIMEOUT = 15.0


def write_config(
    path: Path,
    *,
    port: int,
    admin_port: int,
    state: Path,
    default_upstream: str,
    slow_upstream: str | None = None,
    drain_timeout: float = 20,
    extra: str = "",
) -> None:
    slow_route = (
        f'[[routes]]\nsni = ["{SLOW_NAME}"]\nupstreams = ["{slow_upstream}"]\n'
        if slow_upstream
        else ""
    )
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 2
drain_timeout = {drain_timeout}
handshake_timeout = 10

[admin]
listen = "127.0.0.1:{admin_port}"

[tls]
issuer = "internal"
default_sni = "default.example.test"

[on_demand]
allow = ["*.example.test"]

[storage]
backend = "file"
path = "{state}"

[log]
format = "json"

{slow_route}
[[routes]]
sni = ["*"]
default = true
upstreams = ["{default_upstream}"]
{extra}
""")


@dataclass
class Supervised:
    """A running ``edgeproxy run`` with ``workers = 2`` and what it logged so far."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    admin_port: int
    seen_pids: set[int] = field(default_factory=set)

    def records(self) -> list[Record]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # tracebacks, or a worker's config errors before logging is set up
            if isinstance(rec, dict):
                out.append(rec)
        for rec in out:
            if rec.get("logger") == "edgeproxy.workers" and isinstance(rec.get("pid"), int):
                self.seen_pids.add(rec["pid"])
        return out

    async def wait_for(self, what: str, found: Callable[[list[Record]], T | None]) -> T:
        with trio.move_on_after(LOG_WAIT):
            while True:
                result = found(self.records())
                if result is not None:
                    return result
                if self.proc.poll() is not None:
                    break
                await trio.sleep(0.05)
        result = found(self.records())
        if result is not None:
            return result
        tail = self.log_path.read_text(errors="replace")[-4000:]
        raise AssertionError(f"never saw {what} (exit code {self.proc.poll()}); log:\n{tail}")

    async def wait_ready(self, times: int = 1) -> dict[int, int]:
        """Wait for the ``times``-th "2 workers ready"; the current pid of each worker index."""
        await self.wait_for(
            '"2 workers ready"',
            lambda recs: True if len(messages(recs, "2 workers ready")) >= times else None,
        )
        return self.worker_pids()

    def worker_pids(self) -> dict[int, int]:
        pids = {}
        for rec in self.records():
            if rec.get("logger") == "edgeproxy.workers" and " started (pid " in rec["msg"]:
                pids[rec["worker"]] = rec["pid"]
        return pids

    async def wait_exit(self) -> int:
        return await trio.to_thread.run_sync(partial(self.proc.wait, timeout=EXIT_WAIT))


def messages(records: list[Record], text: str, logger: str | None = None) -> list[Record]:
    return [
        r
        for r in records
        if text in r.get("msg", "") and (logger is None or r.get("logger") == logger)
    ]


def access_records(records: list[Record]) -> list[Record]:
    return [r for r in records if r.get("logger") == "edgeproxy.access"]


def _is_worker(pid: int) -> bool:
    try:
        return b"edgeproxy.workers" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


Supervise = Callable[[Path, int, int], Supervised]


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Supervise]:
    """``supervise(config_path, port, admin_port)`` starts ``edgeproxy run``; everything it
    started is stopped at teardown, pass or fail: the supervisor gets SIGTERM then SIGKILL, any
    worker left over SIGKILL."""
    started: list[Supervised] = []

    def start(config_path: Path, port: int, admin_port: int) -> Supervised:
        log_path = tmp_path / f"supervisor-{len(started)}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeproxy", "run", "-c", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        sup = Supervised(proc, log_path, port, admin_port)
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in started:
            sup.records()  # collect every worker pid it logged
            if sup.proc.poll() is None:
                sup.proc.send_signal(signal.SIGTERM)
                try:
                    sup.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    kill_process(sup.proc)
            for pid in sup.seen_pids:
                if _is_worker(pid):
                    os.kill(pid, signal.SIGKILL)


async def ca_context(state: Path) -> ssl.SSLContext:
    """Create the internal CA in the shared storage first, so every worker signs with it."""
    storage = FileStorage(state)
    try:
        pem = await InternalIssuer(storage).ca_certificate_pem()
    finally:
        await storage.aclose()
    return ssl.create_default_context(cadata=pem.decode())


async def fetch(port: int, name: str, ctx: ssl.SSLContext) -> bytes:
    """One HTTPS request over a fresh connection; the response body."""
    with trio.fail_after(FETCH_TIMEOUT):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(tcp, ctx, server_hostname=name, https_compatible=True)
        async with tls:
            request = f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
            await tls.send_all(request.encode())
            data = b""
            while chunk := await tls.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:200]
    return body


async def scrape(admin_port: int) -> dict[str, float]:
    """The admin ``/metrics`` as ``{'name{label=value}': value}``, over a fresh connection."""
    async with httpx.AsyncClient(timeout=10) as client:
        res = await client.get(f"http://127.0.0.1:{admin_port}/metrics")
    res.raise_for_status()
    out = {}
    for family in text_string_to_metric_families(res.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class ClientLoop:
    """Sequential HTTPS requests until stopped, counting answers and failures."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.ctx = port, ctx
        self.ok = 0
        self.failures: list[str] = []
        self._stop, self._stopped = trio.Event(), trio.Event()
        self._target, self._reached = 0, trio.Event()

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    assert await fetch(self.port, NAME, self.ctx) == b"from A\n"
                    self.ok += 1
                except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                    self.failures.append(repr(exc))
                if self.ok >= self._target:
                    self._reached.set()
        finally:
            self._stopped.set()

    async def successes_reach(self, n: int) -> None:
        self._target, self._reached = n, trio.Event()
        if self.ok < n:
            with trio.fail_after(LOG_WAIT):
                await self._reached.wait()

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()


def holding_handler(arrived: trio.Event, release: trio.Event, body: bytes) -> Handler:
    """Answers only once ``release`` is set: a connection still in flight at SIGTERM."""

    async def handle(stream: trio.SocketStream) -> None:
        await read_http_head(stream)
        arrived.set()
        await release.wait()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    return handle


# ---------------------------------------------------------------------- scenarios


async def test_two_workers_share_the_port_and_admin_metrics_are_their_sum(
    tmp_path: Path, nursery: trio.Nursery, supervise: Supervise
) -> None:
    up = await start_upstream(nursery, http_handler(b"from A\n"))
    config = tmp_path / "edgeproxy.toml"
    state = tmp_path / "state"
    port, admin_port = free_port(), free_port()
    write_config(config, port=port, admin_port=admin_port, state=state, default_upstream=up.addr)
    ctx = await ca_context(state)
    sup = supervise(config, port, admin_port)
    pids = await sup.wait_ready()
    assert len(set(pids.values())) == 2

    connections = 40
    for _ in range(connections):
        assert await fetch(sup.port, NAME, ctx) == b"from A\n"

    served = await sup.wait_for(
        f"{connections} access log lines",
        lambda recs: acc if len(acc := access_records(recs)) >= connections else None,
    )
    per_worker = Counter(r["pid"] for r in served)
    # The kernel spread the connections over both workers (all 40 on one: p = 2**-39).
    assert set(per_worker) == set(pids.values()), per_worker
    assert sum(per_worker.values()) == connections

    # Every admin request lands on either worker; each answers with the sum of both.
    for _ in range(6):
        metrics = await scrape(sup.admin_port)
        assert metrics["edgeproxy_connections_accepted_total"] == connections
        assert metrics["edgeproxy_connections_closed_total{reason=ok}"] == connections
        assert metrics["edgeproxy_connections_active"] == 0


async def test_kill_9_worker_is_restarted_and_service_keeps_answering(
    tmp_path: Path, nursery: trio.Nursery, supervise: Supervise
) -> None:
    up = await start_upstream(nursery, http_handler(b"from A\n"))
    config = tmp_path / "edgeproxy.toml"
    state = tmp_path / "state"
    port, admin_port = free_port(), free_port()
    write_config(config, port=port, admin_port=admin_port, state=state, default_upstream=up.addr)
    ctx = await ca_context(state)
    sup = supervise(config, port, admin_port)
    victim = (await sup.wait_ready())[0]

    clients = ClientLoop(sup.port, ctx)
    nursery.start_soon(clients.run)
    await clients.successes_reach(10)
    os.kill(victim, signal.SIGKILL)

    death = await sup.wait_for(
        "the supervisor noticing the death",
        lambda recs: next(
            (r for r in recs if r.get("pid") == victim and "killed" in r["msg"]), None
        ),
    )
    assert death["logger"] == "edgeproxy.workers"
    assert death["msg"].startswith("worker 0 (pid ") and "killed by SIGKILL" in death["msg"]
    assert death["exit_code"] == -signal.SIGKILL and "restarting in" in death["msg"]
    pids = await sup.wait_ready(times=2)
    replacement = pids[0]
    assert replacement != victim and _is_worker(replacement)
    await clients.successes_reach(clients.ok + 30)
    await clients.stop()

    # At most the one connection in flight on the killed worker may fail.
    ok, failures = clients.ok, clients.failures
    assert len(failures) <= 1, failures
    served_by = Counter(r["pid"] for r in access_records(sup.records()))
    assert served_by[victim] > 0 and served_by[replacement] > 0, served_by
    # The dead worker's counters survive it: every answered connection is still counted.
    accepted = (await scrape(sup.admin_port))["edgeproxy_connections_accepted_total"]
    assert ok <= accepted <= ok + len(failures)


async def test_sighup_reloads_every_worker_and_sigterm_drains_then_exits_0(
    tmp_path: Path, nursery: trio.Nursery, supervise: Supervise
) -> None:
    up_a = await start_upstream(nursery, http_handler(b"from A\n"))
    up_b = await start_upstream(nursery, http_handler(b"from B\n"))
    arrived, release = trio.Event(), trio.Event()
    slow = await start_upstream(nursery, holding_handler(arrived, release, b"held reply\n"))
    config = tmp_path / "edgeproxy.toml"
    state = tmp_path / "state"
    settings: dict[str, Any] = dict(
        port=free_port(), admin_port=free_port(), state=state, slow_upstream=slow.addr
    )
    write_config(config, default_upstream=up_a.addr, **settings)
    ctx = await ca_context(state)
    sup = supervise(config, settings["port"], settings["admin_port"])
    pids = set((await sup.wait_ready()).values())
    assert await fetch(sup.port, NAME, ctx) == b"from A\n"

    # A route change: after SIGHUP to the supervisor, both workers reload it.
    write_config(config, default_upstream=up_b.addr, **settings)
    os.kill(sup.proc.pid, signal.SIGHUP)
    reloaded = await sup.wait_for(
        "both workers reloading",
        lambda recs: r if len(r := messages(recs, "config reloaded from")) >= 2 else None,
    )
    assert {r["pid"] for r in reloaded} == pids
    for _ in range(20):  # new connections reach either worker: all see the new route
        assert await fetch(sup.port, NAME, ctx) == b"from B\n"

    # An invalid config is rejected by each worker, which keeps serving the running one.
    config.write_text(config.read_text().replace("[[routes]]", "[[routes]]\nsni = 42", 1))
    os.kill(sup.proc.pid, signal.SIGHUP)
    rejected = await sup.wait_for(
        "both workers rejecting the reload",
        lambda recs: r if len(r := messages(recs, "reload rejected")) >= 2 else None,
    )
    assert {r["pid"] for r in rejected} == pids
    for _ in range(6):
        assert await fetch(sup.port, NAME, ctx) == b"from B\n"

    # SIGTERM with a connection in flight: the workers drain, the supervisor waits for them.
    held: list[bytes] = []

    async def held_request() -> None:
        held.append(await fetch(sup.port, SLOW_NAME, ctx))

    nursery.start_soon(held_request)
    with trio.fail_after(15):
        await arrived.wait()
    os.kill(sup.proc.pid, signal.SIGTERM)
    await sup.wait_for(
        "both workers draining",
        lambda recs: True if len(messages(recs, "draining (up to")) >= 2 else None,
    )
    assert sup.proc.poll() is None  # the held connection keeps its worker, hence us, alive
    release.set()
    assert await sup.wait_exit() == 0
    assert held == [b"held reply\n"]
    records = sup.records()
    assert messages(records, "all workers stopped", logger="edgeproxy.workers")
    exits = messages(records, "exited with code 0", logger="edgeproxy.workers")
    assert {r["pid"] for r in exits} == pids
    assert not any(_is_worker(pid) for pid in pids)


@pytest.mark.parametrize("how", ["deadline", "second SIGTERM"])
async def test_a_hung_worker_is_killed_at_stop_and_the_exit_code_says_so(
    tmp_path: Path, nursery: trio.Nursery, supervise: Supervise, how: str
) -> None:
    up = await start_upstream(nursery, http_handler(b"from A\n"))
    config = tmp_path / "edgeproxy.toml"
    port, admin_port = free_port(), free_port()
    # drain_timeout 0: the deadline is SHUTDOWN_GRACE (5 s) after SIGTERM.
    write_config(
        config,
        port=port,
        admin_port=admin_port,
        state=tmp_path / "state",
        default_upstream=up.addr,
        drain_timeout=0,
    )
    sup = supervise(config, port, admin_port)
    pids = await sup.wait_ready()
    hung, healthy = pids[0], pids[1]
    os.kill(hung, signal.SIGSTOP)  # it cannot act on SIGTERM any more, only die of SIGKILL
    os.kill(sup.proc.pid, signal.SIGTERM)
    await sup.wait_for(
        "the healthy worker stopping",
        lambda recs: True if messages(recs, f"(pid {healthy}) exited with code 0") else None,
    )
    if how == "second SIGTERM":
        os.kill(sup.proc.pid, signal.SIGTERM)
    assert await sup.wait_exit() == 1
    records = sup.records()
    expected = "again: killing workers now" if how == "second SIGTERM" else "killing them"
    assert messages(records, expected, logger="edgeproxy.workers")
    assert messages(records, f"(pid {hung}) killed by SIGKILL", logger="edgeproxy.workers")
    assert not _is_worker(hung)


async def test_a_worker_that_cannot_start_stops_the_supervisor_with_exit_2(
    tmp_path: Path, nursery: trio.Nursery, supervise: Supervise
) -> None:
    # The file exists (so the config validates) but is no certificate: each worker fails in
    # startup with a config error, and restarting it would fail the same way forever.
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = tmp_path / "edgeproxy.toml"
    port, admin_port = free_port(), free_port()
    write_config(
        config,
        port=port,
        admin_port=admin_port,
        state=tmp_path / "state",
        default_upstream="127.0.0.1:9",
        extra=f'\n[[certificates]]\ncert = "{garbage}"\nkey = "{garbage}"\n',
    )
    sup = supervise(config, port, admin_port)
    assert await sup.wait_exit() == 2
    records = sup.records()
    assert messages(records, "could not start", logger="edgeproxy.workers")
    assert not messages(records, "restarting in")
    assert not any(_is_worker(pid) for pid in sup.seen_pids)


@pytest.mark.parametrize("problem", ["port 0", "port taken"])
async def test_unshareable_listen_address_is_refused_before_any_worker_starts(
    tmp_path: Path, problem: str
) -> None:
    config = tmp_path / "edgeproxy.toml"
    with trio.socket.socket() as blocker:
        port = 0
        if problem == "port taken":
            await blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            port = blocker.getsockname()[1]
        write_config(
            config,
            port=port,
            admin_port=free_port(),
            state=tmp_path / "state",
            default_upstream="127.0.0.1:9",
        )
        with trio.fail_after(30):
            res = await trio.run_process(
                [sys.executable, "-m", "edgeproxy", "run", "-c", str(config)],
                capture_stderr=True,
                check=False,
            )
    assert res.returncode == 2
    err = res.stderr.decode()
    assert "server.listen:" in err
    assert ("port 0" if problem == "port 0" else "cannot listen on") in err
    assert "worker 0 started" not in err


def test_restart_backoff_doubles_to_a_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert delays[-1] == 30.0 and max(delays) == 30.0
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert restart_delay(10_000) == 30.0


def test_config_errors_found_inside_exception_groups_still_count_as_config_errors() -> None:
    one, two = ConfigError(["admin.listen: a"]), ConfigError(["server.listen: b"])
    assert config_errors(one) == [one]
    assert config_errors(ExceptionGroup("nursery", [one, ExceptionGroup("inner", [two])])) == [
        one,
        two,
    ]
    assert config_errors(ExceptionGroup("nursery", [one, ValueError("bug")])) is None
    assert config_errors(ValueError("bug")) is None


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
