"""Stopping the child processes the tests, benchmarks and fuzzers start: one way, everywhere.

``stop_process`` asks first (SIGTERM, or SIGTERM to the process group for a child started with
``start_new_session=True`` that has children of its own) and kills what is still there after
``grace`` seconds; ``kill_process`` kills at once (a crash, or a process whose shutdown is not
what is being tested). Both reap the child, ignore one that already exited or was never started,
and are safe to call twice, so every ``finally`` can call them unconditionally.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from types import TracebackType
from typing import Any, Self


def _signal(proc: subprocess.Popen[Any], sig: signal.Signals, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            # The leader may have exited already while its children live on: signal the group.
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)


def stop_process(
    proc: subprocess.Popen[Any] | None, *, grace: float = 5.0, group: bool = False
) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the child is reaped when this returns."""
    if proc is None or (proc.poll() is not None and not group):
        return
    _signal(proc, signal.SIGTERM, group)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL, group)
        proc.wait(timeout=30)


def kill_process(proc: subprocess.Popen[Any] | None, *, group: bool = False) -> None:
    """SIGKILL now; the child is reaped when this returns."""
    if proc is None or (proc.poll() is not None and not group):
        return
    _signal(proc, signal.SIGKILL, group)
    proc.wait(timeout=30)


class StopsOnExit:
    """A started server used as a context manager: leaving the block calls its ``stop()``."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
