"""Progress of long commands, and Ctrl-C that stops them between steps.

Owns how a command that works through many items (``hostnames import``) shows how far it got:
a tqdm bar when stderr is a terminal, otherwise one plain line every ``PLAIN_INTERVAL``
seconds (``$EDGEPROXY_PROGRESS_INTERVAL``; logs and CI output stay readable, no carriage
returns), and a last line at the end if there was any (a short run prints none).
Commands report whole steps (``advance``): a bar never claims work that is not stored yet.

``stop_requests`` turns SIGINT into a request the command checks between steps, so Ctrl-C
never interrupts a step halfway (a storage batch is written whole or not at all) and the
command can say how far it got. ``run_steps`` is the loop every such command shares: one
bar, Ctrl-C checked before each step, and the count of whole steps done.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import trio
from tqdm import tqdm

_T = TypeVar("_T")

#: Seconds between plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL = 1.0
#: Environment variable overriding PLAIN_INTERVAL (seconds), e.g. fewer lines in big logs.
INTERVAL_ENV = "EDGEPROXY_PROGRESS_INTERVAL"


def plain_interval() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, PLAIN_INTERVAL))
    except ValueError:
        return PLAIN_INTERVAL
    return value if value >= 0 else PLAIN_INTERVAL


class Progress:
    """``done`` of ``total`` items of ``what``; ``close()`` when finished or stopped."""

    def __init__(
        self,
        total: int,
        what: str,
        *,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.what, self.done = total, what, 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval if interval is not None else plain_interval()
        self.clock = clock
        if terminal is None:
            terminal = self.stream.isatty()
        self._bar: tqdm[Any] | None = None
        if terminal:
            # A terminal that reports no size (a bare pty) would get a bar 0 wide on row 0 of 0:
            # tqdm would draw nothing.
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self._bar = tqdm(total=total, unit=" " + what, file=self.stream, dynamic_ncols=sized,
                             ncols=None if sized else 80, nrows=None if sized else 24,
                             mininterval=0.1, leave=True)  # fmt: skip
        self._last_line = clock()
        self._lines = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._lines:  # work shorter than one interval stays quiet
            self._line()

    def _line(self) -> None:
        self._lines += 1
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        print(f"{self.what}: {self.done}/{self.total}{share}", file=self.stream, flush=True)


class StopRequest:
    """Set by SIGINT (Ctrl-C) while ``stop_requests`` is active."""

    def __init__(self) -> None:
        self.requested = False


@asynccontextmanager
async def stop_requests(say: Callable[[str], None]) -> AsyncIterator[StopRequest]:
    """While active, SIGINT sets ``requested`` (and ``say``s so once) instead of raising
    KeyboardInterrupt in the middle of a step."""
    stop = StopRequest()
    with trio.open_signal_receiver(signal.SIGINT) as signals:

        async def listen() -> None:
            async for _ in signals:
                if not stop.requested:
                    say("interrupted: stopping after the current step")
                stop.requested = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            try:
                yield stop
            finally:
                nursery.cancel_scope.cancel()


@dataclass(frozen=True, slots=True)
class StepsDone:
    steps: int  # whole steps completed, in order
    stopped: bool  # Ctrl-C ended the run before the last step


async def run_steps(
    steps: Sequence[_T],
    step: Callable[[_T], Awaitable[int]],
    *,
    total: int,
    what: str,
    say: Callable[[str], None],
) -> StepsDone:
    """Await ``step`` on each of ``steps`` in order; each returns how many of ``total`` items
    of ``what`` it finished (the bar's advance). Ctrl-C is only honoured between steps, so a
    step is always finished or never started. An exception from a step ends the run."""
    progress = Progress(total, what)
    done = 0
    async with stop_requests(say) as stop:
        try:
            for item in steps:
                if stop.requested:
                    return StepsDone(done, stopped=True)
                progress.advance(await step(item))
                done += 1
        finally:
            progress.close()
    return StepsDone(done, stopped=False)
