"""Scenarios for the PROXY header: what a balancer puts in front of a stream, and what we read.

The last tests put HAProxy (the protocol's reference implementation) on both sides of our code:
it must accept the headers we build, and we must parse the headers it builds.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from edgeproxy.errors import PeerError
from edgeproxy.wire.proxy_protocol import (
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_AWS,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    build_v1,
    build_v2,
)
from testkit.ports import free_port
from testkit.procs import stop_process

Mode = Literal["v1", "v2", "any"]


def parse(data: bytes, mode: Mode = "any") -> tuple[ProxyHeader, bytes]:
    result = ProxyHeaderParser(mode).feed(data)
    assert result is not None
    return result


def parse_bytewise(data: bytes, mode: Mode = "any") -> tuple[ProxyHeader, bytes]:
    """Feed one byte per read; only the read completing the header may return something."""
    parser = ProxyHeaderParser(mode)
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is None
    result = parser.feed(data[-1:])
    assert result is not None
    return result


def error(data: bytes, mode: Mode = "any") -> ProxyProtocolError:
    with pytest.raises(ProxyProtocolError) as info:
        ProxyHeaderParser(mode).feed(data)
    return info.value


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + size.to_bytes(2, "big") + block


def tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes((tlv_type,)) + len(value).to_bytes(2, "big") + value


IPV4_BLOCK = (
    bytes((203, 0, 113, 7, 198, 51, 100, 1)) + (4242).to_bytes(2, "big") + (443).to_bytes(2, "big")
)

# --- v1 -----------------------------------------------------------------------------------


def test_v1_tcp4_gives_the_client_address_and_leaves_the_rest() -> None:
    header, rest = parse(b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n\x16\x03\x01")

    assert header == ProxyHeader(
        1, "PROXY", "TCP4", ("203.0.113.7", 4242), ("198.51.100.1", 443), ()
    )
    assert rest == b"\x16\x03\x01"


def test_v1_tcp6_addresses_are_canonicalised() -> None:
    header, _ = parse(b"PROXY TCP6 2001:DB8:0:0::1 ::FFFF:192.0.2.1 65535 0\r\n", "v1")
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::1", 65535)
    assert header.destination == ("::ffff:192.0.2.1", 0)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",  # 107 bytes, the maximum
        b"PROXY UNKNOWN whatever the sender put here\r\n",
    ],
)
def test_v1_unknown_means_use_the_real_connection(line: bytes) -> None:
    header, rest = parse(line + b"next")
    assert header.command == "LOCAL"
    assert header.family == "UNSPEC"
    assert header.source is None and header.destination is None
    assert rest == b"next"


def test_v1_one_byte_at_a_time() -> None:
    line = b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
    assert parse_bytewise(line) == parse(line)


def feed_in_two(data: bytes, cut: int, mode: Mode) -> tuple[ProxyHeader, bytes]:
    """Two reads; once the header is complete the caller owns the later bytes."""
    parser = ProxyHeaderParser(mode)
    first = parser.feed(data[:cut])
    if first is not None:
        return first[0], first[1] + data[cut:]
    second = parser.feed(data[cut:])
    assert second is not None
    return second


def test_v1_split_at_every_offset() -> None:
    data = b"PROXY TCP6 ::1 ::2 1000 2000\r\nGET /"
    for cut in range(1, len(data)):
        assert feed_in_two(data, cut, "v1") == parse(data), cut


def test_v1_line_without_crlf_is_refused_at_107_bytes() -> None:
    parser = ProxyHeaderParser("v1")
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * 92) is None  # 106 bytes
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(b"x")
    assert info.value.reason == "v1_too_long"


V1_MALFORMED = [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1_bad_line_end"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "v1_bad_line_end"),
    (b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "v1_bad_line_end"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "v1_bad_syntax"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1_bad_syntax"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1_bad_syntax"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1_bad_address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1_bad_address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1_bad_address"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "v1_bad_address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1_bad_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "v1_bad_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "v1_bad_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "v1_bad_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "v1_bad_character"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "v1_bad_character"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_protocol"),
    (b"PROXY UNKNOWNX\r\n", "v1_bad_protocol"),
    (b"PROXY\r\n", "bad_signature"),
    (b"PROXX TCP4", "bad_signature"),
]


@pytest.mark.parametrize(("data", "reason"), V1_MALFORMED)
def test_v1_malformed_line_is_refused(data: bytes, reason: str) -> None:
    assert error(data, "v1").reason == reason


def test_v1_unknown_protocol_is_refused_before_the_line_ends() -> None:
    assert error(b"PROXY UDP", "v1").reason == "v1_bad_protocol"


def test_v1_wrong_signature_is_refused_at_the_first_wrong_byte() -> None:
    parser = ProxyHeaderParser("v1")
    assert parser.feed(b"PRO") is None
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(b"T")
    assert info.value.reason == "bad_signature"


# --- v2 -----------------------------------------------------------------------------------


def test_v2_tcp4_with_tlvs_behind_an_aws_privatelink_balancer() -> None:
    data = v2(
        0x21,
        0x11,
        IPV4_BLOCK
        + tlv(PP2_TYPE_AUTHORITY, b"shop.example.net")
        + tlv(PP2_TYPE_AWS, b"\x01vpce-0123456789abcdef0")
        + tlv(PP2_TYPE_NOOP, b"")
        + tlv(PP2_TYPE_CRC32C, b"\x00\x00\x00\x00"),  # kept, not verified
    )

    header, rest = parse(data + b"\x16\x03\x01")

    assert header.version == 2
    assert header.command == "PROXY"
    assert header.family == "TCP4"
    assert header.source == ("203.0.113.7", 4242)
    assert header.destination == ("198.51.100.1", 443)
    assert header.authority == "shop.example.net"
    assert header.aws_vpce_id == "vpce-0123456789abcdef0"
    assert [t for t, _ in header.tlvs] == [PP2_TYPE_AUTHORITY, PP2_TYPE_AWS, 4, 3]
    assert rest == b"\x16\x03\x01"


def test_v2_aws_tlv_of_another_subtype_is_not_a_vpce_id() -> None:
    header, _ = parse(v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_AWS, b"\x02other")))
    assert header.aws_vpce_id is None
    assert header.authority is None
    assert header.tlv(PP2_TYPE_AWS) == b"\x02other"


def test_v2_tcp6() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("00000000000000000000ffffc0000201")
    header, _ = parse(v2(0x21, 0x21, src + dst + b"\x10\x00\x01\xbb"), "v2")
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::1", 4096)
    assert header.destination == ("::ffff:192.0.2.1", 443)


@pytest.mark.parametrize(
    "src",
    [
        b"/run/client.sock",
        # A path is any bytes: a newline and a fake log line, invalid UTF-8, an abstract name.
        b"/x\n2026-01-01 00:00:00,000 INFO [1] edgeproxy.access: 6.6.6.6 forged\r\x1b[2J",
        b"\xff\xfe\n",
        b"\x00abstract\x00with NULs",
    ],
)
def test_v2_unix_stream_gives_no_address_use_the_real_peer(src: bytes) -> None:
    """A UNIX path is not a client address: the header says "use the real connection", as
    UNSPEC does, whatever bytes the path holds; the TLVs after the block are still read."""
    block = src.ljust(108, b"\x00") + b"\x00dst".ljust(108, b"\x00")
    data = v2(0x21, 0x31, block + tlv(PP2_TYPE_AUTHORITY, b"shop.example.net"))
    header, rest = parse(data + b"\x16\x03\x01")
    assert (header.command, header.family) == ("PROXY", "UNIX")
    assert header.source is None and header.destination is None
    assert header.authority == "shop.example.net"
    assert rest == b"\x16\x03\x01"
    assert parse_bytewise(data) == (header, b"")


def test_v2_unix_stream_with_a_short_block_is_refused() -> None:
    assert error(v2(0x21, 0x31, bytes(215)), "v2").reason == "v2_short_address"


def test_v2_local_health_check_ignores_the_whole_block() -> None:
    # Even a garbage family byte and a bogus block: LOCAL means "use the real endpoints".
    header, rest = parse(v2(0x20, 0x99, b"\xff" * 20) + b"rest")
    assert header == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, ())
    assert rest == b"rest"
    assert parse(build_v2(None, None))[0] == header


@pytest.mark.parametrize("fam", [0x00, 0x12, 0x22, 0x32])
def test_v2_unspec_and_udp_fall_back_to_the_real_connection(fam: int) -> None:
    size = {0x00: 0, 0x12: 12, 0x22: 36, 0x32: 216}[fam]
    header, _ = parse(v2(0x21, fam, bytes(size)))
    assert header.command == "PROXY"
    assert header.family == "UNSPEC"
    assert header.source is None and header.destination is None


def test_v2_one_byte_at_a_time_and_at_every_split() -> None:
    data = build_v2(("2001:db8::7", 1), ("2001:db8::8", 2), [(PP2_TYPE_UNIQUE_ID, b"id-1")])
    expected = parse(data + b"tail")
    assert parse_bytewise(data) == (expected[0], b"")
    for cut in range(1, len(data) + 4):
        assert feed_in_two(data + b"tail", cut, "v2") == expected, cut


def test_v2_largest_header_is_accepted_and_nothing_more_is_swallowed() -> None:
    big = tlv(0xE0, bytes(65535 - 12 - 3))
    data = v2(0x21, 0x11, IPV4_BLOCK + big)
    assert len(data) == 16 + 65535
    header, rest = parse(data + b"after")
    assert header.tlvs == ((0xE0, bytes(65520)),)
    assert rest == b"after"


@pytest.mark.parametrize("position", range(12))
def test_v2_signature_mismatch_is_refused_at_that_byte(position: int) -> None:
    data = bytearray(build_v2(("1.2.3.4", 1), ("5.6.7.8", 2)))
    data[position] ^= 0x40
    parser = ProxyHeaderParser("v2")
    for i in range(position):
        assert parser.feed(bytes(data[i : i + 1])) is None
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(bytes(data[position : position + 1]))
    assert info.value.reason == "bad_signature"


V2_MALFORMED = [
    ("version 1 in the v2 layout", v2(0x11, 0x11, IPV4_BLOCK), "v2_bad_version"),
    ("version 3", v2(0x31, 0x11, IPV4_BLOCK), "v2_bad_version"),
    ("command 2", v2(0x22, 0x11, IPV4_BLOCK), "v2_bad_command"),
    ("family 4", v2(0x21, 0x41, IPV4_BLOCK), "v2_bad_family"),
    ("transport 3", v2(0x21, 0x13, IPV4_BLOCK), "v2_bad_family"),
    ("INET with UNSPEC transport", v2(0x21, 0x10, IPV4_BLOCK), "v2_bad_family"),
    ("length shorter than the IPv4 block", v2(0x21, 0x11, IPV4_BLOCK[:11]), "v2_short_address"),
    ("length shorter than the IPv6 block", v2(0x21, 0x21, bytes(35)), "v2_short_address"),
    ("truncated TLV header", v2(0x21, 0x11, IPV4_BLOCK + b"\x02\x00"), "v2_bad_tlv"),
    ("TLV value past the end", v2(0x21, 0x11, IPV4_BLOCK + b"\x02\x00\x09abc"), "v2_bad_tlv"),
    ("authority not UTF-8", v2(0x21, 0x11, IPV4_BLOCK + tlv(2, b"\xff\xfe")), "v2_bad_tlv"),
    ("VPCE id not ASCII", v2(0x21, 0x11, IPV4_BLOCK + tlv(0xEA, b"\x01\xe9")), "v2_bad_tlv"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [(d, r) for _, d, r in V2_MALFORMED], ids=[n for n, _, _ in V2_MALFORMED]
)
def test_v2_malformed_header_is_refused(data: bytes, reason: str) -> None:
    assert error(data, "v2").reason == reason
    # Fed bytewise, the same verdict.
    parser = ProxyHeaderParser("v2")
    with pytest.raises(ProxyProtocolError) as info:
        for i in range(len(data)):
            parser.feed(data[i : i + 1])
    assert info.value.reason == reason


def test_v2_short_address_is_refused_before_the_block_arrives() -> None:
    assert error(v2(0x21, 0x21, b"", length=8)).reason == "v2_short_address"


# --- modes and parser life cycle ----------------------------------------------------------


def test_mode_v1_refuses_a_v2_header_at_its_first_byte() -> None:
    assert error(b"\r", "v1").reason == "bad_signature"


def test_mode_v2_refuses_a_v1_header_at_its_first_byte() -> None:
    assert error(b"P", "v2").reason == "bad_signature"


@pytest.mark.parametrize("mode", ["v1", "v2", "any"])
def test_a_tls_client_without_header_is_refused_at_once(mode: Mode) -> None:
    refused = error(b"\x16", mode)
    assert refused.reason == "bad_signature"
    assert isinstance(refused, PeerError)


def test_mode_any_reads_both_versions() -> None:
    assert parse(build_v1(("1.2.3.4", 1), ("5.6.7.8", 2)))[0].version == 1
    assert parse(build_v2(("1.2.3.4", 1), ("5.6.7.8", 2)))[0].version == 2


def test_unknown_mode_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="mode"):
        ProxyHeaderParser("v3")  # type: ignore[arg-type]


def test_parser_is_single_use() -> None:
    parser = ProxyHeaderParser("any")
    assert parser.feed(build_v2(None, None)) is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_failed_parser_keeps_failing_with_the_same_error() -> None:
    parser = ProxyHeaderParser("v1")
    with pytest.raises(ProxyProtocolError) as first:
        parser.feed(b"X")
    with pytest.raises(ProxyProtocolError) as again:
        parser.feed(b"PROXY UNKNOWN\r\n")
    assert again.value is first.value


# --- building -----------------------------------------------------------------------------


def test_build_v1() -> None:
    assert build_v1(("1.2.3.4", 1), ("5.6.7.8", 443)) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1 443\r\n"
    assert build_v1(("2001:DB8::1", 0), ("::1", 65535)) == (
        b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n"
    )


def test_build_mixed_families_maps_ipv4_into_ipv6() -> None:
    # A dual-stack listener can see an IPv4 client on an IPv6 local address.
    assert build_v1(("192.0.2.1", 1), ("2001:db8::1", 2)) == (
        b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1 2\r\n"
    )
    header, _ = parse(build_v2(("192.0.2.1", 1), ("2001:db8::1", 2)))
    assert header.family == "TCP6"
    assert header.source == ("::ffff:192.0.2.1", 1)


def test_build_drops_ipv6_zones() -> None:
    assert build_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


def test_build_v2_local() -> None:
    assert build_v2(None, None) == V2_SIGNATURE + b"\x20\x00\x00\x00"


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_v1(("1.2.3.4", 70000), ("5.6.7.8", 1)),
        lambda: build_v1(("1.2.3.4", -1), ("5.6.7.8", 1)),
        lambda: build_v1(("not-an-ip", 1), ("5.6.7.8", 1)),
        lambda: build_v2(("1.2.3.4", 1), None),
        lambda: build_v2(None, None, [(PP2_TYPE_NOOP, b"")]),
        lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), [(256, b"")]),
        lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), [(0xE0, bytes(65536))]),
        lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), [(0xE0, bytes(40000))] * 2),
        lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), [(PP2_TYPE_AUTHORITY, b"\xff")]),
    ],
)
def test_build_refuses_what_it_cannot_encode(call: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert not isinstance(info.value, PeerError)  # our bug, not the peer's


# --- interop with HAProxy -----------------------------------------------------------------


@dataclass
class HAProxy:
    v1_port: int  # frontend relaying to us with send-proxy
    v2_port: int  # frontend relaying to us with send-proxy-v2 (+ crc32c TLV)
    backend: socket.socket  # where HAProxy connects to, i.e. us


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAProxy]:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    backend.settimeout(10)
    v1_port, v2_port = free_port(), free_port()
    back = backend.getsockname()[1]
    config = Path(tmp_path_factory.mktemp("haproxy")) / "haproxy.cfg"
    config.write_text(
        f"""
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend v1
    bind 127.0.0.1:{v1_port} accept-proxy
    default_backend v1
