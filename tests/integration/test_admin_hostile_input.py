"""Hostile admin requests against a real edgeproxy process: it answers, it lives, storage stays.

``edgeproxy run`` and ``edgeproxy demo`` run as real subprocesses (loopback admin, no token,
the defaults an operator gets); requests go over TCP through hypercorn, so the path a handler
sees is what the server decoded (``%0a`` is a newline by then). The ask endpoint is a real HTTP
listener in the test (``testkit/ask.py``) that records every query it receives.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
import trio

from testkit.ask import AskRecorder, start_ask_recorder
from testkit.ports import free_port
from testkit.procs import kill_process
from testkit.proxy import edgeproxy_subprocess, wait_port
from testkit.tomlw import toml_dumps

DEADLINE = 20.0  # generous bound on any single wait; never a timing assertion
CONTROL_CHARACTERS = [*range(0x00, 0x20), 0x7F]
JSON = {"content-type": "application/json"}


async def start_ask(nursery: trio.Nursery) -> AskRecorder:
    """The ask endpoint of these tests: allows ``ok.ask.test`` only."""
    return await start_ask_recorder(nursery, lambda query: query == b"domain=ok.ask.test")


@dataclass
class Edge:
    proc: subprocess.Popen[bytes]
    admin: str
    state: Path
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self) -> httpx.AsyncClient:
        # trust_env=False: a proxy set in the environment must never see these requests.
        return httpx.AsyncClient(base_url=self.admin, trust_env=False, timeout=DEADLINE)


@contextmanager
def edge_run(tmp_path: Path, ask: str | None = None) -> Iterator[Edge]:
    """``edgeproxy run`` with the internal CA, a loopback admin without token, a file store."""
    port, admin = free_port(), free_port()
    state = tmp_path / "state"
    cfg = {
        "server": {"listen": [f"127.0.0.1:{port}"]},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "tls": {"issuer": "internal", "default_sni": "default.allowed.test"},
        "on_demand": {"allow": ["*.allowed.test"], "ask": ask},
        "storage": {"backend": "file", "path": str(state)},
        "routes": [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
    }
    path = tmp_path / "edgeproxy.toml"
    path.write_text(toml_dumps(cfg))
    log = tmp_path / "edgeproxy.log"
    with edgeproxy_subprocess(path, host="127.0.0.1", port=admin, log_path=log) as proc:
        yield Edge(proc, f"http://127.0.0.1:{admin}", state, log)


@contextmanager
def edge_demo(tmp_path: Path) -> Iterator[Edge]:
    """``edgeproxy demo``: its embedded default, admin on loopback without a token."""
    port, admin = free_port(), free_port()
    state = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "demo", "--listen", f"127.0.0.1:{port}",
             "--admin", f"127.0.0.1:{admin}", "--state-dir", str(state)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_port("127.0.0.1", admin)
        yield Edge(proc, f"http://127.0.0.1:{admin}", state, log)
    finally:
        kill_process(proc)


async def assert_alive(edge: Edge, client: httpx.AsyncClient) -> None:
    assert edge.alive(), edge.log.read_text()[-3000:]
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert (await client.get("/v1/domains")).status_code == 200
    assert edge.alive(), edge.log.read_text()[-3000:]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its content (modes and names included)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        mode = oct(p.lstat().st_mode)
        if p.is_file() and not p.is_symlink():
            out[rel] = mode + ":" + hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = mode
    return out


# ---------------------------------------------------------------------- finding 1: one request


async def test_newline_in_the_issue_path_is_400_and_the_process_lives(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ask = await start_ask(nursery)
    with edge_run(tmp_path, ask=ask.url) as edge:
        async with edge.client() as c:
            r = await c.post("/v1/domains/a%0a.allowed.test/issue", headers=JSON)
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "invalid_name"
            # A trailing newline once reached the ask endpoint as "domain=ok.ask.test%0A".
            r = await c.post("/v1/domains/ok.ask.test%0a/issue", headers=JSON)
            assert r.status_code == 400, r.text
            assert ask.queries == []
            # The ask endpoint still gets exactly the name for a real one.
            r = await c.post("/v1/domains/ok.ask.test/issue", headers=JSON)
            assert r.status_code == 200, r.text
            assert ask.queries == [b"domain=ok.ask.test"]
            await trio.sleep(0.5)  # background tasks (status persistence) run meanwhile
            await assert_alive(edge, c)
        assert "Traceback" not in edge.log.read_text()


async def test_newline_in_the_issue_path_against_the_demo(tmp_path: Path) -> None:
    with edge_demo(tmp_path) as edge:
        async with edge.client() as c:
            r = await c.post("/v1/domains/a%0a.edgeproxy.test/issue", headers=JSON)
            assert r.status_code == 400, r.text
            await trio.sleep(0.5)
            await assert_alive(edge, c)
        assert "Traceback" not in edge.log.read_text()


# ---------------------------------------------------------------------- fuzz: every route


def fuzz_names() -> list[str]:
    """Raw path segments (already percent-encoded where meant): control characters in every
    spelling, and non-ASCII / IDNA garbage. None of them is a valid name."""
    out: list[str] = []
    for c in CONTROL_CHARACTERS:
        out += [
            f"a%{c:02x}.allowed.test",  # decoded by the server into a control character
            f"a.allowed.test%{c:02X}",
            f"a%25{c:02x}.allowed.test",  # double-encoded: a literal "%0a" after decoding
        ]
    out += [
        "%c3%28.allowed.test",  # invalid UTF-8
        "%ff%fe.allowed.test",
        "%ed%a0%80.allowed.test",  # an encoded UTF-16 surrogate
        "%e2%80%ae.allowed.test",  # RIGHT-TO-LEFT OVERRIDE
        "b%C3%BCcher%00.allowed.test",  # a U-label hiding a NUL
        "xn--.allowed.test",
        "xn--%0a.allowed.test",
        "%2e%2e",  # ".."
        "..%2f..%2fetc",
        "a%2fb.allowed.test",  # an encoded slash inside the name
        "%20.allowed.test",
        "a" * 64 + ".allowed.test",
        ("a" * 60 + ".") * 5 + "allowed.test",
        "%e2%80%8b",  # ZERO WIDTH SPACE alone: empty after IDNA mapping
        "%ef%bc%8e%ef%bc%8e",  # FULLWIDTH FULL STOPs
    ]
    return out


# (methods, path template): the ones taking a name get every spelling of every fuzz name;
# wrong methods included (405 must stay 405, not 500).
NAME_ROUTES = [
    (("GET", "POST"), "/v1/domains/{}"),
    (("POST", "GET"), "/v1/domains/{}/issue"),
    (("POST",), "/v1/domains/{}/issue?force=1"),
    (("GET", "PATCH", "DELETE", "POST"), "/v1/hostnames/{}"),
]
# The fixed routes with something appended, and the query strings: each control character once.
OTHER_ROUTES = [
    (("GET", "POST"), "/healthz{}"),
    (("GET", "POST"), "/readyz{}"),
    (("GET", "POST"), "/metrics{}"),
    (("GET", "POST"), "/v1/domains{}"),
    (("GET", "POST"), "/v1/hostnames{}"),
    (("GET",), "/v1/openapi.json{}"),
    (("GET",), "/v1/hostnames?cursor={}"),
    (("GET",), "/v1/hostnames?state={}&limit={}"),
    (("POST",), "/v1/domains/denied.example/issue?force={}"),  # not allowed: only the query varies
]
# State-changing routes that read a body.
BODY_ROUTES = [
    ("POST", "/v1/domains/b.allowed%0a.test/issue"),
    ("POST", "/v1/hostnames"),
    ("PATCH", "/v1/hostnames/b.allowed.test"),
]


async def raw_request(port: int, request: bytes) -> bytes:
    """Send bytes an HTTP client library would refuse to, return what came back within a
    second (a request the server still waits on the rest of gets no answer: that is fine)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reply = b""
    try:
        await stream.send_all(request)
        with trio.move_on_after(1.0):
            while chunk := await stream.receive_some(65536):
                reply += chunk
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()
    return reply


