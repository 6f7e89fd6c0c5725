"""``edgeproxy.progress``: plain lines at most once per interval and a last line only after
some; a tqdm bar on a terminal; stop requests from SIGINT instead of KeyboardInterrupt."""

from __future__ import annotations

import io
import os
import signal

import pytest
import trio

from edgeproxy.progress import INTERVAL_ENV, Progress, plain_interval, stop_requests


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_at_most_once_per_interval_and_end_with_the_total() -> None:
    out, clock = io.StringIO(), Clock()
    p = Progress(10, "hostnames", stream=out, terminal=False, interval=1.0, clock=clock)
    for step in range(10):
        clock.now = step * 0.4  # 0.0, 0.4, ... 3.6: lines at 1.2, 2.4 and 3.6
        p.advance(1)
    p.close()
    assert out.getvalue().splitlines() == [
        "hostnames: 4/10 (40%)",
        "hostnames: 7/10 (70%)",
        "hostnames: 10/10 (100%)",
        "hostnames: 10/10 (100%)",
    ]


def test_work_shorter_than_an_interval_prints_nothing() -> None:
    out = io.StringIO()
    p = Progress(3, "hostnames", stream=out, terminal=False, interval=1.0, clock=Clock())
    p.advance(3)
    p.close()
    assert out.getvalue() == ""


def test_on_a_terminal_a_bar_is_drawn() -> None:
    out = io.StringIO()
    p = Progress(4, "hostnames", stream=out, terminal=True)
    p.advance(2)
    p.advance(2)
    p.close()
    assert "4/4" in out.getvalue() and "100%|" in out.getvalue() and "\r" in out.getvalue()


def test_the_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "5")
    assert plain_interval() == 5.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        assert plain_interval() == 1.0
    monkeypatch.delenv(INTERVAL_ENV)
    assert plain_interval() == 1.0


async def test_sigint_becomes_a_stop_request() -> None:
    said: list[str] = []
    async with stop_requests(said.append) as stop:
        assert not stop.requested
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
        with trio.fail_after(5):
            while not stop.requested:
                await trio.sleep(0.01)
        await trio.sleep(0.05)
    assert said == ["interrupted: stopping after the current step"]  # said once
