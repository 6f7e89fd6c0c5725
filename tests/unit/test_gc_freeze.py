"""A serving process freezes its cached names out of the garbage collector as the cache grows
(``app._freeze_cache_growth``): every full collection would otherwise rescan them."""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from edgeproxy import app
from edgeproxy.app import GC_FREEZE_CHECK, GC_FREEZE_STEP, cache_freeze_due


def test_freeze_steps_are_a_tenth_and_at_least_the_step() -> None:
    assert not cache_freeze_due(0, 0)
    assert not cache_freeze_due(GC_FREEZE_STEP - 1, 0)
    assert cache_freeze_due(GC_FREEZE_STEP, 0)
    assert not cache_freeze_due(2 * GC_FREEZE_STEP - 1, GC_FREEZE_STEP)
    assert not cache_freeze_due(109_999, 100_000)
    assert cache_freeze_due(110_000, 100_000)
    assert not cache_freeze_due(50_000, 100_000)  # evictions do not count as growth


class _Certs:
    def __init__(self) -> None:
        self.cached = 0

    def cached_count(self) -> int:
        return self.cached


def _run_with(certs: _Certs, steps: list[tuple[int, bool]]) -> None:
    """Drive ``_freeze_cache_growth`` on a mock clock: for each (cache size, frozen?), set the
    size, let one check pass, and see whether objects made before it were frozen."""
    rt: Any = SimpleNamespace(certs=certs)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app._freeze_cache_growth, rt)
            for size, frozen in steps:
                certs.cached = size
                before = gc.get_freeze_count()
                # A long-lived object of the kind a cached name holds (tracked by the GC).
                keep.append(SimpleNamespace(size=size))
                await trio.sleep(GC_FREEZE_CHECK)
                await trio.testing.wait_all_tasks_blocked()
                assert (gc.get_freeze_count() > before) == frozen, (size, frozen)
            nursery.cancel_scope.cancel()

    keep: list[object] = []
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_serving_process_freezes_as_the_cache_grows() -> None:
    started_frozen = gc.get_freeze_count() > 0
    gc.freeze()  # as tune_gc_for_serving leaves a serving process
    try:
        _run_with(
            _Certs(),
            [
                (10, False),
                (GC_FREEZE_STEP, True),
                (GC_FREEZE_STEP + 10, False),
                (2 * GC_FREEZE_STEP, True),
                (GC_FREEZE_STEP, False),  # evicted: nothing to freeze
            ],
        )
    finally:
        if not started_frozen:
            gc.unfreeze()


def test_a_process_that_is_not_serving_never_freezes() -> None:
    if gc.get_freeze_count():
        gc.unfreeze()
    _run_with(_Certs(), [(GC_FREEZE_STEP, False), (10 * GC_FREEZE_STEP, False)])
    assert gc.get_freeze_count() == 0