async def test_fuzzed_admin_requests_change_nothing_and_kill_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ask = await start_ask(nursery)
    with edge_run(tmp_path, ask=ask.url) as edge:
        async with edge.client() as c:
            assert (await c.get("/readyz")).status_code == 200
            await trio.sleep(0.5)  # let the first maintenance pass settle before the snapshot
            before = snapshot(edge.state)
            statuses: set[int] = set()

            async def check(method: str, path: str, **kw: object) -> None:
                r = await c.request(method, path, **kw)  # type: ignore[arg-type]
                statuses.add(r.status_code)
                assert r.status_code < 500, (method, path, kw, r.text)

            for name in fuzz_names():
                for methods, route in NAME_ROUTES:
                    for method in methods:
                        await check(method, route.format(name), headers=JSON)
                # The registry takes its hostname from a JSON body: the decoded name there.
                raw = unquote(name, errors="surrogateescape")
                for body in ({"hostname": raw}, {"hostname": "b.allowed.test", "upstream": raw}):
                    await check("POST", "/v1/hostnames", content=json.dumps(body), headers=JSON)
            for c_ in CONTROL_CHARACTERS:
                for methods, route in OTHER_ROUTES:
                    for method in methods:
                        await check(method, route.format(f"%{c_:02x}", f"%{c_:02x}"), headers=JSON)
                # Control characters in the bodies of the state-changing routes, raw (not
                # even valid JSON) and escaped inside JSON strings.
                raw_body = b'{"hostname": "a' + bytes([c_]) + b'.allowed.test"}' + bytes([c_])
                json_body = json.dumps({"hostname": f"a{chr(c_)}.allowed.test", "metadata": {
                    chr(c_): chr(c_)}, "upstream": f"127.0.0.1:{chr(c_)}"}).encode()
                for method, route in BODY_ROUTES:
                    for body_bytes in (raw_body, json_body):
                        # One connection each: a handler that never reads the body leaves the
                        # server unable to reuse the connection (h11), a client-side race.
                        await check(
                            method, route, content=body_bytes,
                            headers={**JSON, "connection": "close"},
                        )
            # Raw control bytes on the wire (no client library would send them): in the
            # request target, in a header value, in the method.
            port = int(edge.admin.rsplit(":", 1)[1])
            replies: list[tuple[bytes, bytes]] = []

            async def send_raw(req: bytes) -> None:
                replies.append((req, await raw_request(port, req)))

            async with trio.open_nursery() as n:
                for c_ in CONTROL_CHARACTERS:
                    ch = bytes([c_])
                    for req in (
                        b"POST /v1/domains/a" + ch + b".allowed.test/issue HTTP/1.1\r\n"
                        b"Host: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        b"GET /v1/domains/a.allowed.test" + ch + b" HTTP/1.1\r\n"
                        b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a" + ch + b"b\r\n"
                        b"Connection: close\r\n\r\n",
                        b"PO" + ch + b"ST /v1/domains HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Connection: close\r\n\r\n",
                    ):
                        n.start_soon(send_raw, req)
            for req, reply in replies:
                assert not reply.startswith(b"HTTP/1.1 5"), (req, reply[:200])
            await assert_alive(edge, c)
            await trio.sleep(0.5)  # anything spawned in the background has run by now
            await assert_alive(edge, c)
            assert snapshot(edge.state) == before
            # Nothing invalid ever reached the ask endpoint; the one valid, not statically
            # allowed name did.
            assert set(ask.queries) == {b"domain=denied.example"}
            assert statuses <= {200, 400, 403, 404, 405, 413, 422, 429}, statuses
        assert "Traceback" not in edge.log.read_text()
