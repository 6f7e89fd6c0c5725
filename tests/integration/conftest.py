"""Pebble fixtures: a TLS-ALPN-01 responder and a pebble factory, both stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from testkit.pebble import Pebble, TlsAlpnResponder, pebble_available, start_pebble
from testkit.ports import free_port


@pytest.fixture
async def alpn_responder(nursery: trio.Nursery, tmp_path: Path) -> TlsAlpnResponder:
    """A TLS-ALPN-01 responder listening on 127.0.0.1 (pytest-trio cancels it at test end)."""
    responder = TlsAlpnResponder(free_port(), tmp_path / "alpn")
    await nursery.start(responder.serve)
    return responder


@pytest.fixture
def make_pebble(tmp_path: Path) -> Iterator[Callable[..., Pebble]]:
    """``make_pebble(tls_port=..., env=..., eab_keys=..., validity=...)`` -> a running pebble.

    Every pebble started through it is stopped at teardown, pass or fail.
    """
    if not pebble_available():
        pytest.skip("pebble / pebble-challtestsrv are not installed")
    started: list[Pebble] = []

    def make(**kwargs: Any) -> Pebble:
        pebble = start_pebble(tmp_path, **kwargs)
        started.append(pebble)
        return pebble

    try:
        yield make
    finally:
        for pebble in started:
            pebble.stop()
