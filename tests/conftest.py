"""Fixtures every test folder may use, each built from ``testkit`` (nothing else lives here)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.pebble import Pebble, pebble_available, pebbles


@pytest.fixture
def make_pebble(tmp_path: Path) -> Iterator[Callable[..., Pebble]]:
    """``make_pebble(tls_port=..., env=..., eab_keys=..., validity=...)`` -> a running pebble.

    Every pebble started through it is stopped at teardown, pass or fail.
    """
    if not pebble_available():
        pytest.skip("pebble / pebble-challtestsrv are not installed")
    with pebbles(tmp_path) as make:
        yield make
