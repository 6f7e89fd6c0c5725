"""The processes a benchmark starts: pinned to a CPU, always stopped, measured from /proc.

Owns: starting a command under ``taskset -c CPU`` (and ``setpriv --pdeathsig KILL`` where
available, so a harness killed with SIGKILL takes its servers with it), waiting until it
listens, stopping it together with everything it forked, and reading a process tree's CPU
seconds and resident memory. Must not know which program it runs or what is being measured.

CPU seconds are ``utime + stime`` of every live process in the tree (a process's figures
already include all its threads) plus ``cutime + cstime`` of each, which covers children that
exited and were reaped: every CPU tick is counted exactly once. Read before and after a run,
the difference is what the server spent on that run.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "CLK_TCK",
    "ProcessStartError",
    "Server",
    "Supervisor",
    "pin_self",
    "raise_nofile_limit",
    "tree_cpu_seconds",
    "tree_pids",
    "tree_rss_kib",
    "wait_tcp",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcessStartError(RuntimeError):
    """A server did not come up; the message carries the end of its log."""


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant, parents before children."""
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # Fields 14-17 of proc(5), counted from 1; ``fields`` starts at field 3.
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def tree_rss_kib(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one (children inherit it); return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pin_self(cpu: int | None) -> None:
    """Pin this process (and so what it starts without its own pinning) to ``cpu``."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


@dataclass
class Server:
    """A started program; ``pid`` is the program itself (taskset and setpriv exec into it)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return tree_rss_kib(self.pid)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the whole tree, SIGKILL to what is left after ``grace`` seconds."""
        if self.popen.poll() is not None:
            return
        pids = tree_pids(self.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


@dataclass
class Supervisor:
    """Starts servers and stops every one of them on exit, in reverse order, even on error."""

    workdir: Path
    started: list[Server] = field(default_factory=list)
    _pdeathsig: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if shutil.which("setpriv"):
            self._pdeathsig = ["setpriv", "--pdeathsig", "KILL", "--"]

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        cwd: Path | None = None,
        start_timeout: float = 20.0,
    ) -> Server:
        """Run ``argv`` pinned to ``cpu``; when ``port`` is given, return once it accepts."""
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                [*self._pdeathsig, *pin, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        server = Server(name, popen, log_path, port)
        self.started.append(server)
        if port is not None and not wait_tcp("127.0.0.1", port, popen, start_timeout):
            self.stop(server)
            raise ProcessStartError(
                f"{name} did not start listening on {port}:\n{server.log_tail()}"
            )
        return server

    def stop(self, server: Server) -> None:
        try:
            server.stop()
        finally:
            if server in self.started:
                self.started.remove(server)

    @contextlib.contextmanager
    def running(self, server: Server) -> Iterator[Server]:
        try:
            yield server
        finally:
            self.stop(server)

    def close(self) -> None:
        while self.started:
            server = self.started[-1]
            with contextlib.suppress(Exception):
                self.stop(server)
            if server in self.started:
                self.started.remove(server)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
