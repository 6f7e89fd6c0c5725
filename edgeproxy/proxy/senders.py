"""Who may send PROXY headers: ``server.proxy_protocol_from``, checked on the accept path.

A PROXY header is a claim about who the client is; only the load balancer may make it. The
accept loop asks :class:`AddressSet` about every peer before reading a byte from it, so it
must be cheap: networks are turned into ``(network, mask)`` integers once, a peer costs one
``inet_pton`` and a mask per network, and the usual single network skips the loop. Allowed
addresses are remembered (a balancer connects from a handful), so the usual answer is one
dict lookup; only addresses inside the listed networks can enter that memo, and it is
emptied when it reaches its bound.

IPv4-mapped IPv6 peers (``::ffff:10.0.0.1``, from a dual-stack socket) are matched as the IPv4
address they carry, so an IPv4 CIDR covers them; an IPv6 network listed in the mapped range is
matched as IPv4 too.

:class:`RefusalSummary` keeps the log of refused peers to one line per interval, whatever the
rate: a scanner must not be able to fill the disk through us (the metric stays exact).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")
_MEMO_SIZE = 4096


class AddressSet:
    """A fixed set of networks; ``allows(host)`` for the text of an accepted peer's address."""

    __slots__ = ("_allowed", "_single", "_v4", "_v6")

    def __init__(self, networks: Iterable[Network]) -> None:
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for net in networks:
            if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED_NET):
                mapped = net.network_address.ipv4_mapped
                assert mapped is not None  # inside ::ffff:0:0/96
                v4.append(ipaddress.IPv4Network((mapped, net.prefixlen - 96)))
            elif isinstance(net, ipaddress.IPv4Network):
                v4.append(net)
            else:
                v6.append(net)
        self._v4 = tuple(_masks(ipaddress.collapse_addresses(v4)))
        self._v6 = tuple(_masks(ipaddress.collapse_addresses(v6)))
        both = [(4, *m) for m in self._v4] + [(6, *m) for m in self._v6]
        self._single: tuple[int, int, int] | None = both[0] if len(both) == 1 else None
        self._allowed: set[str] = set()

    def allows(self, host: str) -> bool:
        """True if ``host`` (an IPv4 or IPv6 address as text) is inside one of the networks."""
        if host in self._allowed:
            return True
        if self._matches(host):
            if len(self._allowed) >= _MEMO_SIZE:
                self._allowed.clear()
            self._allowed.add(host)
            return True
        return False

    def _matches(self, host: str) -> bool:
        try:
            if ":" in host:
                packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
                if packed[:12] == _MAPPED_PREFIX:
                    version, value = 4, int.from_bytes(packed[12:], "big")
                else:
                    version, value = 6, int.from_bytes(packed, "big")
            else:
                version, value = 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
        except OSError:  # not an IP address at all: nobody listed it
            return False
        single = self._single
        if single is not None:
            return single[0] == version and value & single[2] == single[1]
        for network, mask in self._v4 if version == 4 else self._v6:
            if value & mask == network:
                return True
        return False


def _masks(networks: Iterable[Network]) -> Iterable[tuple[int, int]]:
    for net in networks:
        yield int(net.network_address), int(net.netmask)


class RefusalSummary:
    """Refused peers, logged as at most one line per ``interval`` seconds.

    The first refusal after a quiet interval is reported at once (an operator who just got
    the CIDRs wrong sees it immediately); the ones that follow are counted and reported by
    ``flush``, which the caller runs every ``interval`` seconds.
    """

    __slots__ = ("_count", "_last_peer", "_quiet", "interval")

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._count = 0
        self._last_peer = ""
        self._quiet = True  # nothing was reported in the current interval

    def note(self, peer: str) -> str | None:
        """Count one refusal; return a line to log now, or None."""
        if self._quiet:
            self._quiet = False
            return (
                f"refused a connection from {peer}: not in server.proxy_protocol_from, so it "
                f"may not send PROXY headers (further refusals: one summary per "
                f"{self.interval:g} s; edgeproxy_proxy_protocol_refused_total counts them all)"
            )
        self._count += 1
        self._last_peer = peer
        return None

    def flush(self) -> str | None:
        """End the interval; return the summary line for the refusals not yet reported."""
        count, self._count = self._count, 0
        if not count:
            self._quiet = True
            return None
        return (
            f"refused {count} more connections from peers not in server.proxy_protocol_from "
            f"in the last {self.interval:g} s (the latest from {self._last_peer})"
        )
