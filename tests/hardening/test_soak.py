"""Memory and descriptors under sustained mixed traffic, and the cost of an idle connection.

The soak drives a subprocess edgeproxy (ACME issuer against pebble) with five kinds of
traffic at once for ``EDGEPROXY_SOAK_SECONDS`` (75 s in CI; 600 for the local mode):
keep-alive connections exchanging lines, short connections, client half-closes (TLS
close_notify, then reading the rest), abrupt resets (SO_LINGER 0, mid-handshake and
mid-stream) and new-name churn (a fresh name every couple of seconds, about 40 per run
whatever its length, each an ACME order).
VmRSS and the fd table are sampled every second. After the warm-up (a third of the run)
RSS must stay within 10% of its post-warm-up level, the fds must come back to their
pre-traffic level once traffic stops, and the log may hold no unexpected ERROR/traceback.

The second test opens 2,000 idle TLS connections (each with its upstream leg) and prints
the proxy's RSS growth per connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from OpenSSL import SSL

from testkit.hardening import (
    PING,
    EdgeproxyProcess,
    client_context,
    edgeproxy_process,
    establish,
    make_internal_ca,
    proxy_config,
    receive_exactly,
    still_echoes,
    unexpected_log_lines,
    wait_until,
)
from testkit.pebble import Pebble, pebble_for_proxy
from testkit.ports import free_port
from testkit.tlsstream import TLSStream

SOAK_SECONDS = float(os.environ.get("EDGEPROXY_SOAK_SECONDS", "75"))
IDLE_CONNECTIONS = int(os.environ.get("EDGEPROXY_IDLE_CONNECTIONS", "2000"))
RSS_TOLERANCE = 0.10


@dataclass
class Samples:
    rss_kb: list[tuple[float, int]] = field(default_factory=list)
    fds: list[tuple[float, int]] = field(default_factory=list)

    def take(self, ep: EdgeproxyProcess, t: float) -> None:
        self.rss_kb.append((t, ep.rss_kb()))
        self.fds.append((t, ep.fd_count()))


@dataclass
class Counts:
    keepalive_lines: int = 0
    short: int = 0
    half_closes: int = 0
    resets: int = 0
    new_names: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, what: str, exc: BaseException) -> None:
        self.errors.append(f"{what}: {type(exc).__name__}: {exc}")


NETWORK_ERRORS = (OSError, ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError)


async def keepalive(port: int, name: str, ctx: ssl.SSLContext, counts: Counts) -> None:
    """One long connection exchanging a line every 20 ms; reconnects if it breaks."""
    while True:
        try:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = trio.SSLStream(tcp, ctx, server_hostname=name)
            async with tls:
                while True:
                    await tls.send_all(PING)
                    if await receive_exactly(tls, len(PING)) != PING:
                        raise ConnectionError("short echo")
                    counts.keepalive_lines += 1
                    await trio.sleep(0.02)
        except (*NETWORK_ERRORS, ConnectionError) as exc:
            counts.error("keepalive", exc)
            await trio.sleep(0.5)


async def short_connections(
    port: int, names: list[str], ctx: ssl.SSLContext, counts: Counts
) -> None:
    i = 0
    while True:
        i += 1
        name = names[i % len(names)]
        try:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            async with trio.SSLStream(tcp, ctx, server_hostname=name) as tls:
                await tls.send_all(PING)
                if await receive_exactly(tls, len(PING)) == PING:
                    counts.short += 1
        except NETWORK_ERRORS as exc:
            counts.error("short", exc)
        await trio.sleep(0.03)


def _openssl_client(ca: Path, name: str) -> SSL.Connection:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    conn = SSL.Connection(ctx, None)
    conn.set_tlsext_host_name(name.encode())
    conn.set_connect_state()
    return conn


async def half_closes(port: int, names: list[str], ca: Path, counts: Counts) -> None:
    """Send, close_notify ("done sending"), then read the echo until the proxy's EOF."""
    payload = os.urandom(20000)
    i = 0
    while True:
        i += 1
        try:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = TLSStream(tcp, _openssl_client(ca, names[i % len(names)]))
            try:
                with trio.fail_after(20):
                    await tls.do_handshake()
                    await tls.send_all(payload)
                    await tls.send_eof()
                    got = b""
                    while chunk := await tls.receive_some(65536):
                        got += chunk
                if got == payload:
                    counts.half_closes += 1
                else:
                    counts.errors.append(f"half-close: {len(got)} of {len(payload)} bytes")
            finally:
                await trio.aclose_forcefully(tls)
        except (*NETWORK_ERRORS, trio.TooSlowError) as exc:
            counts.error("half-close", exc)
        await trio.sleep(0.1)


