"""The two-way pipe over in-memory streams: half-close both ways, idle timeout, resets."""

from __future__ import annotations

import trio
import trio.testing

from edgeproxy.proxy.pipe import pipe


async def test_half_close_each_direction_keeps_the_other_flowing() -> None:
    client_app, client_side = trio.testing.memory_stream_pair()
    upstream_side, upstream_app = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        results = []

        async def run_pipe() -> None:
            results.append(await pipe(client_side, upstream_side, idle_timeout=5))

        n.start_soon(run_pipe)
        await client_app.send_all(b"request")
        await client_app.send_eof()
        got = b""
        while True:
            chunk = await upstream_app.receive_some()
            if not chunk:
                break
            got += chunk
        assert got == b"request"
        # The upstream answers after seeing EOF, then closes.
        await upstream_app.send_all(b"answer" * 1000)
        await upstream_app.send_eof()
        data = b""
        while True:
            chunk = await client_app.receive_some()
            if not chunk:
                break
            data += chunk
        assert data == b"answer" * 1000
    assert results[0].reason == "done"
    assert (results[0].to_upstream, results[0].to_client) == (7, 6000)


async def test_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    client_app, client_side = trio.testing.memory_stream_pair()
    upstream_side, upstream_app = trio.testing.memory_stream_pair()
    result = await pipe(client_side, upstream_side, idle_timeout=30)
    assert result.reason == "idle_timeout"
    assert trio.current_time() >= 30


async def test_activity_postpones_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    client_app, client_side = trio.testing.memory_stream_pair()
    upstream_side, upstream_app = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        results = []

        async def run_pipe() -> None:
            results.append(await pipe(client_side, upstream_side, idle_timeout=10))

        n.start_soon(run_pipe)
        for _ in range(5):
            await trio.sleep(8)
            await client_app.send_all(b"x")
            assert await upstream_app.receive_some() == b"x"
    assert results[0].reason == "idle_timeout"
    assert trio.current_time() >= 50


async def test_upstream_reset_ends_both_directions() -> None:
    client_app, client_side = trio.testing.memory_stream_pair()
    upstream_side, upstream_app = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        results = []

        async def run_pipe() -> None:
            results.append(await pipe(client_side, upstream_side, idle_timeout=5))

        n.start_soon(run_pipe)
        await upstream_app.aclose()
        await client_app.send_all(b"into the void")
    assert results[0].reason in ("upstream_reset", "done")