frontend v2
    bind 127.0.0.1:{v2_port} accept-proxy
    default_backend v2
backend v1
    server us 127.0.0.1:{back} send-proxy
backend v2
    server us 127.0.0.1:{back} send-proxy-v2 proxy-v2-options crc32c
"""
    )
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(proc, v1_port)
        _wait_listening(proc, v2_port)
        yield HAProxy(v1_port, v2_port, backend)
    finally:
        stop_process(proc, grace=10)
        backend.close()


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"haproxy is not listening on {port}")


def _relay_through(haproxy: HAProxy, port: int, header: bytes) -> tuple[ProxyHeader, bytes]:
    """Send ``header`` + payload to HAProxy; parse the header HAProxy sends us."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(header + b"payload")
        conn, _ = haproxy.backend.accept()
        with conn:
            conn.settimeout(10)
            parser = ProxyHeaderParser("any")
            while True:
                data = conn.recv(4096)
                assert data, "haproxy closed without a header"
                result = parser.feed(data)
                if result is not None:
                    header_seen, rest = result
                    while len(rest) < len(b"payload"):
                        more = conn.recv(4096)
                        assert more
                        rest += more
                    return header_seen, rest


INTEROP = [
    (("203.0.113.7", 4242), ("198.51.100.1", 443)),
    (("2001:db8::7", 65535), ("2001:db8::443", 443)),
]


@pytest.mark.parametrize(("source", "destination"), INTEROP)
@pytest.mark.parametrize("ours", ["v1", "v2"])
@pytest.mark.parametrize("theirs", ["v1", "v2"])
def test_haproxy_accepts_our_header_and_we_parse_its_own(
    haproxy: HAProxy,
    source: tuple[str, int],
    destination: tuple[str, int],
    ours: str,
    theirs: str,
) -> None:
    header = build_v1(source, destination) if ours == "v1" else build_v2(source, destination)
    port = haproxy.v1_port if theirs == "v1" else haproxy.v2_port

    seen, rest = _relay_through(haproxy, port, header)

    assert seen.version == int(theirs[1])
    assert seen.command == "PROXY"
    assert seen.family == ("TCP4" if "." in source[0] else "TCP6")
    assert seen.source == source
    assert seen.destination == destination
    assert rest == b"payload"
    if theirs == "v2":
        assert seen.tlv(PP2_TYPE_CRC32C) is not None
