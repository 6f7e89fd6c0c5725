"""PROXY protocol v1 and v2, parsed and built without I/O (haproxy's proxy-protocol.txt).

This module owns the header a load balancer puts in front of a relayed TCP stream to say who
the client really was, and the header we put in front of streams we relay upstream. It must
not know about sockets, TLS or routing, nor decide *whether* a peer may send a header: that
is configuration (``server.proxy_protocol`` and ``server.proxy_protocol_from``), checked by the
caller before a byte is read (``proxy/senders.py``).

Theory of operation
-------------------
:class:`ProxyHeaderParser` is fed the connection's first bytes. It returns ``None`` while the
header is incomplete and ``(header, rest)`` once it is complete, where ``rest`` is whatever
followed the header in the bytes fed (typically the start of the ClientHello). The spec asks
receivers to abort "as soon as possible" on anything that does not match exactly, so every
byte is checked as it arrives: a wrong signature byte, version nibble, command or family fails
immediately, long before the announced length is buffered.

* v1 is one US-ASCII line of at most 107 bytes ending in CRLF. Addresses are checked with
  :mod:`ipaddress` (no leading zeros, no IPv6 zone), ports are decimal 0-65535 without leading
  zeros, separators are exactly one space. ``PROXY UNKNOWN ...`` is accepted and, as the spec
  says, means "use the real connection's addresses": we report it as ``command="LOCAL"``.
* v2 is a 16-byte binary header whose 16-bit length bounds the rest, so at most 16 + 65535
  bytes are ever buffered. LOCAL discards the address block entirely (the spec's "discard the
  protocol block including the family"). For PROXY, TCP over IPv4/IPv6 gives addresses; UDP
  and AF_UNSPEC fall back to UNSPEC, as the spec allows, and UNIX streams keep their family
  but give no addresses either: ``source is None`` means "use the real peer". TLVs after the
  address block are walked with bounds checks; CRC32C (type 0x03) is kept but not verified (no
  CRC32C in the stdlib, and the header comes from a trusted balancer over TCP, which already
  checksums).
* In ``"any"`` mode the first byte decides: ``P`` is v1, ``\\r`` is v2.

``source`` and ``destination``, when given, are always an IP address and a port. A UNIX path
is neither: it is 108 arbitrary bytes (newlines included) that would otherwise reach the access
log as the client and break ``build_v1``/``build_v2`` for ``send_proxy``, and no TCP client
behind a TCP balancer has one. So UNIX is treated like UNSPEC (the address block is skipped,
its TLVs are still read). IPv4-mapped IPv6 addresses are written ``::ffff:a.b.c.d`` on every
Python version.

Error reasons (``ProxyProtocolError.reason``): ``bad_signature``; v1 ``v1_too_long``,
``v1_bad_line_end``, ``v1_bad_character``, ``v1_bad_protocol``, ``v1_bad_syntax``,
``v1_bad_address``, ``v1_bad_port``; v2 ``v2_bad_version``, ``v2_bad_command``,
``v2_bad_family``, ``v2_short_address``, ``v2_bad_tlv``. The verdict for a given byte stream
does not depend on how it was cut into reads.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from edgeproxy.errors import PeerError

__all__ = [
    "PP2_SUBTYPE_AWS_VPCE_ID",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_AWS",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyProtocolError",
    "build_v1",
    "build_v2",
]

V1_SIGNATURE: Final = b"PROXY "
V1_MAX_LENGTH: Final = 107  # the worst-case "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n"
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH: Final = 16

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_AWS: Final = 0xEA  # AWS PrivateLink; value = subtype byte + data
PP2_SUBTYPE_AWS_VPCE_ID: Final = 0x01

_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1

Family = Literal["TCP4", "TCP6", "UNIX", "UNSPEC"]
Address = tuple[str, int]

# v2 family/transport byte -> (reported family, address block size). Only the combinations the
# spec lists are valid; UDP has no place in a TCP proxy, so it falls back to UNSPEC.
_V2_FAMILIES: Final[dict[int, tuple[Family, int]]] = {
    0x00: ("UNSPEC", 0),
    0x11: ("TCP4", 12),
    0x12: ("UNSPEC", 12),
    0x21: ("TCP6", 36),
    0x22: ("UNSPEC", 36),
    0x31: ("UNIX", 216),
    0x32: ("UNSPEC", 216),
}

_V2_PREFIX = struct.Struct(">BBH")
_TLV_HEADER = struct.Struct(">BH")

# A v1 line may only contain printable US-ASCII; CR only right before the LF.
_V1_BAD_CHARACTER: Final = re.compile(rb"[^\x20-\x7e\r]")
_V1_BARE_CR: Final = re.compile(rb"\r[^\n]")
_V1_PROTOCOLS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")


class ProxyProtocolError(PeerError, ValueError):
    """The bytes are not a valid PROXY header. ``reason`` is a short token for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header. ``source is None`` means: use the real connection's peer.

    ``source`` and ``destination`` are set only for the TCP4 and TCP6 families.
    """

    version: int
    command: Literal["PROXY", "LOCAL"]
    family: Family
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, tlv_type: int) -> bytes | None:
        """Value of the first TLV of ``tlv_type``, or None."""
        for t, value in self.tlvs:
            if t == tlv_type:
                return value
        return None

    @property
    def aws_vpce_id(self) -> str | None:
        """The AWS VPC endpoint id (TLV 0xEA, subtype 0x01), e.g. ``vpce-0123abcd``."""
        for t, value in self.tlvs:
            if t == PP2_TYPE_AWS and value[:1] == bytes((PP2_SUBTYPE_AWS_VPCE_ID,)):
                return value[1:].decode("ascii")  # checked to be ASCII when parsed
        return None

    @property
    def authority(self) -> str | None:
        """PP2_TYPE_AUTHORITY: the host name the client asked for (the balancer's SNI)."""
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8")  # checked when parsed


_LOCAL_V1: Final = ProxyHeader(1, "LOCAL", "UNSPEC", None, None)
_LOCAL_V2: Final = ProxyHeader(2, "LOCAL", "UNSPEC", None, None)


class ProxyHeaderParser:
    """Incremental PROXY header parser for one connection.

    ``mode`` is what the listener is configured to accept: ``"v1"``, ``"v2"`` or ``"any"``.
    ``feed`` raises only :class:`ProxyProtocolError` (and the same one again if fed after
    failing); feeding after a header was returned is a caller bug (RuntimeError).
    """

    __slots__ = ("_buf", "_done", "_error", "_modes", "_version")

    def __init__(self, mode: Literal["v1", "v2", "any"]) -> None:
        versions = {"v1": (1,), "v2": (2,), "any": (1, 2)}.get(mode)
        if versions is None:
            raise ValueError(f"mode must be 'v1', 'v2' or 'any', not {mode!r}")
        self._modes: tuple[int, ...] = versions
        self._buf = bytearray()
        self._version: int | None = None
        self._error: ProxyProtocolError | None = None
        self._done = False

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        if self._done:
            raise RuntimeError("the PROXY header was already parsed")
        if self._error is not None:
            raise self._error
        self._buf += data
        try:
            result = self._advance()
        except ProxyProtocolError as exc:
            self._error = exc
            raise
        if result is None:
            return None
        header, consumed = result
        rest = bytes(self._buf[consumed:])
        self._done = True
        self._buf = bytearray()
        return header, rest

    def _advance(self) -> tuple[ProxyHeader, int] | None:
        if self._version is None:
            self._version = self._detect_version()
            if self._version is None:
                return None
        if self._version == 1:
            return _parse_v1(self._buf)
        return _parse_v2(self._buf)

    def _detect_version(self) -> int | None:
        if not self._buf:
            return None
        # The two signatures differ in their first byte, so one byte decides.
        first = self._buf[0]
        for version, signature in ((1, V1_SIGNATURE), (2, V2_SIGNATURE)):
            if version in self._modes and first == signature[0]:
                return version
        expected = " or ".join(f"v{v}" for v in self._modes)
        raise ProxyProtocolError(
            "bad_signature", f"first byte 0x{first:02x} does not start a PROXY {expected} header"
        )


def _check_signature(buf: bytearray, signature: bytes, version: int) -> bool:
    """True once the whole signature is there; raise on the first byte that differs."""
    n = min(len(buf), len(signature))
    if buf[:n] != signature[:n]:
        raise ProxyProtocolError(
            "bad_signature", f"{bytes(buf[:n])!r} is not the PROXY v{version} signature"
        )
    return n == len(signature)


# --- v1 -----------------------------------------------------------------------------------


def _parse_v1(buf: bytearray) -> tuple[ProxyHeader, int] | None:
    if not _check_signature(buf, V1_SIGNATURE, 1):
        return None
    lf = buf.find(b"\n", 0, V1_MAX_LENGTH)
    line = bytes(buf[: V1_MAX_LENGTH if lf < 0 else lf])
    problem = _v1_first_problem(line, complete=lf >= 0)
    if problem is not None:
        raise problem
    if lf < 0:
        return None
    text = line[:-1]  # without the CR that _v1_first_problem checked is there
    consumed = lf + 1
    if text == b"PROXY UNKNOWN" or text.startswith(b"PROXY UNKNOWN "):
        return _LOCAL_V1, consumed  # the rest of an UNKNOWN line must be ignored
    parts = text.split(b" ")
    protocol = parts[1]
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("v1_bad_protocol", f"unknown PROXY v1 protocol {protocol!r}")
    if len(parts) != 6:
        raise ProxyProtocolError(
            "v1_bad_syntax", f"expected 'PROXY {protocol.decode()} src dst sport dport'"
        )
    ip_type = ipaddress.IPv4Address if protocol == b"TCP4" else ipaddress.IPv6Address
    src_ip, dst_ip = (_v1_address(ip_type, raw) for raw in parts[2:4])
    src_port, dst_port = (_v1_port(raw) for raw in parts[4:6])
    family: Family = "TCP4" if protocol == b"TCP4" else "TCP6"
    return ProxyHeader(1, "PROXY", family, (src_ip, src_port), (dst_ip, dst_port)), consumed


def _v1_first_problem(line: bytes, *, complete: bool) -> ProxyProtocolError | None:
    """The problem at the earliest offset of ``line`` (the bytes before the LF, if any).

    Each check reports the offset of the first byte that breaks it, which depends only on the
    bytes before that offset: so the verdict is the same however the reads were cut.
    """
    problems: list[tuple[int, str, str]] = []
    if bad := _V1_BAD_CHARACTER.search(line):
        problems.append((bad.start(), "v1_bad_character", "non-printable byte in the PROXY line"))
    if bare := _V1_BARE_CR.search(line):
        problems.append((bare.end() - 1, "v1_bad_line_end", "CR not followed by LF"))
    protocol = line[len(V1_SIGNATURE) :]
    if not any(p.startswith(protocol[: len(p)]) for p in _V1_PROTOCOLS):
        agreed = max(_common_prefix(protocol, p) for p in _V1_PROTOCOLS)
        problems.append(
            (len(V1_SIGNATURE) + agreed, "v1_bad_protocol", f"protocol {protocol[:8]!r}")
        )
    if complete:
        if not line.endswith(b"\r"):
            problems.append((len(line), "v1_bad_line_end", "LF not preceded by CR"))
    elif len(line) >= V1_MAX_LENGTH:
        problems.append((V1_MAX_LENGTH, "v1_too_long", f"no CRLF in {V1_MAX_LENGTH} bytes"))
    if not problems:
        return None
    _, reason, message = min(problems, key=lambda problem: problem[0])
    return ProxyProtocolError(reason, f"{message} (PROXY v1 line)")


def _common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _v1_address(
    ip_type: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address], raw: bytes
) -> str:
    text = raw.decode("ascii")
    try:
        # Zones ("%eth0") have no meaning across hosts and are not in the spec's grammar.
        if "%" in text:
            raise ValueError("zone index")
        return _ip_text(ip_type(text))
    except ValueError:
        raise ProxyProtocolError(
            "v1_bad_address", f"{text!r} is not a canonical {ip_type.__name__[:4]} address"
        ) from None


