"""The reactor's driven connections (proxy/reactor.py, waits.py): no task until one is needed.

A served name's connection must be accepted, handshaken, piped and closed without a trio task
of its own; what a driven connection cannot do goes on in a task carrying its deadline; a
deadline, a shutdown or a bug ends that one connection only; readiness that came while the
connection waited for something else is not lost (the epoll is edge-triggered), and a write
that has to wait resumes when there is room; the timer's stale entries stay bounded.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import trio

from edgeproxy import waits
from edgeproxy.proxy.reactor import Driver, reactor
from edgeproxy.tls.server import send_all
from testkit.proxy import base_config, running_proxy
from testkit.upstreams import http_handler, start_upstream

NAME = "app.example.test"
BODY = b"hello from upstream\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n"


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


def _fetch(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(REQUEST)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data


async def test_a_served_names_connections_spawn_no_task(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(tmp_path, [{"sni": [NAME], "upstreams": [up.addr]}])
    async with running_proxy(tmp_path, cfg) as p:
        assert p.ca_path is not None
        # The first connection waits for its certificate (issued by the internal CA): that
        # wait is trio's, so it goes on in a task.
        spawns = _Spawns()
        trio.lowlevel.add_instrument(spawns)
        try:
            assert (await trio.to_thread.run_sync(_fetch, p.port, p.ca_path)).endswith(BODY)
            first = spawns.names.count("edgeproxy.connection")
            spawns.names.clear()
            for _ in range(5):
                answer = await trio.to_thread.run_sync(_fetch, p.port, p.ca_path)
                assert answer.endswith(BODY)
            with trio.fail_after(10):
                await p.rt.proxy.wait_idle()
        finally:
            trio.lowlevel.remove_instrument(spawns)
        assert first == 1
        assert spawns.names.count("edgeproxy.connection") == 0, spawns.names
        assert p.rt.proxy.live == {}


async def test_shutdown_ends_driven_connections(tmp_path: Path, nursery: trio.Nursery) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(tmp_path, [{"sni": [NAME], "upstreams": [up.addr]}])
    async with running_proxy(tmp_path, cfg) as p:
        silent = socket.create_connection(p.addr)  # driven, waiting for its ClientHello
        with trio.fail_after(5):
            while not p.rt.proxy.live:
                await trio.sleep(0.01)
        proxy = p.rt.proxy
    # The proxy's nursery was cancelled: the silent connection must be closed, not left open.
    assert proxy.live == {}
    silent.settimeout(5)
    try:
        assert silent.recv(10) == b""
    except ConnectionResetError:
        pass
    silent.close()


async def test_a_deadline_expires_a_driven_wait(nursery: trio.Nursery) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    ended = trio.Event()
    seen: list[str] = []

    async def story() -> None:
        try:
            await waits.wait_readable(a)  # b never writes
            seen.append("readable")
        except waits.Expired:
            seen.append("expired")
            ended.set()

    d = Driver(reactor(), nursery, trio.current_time() + 0.2)
    d.start(story())
    with trio.fail_after(5):
        await ended.wait()
    assert seen == ["expired"]
    a.close()
    b.close()


async def test_handover_goes_on_in_a_task_that_keeps_the_deadline(nursery: trio.Nursery) -> None:
    ended = trio.Event()
    seen: list[object] = []
    d = Driver(reactor(), nursery, trio.current_time() + 0.2)

    async def story() -> None:
        await waits.handover()
        seen.append(trio.lowlevel.current_task().name)
        try:
            await trio.sleep_forever()
        except trio.Cancelled as exc:
            seen.append(d.ours(exc))
            raise
        finally:
            ended.set()

    d.start(story())
    with trio.fail_after(5):
        await ended.wait()
    assert seen == ["edgeproxy.connection", True]


async def test_a_driven_step_that_awaits_trio_fails_alone(nursery: trio.Nursery) -> None:
    seen: list[str] = []

    async def story() -> None:
        try:
            await trio.lowlevel.checkpoint()  # a checkpoint before handover: a bug
        except RuntimeError as exc:
            seen.append(str(exc))

    d = Driver(reactor(), nursery, trio.current_time() + 10)
    d.start(story())
    assert len(seen) == 1 and "awaited trio itself" in seen[0]
    # The reactor goes on for the others.
    a, b = socket.socketpair()
    a.setblocking(False)
    got = trio.Event()

    async def other() -> None:
        await waits.wait_readable(a)
        got.set()

    Driver(reactor(), nursery, trio.current_time() + 10).start(other())
    b.send(b"x")
    with trio.fail_after(5):
        await got.wait()
    a.close()
    b.close()


async def test_readiness_that_came_during_another_wait_is_not_lost(
    nursery: trio.Nursery,
) -> None:
    # Edge-triggered: an event is reported once. Data arriving on the client socket while the
    # story waits for another socket must still satisfy its next wait on the client.
    client, client_peer = socket.socketpair()
    other, other_peer = socket.socketpair()
    for s in (client, other):
        s.setblocking(False)
    step = trio.Event()
    done = trio.Event()

    async def story() -> None:
        await waits.wait_readable(client)  # registers the client socket
        assert client.recv(10) == b"1"
        step.set()
        await waits.wait_readable(other)
        await waits.wait_readable(client)  # "2" came during the wait above: no new edge
        assert client.recv(10) == b"2"
        done.set()

    Driver(reactor(), nursery, trio.current_time() + 30).start(story())
    client_peer.send(b"1")
    with trio.fail_after(5):
        await step.wait()
    client_peer.send(b"2")
    await trio.sleep(0.1)  # the reactor sees "2" while the story waits for the other socket
    other_peer.send(b"x")
    with trio.fail_after(5):
        await done.wait()
    for s in (client, client_peer, other, other_peer):
        s.close()


async def test_stale_timer_entries_stay_bounded(nursery: trio.Nursery) -> None:
    r = reactor()

    async def story() -> None:
        return  # ends at once: its deadline entry goes stale

    for _ in range(3000):
        Driver(r, nursery, trio.current_time() + 3600).start(story())
    assert r.drivers == 0
    assert len(r._timers) <= 2 * r.drivers + 1024 + 1


async def test_a_driven_write_waits_for_room(nursery: trio.Nursery) -> None:
    # A write that fills the socket waits (driven, edge-triggered for writing) and finishes
    # once the peer reads.
    a, b = socket.socketpair()
    a.setblocking(False)
    payload = b"x" * (8 * 1024 * 1024)  # far more than two socket buffers
    sent = trio.Event()
    states: list[str] = []

    async def story() -> None:
        await send_all(a, payload)
        states.append("sent")
        sent.set()

    d = Driver(reactor(), nursery, trio.current_time() + 30)
    d.start(story())
    assert states == []  # it had to wait: the peer has read nothing yet
    received = 0

    def drain() -> None:
        nonlocal received
        b.settimeout(5)  # a writer that never resumes fails the test instead of hanging it
        while received < len(payload):
            received += len(b.recv(1 << 20))

    with trio.fail_after(10):
        await trio.to_thread.run_sync(drain)
        await sent.wait()
    assert states == ["sent"] and received == len(payload)
    a.close()
    b.close()
