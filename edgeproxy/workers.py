"""Multi-process mode (``[server] workers = N``): a supervisor and its worker processes.

Owns the lifecycle of the worker processes: spawning N copies of a single-process edgeproxy
that share the listening ports with SO_REUSEPORT, restarting a dead one with backoff,
forwarding SIGTERM/SIGINT (drain) and SIGHUP (reload), reaping every child (it may run as
PID 1 in a container), and the Prometheus multiprocess directory through which any worker's
``/metrics`` reports the sum of all of them. It must not know what a worker does inside:
``app.run_process`` is the whole of it.

Theory of operation
-------------------
*Sharing the port.* Each worker binds its own listening sockets with SO_REUSEPORT, so each has
its own accept queue and the kernel spreads new connections by a hash of the 4-tuple. A single
socket bound here and inherited by all would wake every worker for every connection and let
the busiest one win. The price: connections queued on a worker but not yet accepted are reset
when it dies, and port 0 cannot be shared (each worker would get its own random port), so
port 0 is refused. Before spawning, the supervisor probe-binds each address *without*
SO_REUSEPORT: if something already listens there (say, an edgeproxy that never stopped), that
fails loudly instead of the new workers silently joining the old ones' group.

*Reaping.* The supervisor is the only waiter for its children: on SIGCHLD it calls
``waitpid(-1)`` until nothing is left to reap, which collects its workers and, when it runs as
PID 1, the orphans the kernel re-parents to it. That is why workers are started with
``os.posix_spawn`` rather than ``subprocess`` or ``trio.Process``, which each wait on their own
pid and would race with that loop.

*Readiness.* Each worker inherits the write end of a pipe and writes one byte from
``run_process``'s ``on_ready``: its listeners accept and its signal handlers are installed.
Hence SIGHUP goes only to ready workers; one still starting gets it the moment it reports ready
(it may have read the config file before the change). SIGTERM goes to every worker: one that
dies of it before installing its handlers had accepted nothing, so that counts as a clean stop.

*Process groups and orphans.* Workers run in their own process groups, so Ctrl-C in a terminal
reaches only the supervisor, which turns it into one SIGTERM per worker (a worker draining must
not be hit by a second, default-action signal). Each worker asks the kernel for SIGTERM when
the supervisor dies (``PR_SET_PDEATHSIG``): a supervisor killed outright must not leave workers
holding the port with nobody to restart or stop them.

*Metrics.* A fresh directory, named only in the workers' environment, holds one file per
worker and metric type. Counters of dead workers stay, so the totals never go backwards when a
worker is replaced; ``mark_process_dead`` drops a dead worker's live gauges.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from prometheus_client.multiprocess import mark_process_dead

from .addresses import HostPort, bound_socket, parse_hostport
from .config import Config, load_config
from .errors import ConfigError, EdgeproxyError, config_errors

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("edgeproxy.workers")

#: Environment of a worker: its index, the pipe fd to report readiness on, its supervisor.
WORKER_ENV = "EDGEPROXY_WORKER"
READY_FD_ENV = "EDGEPROXY_READY_FD"
SUPERVISOR_ENV = "EDGEPROXY_SUPERVISOR_PID"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Run as ``python -m WORKER_MODULE CONFIG``: the worker entry point below, not a CLI command.
WORKER_MODULE = "edgeproxy.workers"

#: First restart delay after a death; doubles with each consecutive death up to the cap.
RESTART_DELAY_BASE = 0.5
RESTART_DELAY_MAX = 30.0
#: A worker that lived this long before dying starts the backoff over.
STABLE_UPTIME = 60.0
#: Added to ``server.drain_timeout``: a worker also closes its admin API and storage on exit.
SHUTDOWN_GRACE = 5.0
#: How long SIGKILLed stragglers get to be reaped before the supervisor gives up on them.
KILL_WAIT = 5.0

#: The exit code of a worker that could not start with this config (as ``edgeproxy run``).
EXIT_CONFIG = 2

_PR_SET_PDEATHSIG = 1
_READY = b"R"


def worker_count(cfg: Config) -> int:
    """``server.workers``, where 0 means one per CPU."""
    return cfg.server.workers or os.cpu_count() or 1


def restart_delay(consecutive_deaths: int) -> float:
    """Seconds to wait before restarting a worker that died ``consecutive_deaths`` (>= 1) times
    in a row without staying up ``STABLE_UPTIME``: 0.5, 1, 2, ... capped at 30."""
    exponent = min(max(consecutive_deaths, 1) - 1, 16)
    return min(RESTART_DELAY_MAX, RESTART_DELAY_BASE * 2.0**exponent)


def describe_exit(code: int) -> str:
    """An ``os.waitstatus_to_exitcode`` value in words, e.g. "killed by SIGKILL"."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def preflight(cfg: Config, workers: int) -> list[str]:
    """Problems that would make every worker fail to listen, each naming the key and the fix."""
    addresses = [("server.listen", hp) for hp in cfg.server.listen_addresses()]
    if cfg.admin.listen:
        addresses.append(("admin.listen", parse_hostport(cfg.admin.listen, what="")))
    problems = []
    for key, hp in addresses:
        if hp.port == 0:
            if workers > 1:
                problems.append(
                    f"{key}: port 0 would give each of the {workers} workers its own random "
                    "port (choose a fixed port, or set server.workers = 1)"
                )
            continue
        error = _probe_bind(hp)
        if error is not None:
            problems.append(
                f"{key}: cannot listen on {hp} ({error}) (stop whatever listens there, "
                "perhaps an edgeproxy still running, or change the port)"
            )
    return problems


