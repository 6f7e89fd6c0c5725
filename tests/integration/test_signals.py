"""Operations proof, process half: SIGTERM drains and SIGHUP reloads a real ``edgeproxy run``.

Each test starts the command an operator runs (``python -m edgeproxy run -c FILE``) as a
subprocess and talks to it like the outside world does: TLS clients streaming lines through
it to echo upstreams in this process, the admin API for ``/readyz`` and ``/metrics``, the log
file for what it says, signals, and its exit code.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.file import FileStorage
from testkit.ports import free_port
from testkit.proxy import base_config, edgeproxy_subprocess
from testkit.tomlw import toml_dumps
from testkit.upstreams import Handler, start_upstream

NAME = "app.example.test"
DEADLINE = 20.0  # bound on any single wait; never a timing assertion
LINE_INTERVAL = 0.2  # the streaming client sends a line this often


# ---------------------------------------------------------------------- the world around it


def tagged_echo(tag: bytes) -> Handler:
    """Echoes every line back with ``tag`` in front, so a reply says which upstream sent it."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                await stream.send_eof()
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                await stream.send_all(tag + b" " + line + b"\n")

    return handle




@dataclass
class Edge:
    """A running ``edgeproxy run`` subprocess."""

    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    port: int
    admin_port: int
    ca_path: Path
    tmp_path: Path

    def config(self, upstream: str, **server: Any) -> dict[str, Any]:
        return edge_config(self.tmp_path, self.port, self.admin_port, upstream, **server)

    def rewrite_config(self, text: str) -> None:
        # Replace, never truncate in place: the process must not read a half-written file.
        tmp = self.config_path.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, text: str, count: int = 1) -> None:
        """Until ``text`` occurs ``count`` times in the log."""
        # Polling: the process tells us only through its log file.
        with trio.move_on_after(DEADLINE):
            while True:
                if self.log().count(text) >= count:
                    return
                await trio.sleep(0.05)
        raise AssertionError(f"{text!r} x{count} not logged; log:\n{self.log()[-3000:]}")

    async def wait_exit(self) -> int:
        with trio.move_on_after(DEADLINE):
            while True:
                if self.proc.poll() is not None:
                    break
                await trio.sleep(0.05)
        code = self.proc.poll()
        assert code is not None, f"edgeproxy still running; log:\n{self.log()[-3000:]}"
        return code

    async def readyz(self) -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE) as c:
            return await c.get(f"http://127.0.0.1:{self.admin_port}/readyz")

    async def metric(self, name: str, **labels: str) -> float | None:
        async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE) as c:
            text = (await c.get(f"http://127.0.0.1:{self.admin_port}/metrics")).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return None


def edge_config(
    tmp_path: Path, port: int, admin_port: int, upstream: str, **server: Any
) -> dict[str, Any]:
    return base_config(
        tmp_path,
        [{"sni": [NAME], "upstreams": [upstream]}],
        server={"listen": [f"127.0.0.1:{port}"], **server},
        admin={"listen": f"127.0.0.1:{admin_port}"},
    )


StartEdge = Callable[..., Awaitable[Edge]]  # (upstream, **server settings) -> Edge


@pytest.fixture
def start_edge(tmp_path: Path) -> Iterator[StartEdge]:
    """``await start_edge(upstream, drain_timeout=...)`` -> an ``Edge`` that has opened its
    signal handlers. Every process started is killed at teardown if it is still running."""
    with ExitStack() as stack:

        async def start(upstream: str, **server: Any) -> Edge:
            port, admin_port = free_port(), free_port()
            cfg = edge_config(tmp_path, port, admin_port, upstream, **server)
            config_path = tmp_path / "edgeproxy.toml"
            config_path.write_text(toml_dumps(cfg))
            # Make the internal CA now, so the clients can verify what the process serves.
            storage = FileStorage(cfg["storage"]["path"])
            try:
                ca_pem = await InternalIssuer(storage).ca_certificate_pem()
            finally:
                await storage.aclose()
            ca_path = tmp_path / "ca.pem"
            ca_path.write_bytes(ca_pem)
            log_path = tmp_path / "edgeproxy.log"
            proc = stack.enter_context(
                edgeproxy_subprocess(
                    config_path, host="127.0.0.1", port=admin_port, log_path=log_path
                )
            )
            edge = Edge(proc, config_path, log_path, port, admin_port, ca_path, tmp_path)
            # Logged once the signal handlers are in place: a signal before it would kill the
            # process the default way instead of draining or reloading.
            await edge.wait_log("edgeproxy listening on")
            return edge

        yield start


# ---------------------------------------------------------------------- clients


class LineClient:
    """A TLS client that sends a line and reads the upstream's answer to it."""

    def __init__(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        self.tls = tls
        self._buf = b""
        self.sent = 0

    async def roundtrip(self) -> bytes:
        """Send the next numbered line; return the reply line. Raises ``ConnectionEnded``."""
        self.sent += 1
        line = f"line {self.sent}".encode()
        try:
            await self.tls.send_all(line + b"\n")
            while b"\n" not in self._buf:
                chunk = await self.tls.receive_some(65536)
                if not chunk:
                    raise ConnectionEnded("EOF")
                self._buf += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionEnded(str(exc)) from exc
        reply, self._buf = self._buf.split(b"\n", 1)
        assert reply.endswith(b" " + line), (reply, line)
        return reply.removesuffix(b" " + line)  # the upstream's tag

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.tls)


