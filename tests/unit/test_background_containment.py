"""Background work outside the certificate manager survives a bug: the port-80 listener's
per-connection task and the hostname registry's follow loop log, count and carry on.

Each test injects an exception nobody foresaw (not a connection or storage error) into the real
component and checks it costs one connection or one poll, never the listener or the loop.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio
from prometheus_client import REGISTRY

from edgeproxy.config import HostPort
from edgeproxy.hostnames.registry import HostnameRegistry
from edgeproxy.proxy.http import HttpListener
from edgeproxy.proxy.server import open_listeners
from edgeproxy.storage import FileStorage, HostnameEntry
from testkit.rawhttp import exchange, settings

METRIC = "edgeproxy_background_task_errors_total"


def errors(task: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"task": task}) or 0.0


async def test_a_bug_in_one_port_80_connection_costs_that_connection_only() -> None:
    calls = 0

    async def key_authorization(token: str) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug nobody foresaw")
        return None

    listener = HttpListener(
        settings(), key_authorization=key_authorization, serves=lambda n: n == "a.example.test"
    )
    before = errors("http")
    socks = await open_listeners([HostPort("127.0.0.1", 0)])
    request = b"GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: a.example.test\r\n\r\n"
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(listener.serve, socks)
        port = bound[0][1]
        assert await exchange(port, request) == b""  # closed: the bug cost this connection
        # ... and the listener still answers the next one.
        assert (await exchange(port, request)).startswith(b"HTTP/1.1 404")
        nursery.cancel_scope.cancel()
    assert errors("http") == before + 1


class FlakyStorage(FileStorage):
    """Real file storage whose registry listing raises an unforeseen error once."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fail_next = True

    async def list_hostnames(
        self, *, after: str | None = None, limit: int = 100
    ) -> list[HostnameEntry]:
        if self.fail_next:
            self.fail_next = False
            raise ValueError("an entry this version cannot read")
        return await super().list_hostnames(after=after, limit=limit)


async def test_a_bug_in_a_registry_update_keeps_the_loop_following(tmp_path: Path) -> None:
    storage = FlakyStorage(tmp_path / "state")
    registry = HostnameRegistry(storage, poll_interval=0.05, resync_interval=0.0)
    before = errors("registry")
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await storage.add_hostname(HostnameEntry("shop.example.test", None, "{}", time.time()))
        with trio.fail_after(10):
            while not registry.is_registered("shop.example.test"):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert errors("registry") == before + 1