def _probe_bind(hp: HostPort) -> str | None:
    try:
        bound_socket(hp).close()  # without SO_REUSEPORT: any listener there fails us
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


# ---------------------------------------------------------------------- the supervisor


def run_supervisor(cfg: Config, config_path: Path) -> int:
    """Run ``server.workers`` worker processes until SIGTERM/SIGINT; the process exit code.

    0 when every worker drained and exited cleanly, 1 when one had to be killed or failed to
    stop cleanly, 2 when the config cannot work with workers or a worker could not start with
    it.
    """
    workers = worker_count(cfg)
    problems = preflight(cfg, workers)
    if problems:
        for problem in problems:
            log.error("%s", problem)
        return EXIT_CONFIG
    metrics_dir = Path(tempfile.mkdtemp(prefix="edgeproxy-metrics-"))
    try:
        supervisor = Supervisor(cfg, config_path.resolve(), workers, metrics_dir)
        return trio.run(supervisor.run)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@dataclass
class WorkerSlot:
    """One of the N worker positions; its process changes on every restart."""

    index: int
    pid: int | None = None
    started_at: float = 0.0
    ready: bool = False
    hup_pending: bool = False
    consecutive_deaths: int = 0
    told_to_stop: bool = False
    exit_code: int | None = None
    restart_scope: trio.CancelScope | None = None


