"""Scenarios for the ClientHello peek: what a client sends first, and what the proxy learns.

Hellos are built with testkit.tlsbuild (so each test says exactly what the client sent)
or are real captures from curl, openssl, Python and Chromium (testkit/clienthellos).
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import pytest

from edgeproxy.errors import PeerError
from edgeproxy.wire.clienthello import (
    DEFAULT_MAX_SIZE,
    MAX_CLIENT_HELLO_BODY,
    NEED_DATA,
    REJECTION_ALERTS,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
    ClientHelloTooLarge,
    MalformedClientHello,
    NotTLS,
    Reason,
    parse_client_hello,
)
from edgeproxy.wire.tls_alert import AlertDescription
from testkit import tlsbuild as tb
from testkit.clienthellos import capture

FIXTURES = Path(capture.__file__).parent


def feed_all(chunks: list[bytes], max_size: int = 65536) -> ClientHello:
    """Feed reads in order; every read but the last must leave the parser wanting more."""
    parser = ClientHelloParser(max_size)
    for chunk in chunks[:-1]:
        assert parser.feed(chunk) is NEED_DATA
    result = parser.feed(chunks[-1])
    assert result is not NEED_DATA
    return result


def without_raw(hello: ClientHello) -> ClientHello:
    return dataclasses.replace(hello, raw=b"")


def error_from(data: bytes, max_size: int = 65536) -> ClientHelloError:
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(data, max_size)
    return info.value


# --- a normal client ----------------------------------------------------------------------


def test_a_modern_hello_in_one_read_gives_everything_the_proxy_routes_on() -> None:
    wire = tb.to_records(tb.client_hello("shop.example.net", ["h2", "http/1.1"]))

    hello = parse_client_hello(wire)

    assert hello is not None
    assert hello.sni == "shop.example.net"
    assert hello.alpn_protocols == ("h2", "http/1.1")
    assert hello.supported_versions == (tb.TLS13, tb.TLS12)
    assert hello.legacy_version == tb.TLS12
    assert hello.cipher_suites == tb.DEFAULT_CIPHER_SUITES
    assert hello.extensions == (0, 10, 13, 16, 43, 51)
    assert hello.raw == wire
    assert not hello.offers_only_acme_tls


def test_incomplete_hello_means_need_more() -> None:
    wire = tb.to_records(tb.client_hello())
    for cut in (0, 1, 5, 9, len(wire) - 1):
        assert parse_client_hello(wire[:cut]) is None


def test_fed_one_byte_at_a_time() -> None:
    wire = tb.to_records(tb.client_hello("a.example", ["h2"]))

    hello = feed_all([wire[i : i + 1] for i in range(len(wire))])

    assert hello == parse_client_hello(wire)


def test_split_into_two_reads_at_every_offset() -> None:
    wire = tb.to_records(tb.client_hello("a.example", ["http/1.1"]))
    whole = parse_client_hello(wire)

    for cut in range(1, len(wire)):
        assert feed_all([wire[:cut], wire[cut:]]) == whole, cut


def test_hello_split_over_many_records_is_reassembled() -> None:
    message = tb.client_hello("multi.example", ["h2"])
    # 1-byte records split even the 4-byte handshake header across records.
    for sizes in ([1] * len(message), [3, 1, 2, 50], [len(message) - 1]):
        wire = tb.to_records(message, sizes)
        hello = feed_all(tb.split(wire, range(7, len(wire), 7)))
        assert hello.sni == "multi.example"
        assert hello.alpn_protocols == ("h2",)
        assert hello.raw == wire


def test_hello_larger_than_one_record_with_post_quantum_key_share() -> None:
    message = tb.client_hello(
        "big.example",
        ["h2"],
        key_shares=[(tb.X25519MLKEM768, 1216), (tb.X25519, 32)],
        padding_length=20000,
    )
    wire = tb.to_records(message)
    assert len(tb.record_payloads(wire)) == 2  # more than 2**14 bytes: two records

    hello = feed_all(tb.split(wire, range(1000, len(wire), 1000)))

    assert hello.sni == "big.example"
    assert hello.extensions[-1] == tb.EXT_PADDING
    assert hello.raw == wire


def test_bytes_after_the_hello_are_kept_in_buffered_not_in_raw() -> None:
    wire = tb.to_records(tb.client_hello())
    change_cipher_spec = tb.record(b"\x01", content_type=20)
    parser = ClientHelloParser()

    hello = parser.feed(wire + change_cipher_spec)
    assert hello is not NEED_DATA
    assert hello.raw == wire
    assert parser.buffered == wire + change_cipher_spec

    # Later reads only extend buffered: the proxy primes OpenSSL with all of it.
    assert parser.feed(b"early data") is hello
    assert parser.buffered == wire + change_cipher_spec + b"early data"


def test_buffered_holds_partial_input_too() -> None:
    wire = tb.to_records(tb.client_hello())
    parser = ClientHelloParser()
    parser.feed(wire[:10])
    assert parser.buffered == wire[:10]


# --- what the hello says ------------------------------------------------------------------


def test_no_sni() -> None:
    hello = parse_client_hello(tb.to_records(tb.client_hello(sni=None)))
    assert hello is not None
    assert hello.sni is None
    assert tb.EXT_SERVER_NAME not in hello.extensions


@pytest.mark.parametrize(
    ("sent", "seen"),
    [("Shop.Example.NET", "shop.example.net"), ("shop.example.net.", "shop.example.net")],
)
def test_sni_is_lower_cased_without_trailing_dot(sent: str, seen: str) -> None:
    hello = parse_client_hello(tb.to_records(tb.client_hello(sent)))
    assert hello is not None
    assert hello.sni == seen


def test_sni_entries_of_other_name_types_are_ignored() -> None:
    both = tb.server_name("real.example", entries=[(7, b"\x00\x01opaque")])
    only_other = tb.server_name(entries=[(1, b"not-a-host-name")])

    def sni_of(ext: tuple[int, bytes]) -> str | None:
        body = tb.client_hello_body(extensions=[ext])
        hello = parse_client_hello(tb.to_records(tb.handshake_message(body)))
        assert hello is not None
        return hello.sni

    assert sni_of(both) == "real.example"
    assert sni_of(only_other) is None


def test_grease_does_not_confuse_versions_alpn_or_extensions() -> None:
    message = tb.client_hello(
        "grease.example",
        [bytes([0x3A, 0x3A]), "h2", bytes([0xFA, 0xFA]), "http/1.1"],
        grease=True,
    )
    hello = parse_client_hello(tb.to_records(message))
    assert hello is not None

    assert hello.supported_versions == (tb.TLS13, tb.TLS12)
    assert hello.alpn_protocols == ("h2", "http/1.1")
    # Wire-faithful fields keep GREASE, in place.
    assert hello.cipher_suites[0] == tb.GREASE[1]
    assert hello.extensions[0] == tb.GREASE[2]
    assert hello.extensions[-1] == tb.GREASE[9]
    assert hello.sni == "grease.example"


def test_grease_tables_hold_exactly_the_rfc_8701_values() -> None:
    # The parser drops GREASE by set lookup; the sets must match the definition everywhere.
    from edgeproxy.wire.clienthello import _GREASE, _GREASE_ALPN, is_grease

    assert {v for v in range(1 << 16) if is_grease(v)} == _GREASE
    assert {int.from_bytes(name, "big") for name in _GREASE_ALPN} == _GREASE
    assert all(len(name) == 2 for name in _GREASE_ALPN)
    # A GREASE-looking ALPN name of another length is a real (if odd) protocol name.
    message = tb.client_hello("x.example", [bytes([0x3A, 0x3A, 0x3A]), "h2"])
    hello = parse_client_hello(tb.to_records(message))
    assert hello is not None
    assert hello.alpn_protocols == (":::", "h2")


def test_only_grease_versions_leave_no_supported_version() -> None:
    body = tb.client_hello_body(extensions=[tb.supported_versions(tb.GREASE[0], tb.GREASE[4])])
    hello = parse_client_hello(tb.to_records(tb.handshake_message(body)))
    assert hello is not None
    assert hello.supported_versions == ()


def test_ech_outer_extension_is_just_an_extension() -> None:
    message = tb.client_hello("public.example", ["h2"], extra_extensions=[tb.ech_outer(300)])
    hello = parse_client_hello(tb.to_records(message))
    assert hello is not None
    assert hello.sni == "public.example"  # the outer (public) name; the inner one is sealed
    assert tb.EXT_ECH_OUTER in hello.extensions


def test_tls12_hello_without_extensions_block() -> None:
    body = tb.client_hello_body(legacy_version=tb.TLS12, extensions=None)
    hello = parse_client_hello(tb.to_records(tb.handshake_message(body)))
    assert hello is not None
    assert hello.sni is None
    assert hello.extensions == ()
    assert hello.alpn_protocols == ()
    assert hello.supported_versions == (tb.TLS12,)


def test_without_supported_versions_the_legacy_version_is_the_offer() -> None:
    message = tb.client_hello(versions=None, legacy_version=tb.TLS11)
    hello = parse_client_hello(tb.to_records(message))
    assert hello is not None
    assert hello.supported_versions == (tb.TLS11,)


@pytest.mark.parametrize(
    ("alpn", "only_acme"),
    [
        (["acme-tls/1"], True),
        (["acme-tls/1", "h2"], False),
        (["h2", "acme-tls/1"], False),
        ([], False),
        (["ACME-TLS/1"], False),
    ],
)
def test_acme_tls_alpn_challenge_is_recognised(alpn: list[str], only_acme: bool) -> None:
    hello = parse_client_hello(tb.to_records(tb.client_hello("acme.example", alpn)))
    assert hello is not None
    assert hello.offers_only_acme_tls is only_acme


def test_alpn_names_are_latin1_so_any_byte_round_trips() -> None:
    hello = parse_client_hello(tb.to_records(tb.client_hello(alpn_protocols=[b"\xff\x00x"])))
    assert hello is not None
    assert hello.alpn_protocols == ("\xff\x00x",)


# --- not TLS at all -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_start",
    [
        b"GET / HTTP/1.1\r\n",
        b"POST /x HTTP/1.1\r\n",
        b"HEAD / HTTP/1.0\r\n",
        b"PUT /x HTTP/1.1\r\n",
        b"OPTIONS * HTTP/1.1\r\n",
        b"CONNECT a:443 HTTP/1.1\r\n",
        b"DELETE /x HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ],
)
def test_plain_http_is_recognised_from_the_first_bytes(request_start: bytes) -> None:
    method_and_space = request_start[: request_start.index(b" ") + 1]
    if request_start.startswith(b"PRI"):
        method_and_space = b"PRI * HTTP/2.0"
    parser = ClientHelloParser()
    for i in range(1, len(method_and_space)):
        assert parser.feed(method_and_space[i - 1 : i]) is NEED_DATA

    with pytest.raises(NotTLS) as info:
        parser.feed(method_and_space[-1:])

    assert info.value.looks_like_http
    assert info.value.reason == "http"


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "proxy_protocol"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c", "proxy_protocol"),
        (b"\x80\x2e\x01\x03\x01\x00\x15", "sslv2_hello"),
        (b"\x80\x2e\x02", "not_tls"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not_tls"),
        (b"\x16\x02\x00", "not_tls"),
        (b"\x00", "not_tls"),
        (b"GETX / HTTP/1.1", "not_tls"),
    ],
)
def test_other_protocols_are_not_tls(first_bytes: bytes, reason: str) -> None:
    error = error_from(first_bytes)
    assert isinstance(error, NotTLS)
    assert error.reason == reason
    assert not error.looks_like_http


def test_garbage_is_refused_at_the_first_byte_that_rules_out_everything() -> None:
    parser = ClientHelloParser()
    assert parser.feed(b"G") is NEED_DATA  # could still be GET
    with pytest.raises(NotTLS):
        parser.feed(b"x")


def test_sslv2_needs_only_three_bytes() -> None:
    parser = ClientHelloParser()
    assert parser.feed(b"\x80\x2e") is NEED_DATA
    with pytest.raises(NotTLS, match="SSLv2"):
        parser.feed(b"\x01")


# --- too large ----------------------------------------------------------------------------


def test_record_header_beyond_max_size_is_refused_before_its_payload() -> None:
    parser = ClientHelloParser(max_size=1000)
    with pytest.raises(ClientHelloTooLarge):
        parser.feed(tb.u8(22) + tb.u16(tb.TLS10) + tb.u16(2000))


def test_handshake_header_announcing_too_much_is_refused_without_buffering_it() -> None:
    # One byte more than OpenSSL would read (CLIENT_HELLO_MAX_LENGTH): 9 bytes tell.
    first_nine = (
        tb.u8(22) + tb.u16(tb.TLS10) + tb.u16(16384) + tb.u8(1) + tb.u24(MAX_CLIENT_HELLO_BODY + 1)
    )
    parser = ClientHelloParser()
    assert parser.feed(first_nine[:8]) is NEED_DATA
    with pytest.raises(ClientHelloTooLarge) as info:
        parser.feed(first_nine[8:])
    assert info.value.reason == "too_large"
    assert info.value.alert == AlertDescription.ILLEGAL_PARAMETER


def test_the_largest_hello_openssl_reads_is_parsed() -> None:
    # Every hello OpenSSL would complete passes the peek: the bound is OpenSSL's, in records.
    # Every field at its maximum, as in OpenSSL's CLIENT_HELLO_MAX_LENGTH.
    fields = {"cipher_suites": [0x1301] * 32767, "compression_methods": bytes(255)}
    sni = tb.server_name("big.example")
    base = len(tb.client_hello_body(extensions=[sni], **fields))  # type: ignore[arg-type]
    pad = MAX_CLIENT_HELLO_BODY - base - 4
    body = tb.client_hello_body(extensions=[sni, tb.padding(pad)], **fields)  # type: ignore[arg-type]
    assert len(body) == MAX_CLIENT_HELLO_BODY
    wire = tb.to_records(tb.handshake_message(body))
    assert len(wire) == DEFAULT_MAX_SIZE
    hello = ClientHelloParser().feed(wire)
    assert isinstance(hello, ClientHello) and hello.sni == "big.example"


def test_every_reason_has_an_alert_decision() -> None:
    assert set(REJECTION_ALERTS) == set(Reason)


def test_tiny_records_cannot_smuggle_a_hello_past_the_limit() -> None:
    message = tb.client_hello()
    wire = tb.to_records(message, [1] * len(message))  # 6 wire bytes per payload byte
    assert len(wire) > 1024 > len(tb.to_records(message))
    with pytest.raises(ClientHelloTooLarge):
        feed_all([wire], max_size=1024)


def test_never_buffers_more_than_max_size_while_incomplete() -> None:
    message = tb.client_hello()
    wire = tb.to_records(message, [1] * len(message))  # 6-byte records
    # Two records fit, then a record header straddles the limit before the handshake
    # header (spread over four records) could tell the hello's size.
    max_size = 6 * 2 + 2
    parser = ClientHelloParser(max_size)
    assert parser.feed(wire[:max_size]) is NEED_DATA
    with pytest.raises(ClientHelloTooLarge):
        parser.feed(wire[max_size : max_size + 1])


def test_hello_of_exactly_max_size_is_accepted() -> None:
    wire = tb.to_records(tb.client_hello())
    assert parse_client_hello(wire, max_size=len(wire)) is not None
    with pytest.raises(ClientHelloTooLarge):
        parse_client_hello(wire, max_size=len(wire) - 1)


def test_too_large_is_a_client_hello_error_and_a_peer_error() -> None:
    error = error_from(tb.to_records(tb.client_hello()), max_size=64)
    assert isinstance(error, ClientHelloTooLarge)
    assert isinstance(error, PeerError)
    assert isinstance(error, ValueError)


# --- malformed ----------------------------------------------------------------------------

_SUITES = tb.vec16(tb.u16(0x1301))


def _body(
    *,
    extensions_block: bytes = b"",
    session: bytes = tb.vec8(b""),
    suites: bytes = _SUITES,
    compression: bytes = b"\x01\x00",
    version: int = 0x0303,
) -> bytes:
    return tb.u16(version) + bytes(32) + session + suites + compression + extensions_block


def _ext_block(*extensions: tuple[int, bytes]) -> bytes:
    return tb.encode_extensions(extensions)


def _hello_records(body: bytes) -> bytes:
    return tb.to_records(tb.handshake_message(body))


_GOOD = tb.handshake_message(_body())

MALFORMED: list[tuple[str, bytes, str]] = [
    (
        "alert before the hello completed",
        tb.record(_GOOD[:10]) + tb.record(b"\x02\x28", content_type=21),
        "unexpected_alert",
    ),
    (
        "application data before the hello completed",
        tb.record(_GOOD[:10]) + tb.record(b"xx", content_type=23),
        "unexpected_content_type",
    ),
    (
        "second record has a bogus version",
        tb.record(_GOOD[:10]) + tb.record(_GOOD[10:], version=0x0203),
        "bad_record_version",
    ),
    ("empty handshake record", tb.record(b"") + tb.record(_GOOD), "empty_record"),
    (
        "record longer than 2**14",
        tb.u8(22) + tb.u16(tb.TLS10) + tb.u16(16385) + _GOOD,
        "record_overflow",
    ),
    (
        "first handshake message is not a ClientHello",
        tb.to_records(tb.handshake_message(_body(), msg_type=2)),
        "not_client_hello",
    ),
    (
        "hello body too short to hold the fixed fields",
        tb.to_records(tb.handshake_message(bytes(40))),
        "hello_too_short",
    ),
    (
        "another handshake message follows in the same record",
        tb.record(_GOOD + tb.handshake_message(b"")),
        "trailing_handshake_data",
    ),
    ("legacy_version is not 3.x", _hello_records(_body(version=0x0200)), "bad_legacy_version"),
    (
        "session id longer than 32",
        _hello_records(_body(session=tb.vec8(bytes(33)))),
        "bad_session_id",
    ),
    (
        "session id overruns the body",
        _hello_records(tb.u16(0x0303) + bytes(32) + b"\xff" + bytes(8)),
        "bad_session_id",
    ),
    (
        "odd cipher_suites length",
        _hello_records(_body(suites=tb.vec16(b"\x13\x01\x13"))),
        "bad_cipher_suites",
    ),
    (
        "empty cipher_suites",
        _hello_records(_body(suites=tb.vec16(b""), compression=b"\x01\x00\x00\x00")),
        "bad_cipher_suites",
    ),
    (
        "empty compression_methods",
        _hello_records(_body(compression=b"\x00\x00\x00")),
        "bad_compression_methods",
    ),
    (
        "bytes after the extensions block",
        _hello_records(_body(extensions_block=_ext_block((23, b"")) + b"\x00")),
        "trailing_data",
    ),
    (
        "extensions length overruns the body",
        _hello_records(_body(extensions_block=tb.u16(10) + tb.u16(23) + tb.u16(0))),
        "bad_extensions",
    ),
    (
        "extension data overruns the block",
        _hello_records(_body(extensions_block=tb.vec16(tb.u16(23) + tb.u16(5) + b"ab"))),
        "bad_extensions",
    ),
    (
        "truncated extension header",
        _hello_records(_body(extensions_block=tb.vec16(b"\x00\x17\x00"))),
        "bad_extensions",
    ),
    (
        "same extension twice",
        _hello_records(_body(extensions_block=_ext_block((23, b""), (35, b""), (23, b"")))),
        "duplicate_extension",
    ),
    (
        "two server_name extensions (which one would OpenSSL see?)",
        _hello_records(
            _body(
                extensions_block=_ext_block(
                    tb.server_name("a.example"), tb.server_name("b.example")
                )
            )
        ),
        "duplicate_extension",
    ),
    (
        "server_name list length disagrees with the extension",
        _hello_records(
            _body(extensions_block=_ext_block((0, tb.u16(50) + b"\x00" + tb.vec16(b"a.example"))))
        ),
        "bad_server_name",
    ),
    (
        "empty server_name list",
        _hello_records(_body(extensions_block=_ext_block((0, tb.u16(0))))),
        "bad_server_name",
    ),
    (
        "empty server_name extension (the server's form, not a client's)",
        _hello_records(_body(extensions_block=_ext_block((0, b"")))),
        "bad_server_name",
    ),
    (
        "two host_name entries",
        _hello_records(
            _body(extensions_block=_ext_block(tb.server_name("a.example", "b.example")))
        ),
        "two_host_names",
    ),
    (
        "host_name entry overruns the list",
        _hello_records(
            _body(extensions_block=_ext_block((0, tb.vec16(b"\x00" + tb.u16(40) + b"a.example"))))
        ),
        "bad_server_name",
    ),
    (
        "control character in host_name",
        _hello_records(_body(extensions_block=_ext_block(tb.server_name(b"a\x00.example")))),
        "bad_host_name",
    ),
    (
        "non-ASCII host_name",
        _hello_records(_body(extensions_block=_ext_block(tb.server_name("bücher.example")))),
        "bad_host_name",
    ),
    (
        "empty host_name",
        _hello_records(_body(extensions_block=_ext_block(tb.server_name(b"")))),
        "bad_server_name",
    ),
    (
        "host_name is a lone dot",
        _hello_records(_body(extensions_block=_ext_block(tb.server_name(".")))),
        "bad_host_name",
    ),
    (
        "empty ALPN protocol name",
        _hello_records(_body(extensions_block=_ext_block(tb.alpn("h2", b"")))),
        "bad_alpn",
    ),
    (
        "empty ALPN list",
        _hello_records(_body(extensions_block=_ext_block((16, tb.u16(0))))),
        "bad_alpn",
    ),
    (
        "ALPN name overruns the list",
        _hello_records(_body(extensions_block=_ext_block((16, tb.vec16(b"\x05h2"))))),
        "bad_alpn",
    ),
    (
        "odd supported_versions list",
        _hello_records(_body(extensions_block=_ext_block((43, b"\x03\x03\x04\x03")))),
        "bad_supported_versions",
    ),
    (
        "empty supported_versions list",
        _hello_records(_body(extensions_block=_ext_block(tb.supported_versions()))),
        "bad_supported_versions",
    ),
]


@pytest.mark.parametrize(
    ("wire", "reason"), [(w, r) for _, w, r in MALFORMED], ids=[d for d, _, _ in MALFORMED]
)
def test_malformed_hello_is_refused_with_a_precise_reason(wire: bytes, reason: str) -> None:
    whole = error_from(wire)
    assert isinstance(whole, MalformedClientHello), whole
    assert whole.reason == reason, str(whole)

    # The same verdict whatever the TCP segmentation.
    parser = ClientHelloParser()
    with pytest.raises(MalformedClientHello) as info:
        for i in range(len(wire)):
            parser.feed(wire[i : i + 1])
    assert info.value.reason == reason


def test_the_good_baseline_of_the_malformed_cases_parses() -> None:
    hello = parse_client_hello(tb.to_records(_GOOD))
    assert hello is not None
    assert hello.cipher_suites == (0x1301,)


def test_a_failed_parser_keeps_failing_with_the_same_error() -> None:
    parser = ClientHelloParser()
    with pytest.raises(NotTLS) as first:
        parser.feed(b"\x00")
    with pytest.raises(NotTLS) as again:
        parser.feed(tb.to_records(tb.client_hello()))
    assert again.value is first.value


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ClientHelloParser(0)


# --- real clients -------------------------------------------------------------------------


@pytest.mark.parametrize("client", capture.CLIENTS.values(), ids=list(capture.CLIENTS))
def test_captured_hello_from_a_real_client(client: capture.Client) -> None:
    wire = (FIXTURES / f"{client.name}.bin").read_bytes()

    hello = feed_all([wire[i : i + 1] for i in range(len(wire))])

    assert hello.sni == client.sni
    assert hello.alpn_protocols == client.alpn
    assert hello.raw == wire
    # Re-fragmented into small records and odd reads, it still reads the same.
    message = b"".join(payload for _, payload in tb.record_payloads(wire))
    refragmented = tb.to_records(message, [97] * (len(message) // 97 + 1))
    again = feed_all(tb.split(refragmented, range(13, len(refragmented), 31)))
    assert without_raw(again) == without_raw(hello)


def test_captured_chromium_hello_is_the_big_grease_and_ech_case() -> None:
    wire = (FIXTURES / "chromium.bin").read_bytes()
    hello = parse_client_hello(wire)
    assert hello is not None
    assert len(wire) > 1500  # the ML-KEM key share
    assert set(hello.extensions) & set(tb.GREASE)
    assert set(hello.cipher_suites) & set(tb.GREASE)
    assert hello.supported_versions == (tb.TLS13, tb.TLS12)
    assert tb.EXT_ECH_OUTER in hello.extensions


@pytest.mark.parametrize(
    ("name", "versions"),
    [("openssl-tls1_2", (tb.TLS12,)), ("openssl-tls1_3", (tb.TLS13,))],
)
def test_captured_openssl_version_pinning(name: str, versions: tuple[int, ...]) -> None:
    hello = parse_client_hello((FIXTURES / f"{name}.bin").read_bytes())
    assert hello is not None
    assert hello.supported_versions == versions


def test_live_python_ssl_hello_built_in_memory() -> None:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["acme-tls/1"])
    outgoing = ssl.MemoryBIO()
    client = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="Live.Example.")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()

    hello = parse_client_hello(outgoing.read())

    assert hello is not None
    assert hello.sni == "live.example"
    assert hello.offers_only_acme_tls


@pytest.mark.parametrize(
    "client",
    [c for c in capture.CLIENTS.values() if c.name != "chromium"],
    ids=[n for n in capture.CLIENTS if n != "chromium"],
)
def test_live_capture_from_installed_clients(client: capture.Client) -> None:
    if not client.available():
        pytest.skip(f"{client.program} is not installed")
    hello = parse_client_hello(capture.capture(client))
    assert hello is not None
    assert hello.sni == client.sni
    assert hello.alpn_protocols == client.alpn


@pytest.mark.slow
def test_live_capture_from_headless_chromium() -> None:
    client = capture.CLIENTS["chromium"]
    if not client.available():
        pytest.skip("chromium is not installed")
    hello = parse_client_hello(capture.capture(client))
    assert hello is not None
    assert hello.sni == "chromium.example.test"
    assert hello.alpn_protocols == ("h2", "http/1.1")