def _v1_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[0] == 0x30):
        raise ProxyProtocolError("v1_bad_port", f"{raw!r} is not a port number")
    port = int(raw)
    if port > 65535:
        raise ProxyProtocolError("v1_bad_port", f"port {port} is out of range")
    return port


# --- v2 -----------------------------------------------------------------------------------


def _parse_v2(buf: bytearray) -> tuple[ProxyHeader, int] | None:
    if not _check_signature(buf, V2_SIGNATURE, 2):
        return None
    have = len(buf)
    if have < 13:
        return None
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("v2_bad_version", f"version nibble {ver_cmd >> 4}, not 2")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError("v2_bad_command", f"command {command} is neither LOCAL nor PROXY")
    if have < 14:
        return None
    fam_byte = buf[13]
    # LOCAL ignores the family byte altogether, as the spec requires.
    if command == _CMD_PROXY and fam_byte not in _V2_FAMILIES:
        raise ProxyProtocolError("v2_bad_family", f"family/transport byte 0x{fam_byte:02x}")
    if have < V2_HEADER_LENGTH:
        return None
    _, _, length = _V2_PREFIX.unpack_from(buf, 12)
    total = V2_HEADER_LENGTH + length
    if command == _CMD_LOCAL:
        if have < total:
            return None
        return _LOCAL_V2, total
    family, addr_size = _V2_FAMILIES[fam_byte]
    if length < addr_size:
        raise ProxyProtocolError(
            "v2_short_address", f"length {length} < {addr_size} for family 0x{fam_byte:02x}"
        )
    if have < total:
        return None
    block = bytes(buf[V2_HEADER_LENGTH:total])
    source: Address | None = None
    destination: Address | None = None
    if family == "TCP4":
        source, destination = _inet_pair(ipaddress.IPv4Address, block, 4)
    elif family == "TCP6":
        source, destination = _inet_pair(ipaddress.IPv6Address, block, 16)
    tlvs = _parse_tlvs(block, addr_size)
    return ProxyHeader(2, "PROXY", family, source, destination, tlvs), total