class Supervisor:
    def __init__(self, cfg: Config, config_path: Path, workers: int, metrics_dir: Path) -> None:
        self.config_path = config_path
        self.metrics_dir = metrics_dir
        self.drain_timeout = cfg.server.drain_timeout
        self.slots = [WorkerSlot(i) for i in range(workers)]
        self.stopping = False
        self._by_pid: dict[int, WorkerSlot] = {}
        self._all_ready_announced = False
        self._ever_all_ready = False
        self._fatal: int | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self) -> int:
        # The receiver exists before the first spawn, so no child's exit can go unnoticed.
        with trio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD
        ) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                log.info(
                    "starting %d workers (config %s, metrics in %s)",
                    len(self.slots),
                    self.config_path,
                    self.metrics_dir,
                )
                for slot in self.slots:
                    self._spawn(slot)
                await self._supervise(signals)
                code = await self._stop(signals)
                nursery.cancel_scope.cancel()
        return code

    async def _supervise(self, signals: AsyncIterator[int]) -> None:
        """Until a stop signal or a worker that cannot start: reap, restart, forward SIGHUP."""
        async for signum in signals:
            if signum == signal.SIGCHLD:
                self._reap()
                if self._fatal is not None:
                    return
            elif signum == signal.SIGHUP:
                self._forward_reload()
            else:
                log.info(
                    "received %s: stopping %d workers (drain up to %.0fs)",
                    signal.Signals(signum).name,
                    self._alive(),
                    self.drain_timeout,
                )
                return

    async def _stop(self, signals: AsyncIterator[int]) -> int:
        self.stopping = True
        for slot in self.slots:
            if slot.restart_scope is not None:
                slot.restart_scope.cancel()
        self._signal_all(signal.SIGTERM, mark_stopping=True)
        with trio.move_on_after(self.drain_timeout + SHUTDOWN_GRACE):
            await self._wait_all_exited(signals)
        if self._alive():
            log.warning(
                "%d workers still running %.0fs after SIGTERM: killing them",
                self._alive(),
                self.drain_timeout + SHUTDOWN_GRACE,
            )
            self._signal_all(signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT):
                await self._wait_all_exited(signals)
            if self._alive():
                log.error("%d workers did not die after SIGKILL; giving up", self._alive())
        if self._fatal is not None:
            return self._fatal
        clean = (0, -signal.SIGTERM)
        stopped = [s for s in self.slots if s.told_to_stop]
        unclean = [s for s in stopped if s.pid is not None or s.exit_code not in clean]
        if unclean:
            log.warning("%d of %d workers did not stop cleanly", len(unclean), len(stopped))
            return 1
        log.info("all workers stopped")
        return 0

    async def _wait_all_exited(self, signals: AsyncIterator[int]) -> None:
        self._reap()
        if not self._alive():
            return
        async for signum in signals:
            if signum == signal.SIGCHLD:
                self._reap()
                if not self._alive():
                    return
            elif signum in (signal.SIGTERM, signal.SIGINT):
                # Asked twice: whoever asks does not want to wait for the drain.
                log.warning("received %s again: killing workers now", signal.Signals(signum).name)
                self._signal_all(signal.SIGKILL)

    # ------------------------------------------------------------------ processes

    def _spawn(self, slot: WorkerSlot) -> None:
        assert self._nursery is not None
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        env = {
            **os.environ,
            WORKER_ENV: str(slot.index),
            READY_FD_ENV: str(write_fd),
            SUPERVISOR_ENV: str(os.getpid()),
            MULTIPROC_ENV: str(self.metrics_dir),
        }
        argv = [sys.executable, "-m", WORKER_MODULE, str(self.config_path)]
        try:
            pid = os.posix_spawn(
                sys.executable,
                argv,
                env,
                setpgroup=0,
                setsigmask=(),
                setsigdef=(
                    signal.SIGTERM,
                    signal.SIGINT,
                    signal.SIGHUP,
                    signal.SIGCHLD,
                    signal.SIGPIPE,
                ),
            )
        except OSError as exc:
            os.close(read_fd)
            slot.consecutive_deaths += 1
            log.error(
                "worker %d: cannot start %s: %s",
                slot.index,
                sys.executable,
                exc,
                extra={"worker": slot.index},
            )
            self._schedule_restart(slot)
            return
        finally:
            os.close(write_fd)
        slot.pid = pid
        slot.started_at = trio.current_time()
        slot.ready = False
        slot.told_to_stop = False
        self._by_pid[pid] = slot
        log.info(
            "worker %d started (pid %d)", slot.index, pid, extra={"worker": slot.index, "pid": pid}
        )
        self._nursery.start_soon(self._watch_ready, slot, pid, read_fd)

    async def _watch_ready(self, slot: WorkerSlot, pid: int, read_fd: int) -> None:
        async with trio.lowlevel.FdStream(read_fd) as pipe:
            data = await pipe.receive_some(16)
        if data != _READY or slot.pid != pid:
            return  # died first: the SIGCHLD path reports it
        slot.ready = True
        log.info(
            "worker %d ready (pid %d)", slot.index, pid, extra={"worker": slot.index, "pid": pid}
        )
        if slot.hup_pending and not self.stopping:
            slot.hup_pending = False
            self._kill(pid, signal.SIGHUP)
        if not self._all_ready_announced and all(s.ready for s in self.slots):
            self._all_ready_announced = True
            self._ever_all_ready = True
            log.info("%d workers ready", len(self.slots))

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self._by_pid.pop(pid, None)
            if slot is None:
                log.debug("reaped orphaned process %d", pid)
                continue
            self._worker_exited(slot, pid, os.waitstatus_to_exitcode(status))

    def _worker_exited(self, slot: WorkerSlot, pid: int, code: int) -> None:
        with suppress(OSError):
            mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        uptime = trio.current_time() - slot.started_at
        was_ready = slot.ready
        slot.pid, slot.ready, slot.exit_code = None, False, code
        fields = {"worker": slot.index, "pid": pid, "exit_code": code}
        if self.stopping:
            log.info("worker %d (pid %d) %s", slot.index, pid, describe_exit(code), extra=fields)
            return
        self._all_ready_announced = False
        if code == EXIT_CONFIG and not was_ready and not self._ever_all_ready:
            # It would fail the same way again: the config or an address is unusable.
            log.error(
                "worker %d (pid %d) could not start (exit code %d, see its error above); "
                "stopping all",
                slot.index,
                pid,
                code,
                extra=fields,
            )
            self._fatal = EXIT_CONFIG
            return
        slot.consecutive_deaths = 1 if uptime >= STABLE_UPTIME else slot.consecutive_deaths + 1
        log.warning(
            "worker %d (pid %d) %s after %.1fs; restarting in %.1fs",
            slot.index,
            pid,
            describe_exit(code),
            uptime,
            restart_delay(slot.consecutive_deaths),
            extra=fields,
        )
        self._schedule_restart(slot)

    def _schedule_restart(self, slot: WorkerSlot) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._restart_later, slot, restart_delay(slot.consecutive_deaths))

    async def _restart_later(self, slot: WorkerSlot, delay: float) -> None:
        slot.restart_scope = scope = trio.CancelScope()
        with scope:
            await trio.sleep(delay)
            if not self.stopping:
                self._spawn(slot)
        slot.restart_scope = None

    def _forward_reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError:
            pass  # every worker rejects it too and logs why
        else:
            self.drain_timeout = new.server.drain_timeout
            if worker_count(new) != len(self.slots):
                log.warning("server.workers changed: takes effect when edgeproxy restarts")
        forwarded = 0
        for slot in self.slots:
            if slot.pid is None:
                continue  # a pending restart reads the file afresh
            if slot.ready:
                self._kill(slot.pid, signal.SIGHUP)
                forwarded += 1
            else:
                slot.hup_pending = True
        log.info("received SIGHUP: reload forwarded to %d workers", forwarded)

    def _signal_all(self, signum: int, *, mark_stopping: bool = False) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                slot.told_to_stop = slot.told_to_stop or mark_stopping
                self._kill(slot.pid, signum)

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        # An exited but unreaped child is a zombie and still takes signals; this is for races.
        with suppress(ProcessLookupError):
            os.kill(pid, signum)

    def _alive(self) -> int:
        return sum(1 for s in self.slots if s.pid is not None)


