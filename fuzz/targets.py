"""The fuzz targets: each takes arbitrary bytes and fails (raises) only on a broken promise.

A parser of untrusted input promises two things: it raises nothing but its own typed error,
and what it returns means what its docstring says. Each target states both for one parser,
so any other exception, or an ``InvariantViolation``, is a finding. The targets are plain
functions (no atheris here): ``fuzz.run`` drives them under libFuzzer, and the regression
tests in ``tests/hardening`` replay saved inputs through them in-process.

Fragmentation is part of the input space: TCP may cut the bytes anywhere, so every target
that parses a stream also feeds the same bytes cut at points derived from the input itself
(a CRC of the bytes seeds the cuts, so a saved input replays exactly) and checks the verdict
does not depend on the cuts.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Literal

from edgeproxy.acme.ari import parse_renewal_info
from edgeproxy.acme.errors import AcmeProblem, AcmeProtocolError
from edgeproxy.acme.messages import (
    parse_account,
    parse_authorization,
    parse_directory,
    parse_links,
    parse_order,
    parse_retry_after,
    problem_from_response,
)
from edgeproxy.wire.clienthello import (
    DEFAULT_MAX_SIZE,
    NEED_DATA,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
    is_grease,
)
from edgeproxy.wire.proxy_protocol import (
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    build_v1,
    build_v2,
)

__all__ = [
    "TARGETS",
    "InvariantViolation",
    "acme_messages",
    "client_hello",
    "cuts",
    "proxy_protocol",
]

# "Now" for the ACME parsers is fixed so a saved input replays the same way on any day.
_NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
_PRINTABLE = frozenset(range(0x21, 0x7F))


class InvariantViolation(AssertionError):
    """A parser returned without error but broke a promise of its docstring."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)


def cuts(data: bytes, max_pieces: int = 32) -> list[bytes]:
    """``data`` cut into pieces at points derived from ``data`` (deterministic per input)."""
    if len(data) < 2:
        return [data]
    rng = random.Random(zlib.crc32(data))
    n = rng.randint(1, min(max_pieces, len(data)) - 1)
    points = sorted(rng.sample(range(1, len(data)), n))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# --- ClientHello ------------------------------------------------------------------------

HelloOutcome = tuple[Literal["hello", "need", "error"], object]


def _feed_hello(parser: ClientHelloParser, pieces: list[bytes]) -> HelloOutcome:
    result: object = NEED_DATA
    try:
        for piece in pieces:
            result = parser.feed(piece)
            if result is not NEED_DATA:
                break
    except ClientHelloError as exc:
        _check(isinstance(exc.reason, str) and bool(exc.reason), "error without a reason token")
        return "error", exc.reason
    if result is NEED_DATA:
        return "need", None
    _check(isinstance(result, ClientHello), f"feed returned {type(result).__name__}")
    return "hello", result


def _check_hello(hello: ClientHello, data: bytes, max_size: int) -> None:
    _check(data.startswith(hello.raw), "ClientHello.raw is not a prefix of the input")
    _check(len(hello.raw) <= max_size, f"hello of {len(hello.raw)} bytes > max_size {max_size}")
    if hello.sni is not None:
        raw = hello.sni.encode("ascii")
        _check(bool(raw), "empty SNI reported")
        _check(all(b in _PRINTABLE for b in raw), f"SNI {hello.sni!r} is not printable ASCII")
        _check(hello.sni == hello.sni.lower(), f"SNI {hello.sni!r} is not lower-cased")
        _check(not hello.sni.endswith("."), f"SNI {hello.sni!r} keeps its trailing dot")
    _check(all(p for p in hello.alpn_protocols), "empty ALPN protocol reported")
    _check(
        not any(
            len(p) == 2 and is_grease(int.from_bytes(p.encode("latin-1")))
            for p in hello.alpn_protocols
        ),
        "GREASE ALPN value reported",
    )
    _check(not any(is_grease(v) for v in hello.supported_versions), "GREASE version reported")
    _check(len(hello.cipher_suites) >= 1, "no cipher suites reported")


def client_hello(data: bytes) -> None:
    """ClientHelloParser: only ClientHelloError; same verdict whole, cut, or byte by byte."""
    whole_parser = ClientHelloParser()
    whole = _feed_hello(whole_parser, [data])
    pieces = cuts(data)
    cut = _feed_hello(ClientHelloParser(), pieces)
    _check(whole == cut, f"verdict depends on the cuts: whole {whole!r}, cut {cut!r}")
    if len(data) <= 160:  # byte by byte costs a feed per byte: keep it to short inputs
        single = _feed_hello(ClientHelloParser(), [data[i : i + 1] for i in range(len(data))])
        _check(whole == single, f"verdict differs byte by byte: {whole!r} vs {single!r}")

    kind, value = whole
    if kind == "hello":
        assert isinstance(value, ClientHello)
        _check_hello(value, data, DEFAULT_MAX_SIZE)
        # After a hello, feeding more only grows `buffered` and returns the same hello.
        _check(whole_parser.feed(b"\x17\x03\x03") is value, "a second feed changed the hello")
        _check(whole_parser.buffered == data + b"\x17\x03\x03", "buffered lost bytes")
    elif kind == "error":
        # Once failed, the parser keeps failing the same way.
        try:
            whole_parser.feed(b"")
        except ClientHelloError as exc:
            _check(exc.reason == value, "a failed parser changed its error")
        else:
            raise InvariantViolation("a failed parser accepted more bytes")

    # A small max_size must bound what is buffered and returned, whatever the input.
    max_size = zlib.crc32(data) % 4096 + 1
    small = _feed_hello(ClientHelloParser(max_size), pieces)
    if small[0] == "hello":
        assert isinstance(small[1], ClientHello)
        _check_hello(small[1], data, max_size)


