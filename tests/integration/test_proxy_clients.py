"""Real clients fetch a page through edgeproxy: curl, openssl s_client, Python ssl, Chromium.

Certificates come from the internal CA (created at test time) and are verified against it
wherever the client allows it.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import trio

from testkit.proxy import base_config, running_proxy
from testkit.upstreams import http_handler, start_upstream

BODY = b"hello from upstream\n"


async def run(
    cmd: list[str], *, stdin: bytes = b"", timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            cmd,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **(env or {})},
        )


def routes(up_addr: str, alpn: list[str] | None = None) -> list[dict[str, object]]:
    return [
        {"sni": ["*"], "default": True, "upstreams": [up_addr], "alpn": alpn or ["h2", "http/1.1"]}
    ]


async def test_curl_fetches_through_proxy_with_verified_chain(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    async with running_proxy(tmp_path, base_config(tmp_path, routes(up.addr, ["http/1.1"]))) as p:
        res = await run(
            [
                "curl",
                "-sS",
                "--fail",
                "--cacert",
                str(p.ca_path),
                "--resolve",
                f"shop.example.test:{p.port}:127.0.0.1",
                f"https://shop.example.test:{p.port}/",
            ]
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout == BODY
        # A second name gets its own certificate on demand.
        res = await run(
            [
                "curl",
                "-sS",
                "--fail",
                "--cacert",
                str(p.ca_path),
                "-w",
                "%{ssl_verify_result}",
                "-o",
                "/dev/null",
                "--resolve",
                f"other.example.test:{p.port}:127.0.0.1",
                f"https://other.example.test:{p.port}/",
            ]
        )
        assert res.returncode == 0 and res.stdout == b"0", res.stderr


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("sni", [True, False])
async def test_openssl_s_client(
    tmp_path: Path, nursery: trio.Nursery, version: str, sni: bool
) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    async with running_proxy(tmp_path, base_config(tmp_path, routes(up.addr))) as p:
        cmd = [
            "openssl",
            "s_client",
            version,
            "-connect",
            f"127.0.0.1:{p.port}",
            "-CAfile",
            str(p.ca_path),
            "-verify_return_error",
            "-alpn",
            "h2,http/1.1",
            "-ign_eof",
        ]
        if sni:
            cmd += ["-servername", "app.example.test", "-verify_hostname", "app.example.test"]
        else:
            # No SNI: the default route and tls.default_sni's certificate.
            cmd += ["-noservername", "-verify_hostname", "default.example.test"]
        res = await run(cmd, stdin=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        out = res.stdout.decode(errors="replace")
        assert "Verify return code: 0 (ok)" in out, out + res.stderr.decode(errors="replace")
        assert ("TLSv1.3" if version == "-tls1_3" else "TLSv1.2") in out
        assert "ALPN protocol: h2" in out
        assert BODY.decode() in out


async def test_alpn_follows_the_route(tmp_path: Path, nursery: trio.Nursery) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(
        tmp_path,
        [
            {"sni": ["h1.example.test"], "upstreams": [up.addr], "alpn": ["http/1.1"]},
            {"sni": ["*"], "default": True, "upstreams": [up.addr]},  # no ALPN configured
        ],
    )
    async with running_proxy(tmp_path, cfg) as p:
        for name, expect in (
            ("h1.example.test", "ALPN protocol: http/1.1"),
            ("x.example.test", "No ALPN negotiated"),
        ):
            res = await run(
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{p.port}",
                    "-servername",
                    name,
                    "-alpn",
                    "h2,http/1.1",
                    "-CAfile",
                    str(p.ca_path),
                ],
                stdin=b"",
            )
            assert expect in res.stdout.decode(), res.stdout.decode()


async def test_python_ssl_client(tmp_path: Path, nursery: trio.Nursery) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    async with running_proxy(tmp_path, base_config(tmp_path, routes(up.addr))) as p:
        ctx = ssl.create_default_context(cafile=str(p.ca_path))
        ctx.set_alpn_protocols(["http/1.1"])
        tcp = await trio.open_tcp_stream("127.0.0.1", p.port)
        tls = trio.SSLStream(tcp, ctx, server_hostname="py.example.test")
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: py.example.test\r\n\r\n")
        data = b""
        while True:
            try:
                chunk = await tls.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
        assert data.endswith(BODY)
        assert tls.selected_alpn_protocol() == "http/1.1"
        cert = tls.getpeercert()
        assert ("DNS", "py.example.test") in cert["subjectAltName"]
        await tls.aclose()


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed (tests/run installs it)"
)
async def test_headless_chromium(tmp_path: Path, nursery: trio.Nursery) -> None:
    up = await start_upstream(
        nursery, http_handler(b"<html><body><p id=x>hello chromium</p></body></html>")
    )
    async with running_proxy(tmp_path, base_config(tmp_path, routes(up.addr, ["http/1.1"]))) as p:
        home = tmp_path / "home"
        nssdb = home / ".pki" / "nssdb"
        nssdb.mkdir(parents=True)
        env = {"HOME": str(home)}
        verified = False
        if shutil.which("certutil"):
            # Chromium on Linux trusts the user's NSS database: put our CA there so the
            # certificate is really verified, not ignored.
            await run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], env=env)
            res = await run(
                [
                    "certutil",
                    "-A",
                    "-d",
                    f"sql:{nssdb}",
                    "-n",
                    "edgeproxy-test",
                    "-t",
                    "C,,",
                    "-i",
                    str(p.ca_path),
                ],
                env=env,
            )
            verified = res.returncode == 0
        cmd = [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chrome'}",
            f"--host-resolver-rules=MAP browser.example.test 127.0.0.1:{p.port}",
            "--dump-dom",
            "https://browser.example.test/",
        ]
        if not verified:
            cmd.insert(1, "--ignore-certificate-errors")
        res = await run(cmd, env=env, timeout=90)
        assert b"hello chromium" in res.stdout, res.stderr.decode(errors="replace")[-2000:]


@pytest.mark.parametrize("tickets", [True, False])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_session_resumption_follows_config(
    tmp_path: Path, nursery: trio.Nursery, tickets: bool, version: ssl.TLSVersion
) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(tmp_path, routes(up.addr), tls={"session_tickets": tickets})
    async with running_proxy(tmp_path, cfg) as p:

        def two_connections() -> bool:
            import socket

            ctx = ssl.create_default_context(cafile=str(p.ca_path))
            ctx.minimum_version = ctx.maximum_version = version
            name = "resume.example.test"
            with ctx.wrap_socket(socket.create_connection(p.addr), server_hostname=name) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(65536)  # TLS 1.3 tickets arrive after the handshake
                session = s.session
            with ctx.wrap_socket(
                socket.create_connection(p.addr), server_hostname=name, session=session
            ) as s2:
                return s2.session_reused

        assert await trio.to_thread.run_sync(two_connections) is tickets


async def test_tickets_from_before_two_key_rotations_are_refused(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # tls.ticket_key_rotation = 2 s: a ticket resumes at once, and once its keys are more
    # than two periods old the client gets a full handshake (and the page) instead.
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(tmp_path, routes(up.addr), tls={"ticket_key_rotation": 2.0})
    versions = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
    async with running_proxy(tmp_path, cfg) as p:
        contexts = {}
        for v in versions:  # a session belongs to the client context that made it
            contexts[v] = ssl.create_default_context(cafile=str(p.ca_path))
            contexts[v].minimum_version = contexts[v].maximum_version = v

        def fetch(version: ssl.TLSVersion, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession]:
            import socket

            with contexts[version].wrap_socket(
                socket.create_connection(p.addr), server_hostname="rotate.example.test",
                session=session,
            ) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert BODY in s.recv(65536)  # TLS 1.3 tickets arrive after the handshake
                assert s.session is not None
                return s.session_reused, s.session

        def sessions_resume(sessions: dict[ssl.TLSVersion, ssl.SSLSession]) -> list[bool]:
            return [fetch(v, sessions[v])[0] for v in versions]

        sessions = {v: (await trio.to_thread.run_sync(fetch, v, None))[1] for v in versions}
        assert await trio.to_thread.run_sync(sessions_resume, sessions) == [True, True]
        await trio.sleep(4.5)  # more than two rotation periods
        assert await trio.to_thread.run_sync(sessions_resume, sessions) == [False, False]
        assert p.rt.proxy.tickets is not None and p.rt.proxy.tickets.rotations >= 1


async def test_several_listeners_ipv4_and_ipv6(tmp_path: Path, nursery: trio.Nursery) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(tmp_path, routes(up.addr, ["http/1.1"]), server={"listen": ["127.0.0.1:0", "[::1]:0"]})
    async with running_proxy(tmp_path, cfg) as p:
        bound = p.rt.proxy.bound
        assert [b[0] for b in bound] == ["127.0.0.1", "::1"]
        for host, port in bound:
            url_host = f"[{host}]" if ":" in host else host
            res = await run(
                ["curl", "-sS", "--fail", "--cacert", str(p.ca_path), "--resolve",
                 f"v6.example.test:{port}:{url_host}", f"https://v6.example.test:{port}/"]
            )
            assert res.returncode == 0 and res.stdout == BODY, (host, res.stderr)