# ---------------------------------------------------------------------- a worker


def worker_main(config_path: Path) -> int:
    """One worker process: ``run_process`` with shared ports; the process exit code."""
    index_text = os.environ.get(WORKER_ENV, "")
    index = int(index_text) if index_text.isdigit() else None
    if not _stop_with_supervisor():
        print(f"edgeproxy worker {index}: supervisor already gone; exiting", file=sys.stderr)
        return 1
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        print(f"{config_path}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG

    from .app import raise_fd_limit, run_process, tune_gc_for_serving
    from .logs import setup_logging

    setup_logging(cfg.log.format, cfg.log.level)
    tag = _WorkerTag(index)
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    tune_gc_for_serving()
    raise_fd_limit(cfg.server.max_handshakes)
    try:
        trio.run(
            partial(
                run_process,
                cfg,
                config_path=config_path,
                reuse_port=True,
                on_ready=_ready_notifier(),
            )
        )
    except (ConfigError, BaseExceptionGroup) as exc:
        errors = config_errors(exc)
        if errors is None:
            raise
        problems = [p for e in errors for p in e.problems]
        log.error("cannot start:\n  %s", "\n  ".join(problems))
        return EXIT_CONFIG
    except EdgeproxyError as exc:
        log.error("stopped: %s", exc)
        return 1
    return 0


class _WorkerTag(logging.Filter):
    """Puts ``worker`` and ``pid`` on every record, so JSON logs say which worker wrote them."""

    def __init__(self, index: int | None) -> None:
        super().__init__()
        self.index = index
        self.pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        record.pid = self.pid
        return True


def _ready_notifier() -> Callable[[Runtime], Awaitable[None]]:
    fd_text = os.environ.get(READY_FD_ENV)

    async def notify(rt: Runtime) -> None:
        if fd_text is None:
            return
        fd = int(fd_text)
        try:
            os.write(fd, _READY)
        except OSError as exc:
            log.warning("cannot tell the supervisor this worker is ready: %s", exc)
        finally:
            with suppress(OSError):
                os.close(fd)

    return notify


def _stop_with_supervisor() -> bool:
    """Ask for SIGTERM when the supervisor dies; False if it is already gone (Linux only)."""
    expected = os.environ.get(SUPERVISOR_ENV)
    if expected is None or not sys.platform.startswith("linux"):
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return True
    except (OSError, AttributeError):
        return True
    # The supervisor may have died between spawning us and the prctl: then nobody signals us.
    return os.getppid() == int(expected)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m edgeproxy.workers CONFIG (started by the supervisor)")
        sys.exit(EXIT_CONFIG)
    sys.exit(worker_main(Path(sys.argv[1])))
