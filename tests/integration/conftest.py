"""Fixtures of the integration tests, each built from ``testkit`` and stopped at teardown:
a TLS-ALPN-01 responder, a pebble roots file, a Prometheus, the bad-input tests' proxy
(``make_pebble`` is in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from testkit.http_proxy import proxy_to_http
from testkit.pebble import Pebble, TlsAlpnResponder
from testkit.ports import free_port
from testkit.prometheus import PROMETHEUS, Prometheus, prometheus_servers
from testkit.proxy import RunningProxy


@pytest.fixture
async def alpn_responder(nursery: trio.Nursery, tmp_path: Path) -> TlsAlpnResponder:
    """A TLS-ALPN-01 responder listening on 127.0.0.1 (pytest-trio cancels it at test end)."""
    responder = TlsAlpnResponder(free_port(), tmp_path / "alpn")
    await nursery.start(responder.serve)
    return responder


@pytest.fixture
def roots_file(tmp_path: Path) -> Callable[[Pebble], Path]:
    """``roots_file(pebble)`` -> a file holding the roots of the certificates pebble issues."""

    def write(pebble: Pebble) -> Path:
        path = tmp_path / "pebble-roots.pem"
        path.write_bytes(pebble.roots_pem())
        return path

    return write


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """``start_prometheus(admin_port)`` -> a Prometheus scraping it every second, with the
    edgeproxy rules loaded; stopped at teardown, pass or fail."""
    if PROMETHEUS is None:
        pytest.skip("prometheus missing (Debian package prometheus)")
    with prometheus_servers(tmp_path) as start:
        yield start


@pytest.fixture
async def proxy(tmp_path: Path, nursery: trio.Nursery) -> RunningProxy:  # type: ignore[misc]
    """The bad-input tests' proxy (internal issuer, a default route to an HTTP upstream) with
    short handshake and idle timeouts."""
    async with proxy_to_http(
        tmp_path, nursery, server={"handshake_timeout": 1.5, "idle_timeout": 2}
    ) as p:
        yield p
