"""Half-close through the proxy, and PROXY protocol v2 in (from HAProxy) and out (to upstream)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from OpenSSL import SSL

from edgeproxy.tls.stream import TLSStream
from edgeproxy.wire.proxy_protocol import ProxyHeaderParser
from tests.support.ports import free_port
from tests.support.proxy import base_config, running_proxy, wait_port
from tests.support.upstreams import (
    Upstream,
    answer_after_eof,
    proxy_header_recorder,
    start_upstream,
)


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


@pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="Debian haproxy not installed (tests/run installs it)"
)
async def test_proxy_v2_from_haproxy_in_and_out(tmp_path: Path, nursery: trio.Nursery) -> None:
    """HAProxy (mode tcp, send-proxy-v2) in front, as an NLB would be; the address HAProxy saw
    travels through edgeproxy into the PROXY v2 header edgeproxy sends upstream. HAProxy's own
    health checks arrive as PROXY LOCAL and must pass."""
    ref: list[Upstream] = []
    up = await start_upstream(nursery, proxy_header_recorder(ref))
    ref.append(up)
    cfg = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": [up.addr], "send_proxy": "v2"}],
        server={"proxy_protocol": "v2"},
    )
    async with running_proxy(tmp_path, cfg) as p:
        hport = free_port()
        stats = free_port()
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
            proc.terminate()
            proc.wait(timeout=10)
    parsed = ProxyHeaderParser("v2").feed(up.seen[-1])
    assert parsed is not None
    header, _ = parsed
    assert header.source is not None and header.source[0] == "127.0.0.9"
    # The destination is where the client connected (HAProxy's frontend), not edgeproxy's port.
    assert header.destination == ("127.0.0.1", hport)
    # The health checks (PROXY LOCAL) kept the server UP.
    be_line = next(line for line in csv.stdout.decode().splitlines() if line.startswith("be,ep,"))
    assert ",UP" in be_line, be_line
