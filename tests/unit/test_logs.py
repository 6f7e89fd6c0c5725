"""``[log] format = "json"``: one JSON object per line, the access line's fields, no secrets;
``"text"``: one line per record, whatever a peer put in a name, path or address.

The formatters alone first (plain records in, lines out), then whole connections through an
in-process proxy with the log set up exactly as ``edgeproxy run`` does it: the access line must
carry the client learnt from the PROXY header and every field an operator filters on, and the
log of a certificate issuance (internal CA, then a real ACME CA when pebble is installed) must
never contain key material or a JWS.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from edgeproxy.logs import JsonFormatter, TextFormatter
from testkit.logs import ProcessLog, process_log
from testkit.pebble import pebble_available, start_pebble
from testkit.ports import free_port
from testkit.proxy import base_config, running_proxy
from testkit.upstreams import http_handler, start_upstream

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


def test_json_escapes_every_control_character() -> None:
    nasty = "".join(map(chr, range(32))) + "\x7f\u2028\u2029\x85"
    line = JsonFormatter().format(record("peer %s", nasty, sni=nasty))
    # Python's splitlines() also breaks at \x1c-\x1e, \x85, \u2028, \u2029: none survive.
    assert len(line.splitlines()) == 1
    out = json.loads(line)
    assert (out["msg"], out["sni"]) == (f"peer {nasty}", nasty)


# ---------------------------------------------------------------------- the text formatter

# Every character that is not printable: C0 and C1 controls, DEL, line and paragraph
# separators, a format character, a lone surrogate (what surrogateescape makes of bad UTF-8).
NON_PRINTABLE = "".join(map(chr, range(32))) + "\x7f\x85\x9b\u2028\u2029\u200b\udcff"
FORGED = "\n2026-01-01 00:00:00,000 INFO [1] edgeproxy.access: 6.6.6.6 sni=- result=ok"


def text_line(rec: logging.LogRecord) -> str:
    return TextFormatter().format(rec)


@pytest.mark.parametrize("char", NON_PRINTABLE)
def test_text_escapes_each_non_printable_character_in_message_and_args(char: str) -> None:
    line = text_line(record(f"msg{char}x %s", f"arg{char}y"))
    assert line.isprintable(), repr(line)
    escaped = repr(char)[1:-1]  # \n, \x1b, \u2028...
    assert line.endswith(f": msg{escaped}x arg{escaped}y")


def test_text_escapes_every_field() -> None:
    rec = record("%s", "a\rb" + FORGED)
    rec.name = "edgeproxy\n.fake"
    rec.levelname = "WARNING\x1b[2J"
    line = text_line(rec)
    assert len(line.splitlines()) == 1 and line.isprintable()
    assert " WARNING\\x1b[2J [" in line and " edgeproxy\\n.fake: a\\rb\\n2026-01-01 " in line


def test_text_keeps_printable_text_of_any_script_and_the_usual_layout() -> None:
    line = text_line(record("déjà vu %s", "名前.example 'quoted' \\ back"))
    pid = os.getpid()
    assert line.endswith(f" WARNING [{pid}] edgeproxy.test: déjà vu 名前.example 'quoted' \\ back")
    assert line[4] == "-" and line[10] == " "  # starts with the time, as before


def test_text_traceback_lines_are_indented_and_escaped() -> None:
    try:
        raise ValueError("bad path" + FORGED + "\r\x1b[1A")
    except ValueError:
        rec = record("failed for %s", "x\ny")
        rec.exc_info = sys.exc_info()
    lines = text_line(rec).split("\n")
    assert lines[0].endswith(": failed for x\\ny")
    assert lines[1].strip() == "Traceback (most recent call last):"
    # Only the first line starts at column 0: no line of the traceback can pass for a record,
    # not even the one the exception's message tried to forge.
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert any("2026-01-01 00:00:00,000 INFO" in line for line in lines[1:])
    assert all(line.isprintable() for line in lines)
    assert lines[-1].endswith("\\r\\x1b[1A")


# ---------------------------------------------------------------------- whole connections


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProcessLog]:
    with process_log(monkeypatch) as log:
        yield log


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
    tmp_path: Path, nursery: trio.Nursery, json_log: ProcessLog
) -> None:
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = base_config(
        tmp_path,
        [{"sni": [NAME], "upstreams": [up.addr], "alpn": ["http/1.1"]}],
        server={"proxy_protocol": "v1", "proxy_protocol_from": ["127.0.0.1/32"]},
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
    tmp_path: Path, nursery: trio.Nursery, json_log: ProcessLog
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