def _inet_pair(
    ip_type: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address], block: bytes, size: int
) -> tuple[Address, Address]:
    src_port, dst_port = struct.unpack_from(">HH", block, 2 * size)
    return (
        (_ip_text(ip_type(block[:size])), src_port),
        (_ip_text(ip_type(block[size : 2 * size])), dst_port),
    )


def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Canonical text, with IPv4-mapped IPv6 as ``::ffff:1.2.3.4`` on every Python version."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _parse_tlvs(block: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    end = len(block)
    tlvs: list[tuple[int, bytes]] = []
    while pos < end:
        if end - pos < _TLV_HEADER.size:
            raise ProxyProtocolError("v2_bad_tlv", f"truncated TLV header at offset {pos}")
        tlv_type, length = _TLV_HEADER.unpack_from(block, pos)
        value_end = pos + _TLV_HEADER.size + length
        if value_end > end:
            raise ProxyProtocolError(
                "v2_bad_tlv", f"TLV 0x{tlv_type:02x} announces {length} bytes past the header end"
            )
        value = block[pos + _TLV_HEADER.size : value_end]
        _check_tlv(tlv_type, value)
        tlvs.append((tlv_type, value))
        pos = value_end
    return tuple(tlvs)


def _check_tlv(tlv_type: int, value: bytes) -> None:
    """Validate the TLVs we decode, so the ProxyHeader properties never raise."""
    try:
        if tlv_type == PP2_TYPE_AUTHORITY:
            value.decode("utf-8")
        elif tlv_type == PP2_TYPE_AWS and value[:1] == bytes((PP2_SUBTYPE_AWS_VPCE_ID,)):
            value[1:].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError(
            "v2_bad_tlv", f"TLV 0x{tlv_type:02x} value is not valid text"
        ) from None


