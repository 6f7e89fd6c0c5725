"""Half-close through the proxy, and PROXY protocol v2 in (from HAProxy) and out (to upstream).

The PROXY header is trusted only from ``server.proxy_protocol_from`` (here 127.0.0.1, where
HAProxy connects from): the tests that play an outsider bind their client to 127.0.0.2, which
Linux routes on loopback without any setup.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from OpenSSL import SSL
from prometheus_client import REGISTRY

from edgeproxy.wire.proxy_protocol import V2_SIGNATURE, ProxyHeaderParser, build_v2
from testkit.logs import process_log
from testkit.ports import free_port
from testkit.procs import stop_process
from testkit.proxy import RunningProxy, base_config, running_proxy, wait_port
from testkit.tlsstream import TLSStream
from testkit.upstreams import (
    Upstream,
    answer_after_eof,
    http_handler,
    proxy_header_recorder,
    start_upstream,
)

TRUSTED = ["127.0.0.1/32"]  # where HAProxy and the tests' usual clients connect from
OUTSIDER = "127.0.0.2"
REFUSED = ("edgeproxy_proxy_protocol_refused_total", {"reason": "untrusted_peer"})


def client_connection(ca_path: Path, name: str) -> SSL.Connection:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(ca_path))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    conn = SSL.Connection(ctx, None)
    conn.set_tlsext_host_name(name.encode())
    conn.set_connect_state()
    return conn


async def test_client_half_close_still_receives_the_whole_answer(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    reply_size = 300_000
    up = await start_upstream(nursery, answer_after_eof(reply_size))
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": [up.addr]}])
    async with running_proxy(tmp_path, cfg) as p:
        assert p.ca_path is not None
        tcp = await trio.open_tcp_stream(p.host, p.port)
        tls = TLSStream(tcp, client_connection(p.ca_path, "half.example.test"))
        await tls.do_handshake()
        await tls.send_all(b"x" * 12345)
        await tls.send_eof()  # close_notify: "I am done sending", still reading
        data = b""
        with trio.fail_after(15):
            while True:
                chunk = await tls.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        await tls.aclose()
    assert len(data) == reply_size
    assert data.startswith(b"got 12345 bytes;")


async def test_send_proxy_v2_carries_client_address(tmp_path: Path, nursery: trio.Nursery) -> None:
    ref: list[Upstream] = []
    up = await start_upstream(nursery, proxy_header_recorder(ref))
    ref.append(up)
    cfg = base_config(
        tmp_path, [{"sni": ["*"], "default": True, "upstreams": [up.addr], "send_proxy": "v2"}]
    )
    async with running_proxy(tmp_path, cfg) as p:
        res = await trio.run_process(
            [
                "curl",
                "-sS",
                "--fail",
                "--interface",
                "127.0.0.7",
                "--cacert",
                str(p.ca_path),
                "--resolve",
                f"pp.example.test:{p.port}:127.0.0.1",
                f"https://pp.example.test:{p.port}/",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr
    parsed = ProxyHeaderParser("v2").feed(up.seen[0])
    assert parsed is not None
    header, rest = parsed
    assert header.command == "PROXY"
    assert header.source is not None and header.source[0] == "127.0.0.7"
    assert header.destination == ("127.0.0.1", p.port)
    assert rest.startswith(b"GET / HTTP/1.1")


async def behind_a_balancer(
    tmp_path: Path, nursery: trio.Nursery, **sections: Any
) -> tuple[Upstream, dict[str, Any]]:
    """An upstream recording the PROXY v2 header we send it, and a config that reads PROXY v2
    from TRUSTED and sends PROXY v2 upstream."""
    ref: list[Upstream] = []
    up = await start_upstream(nursery, proxy_header_recorder(ref))
    ref.append(up)
    cfg = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": [up.addr], "send_proxy": "v2"}],
        server={"proxy_protocol": "v2", "proxy_protocol_from": TRUSTED},
        **sections,
    )
    return up, cfg


@pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="Debian haproxy not installed (tests/run installs it)"
)
async def test_proxy_v2_from_haproxy_in_and_out(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """HAProxy (mode tcp, send-proxy-v2) in front, as an NLB would be; the address HAProxy saw
    travels through edgeproxy into the PROXY v2 header edgeproxy sends upstream. HAProxy's own
    health checks arrive as PROXY LOCAL and must pass. The same header sent straight from an
    address outside proxy_protocol_from is refused: closed at once, counted, logged."""
    up, cfg = await behind_a_balancer(tmp_path, nursery)
    async with running_proxy(tmp_path, cfg) as p:
        hport = free_port()
        stats = free_port()
        refused = refused_count()
        # The header HAProxy will send for our curl below, forged by an outsider.
        forged = build_v2(("127.0.0.9", 40000), ("127.0.0.1", hport))
        assert not await tls_from(OUTSIDER, p, "lb.example.test", forged)
        assert refused_count() - refused == 1
        assert up.connections == 0 and p.rt.proxy.active == 0
        [line] = [r.getMessage() for r in caplog.records if r.name == "edgeproxy.proxy"]
        assert f"from {OUTSIDER}: not in server.proxy_protocol_from" in line
        conf = tmp_path / "haproxy.cfg"
        conf.write_text(f"""
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{hport}
    default_backend be
