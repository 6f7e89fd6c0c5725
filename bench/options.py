"""What the benchmark programs (``python -m bench.NAME``) share on their command line: a
comma-separated subset option, and running one measurement in a folder of its own."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio


def subset(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for ``a,b,...`` that accepts only names from ``allowed``."""

    def parse(text: str) -> list[str]:
        chosen = [part for part in text.split(",") if part]
        if unknown := sorted(set(chosen) - set(allowed)):
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown)} (choose from {', '.join(allowed)})"
            )
        return chosen

    return parse


def run_in_tmp(prefix: str, measure: Callable[..., Awaitable[None]], *args: Any) -> None:
    """``trio.run(measure, folder, *args)`` with a fresh temporary folder, removed after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        trio.run(measure, Path(tmp), *args)