# --- building -----------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: str) -> IPAddress:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        ip = ipaddress.IPv6Address(int(ip))  # zones cannot cross hosts; the header has no room
    return ip


def _port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return port


def _same_family(source: Address, destination: Address) -> tuple[IPAddress, IPAddress]:
    """Both addresses as one family; IPv4 is mapped into IPv6 when they differ (as haproxy does)."""
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst)
        )
    return src, dst


def build_v1(source: Address, destination: Address) -> bytes:
    """A PROXY v1 line for a TCP connection from ``source`` to ``destination``."""
    src, dst = _same_family(source, destination)
    protocol = "TCP4" if src.version == 4 else "TCP6"
    src_port, dst_port = _port(source[1]), _port(destination[1])
    line = f"PROXY {protocol} {_ip_text(src)} {_ip_text(dst)} {src_port} {dst_port}\r\n"
    return line.encode("ascii")


def build_v2(
    source: Address | None,
    destination: Address | None,
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """A PROXY v2 header; ``(None, None)`` builds a LOCAL header (health checks).

    Raises ValueError for bad addresses, ports, TLV types or a header longer than 65535.
    """
    if source is None or destination is None:
        if source is not None or destination is not None:
            raise ValueError("source and destination must both be given, or both be None")
        if tlvs:
            raise ValueError("a LOCAL header carries no TLVs (receivers discard its block)")
        return V2_SIGNATURE + bytes((0x20 | _CMD_LOCAL, 0x00, 0, 0))
    src, dst = _same_family(source, destination)
    fam_byte = 0x11 if src.version == 4 else 0x21
    parts = [src.packed, dst.packed, struct.pack(">HH", _port(source[1]), _port(destination[1]))]
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF:
            raise ValueError(f"TLV type {tlv_type} does not fit in a byte")
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{tlv_type:02x} value of {len(value)} bytes is too long")
        try:
            _check_tlv(tlv_type, bytes(value))
        except ProxyProtocolError as exc:
            raise ValueError(str(exc)) from None
        parts.append(_TLV_HEADER.pack(tlv_type, len(value)) + value)
    block = b"".join(parts)
    if len(block) > 0xFFFF:
        raise ValueError(f"PROXY v2 block of {len(block)} bytes exceeds 65535")
    return V2_SIGNATURE + _V2_PREFIX.pack(0x20 | _CMD_PROXY, fam_byte, len(block)) + block
