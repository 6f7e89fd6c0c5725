"""Trio's run loop asking about instruments at the price of a dict lookup.

Owns: one swap in the current trio run, ``dict_instruments``. Must not know: anything of the
proxy.

Why: trio keeps a run's instruments in ``Instruments``, a ``collections.UserDict`` keyed by hook
name, and asks ``"before_task_step" in runner.instruments`` (and ``after_task_step``,
``before_io_wait``, ``after_io_wait``, ``task_spawned``, ``task_scheduled``, ``task_exited``)
on every task step, I/O wait, spawn, reschedule and exit, so that an absent instrument costs
nothing. On a ``UserDict`` each ``in`` is a call of ``UserDict.__contains__`` in Python: about
620 instructions more than a dict's own ``in`` (callgrind), and a proxied connection makes
about 42 of them (cProfile), some 26,000 instructions of the ~2.8 million a full handshake
connection costs, with no instrument installed at all (edgeproxy installs none).

``dict_instruments`` puts a ``dict`` subclass with trio's own methods in its place: the same
layout (hook name -> instruments, plus ``"_all"``), the same ``add_instrument``,
``remove_instrument`` and ``call`` (trio's functions, reused as they are, so an instrument
added later, or one that raises, behaves as before), and dict's C-level ``in``.

This reaches into trio's private run state (``trio._core``), as ``tls/openssl_internals.py``
reaches into pyOpenSSL's: when the layout is not the one this was written against (another
trio), nothing is swapped and trio runs as it ships.
"""

from __future__ import annotations

from collections import UserDict
from typing import Any

__all__ = ["dict_instruments"]


def _make_class() -> type[dict[str, Any]] | None:
    try:
        from trio._core._instrumentation import Instruments
    except ImportError:  # pragma: no cover - another trio layout
        return None
    if not issubclass(Instruments, UserDict):
        return None  # a trio whose Instruments is no UserDict: nothing to gain
    methods = ("add_instrument", "remove_instrument", "call")
    if not all(callable(getattr(Instruments, name, None)) for name in methods):
        return None  # pragma: no cover

    class DictInstruments(dict[str, Any]):
        """trio's ``Instruments`` on a plain dict: ``data`` is the dict itself."""

        __slots__ = ()

        @property
        def data(self) -> dict[str, Any]:
            return self

        add_instrument = Instruments.add_instrument
        remove_instrument = Instruments.remove_instrument
        call = Instruments.call

    return DictInstruments


_DictInstruments = _make_class()


def dict_instruments() -> bool:
    """In the current trio run, answer "is an instrument installed for this hook?" with a dict
    lookup (see the module docstring). Instruments already installed stay. True if swapped
    (or already swapped); False where this trio's layout is not the expected one."""
    cls = _DictInstruments
    if cls is None:
        return False
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        runner = GLOBAL_RUN_CONTEXT.runner
        current = runner.instruments
    except (ImportError, AttributeError):
        return False  # not in a trio run, or another layout
    if isinstance(current, cls):
        return True
    if not isinstance(current, UserDict) or "_all" not in current.data:
        return False
    runner.instruments = cls(current.data)  # type: ignore[assignment]
    return True