backend be
    server ep 127.0.0.1:{p.port} send-proxy-v2 check check-send-proxy inter 200ms
listen stats
    mode http
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats
""")
        proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            await trio.to_thread.run_sync(wait_port, "127.0.0.1", hport)
            await trio.sleep(1.0)  # let a few health checks run
            res = await trio.run_process(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "--interface",
                    "127.0.0.9",
                    "--cacert",
                    str(p.ca_path),
                    "--resolve",
                    f"lb.example.test:{hport}:127.0.0.1",
                    f"https://lb.example.test:{hport}/",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert res.returncode == 0, res.stderr
            csv = await trio.run_process(
                ["curl", "-sS", f"http://127.0.0.1:{stats}/stats;csv"],
                capture_stdout=True,
                check=False,
            )
        finally:
            stop_process(proc, grace=10)
    parsed = ProxyHeaderParser("v2").feed(up.seen[-1])
    assert parsed is not None
    header, _ = parsed
    assert header.source is not None and header.source[0] == "127.0.0.9"
    assert refused_count() - refused == 1  # HAProxy's connections and health checks passed
    # The destination is where the client connected (HAProxy's frontend), not edgeproxy's port.
    assert header.destination == ("127.0.0.1", hport)
    # The health checks (PROXY LOCAL) kept the server UP.
    be_line = next(line for line in csv.stdout.decode().splitlines() if line.startswith("be,ep,"))
    assert ",UP" in be_line, be_line


def refused_count() -> float:
    return REGISTRY.get_sample_value(*REFUSED) or 0.0


async def tls_from(
    source: str, p: RunningProxy, name: str, header: bytes, request: bytes = b""
) -> bytes | None:
    """From ``source``: ``header``, then a TLS handshake for ``name`` and ``request``.

    The answer up to EOF, or None if the proxy closed or reset the connection before the
    handshake ended. Never a timeout: a refusal must be immediate.
    """
    assert p.ca_path is not None
    ctx = ssl.create_default_context(cafile=str(p.ca_path))
    try:
        tcp = await trio.open_tcp_stream(p.host, p.port, local_address=source)
    except OSError:  # reset so soon that connect() itself saw it
        return None
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        with trio.fail_after(10):
            try:
                await tcp.send_all(header)
                await tls.do_handshake()
            except trio.BrokenResourceError:
                return None
            await tls.send_all(request)
            answer = b""
            while chunk := await tls.receive_some(65536):
                answer += chunk
            return answer
    finally:
        await trio.aclose_forcefully(tls)


async def test_max_connections_per_ip_counts_proxy_addresses_only_from_trusted_senders(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """An outsider rotating fake PROXY sources gets nothing (each would have had a fresh
    per-IP budget); the balancer's headers still decide whom the limit charges."""
    up = await start_upstream(nursery, http_handler(b"ok\n"))
    cfg = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": [up.addr]}],
        server={
            "proxy_protocol": "any",
            "proxy_protocol_from": TRUSTED,
            "max_connections_per_ip": 1,
        },
    )
    name = "limit.example.test"
    async with running_proxy(tmp_path, cfg) as p:
        proxy = p.rt.proxy
        refused = refused_count()
        for i in range(5):
            fake = build_v2((f"198.51.100.{i + 1}", 1000 + i), ("127.0.0.1", p.port))
            assert await tls_from(OUTSIDER, p, name, fake) is None, i
        assert refused_count() - refused == 5
        assert proxy.per_ip == {} and proxy.active == 0 and up.connections == 0

        # From the balancer (127.0.0.1): the header's address is the one charged.
        assert p.ca_path is not None
        ctx = ssl.create_default_context(cafile=str(p.ca_path))
        held = trio.SSLStream(await trio.open_tcp_stream(*p.addr), ctx, server_hostname=name)
        await held.transport_stream.send_all(build_v2(("203.0.113.7", 1), ("127.0.0.1", p.port)))
        await held.do_handshake()
        try:
            assert proxy.per_ip == {"203.0.113.7": 1}
            again = build_v2(("203.0.113.7", 2), ("127.0.0.1", p.port))
            assert await tls_from("127.0.0.1", p, name, again) is None  # limit_per_ip
            other = build_v2(("203.0.113.8", 3), ("127.0.0.1", p.port))
            answer = await tls_from("127.0.0.1", p, name, other, b"GET / HTTP/1.0\r\n\r\n")
            assert answer is not None and answer.endswith(b"ok\n")
        finally:
            await trio.aclose_forcefully(held)
        assert refused_count() - refused == 5