class ConnectionEnded(Exception):
    """The proxy closed the client's connection."""


@asynccontextmanager
async def line_client(edge: Edge) -> AsyncIterator[LineClient]:
    ctx = ssl.create_default_context(cafile=str(edge.ca_path))
    tcp = await trio.open_tcp_stream("127.0.0.1", edge.port)
    client = LineClient(trio.SSLStream(tcp, ctx, server_hostname=NAME))
    try:
        with trio.fail_after(DEADLINE):
            await client.tls.do_handshake()
        yield client
    finally:
        await client.aclose()


async def connect_refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await trio.aclose_forcefully(stream)
    return False


async def wait_draining(edge: Edge) -> None:
    """Until ``/readyz`` says draining and the proxy port refuses connections."""
    with trio.move_on_after(DEADLINE):
        while True:
            if (await edge.readyz()).status_code == 503 and await connect_refused(edge.port):
                break
            await trio.sleep(0.05)
    ready = await edge.readyz()
    assert (ready.status_code, ready.json()["reason"]) == (503, "draining"), ready.text
    assert await connect_refused(edge.port)


# ---------------------------------------------------------------------- SIGTERM: drain


async def test_sigterm_drain_lets_a_streaming_connection_finish(
    start_edge: StartEdge, nursery: trio.Nursery
) -> None:
    up = await start_upstream(nursery, tagged_echo(b"A"))
    edge = await start_edge(up.addr, drain_timeout=3)
    assert (await edge.readyz()).status_code == 200
    async with line_client(edge) as client:
        for _ in range(3):
            assert await client.roundtrip() == b"A"
            await trio.sleep(LINE_INTERVAL)

        edge.signal(signal.SIGTERM)
        await wait_draining(edge)
        # Draining: no new connections, but this one goes on streaming.
        for _ in range(3):
            assert await client.roundtrip() == b"A"
            assert await connect_refused(edge.port)
            await trio.sleep(LINE_INTERVAL)
        assert edge.proc.poll() is None
    # The last connection ended by itself: the drain completes before its deadline.
    assert await edge.wait_exit() == 0
    await edge.wait_log("drained; exiting")
    assert "drain timeout" not in edge.log()


async def test_sigterm_drain_timeout_closes_what_remains(
    start_edge: StartEdge, nursery: trio.Nursery
) -> None:
    up = await start_upstream(nursery, tagged_echo(b"A"))
    edge = await start_edge(up.addr, drain_timeout=3)
    async with line_client(edge) as client:
        assert await client.roundtrip() == b"A"
        edge.signal(signal.SIGTERM)
        await wait_draining(edge)
        survived = 0
        with trio.fail_after(DEADLINE), pytest.raises(ConnectionEnded):
            while True:  # a client that never stops: only the drain deadline ends it
                assert await client.roundtrip() == b"A"
                survived += 1
                await trio.sleep(LINE_INTERVAL)
        assert survived >= 1  # it lived on into the drain before being cut
    assert await edge.wait_exit() == 0
    assert "drain timeout: closing 1 remaining connections" in edge.log()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_idle_process_exits_at_once(
    start_edge: StartEdge, nursery: trio.Nursery, signum: signal.Signals
) -> None:
    up = await start_upstream(nursery, tagged_echo(b"A"))
    # A drain timeout far longer than DEADLINE: exiting within DEADLINE proves it never waited.
    edge = await start_edge(up.addr, drain_timeout=600)
    edge.signal(signum)
    assert await edge.wait_exit() == 0
    assert "drained; exiting" in edge.log()


# ---------------------------------------------------------------------- SIGHUP: reload


async def test_sighup_reroutes_new_connections_and_keeps_old_ones(
    start_edge: StartEdge, nursery: trio.Nursery
) -> None:
    up_a = await start_upstream(nursery, tagged_echo(b"A"))
    up_b = await start_upstream(nursery, tagged_echo(b"B"))
    edge = await start_edge(up_a.addr)

    async with line_client(edge) as old:
        assert await old.roundtrip() == b"A"

        edge.rewrite_config(toml_dumps(edge.config(up_b.addr)))
        edge.signal(signal.SIGHUP)
        await edge.wait_log("config reloaded from")

        async with line_client(edge) as new:
            assert await new.roundtrip() == b"B"
            assert await old.roundtrip() == b"A"  # a connection keeps the route it began with

            # A broken file (routes back to A, with an invalid drain_timeout) is refused whole.
            edge.rewrite_config(toml_dumps(edge.config(up_a.addr, drain_timeout=-1)))
            edge.signal(signal.SIGHUP)
            await edge.wait_log("reload rejected")
            assert "server.drain_timeout" in edge.log()

            async with line_client(edge) as third:
                assert await third.roundtrip() == b"B"
            assert await new.roundtrip() == b"B"
            assert await old.roundtrip() == b"A"

    assert await edge.metric("edgeproxy_config_reloads_total", result="ok") == 1
    assert await edge.metric("edgeproxy_config_reloads_total", result="rejected") == 1
    assert (up_a.connections, up_b.connections) == (1, 2)
    assert (await edge.readyz()).status_code == 200
    edge.signal(signal.SIGTERM)
    assert await edge.wait_exit() == 0
