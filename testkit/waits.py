"""Waits bounded in real time, for tests that run under trio's MockClock."""

from __future__ import annotations

import time

import trio


async def wait_to_be_cancelled(bound: float = 10.0) -> None:
    """Park until cancelled, for at most ``bound`` *real* seconds.

    Under ``mock_clock`` trio time stands still, so a trio timeout would never fire and a
    broken implementation would hang the suite; this makes it fail the test instead.
    """
    await trio.to_thread.run_sync(time.sleep, bound, abandon_on_cancel=True)
