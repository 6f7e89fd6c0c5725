"""``[log] format = "json"``: one JSON object per line, the access line's fields, no secrets.

The formatter alone first (plain records in, lines out), then whole connections through an
in-process proxy with the log set up exactly as ``edgeproxy run`` does it: the access line must
carry the client learnt from the PROXY header and every field an operator filters on, and the
log of a certificate issuance (internal CA, then a real ACME CA when pebble is installed) must
never contain key material or a JWS.
"""

from __future__ import annotations

import io
import json
import logging
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from edgeproxy.config import load_config_data
from edgeproxy.logs import JsonFormatter, setup_logging
from tests.support.pebble import pebble_available, start_pebble
from tests.support.ports import free_port
from tests.support.proxy import base_config, running_proxy
from tests.support.upstreams import http_handler, start_upstream

NAME = "app.example.test"
BODY = b"hello from upstream\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n"
CLIENT = ("203.0.113.7", 40001)  # what the load balancer's PROXY header says
PROXY_V1 = f"PROXY TCP4 {CLIENT[0]} 127.0.0.1 {CLIENT[1]} 443\r\n".encode()
# A PEM private key, a JWS (its "protected" header, its "signature"): none may reach a log.
SECRET_MARKERS = ("PRIVATE KEY", "protected", "signature")


# ---------------------------------------------------------------------- the formatter alone


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("edgeproxy.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


def test_a_record_is_one_line_of_json_with_its_extra_fields() -> None:
    line = JsonFormatter().format(
        record("reload rejected:\n  %s", "server.drain_timeout: bad", route="shop", bytes_up=12)
    )
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "reload rejected:\n  server.drain_timeout: bad"
    assert (out["level"], out["logger"]) == ("warning", "edgeproxy.test")
    assert (out["route"], out["bytes_up"]) == ("shop", 12)
    assert out["ts"].endswith("Z") and out["ts"][10] == "T"


def test_a_traceback_stays_on_the_line() -> None:
    line = JsonFormatter().format(record("failed", exc=True))
    assert "\n" not in line
    assert "ValueError: boom\nsecond line" in json.loads(line)["exc"]


def test_values_json_cannot_encode_become_strings() -> None:
    out = json.loads(JsonFormatter().format(record("x", path=Path("/a/b"), peer=("::1", 443))))
    assert (out["path"], out["peer"]) == ("/a/b", ["::1", 443])


# ---------------------------------------------------------------------- whole connections


class JsonLog:
    """The process log, set up from a config as ``edgeproxy run`` does it, into a buffer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self._buf = io.StringIO()

    def setup(self, cfg_data: dict[str, Any]) -> None:
        cfg = load_config_data(cfg_data)
        with self._monkeypatch.context() as m:
            m.setattr(sys, "stderr", self._buf)  # setup_logging logs to the stderr of its time
            setup_logging(cfg.log.format, cfg.log.level)

    def text(self) -> str:
        return self._buf.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        # Every line must parse on its own, as one object: that is the whole contract.
        out = [json.loads(line) for line in self.text().splitlines()]
        assert all(isinstance(o, dict) for o in out)
        return out


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[JsonLog]:
    """Restores the logging setup ``JsonLog.setup`` replaced, at teardown."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    quiet = {n: logging.getLogger(n).level for n in ("httpx", "hypercorn.access")}
    try:
        yield JsonLog(monkeypatch)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(20):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def assert_no_secrets(text: str) -> None:
    found = [m for m in SECRET_MARKERS if m in text]
    assert found == [], f"{found} in the log"


async def test_access_line_in_json_carries_every_field(
    tmp_path: Path, nursery: trio.Nursery, json_log: JsonLog
) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(
        tmp_path,
        [{"sni": [NAME], "upstreams": [up.addr], "alpn": ["http/1.1"]}],
        server={"proxy_protocol": "v1"},
        log={"format": "json", "level": "debug"},
    )
    json_log.setup(cfg)
    async with running_proxy(tmp_path, cfg) as p:
        assert p.ca_path is not None
        ctx = ssl.create_default_context(cafile=str(p.ca_path))
        ctx.set_alpn_protocols(["http/1.1"])
        tcp = await trio.open_tcp_stream(*p.addr)
        await tcp.send_all(PROXY_V1)
        tls = trio.SSLStream(tcp, ctx, server_hostname=NAME)
        await tls.send_all(REQUEST)
        answer = await read_to_eof(tls)
        await trio.aclose_forcefully(tls)
        assert answer.endswith(BODY)
        with trio.fail_after(20):
            await p.rt.proxy.wait_idle()  # closed, counted and logged

    lines = json_log.lines()
    for out in lines:
        assert {"ts", "level", "logger", "msg"} <= out.keys(), out
    access = [out for out in lines if out["logger"] == "edgeproxy.access"]
    assert len(access) == 1, access
    a = access[0]
    assert a["client"] == f"{CLIENT[0]}:{CLIENT[1]}"  # from the PROXY header, not the socket
    assert (a["sni"], a["alpn"], a["route"], a["upstream"]) == (NAME, "http/1.1", NAME, up.addr)
    assert (a["bytes_up"], a["bytes_down"]) == (len(REQUEST), len(answer))
    assert isinstance(a["duration"], float) and a["duration"] >= 0
    assert a["result"] == "ok"
    assert a["msg"].startswith(f"{CLIENT[0]} sni={NAME} ")

    # The first connection issued the certificate from the internal CA: logged, keylessly.
    assert any(f"issued for {NAME}" in out["msg"] for out in lines), lines
    assert_no_secrets(json_log.text())


@pytest.mark.skipif(not pebble_available(), reason="pebble / pebble-challtestsrv not installed")
async def test_acme_issuance_logs_no_keys_and_no_jws(
    tmp_path: Path, nursery: trio.Nursery, json_log: JsonLog
) -> None:
    port = free_port()
    # Rejected nonces make the client take its error and retry paths, where a careless log
    # line would dump the request it sent.
    with start_pebble(tmp_path, tls_port=port, env={"PEBBLE_WFE_NONCEREJECT": "30"}) as pebble:
        up = await start_upstream(nursery, http_handler(BODY))
        cfg = base_config(
            tmp_path,
            [{"sni": ["*"], "default": True, "upstreams": [up.addr]}],
            server={"listen": [f"127.0.0.1:{port}"]},
            tls={"issuer": "acme", "default_sni": None},
            acme={
                "directory": pebble.directory_url,
                "trust": str(pebble.ca_bundle_path),
                "email": "ops@example.test",
            },
            log={"format": "json", "level": "debug"},
        )
        json_log.setup(cfg)
        async with running_proxy(tmp_path, cfg) as p:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the log is under test here, not the chain
            tcp = await trio.open_tcp_stream(*p.addr)
            tls = trio.SSLStream(tcp, ctx, server_hostname=NAME)
            with trio.fail_after(60):
                await tls.do_handshake()
            await trio.aclose_forcefully(tls)

    lines = json_log.lines()
    msgs = [out["msg"] for out in lines]
    assert any(f"issued for {NAME}" in m for m in msgs), msgs
    assert any("answered TLS-ALPN-01 validation" in m for m in msgs), msgs
    validations = [
        out
        for out in lines
        if out["logger"] == "edgeproxy.access" and out["result"] == "acme_challenge_answered"
    ]
    assert validations and all(v["alpn"] == "acme-tls/1" for v in validations)
    assert_no_secrets(json_log.text())