def unix_v2_header(source_path: bytes) -> bytes:
    block = source_path.ljust(108, b"\x00") + b"/run/lb.sock".ljust(108, b"\x00")
    return V2_SIGNATURE + bytes((0x21, 0x31)) + len(block).to_bytes(2, "big") + block


async def test_proxy_v2_unix_path_with_a_newline_is_no_client_address(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UNIX-family header's path (108 arbitrary bytes) once became the client address: a
    newline in it forged an access-log line, and send_proxy failed on it (internal_error).
    Now it means "use the real peer", like UNSPEC, and the log stays one line per record."""
    up, cfg = await behind_a_balancer(tmp_path, nursery, log={"format": "text", "level": "info"})
    forged = b"/x\n2026-01-01 00:00:00,000 INFO [1] edgeproxy.access: 6.6.6.6 sni=- result=ok\r"
    with process_log(monkeypatch) as plog:
        plog.setup(cfg)
        async with running_proxy(tmp_path, cfg) as p:
            answer = await tls_from(
                "127.0.0.1",
                p,
                "unix.example.test",
                unix_v2_header(forged),
                b"GET / HTTP/1.0\r\n\r\n",
            )
            with trio.fail_after(20):
                await p.rt.proxy.wait_idle()  # closed, counted and logged
        text = plog.text()
    assert answer is not None and answer.endswith(b"ok\n"), answer
    parsed = ProxyHeaderParser("v2").feed(up.seen[0])
    assert parsed is not None
    header, _ = parsed
    assert header.source is not None and header.source[0] == "127.0.0.1"  # the real peer
    access = [line for line in text.splitlines() if " edgeproxy.access: " in line]
    assert len(access) == 1, text
    assert " edgeproxy.access: 127.0.0.1 sni=unix.example.test " in access[0]
    assert access[0].endswith(" result=ok"), access[0]
    assert "6.6.6.6" not in text and "internal_error" not in text, text
