"""Properties of the wire parsers, checked with hypothesis.

* Segmentation never matters: a hello cut into any TLS records and any TCP reads, and a PROXY
  header cut into any reads, parse to the same thing as when sent whole.
* What we build is what we read: random SNI/ALPN/versions/extensions, random PROXY addresses
  and TLVs, round-trip.
* Garbage is only ever refused with the parser's own error type: random bytes and random
  mutations of valid input (real captured hellos included) never raise anything else, and
  the verdict does not depend on how the bytes were cut.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.wire.clienthello import (
    NEED_DATA,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
    parse_client_hello,
)
from edgeproxy.wire.proxy_protocol import (
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    build_v1,
    build_v2,
)
from testkit import tlsbuild as tb
from testkit.clienthellos import CAPTURED

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Mode = Literal["v1", "v2", "any"]

CAPTURED_HELLOS = sorted(CAPTURED.glob("*.bin"))
GREASE_NAMES = {v.to_bytes(2, "big") for v in tb.GREASE}

# --- strategies ---------------------------------------------------------------------------

_label = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20
)
hostnames = st.builds(
    lambda labels, dot: ".".join(labels) + ("." if dot else ""),
    st.lists(_label, min_size=1, max_size=5),
    st.booleans(),
)
alpn_names = st.one_of(
    st.sampled_from([b"h2", b"http/1.1", b"acme-tls/1", *sorted(GREASE_NAMES)]),
    st.binary(min_size=1, max_size=12),
)
versions = st.lists(
    st.one_of(st.sampled_from(tb.GREASE), st.integers(0, 0xFFFF)), min_size=1, max_size=8
)
# Extension types the parser interprets, or that hellos() adds, are never drawn at random.
_BUILT_ON_PURPOSE = {
    tb.EXT_SERVER_NAME,
    tb.EXT_ALPN,
    tb.EXT_SUPPORTED_VERSIONS,
    tb.EXT_KEY_SHARE,
    tb.EXT_PADDING,
}
other_extensions = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF).filter(lambda t: t not in _BUILT_ON_PURPOSE),
        st.binary(max_size=40),
    ),
    max_size=6,
    unique_by=lambda ext: ext[0],
)


@st.composite
def hellos(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    """A handshake message plus what the parser must report for it."""
    sni = draw(st.none() | hostnames)
    alpn = draw(st.lists(alpn_names, max_size=6))
    offered = draw(st.none() | versions)
    extra = draw(other_extensions)
    big = draw(st.booleans())
    suites = draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20))
    extensions: list[tuple[int, bytes]] = [*extra]
    if sni is not None:
        extensions.append(tb.server_name(sni))
    if alpn:
        extensions.append(tb.alpn(*alpn))
    if offered is not None:
        extensions.append(tb.supported_versions(*offered))
    if big:
        extensions.append(tb.key_share((tb.X25519MLKEM768, 1216), (tb.X25519, 32)))
        extensions.append(tb.padding(draw(st.integers(0, 20000))))
    extensions = draw(st.permutations(extensions))
    body = tb.client_hello_body(cipher_suites=suites, extensions=extensions)
    expected: dict[str, object] = {
        "sni": None if sni is None else sni.lower().removesuffix("."),
        "alpn_protocols": tuple(n.decode("latin-1") for n in alpn if n not in GREASE_NAMES),
        "supported_versions": (
            (tb.TLS12,) if offered is None else tuple(v for v in offered if v not in tb.GREASE)
        ),
        "cipher_suites": tuple(suites),
        "extensions": tuple(t for t, _ in extensions),
    }
    return tb.handshake_message(body), expected


def record_sizes(message_len: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, min(message_len, tb.MAX_FRAGMENT)), max_size=12)


def cuts(data_len: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, max(1, data_len - 1)), max_size=12)


def feed(chunks: list[bytes], max_size: int = 65536) -> ClientHello | str:
    """The outcome of feeding ``chunks``: a hello, "need" or the error reason."""
    parser = ClientHelloParser(max_size)
    try:
        for chunk in chunks:
            result = parser.feed(chunk)
            if result is not NEED_DATA:
                return result
    except ClientHelloError as exc:
        return f"error:{type(exc).__name__}:{exc.reason}"
    return "need"


# --- ClientHello --------------------------------------------------------------------------


@PROPERTY
@given(hellos(), st.data())
def test_built_hello_parses_to_what_was_built_however_it_is_cut(
    built: tuple[bytes, dict[str, object]], data: st.DataObject
) -> None:
    message, expected = built
    whole = tb.to_records(message)
    fragmented = tb.to_records(message, data.draw(record_sizes(len(message))))
    reads = tb.split(fragmented, data.draw(cuts(len(fragmented))))

    in_one = parse_client_hello(whole)
    in_pieces = feed(reads)

    assert in_one is not None
    for name, value in expected.items():
        assert getattr(in_one, name) == value, name
    assert isinstance(in_pieces, ClientHello)
    assert dataclasses.replace(in_pieces, raw=b"") == dataclasses.replace(in_one, raw=b"")
    assert in_pieces.raw == fragmented


@PROPERTY
@given(st.binary(max_size=600), st.data())
def test_random_bytes_only_ever_raise_client_hello_errors(
    garbage: bytes, data: st.DataObject
) -> None:
    for prefix in (b"", b"\x16\x03\x01"):  # half the time, past the "is it TLS" gate
        wire = prefix + garbage
        reads = tb.split(wire, data.draw(cuts(len(wire))))
        assert feed([wire], max_size=512) == feed(reads, max_size=512)


_mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "delete", "insert", "truncate"]),
        st.integers(0, 1 << 16),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        if not out:
            break
        i = where % len(out)
        if kind == "flip":
            out[i] ^= value or 1
        elif kind == "delete":
            del out[i]
        elif kind == "insert":
            out.insert(i, value)
        else:
            del out[i:]
    return bytes(out)


@PROPERTY
@given(
    st.one_of(
        st.sampled_from(CAPTURED_HELLOS).map(Path.read_bytes),
        hellos().map(lambda built: tb.to_records(built[0], [300])),
    ),
    _mutations,
    st.data(),
)
def test_mutated_hellos_get_the_same_verdict_however_they_are_cut(
    valid: bytes, mutations: list[tuple[str, int, int]], data: st.DataObject
) -> None:
    wire = mutate(valid, mutations)
    reads = tb.split(wire, data.draw(cuts(len(wire))))
    whole = feed([wire])
    assert feed(reads) == whole
    if isinstance(whole, ClientHello):
        assert wire.startswith(whole.raw)


# --- PROXY protocol -----------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlvs = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t not in (0x02, 0xEA)), st.binary(max_size=64)),
    max_size=5,
)


def canonical(host: str) -> str:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def feed_proxy(chunks: list[bytes], mode: Mode) -> tuple[ProxyHeader, bytes] | str:
    parser = ProxyHeaderParser(mode)
    try:
        for i, chunk in enumerate(chunks):
            result = parser.feed(chunk)
            if result is not None:
                return result[0], result[1] + b"".join(chunks[i + 1 :])
    except ProxyProtocolError as exc:
        return f"error:{exc.reason}"
    return "need"


@PROPERTY
@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6), st.tuples(ipv4, ipv6)),
    st.tuples(ports, ports),
    st.sampled_from(["v1", "v2"]),
    tlvs,
    st.binary(max_size=20),
    st.data(),
)
def test_proxy_header_round_trips_however_it_is_cut(
    hosts: tuple[str, str],
    port_pair: tuple[int, int],
    version: str,
    extra_tlvs: list[tuple[int, bytes]],
    after: bytes,
    data: st.DataObject,
) -> None:
    source, destination = (hosts[0], port_pair[0]), (hosts[1], port_pair[1])
    if version == "v1":
        wire = build_v1(source, destination)
    else:
        wire = build_v2(source, destination, extra_tlvs)
    stream = wire + after
    reads = tb.split(stream, data.draw(cuts(len(stream))))
    modes: tuple[Mode, Mode] = ("any", "v1") if version == "v1" else ("any", "v2")
    mode = data.draw(st.sampled_from(modes))

    result = feed_proxy(reads, mode)

    assert not isinstance(result, str), result
    header, rest = result
    assert rest == after
    assert header.version == int(version[1])
    mixed = ":" in hosts[0] or ":" in hosts[1]
    assert header.family == ("TCP6" if mixed else "TCP4")
    mapped = [f"::ffff:{h}" if mixed and ":" not in h else h for h in hosts]
    assert header.source == (canonical(mapped[0]), port_pair[0])
    assert header.destination == (canonical(mapped[1]), port_pair[1])
    if version == "v2":
        assert list(header.tlvs) == extra_tlvs


@PROPERTY
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: b"\r\n\r\n\x00\r\nQUIT\n" + b),
    ),
    st.sampled_from(["v1", "v2", "any"]),
    st.data(),
)
def test_random_bytes_only_ever_raise_proxy_protocol_errors(
    garbage: bytes, mode: Mode, data: st.DataObject
) -> None:
    reads = tb.split(garbage, data.draw(cuts(len(garbage))))
    assert feed_proxy(reads, mode) == feed_proxy([garbage], mode)


@PROPERTY
@given(
    st.one_of(
        st.builds(build_v1, st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
        st.builds(build_v1, st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
        st.builds(build_v2, st.tuples(ipv6, ports), st.tuples(ipv4, ports), tlvs),
        st.just(b"PROXY UNKNOWN\r\n"),
        st.just(build_v2(None, None)),
    ),
    _mutations,
    st.data(),
)
def test_mutated_proxy_headers_get_the_same_verdict_however_they_are_cut(
    valid: bytes, mutations: list[tuple[str, int, int]], data: st.DataObject
) -> None:
    wire = mutate(valid, mutations)
    reads = tb.split(wire, data.draw(cuts(len(wire))))
    assert feed_proxy(reads, "any") == feed_proxy([wire], "any")
