"""runloop.dict_instruments: trio's instrument checks on a dict, instruments working as before."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.abc
from trio._core._run import GLOBAL_RUN_CONTEXT

from edgeproxy.runloop import dict_instruments


class Recorder(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0
        self.spawned: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned.append(task.name)


class Raises(trio.abc.Instrument):
    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        raise RuntimeError("broken instrument")


def _instruments() -> object:
    return GLOBAL_RUN_CONTEXT.runner.instruments


async def _child() -> None:
    await trio.lowlevel.checkpoint()


def test_the_swap_answers_with_dicts_own_in_and_keeps_instruments_installed_before() -> None:
    early = Recorder()

    async def main() -> None:
        assert dict_instruments()
        inst = _instruments()
        assert type(inst).__contains__ is dict.__contains__
        assert "before_task_step" in inst  # type: ignore[operator]
        assert "after_io_wait" not in inst  # type: ignore[operator]
        assert dict_instruments()  # a second call changes nothing
        assert _instruments() is inst
        before = early.steps
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_child, name="child")
        assert early.steps > before
        assert "child" in early.spawned

    trio.run(main, instruments=[early])


def test_instruments_added_and_removed_after_the_swap_behave_as_trios() -> None:
    async def main() -> None:
        assert dict_instruments()
        inst = _instruments()
        assert "task_spawned" not in inst  # type: ignore[operator]
        rec = Recorder()
        trio.lowlevel.add_instrument(rec)
        assert "task_spawned" in inst  # type: ignore[operator]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_child, name="late")
        assert rec.spawned == ["late"]
        assert rec.steps > 0
        trio.lowlevel.remove_instrument(rec)
        assert "task_spawned" not in inst  # type: ignore[operator]
        assert "before_task_step" not in inst  # type: ignore[operator]
        steps = rec.steps
        await trio.lowlevel.checkpoint()
        assert rec.steps == steps
        with pytest.raises(KeyError):
            trio.lowlevel.remove_instrument(rec)

    trio.run(main)


def test_an_instrument_that_raises_is_removed_and_logged_as_trio_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        assert dict_instruments()
        trio.lowlevel.add_instrument(Raises())
        await trio.lowlevel.checkpoint()
        assert "before_task_step" not in _instruments()  # type: ignore[operator]

    with caplog.at_level(logging.ERROR, logger="trio.abc.Instrument"):
        trio.run(main)
    assert "broken instrument" in caplog.text


def test_outside_a_run_nothing_is_swapped() -> None:
    assert not dict_instruments()
