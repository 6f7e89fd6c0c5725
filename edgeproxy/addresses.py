"""Addresses: ``host:port`` parsed once into ``HostPort``, networks, loopback, binding to one.

A leaf: the config, the proxy, the admin server and the hostname registry all speak
``HostPort``, and none of them needs the others for it. Owns the address syntax (and the
wording of its errors, which the config shows as they are) and how edgeproxy binds a TCP socket.
Must not know what listens or connects there.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

__all__ = [
    "HostPort",
    "bound_socket",
    "is_loopback_host",
    "parse_hostport",
    "parse_network",
    "parse_port",
]


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(value: str, *, what: str) -> HostPort:
    """Parse ``host:port`` / ``[v6]:port``; raise ValueError with a fix hint."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f'{value!r} is not [IPv6]:port (write e.g. "[::]:443")')
        port_s = rest[1:]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f'{value!r} has no port (write {what} as "host:port")')
        if ":" in host:
            raise ValueError(f'{value!r}: put IPv6 addresses in brackets, e.g. "[::1]:443"')
    return HostPort(host, parse_port(port_s, value))


def parse_port(port_s: str, value: str, *, lowest: int = 0) -> int:
    """The port part ``port_s`` of the address ``value`` (named in the error), ``lowest``-65535."""
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_s!r} is not a number") from None
    if not lowest <= port <= 65535:
        raise ValueError(f"{value!r}: port must be {lowest}-65535")
    return port


def parse_network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (or a single address) as a network; raise ValueError with a fix hint."""
    if "%" in value:
        raise ValueError(f"{value!r}: a zone index has no place in a network (remove the %...)")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as exc:
        if "host bits set" in str(exc):
            net = ipaddress.ip_network(value.strip(), strict=False)
            raise ValueError(
                f"{value!r} has bits set after the prefix (write the network: {str(net)!r})"
            ) from None
        raise ValueError(
            f'{value!r} is not a network (write a CIDR such as "10.0.0.0/16" or "fd00::/8")'
        ) from None


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address without brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bound_socket(where: HostPort, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``where``, not listening yet; closed again if binding fails.

    SO_REUSEADDR so TIME_WAIT leftovers of a previous run pass; SO_REUSEPORT only when asked
    (worker processes sharing one port), so that otherwise any other listener makes this fail;
    IPv6 sockets are v6-only so ``[::]`` and ``0.0.0.0`` can both be listed.
    """
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((where.host, where.port))
    except BaseException:
        sock.close()
        raise
    return sock
