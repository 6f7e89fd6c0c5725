"""A ClientHello the proxy refuses ends with the TLS alert the RFC names, never a bare close.

Each case is one class of fault tlsfuzzer found answered by a silent close (decode_error,
protocol_version, unexpected_message, record_overflow, illegal_parameter). The expected alert is
written here from the RFC text, not read from the proxy's table, so a wrong table entry fails.
The size bound is OpenSSL's own: a real client's hello over the old 64 KiB limit completes, one
over OpenSSL's limit gets an alert.
"""

from __future__ import annotations

import ssl

import pytest
import trio
from prometheus_client import REGISTRY

from edgeproxy.wire.clienthello import MAX_CLIENT_HELLO_BODY
from testkit import tlsbuild as tb
from testkit.http_proxy import BODY, normal_client, read_until_closed
from testkit.proxy import RunningProxy

# RFC 8446 s6 AlertDescription values, spelled out here on purpose (see the module docstring).
UNEXPECTED_MESSAGE = 10
RECORD_OVERFLOW = 22
ILLEGAL_PARAMETER = 47
DECODE_ERROR = 50
PROTOCOL_VERSION = 70


def _with_extensions(*ext: tb.Extension, raw_block: bytes | None = None) -> bytes:
    block = raw_block if raw_block is not None else tb.encode_extensions(ext)
    body = tb.client_hello_body(extensions=None) + block
    return tb.to_records(tb.handshake_message(body))


_GOOD = tb.client_hello(sni="a.example.test")

CASES = [
    # RFC 8446 s6.2 decode_error: a length that does not add up (tlsfuzzer "fuzz ext length").
    (
        "extension length overruns the block",
        _with_extensions(raw_block=tb.vec16(tb.u16(23) + tb.u16(67) + b"ab")),
        DECODE_ERROR,
        "bad_extensions",
    ),
    (
        "truncated hello (record and message cut short)",
        tb.to_records(tb.handshake_message(b"\x03\x03" + bytes(32) + b"\x00")),
        DECODE_ERROR,
        "hello_too_short",
    ),
    (
        "malformed server_name list length",
        _with_extensions((0, tb.u16(50) + b"\x00" + tb.vec16(b"a.example.test"))),
        DECODE_ERROR,
        "bad_server_name",
    ),
    # RFC 6066 s3 / tlsfuzzer: a host_name that is not a host name is an illegal_parameter.
    (
        "NUL in host_name",
        _with_extensions(tb.server_name(b"a\x00.example.test")),
        ILLEGAL_PARAMETER,
        "bad_host_name",
    ),
    # RFC 8446 s4.2.1 / D.5: a legacy_version that is not TLS at all gets protocol_version.
    (
        "legacy_version 0x0200",
        tb.to_records(tb.client_hello(sni="a.example.test", legacy_version=0x0200)),
        PROTOCOL_VERSION,
        "bad_legacy_version",
    ),
    # RFC 8446 s5.1: zero-length handshake fragments MUST NOT be sent.
    (
        "zero-length handshake record first",
        tb.record(b"") + tb.to_records(_GOOD),
        UNEXPECTED_MESSAGE,
        "empty_record",
    ),
    # RFC 8446 s5: an unexpected record type is answered with unexpected_message.
    (
        "application data inside the hello",
        tb.to_records(_GOOD, [20])[: 5 + 20] + tb.record(b"x", content_type=23),
        UNEXPECTED_MESSAGE,
        "unexpected_content_type",
    ),
    # RFC 8446 s5.1: a record longer than 2**14 bytes gets record_overflow.
    (
        "record of 2**14 + 1 bytes",
        tb.record(_GOOD + bytes(tb.MAX_FRAGMENT + 1 - len(_GOOD))),
        RECORD_OVERFLOW,
        "record_overflow",
    ),
    # Beyond OpenSSL's own ClientHello limit: the alert OpenSSL sends for it.
    (
        "hello announced one byte over OpenSSL's limit",
        tb.record(tb.u8(1) + tb.u24(MAX_CLIENT_HELLO_BODY + 1) + bytes(100)),
        ILLEGAL_PARAMETER,
        "too_large",
    ),
]


async def _exchange(p: RunningProxy, data: bytes) -> bytes:
    """Send ``data`` and return everything the proxy sends before it closes."""
    stream = await trio.open_tcp_stream(p.host, p.port)
    await stream.send_all(data)
    received = await read_until_closed(stream, limit=10)
    await stream.aclose()
    return received


def _hellos_refused(reason: str) -> float:
    value = REGISTRY.get_sample_value("edgeproxy_client_hellos_total", {"result": reason})
    return value or 0.0


@pytest.mark.parametrize(
    ("wire", "alert", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_refused_hello_gets_the_rfc_alert(
    proxy: RunningProxy, wire: bytes, alert: int, reason: str
) -> None:
    before = _hellos_refused(reason)
    reply = await _exchange(proxy, wire)
    # One fatal alert record (level 2), then the close: nothing else, nothing less.
    assert reply == bytes((21, 3, 3, 0, 2, 2, alert))
    assert _hellos_refused(reason) == before + 1  # still counted under its reason


async def test_a_real_hello_over_64_kib_completes(proxy: RunningProxy) -> None:
    # OpenSSL's client with an ALPN list of ~65 KB: a hello bigger than the old 64 KiB bound
    # (it arrives in several records and reads), well within OpenSSL's own server limit.
    assert proxy.ca_path is not None
    ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
    ctx.set_alpn_protocols([f"p{i:03d}".ljust(250, "x") for i in range(260)])
    assert (await normal_client(proxy, "big.example.test", ctx)).endswith(BODY)
