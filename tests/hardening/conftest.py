"""Fixtures for the hardening tests: a real echo upstream, pebble, and a high fd limit."""

from __future__ import annotations

import pytest
import trio

from testkit.hardening import raise_nofile_limit, serve_echo


@pytest.fixture(scope="session", autouse=True)
def _nofile_limit() -> None:
    # Thousands of attacking sockets live in the test process: use the whole hard limit.
    raise_nofile_limit()


@pytest.fixture
async def echo_upstream(nursery: trio.Nursery) -> str:
    """``host:port`` of an echo server in the test's nursery (cancelled at test end)."""
    port = await nursery.start(serve_echo)
    return f"127.0.0.1:{port}"