# --- PROXY protocol ---------------------------------------------------------------------

ProxyOutcome = tuple[Literal["header", "need", "error"], object, bytes]


def _feed_proxy(mode: Literal["v1", "v2", "any"], pieces: list[bytes]) -> ProxyOutcome:
    parser = ProxyHeaderParser(mode)
    try:
        for i, piece in enumerate(pieces):
            parsed = parser.feed(piece)
            if parsed is not None:
                header, rest = parsed
                # What the caller sees next: the rest of this read, then the later reads.
                return "header", header, rest + b"".join(pieces[i + 1 :])
    except ProxyProtocolError as exc:
        _check(isinstance(exc.reason, str) and bool(exc.reason), "error without a reason token")
        return "error", exc.reason, b""
    return "need", None, b""


def _check_header(header: ProxyHeader, mode: str) -> None:
    _check(header.version in (1, 2), f"version {header.version}")
    _check(mode == "any" or mode == f"v{header.version}", f"v{header.version} in mode {mode}")
    # The decoded TLV views are validated at parse time: they must never raise.
    _ = header.aws_vpce_id, header.authority
    if header.command == "LOCAL":
        _check(header.source is None, "LOCAL header with a source address")
        return
    if header.family not in ("TCP4", "TCP6") or header.source is None:
        return
    assert header.destination is not None
    # What we parsed, we can build: and building then parsing gives the same addresses.
    for build, parse_mode in ((build_v1, "v1"), (build_v2, "v2")):
        rebuilt = build(header.source, header.destination)
        kind, again, rest = _feed_proxy(parse_mode, [rebuilt])  # type: ignore[arg-type]
        _check(kind == "header" and rest == b"", f"{parse_mode} rebuild does not parse: {again}")
        assert isinstance(again, ProxyHeader)
        _check(
            (again.source, again.destination) == (header.source, header.destination),
            f"{parse_mode} round trip changed the addresses: {header} -> {again}",
        )
    if header.version == 2:
        again_v2 = _feed_proxy("v2", [build_v2(header.source, header.destination, header.tlvs)])
        assert isinstance(again_v2[1], ProxyHeader)
        _check(again_v2[1].tlvs == header.tlvs, "v2 round trip changed the TLVs")


def proxy_protocol(data: bytes) -> None:
    """ProxyHeaderParser in every mode: only ProxyProtocolError; the verdict, the header and
    the bytes after it do not depend on how the input was cut into reads."""
    pieces = cuts(data)
    modes: tuple[Literal["v1", "v2", "any"], ...] = ("v1", "v2", "any")
    for mode in modes:
        whole = _feed_proxy(mode, [data])
        cut = _feed_proxy(mode, pieces)
        _check(whole == cut, f"mode {mode}: verdict depends on the cuts: {whole!r} vs {cut!r}")
        kind, header, rest = whole
        if kind == "header":
            assert isinstance(header, ProxyHeader)
            _check(data.endswith(rest), "rest is not the tail of the input")
            _check_header(header, mode)


# --- ACME messages ----------------------------------------------------------------------


def _acme_views(data: bytes) -> Iterator[tuple[str, Callable[[], object]]]:
    url = "https://ca.example.test/acme/x"
    yield "directory", lambda: parse_directory(url, data)
    yield "order", lambda: parse_order(url, data)
    yield "authorization", lambda: parse_authorization(url, data)
    yield "account", lambda: parse_account(url, data)
    yield "renewal_info", lambda: parse_renewal_info(data, _header_text(data), _NOW)


def _header_text(data: bytes) -> str:
    # httpx hands header values over as latin-1 text; the first line is "the header".
    return data.split(b"\n", 1)[0].decode("latin-1")


def acme_messages(data: bytes) -> None:
    """edgeproxy.acme.messages and .ari on one body: resources raise only
    AcmeProtocolError; problem documents, Retry-After and Link never raise."""
    for what, parse in _acme_views(data):
        try:
            parsed = parse()
        except AcmeProtocolError as exc:
            _check(bool(str(exc)), f"{what}: AcmeProtocolError without a message")
            continue
        _check(parsed is not None, f"{what}: parser returned None")

    text = _header_text(data)
    for status in (400, 503):
        problem = problem_from_response(status, {"Retry-After": text}, data)
        _check(isinstance(problem, AcmeProblem), "problem_from_response returned a non-problem")
        _check(isinstance(problem.type, str) and bool(problem.type), "problem without a type")
        _check(problem.status == status or status == 0, f"status {problem.status} != {status}")
        if problem.retry_after is not None:
            _check(
                math.isfinite(problem.retry_after) and problem.retry_after >= 0,
                f"retry_after {problem.retry_after!r}",
            )
    seconds = parse_retry_after(text, _NOW)
    _check(
        seconds is None or (math.isfinite(seconds) and seconds >= 0),
        f"parse_retry_after({text[:40]!r}) = {seconds!r}",
    )
    for target, rel in parse_links([text], "https://ca.example.test/acme/"):
        _check(isinstance(target, str) and isinstance(rel, str), "link pair is not text")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "client_hello": client_hello,
    "proxy_protocol": proxy_protocol,
    "acme_messages": acme_messages,
}
"""Target name -> function; the names are the corpus folder names and ``run.py`` choices."""
