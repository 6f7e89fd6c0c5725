"""Server-name normalisation and matching, shared by routing and the on-demand policy.

One rule everywhere: names are compared lower-cased, without a trailing dot, as IDNA A-labels.
Normalising once, before any decision, is what keeps ``Shop.Example.NET.`` from being routed one
way and issued for another. Pure functions, stdlib only.
"""

from __future__ import annotations

import ipaddress
import re

# Always used with fullmatch: ``$`` also matches before a trailing newline, so an anchored
# ``match`` took "a\n" as a label (and an admin path can carry a decoded %0a).
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
MAX_NAME_LENGTH = 253


class InvalidName(ValueError):
    """A server name that is not a DNS hostname we would route or issue for."""


def normalize_name(name: str) -> str:
    """Lower-case, strip one trailing dot, convert U-labels to A-labels; raise InvalidName."""
    if not name:
        raise InvalidName("empty name")
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidName(f"not a valid IDNA name: {exc}") from None
    name = name.lower()
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"longer than {MAX_NAME_LENGTH} characters")
    return name


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address, as written (no brackets)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_ip_literal(name: str) -> bool:
    candidate = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if ":" not in candidate and not candidate[-1:].isdigit():
        # Every IPv6 literal has a colon and every IPv4 one ends in a digit: the common
        # case (a hostname from SNI, once per connection) skips the parser.
        return False
    return is_ip(candidate)


def validate_hostname(name: str) -> str:
    """Normalise and check ``name`` is a hostname a public CA could issue for.

    Refuses IP literals, empty labels, bad characters and over-long names *before* any
    network request (ask endpoint, CA) is made for it.
    """
    norm = normalize_name(name)
    if is_ip_literal(norm):
        raise InvalidName("IP address literals are not server names")
    labels = norm.split(".")
    if len(labels) < 2:
        raise InvalidName("a single-label name cannot get a certificate")
    for label in labels:
        if not label:
            raise InvalidName("empty label")
        if not _LABEL_RE.fullmatch(label):
            raise InvalidName(f"label {label!r} is not a valid DNS label")
    if labels[-1].isdigit():
        raise InvalidName("top-level label is numeric")
    return norm


def normalize_pattern(pattern: str) -> str:
    """Normalise a configured pattern: ``*``, ``*.example.net`` or an exact name."""
    if pattern == "*":
        return pattern
    if pattern.startswith("*."):
        return "*." + normalize_name(pattern[2:])
    return normalize_name(pattern)


def name_matches(pattern: str, name: str) -> bool:
    """Does normalised ``name`` match normalised ``pattern``?

    ``*`` matches everything; ``*.example.net`` matches exactly one extra label
    (``a.example.net`` but neither ``example.net`` nor ``a.b.example.net``), as in RFC 6125.
    """
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.net"
        if not name.endswith(suffix):
            return False
        head = name[: -len(suffix)]
        return bool(head) and "." not in head
    return pattern == name