async def resets(port: int, names: list[str], ctx: ssl.SSLContext, counts: Counts) -> None:
    """RST mid-handshake and mid-stream (SO_LINGER 0, then close)."""
    linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"
    i = 0
    while True:
        i += 1
        sock = trio.socket.socket()
        try:
            await sock.connect(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            tcp = trio.SocketStream(sock)
            if i % 2:
                await tcp.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a hello start
            else:
                tls = trio.SSLStream(tcp, ctx, server_hostname=names[i % len(names)])
                await tls.send_all(PING * 100)
            counts.resets += 1
        except NETWORK_ERRORS as exc:
            counts.error("reset", exc)
        finally:
            sock.close()  # with SO_LINGER 0: an RST, not a FIN
        await trio.sleep(0.05)


async def name_churn(
    port: int, ctx: ssl.SSLContext, counts: Counts, issued: list[str], every: float = 2.0
) -> None:
    """A never-seen name every ``every`` s: each one is an ACME order through pebble."""
    i = 0
    while True:
        i += 1
        name = f"churn{i}-{os.urandom(3).hex()}.example.test"
        try:
            with trio.fail_after(40):
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                async with trio.SSLStream(tcp, ctx, server_hostname=name) as tls:
                    await tls.send_all(PING)
                    if await receive_exactly(tls, len(PING)) == PING:
                        counts.new_names += 1
                        issued.append(name)
        except (*NETWORK_ERRORS, trio.TooSlowError) as exc:
            counts.error("churn", exc)
        await trio.sleep(every)


async def test_soak_rss_stays_flat_and_fds_come_back(
    tmp_path: Path, echo_upstream: str, make_pebble: Callable[..., Pebble]
) -> None:
    roots = tmp_path / "roots.pem"
    port, pebble = pebble_for_proxy(make_pebble, roots)
    cfg = proxy_config(
        tmp_path / "state",
        port,
        echo_upstream,
        admin_port=free_port(),
        server={"handshake_timeout": 10},
        tls={"issuer": "acme", "default_sni": None, "maintenance_interval": 5},
        acme={"directory": pebble.directory_url, "trust": str(pebble.ca_bundle_path)},
        on_demand={"allow": ["*.example.test"], "wait": 30, "max_orders_per_minute": 600},
    )
    ctx = client_context(roots)
    names = [f"soak{i}.example.test" for i in range(4)]
    counts = Counts()
    samples = Samples()
    issued: list[str] = []
    async with edgeproxy_process(tmp_path, cfg) as ep:
        # Pre-traffic: the names the steady traffic uses exist, the ACME client is warm.
        for name in names:
            for tls in await establish(port, 1, name, ctx):
                await tls.aclose()
        await trio.sleep(1.0)
        fds_before = ep.fd_count()
        rss_start = ep.rss_kb()
        start = trio.current_time()
        warmup = max(15.0, SOAK_SECONDS / 3)
        async with trio.open_nursery() as traffic:
            for i in range(16):
                traffic.start_soon(keepalive, port, names[i % len(names)], ctx, counts)
            for _ in range(2):
                traffic.start_soon(short_connections, port, names, ctx, counts)
            traffic.start_soon(half_closes, port, names, roots, counts)
            traffic.start_soon(resets, port, names, ctx, counts)
            # About 40 new names per run whatever its length: each one is a certificate the
            # LRU keeps (tens of kB), growth by design that would otherwise swamp a leak.
            churn_every = max(2.0, SOAK_SECONDS / 40)
            traffic.start_soon(name_churn, port, ctx, counts, issued, churn_every)
            while (t := trio.current_time() - start) < SOAK_SECONDS:
                samples.take(ep, t)
                assert ep.alive(), ep.log_text()[-3000:]
                await trio.sleep(1.0)
            traffic.cancel_scope.cancel()
        # Traffic stopped: every descriptor the traffic used must be given back.
        back = await wait_until(lambda: ep.fd_count() <= fds_before, limit=30)
        fds_after = ep.fd_count()
        log = ep.log_text()

    after_warmup = [kb for t, kb in samples.rss_kb if t >= warmup]
    level = statistics.median(after_warmup[:5])
    peak = max(after_warmup)
    print(
        f"\n[soak {SOAK_SECONDS:.0f} s] keep-alive lines {counts.keepalive_lines}, short "
        f"{counts.short}, half-closes {counts.half_closes}, resets {counts.resets}, new names "
        f"{counts.new_names}; client-side errors {len(counts.errors)}"
        f"\n  RSS: start {rss_start} kB, after warm-up {level:.0f} kB, peak {peak} kB "
        f"({(peak / level - 1) * 100:+.1f}%), end {samples.rss_kb[-1][1]} kB"
        f"\n  fds: before traffic {fds_before}, peak {max(n for _, n in samples.fds)}, "
        f"after {fds_after}"
    )
    # The traffic really ran (each kind), and essentially without errors.
    assert counts.keepalive_lines > 100 and counts.short > 50 and counts.half_closes > 10
    assert counts.resets > 50 and counts.new_names >= 3, counts
    assert len(counts.errors) <= 5, counts.errors[:10]
    assert peak <= level * (1 + RSS_TOLERANCE), samples.rss_kb
    assert back, f"fds {fds_after} after traffic, {fds_before} before"
    assert unexpected_log_lines(log) == []


async def test_memory_per_idle_tls_connection(tmp_path: Path, echo_upstream: str) -> None:
    state = tmp_path / "state"
    ca = await make_internal_ca(state)
    port = free_port()
    cfg = proxy_config(
        state,
        port,
        echo_upstream,
        server={"max_handshakes": 5000, "max_connections": 10000, "idle_timeout": 300},
    )
    ctx = client_context(ca)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        # Warm up allocator and caches with a few hundred connections first.
        warm = await establish(port, 200, "idle.example.test", ctx)
        for tls in warm:
            await trio.aclose_forcefully(tls)
        await trio.sleep(1.0)
        rss_before, fds_before = ep.rss_kb(), ep.fd_count()
        streams = await establish(port, IDLE_CONNECTIONS, "idle.example.test", ctx)
        try:
            await trio.sleep(1.0)
            rss_after, fds_after = ep.rss_kb(), ep.fd_count()
            assert await still_echoes(streams[:20]) == 20
        finally:
            for tls in streams:
                with contextlib.suppress(*NETWORK_ERRORS):
                    await trio.aclose_forcefully(tls)
        per_conn = (rss_after - rss_before) / IDLE_CONNECTIONS
        print(
            f"\n[idle TLS] {IDLE_CONNECTIONS} idle TLS connections (client + upstream leg): "
            f"RSS {rss_before} -> {rss_after} kB = {per_conn:.1f} kB per connection; "
            f"fds {fds_before} -> {fds_after}"
        )
        assert fds_after - fds_before >= 2 * IDLE_CONNECTIONS  # both legs really open
        assert rss_after > rss_before
        assert ep.alive()
