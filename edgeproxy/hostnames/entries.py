"""What a hostname entry may hold: the rules for client input, shared by the admin API and CLI.

Pure functions, no I/O. Each refusal is a ``BadEntry`` with a ``kind`` (the problem type's last
path segment) and a ``detail`` precise enough to fix the input without reading the code.
"""

from __future__ import annotations

import json

from ..addresses import HostPort, parse_hostport
from ..names import InvalidName, is_ip_literal, normalize_name, validate_hostname

#: Largest metadata object, as compact UTF-8 JSON.
MAX_METADATA_BYTES = 4096


class BadEntry(ValueError):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # invalid-hostname | ip-literal | invalid-upstream | ...
        self.detail = detail


def parse_hostname(raw: object) -> str:
    """The normalised hostname, or BadEntry (IP literals get their own kind)."""
    if not isinstance(raw, str) or not raw:
        raise BadEntry("invalid-hostname", "hostname must be a non-empty string")
    try:
        candidate = normalize_name(raw)
    except InvalidName as exc:
        raise BadEntry("invalid-hostname", f"{raw!r} is not a valid hostname: {exc}") from None
    if is_ip_literal(candidate):
        raise BadEntry(
            "ip-literal",
            f"{raw!r} is an IP address; certificates are issued for DNS hostnames only",
        )
    try:
        return validate_hostname(candidate)
    except InvalidName as exc:
        raise BadEntry("invalid-hostname", f"{raw!r} is not a valid hostname: {exc}") from None


def parse_upstream(raw: object) -> str | None:
    """A canonical "host:port" (IPv6 in brackets), or None for no override."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise BadEntry("invalid-upstream", 'upstream must be a string "host:port" or null')
    try:
        hp = parse_hostport(raw, what="the upstream")
    except ValueError as exc:
        raise BadEntry("invalid-upstream", f"upstream {exc}") from None
    if not hp.host or hp.port == 0:
        raise BadEntry("invalid-upstream", f"upstream {raw!r} needs a host and a port 1-65535")
    return str(hp)


def upstream_hostport(upstream: str) -> HostPort:
    """A stored upstream back to host and port (it was canonicalised by ``parse_upstream``)."""
    return parse_hostport(upstream, what="the upstream")


def encode_metadata(raw: object) -> str:
    """Metadata as stored: the object's compact JSON text, keys in the order given."""
    if raw is None:
        return "{}"
    if not isinstance(raw, dict):
        raise BadEntry(
            "invalid-metadata", f"metadata must be a JSON object, not {type(raw).__name__}"
        )
    text = json.dumps(raw, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode())
    if size > MAX_METADATA_BYTES:
        raise BadEntry(
            "metadata-too-large",
            f"metadata is {size} bytes as compact JSON; the limit is {MAX_METADATA_BYTES}",
        )
    return text


def decode_metadata(text: str) -> dict[str, object]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def parse_import_line(line: str) -> tuple[str, str | None, str] | None:
    """One line of a ``hostnames import`` file: (hostname, upstream, metadata text), or None
    for a blank line or a ``#`` comment. A line starting with ``{`` is a JSON object with the
    API's fields (``hostname``, ``upstream``, ``metadata``); anything else is a hostname."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if not text.startswith("{"):
        return parse_hostname(text), None, "{}"
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise BadEntry("invalid-body", f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadEntry("invalid-body", "a JSON line must be an object")
    unknown = sorted(set(obj) - {"hostname", "upstream", "metadata"})
    if unknown:
        raise BadEntry(
            "invalid-body", f"unknown field(s) {', '.join(unknown)} (allowed: hostname, "
            "upstream, metadata)"
        )
    if "hostname" not in obj:
        raise BadEntry("invalid-hostname", "the object has no hostname")
    return (
        parse_hostname(obj["hostname"]),
        parse_upstream(obj.get("upstream")),
        encode_metadata(obj.get("metadata")),
    )
