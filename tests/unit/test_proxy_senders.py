"""``server.proxy_protocol_from`` as the accept loop sees it: which peers may send PROXY headers,
and the rate-limited log line about the ones that may not."""

from __future__ import annotations

import ipaddress

import pytest

from edgeproxy.proxy.senders import _MEMO_SIZE, AddressSet, RefusalSummary


def addresses(*cidrs: str) -> AddressSet:
    return AddressSet(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(
    ("cidrs", "peer", "allowed"),
    [
        # One network: the fast path.
        (["10.0.0.0/16"], "10.0.0.1", True),
        (["10.0.0.0/16"], "10.0.255.255", True),
        (["10.0.0.0/16"], "10.1.0.0", False),
        (["10.0.0.0/16"], "9.255.255.255", False),
        (["127.0.0.1/32"], "127.0.0.1", True),
        (["127.0.0.1/32"], "127.0.0.2", False),
        (["2001:db8::/32"], "2001:db8:ffff::1", True),
        (["2001:db8::/32"], "2001:db9::1", False),
        # An IPv4 network never matches an IPv6 peer of the same bits, nor the reverse.
        (["0.0.0.0/0"], "::1", False),
        (["::/0"], "192.0.2.1", False),
        (["::/0"], "2001:db8::1", True),
        # A dual-stack socket reports IPv4 peers as mapped IPv6: matched as the IPv4 address.
        (["10.0.0.0/16"], "::ffff:10.0.3.4", True),
        (["10.0.0.0/16"], "::ffff:10.9.3.4", False),
        (["::ffff:10.0.0.0/112"], "10.0.3.4", True),
        (["::ffff:10.0.0.0/112"], "::ffff:10.0.3.4", True),
        # Several networks of both families.
        (["10.0.0.0/24", "10.0.1.0/24", "fd00::/8"], "10.0.1.9", True),
        (["10.0.0.0/24", "10.0.1.0/24", "fd00::/8"], "10.0.2.9", False),
        (["10.0.0.0/24", "10.0.1.0/24", "fd00::/8"], "fd12::1", True),
        (["10.0.0.0/24", "10.0.1.0/24", "fd00::/8"], "fe80::1", False),
        (["192.0.2.0/24", "198.51.100.0/24"], "198.51.100.200", True),
        # A link-local peer comes with its zone; the address decides.
        (["fe80::/10"], "fe80::1%eth0", True),
        # Not an address at all (an AF_UNIX listener, a bug): nobody listed it.
        (["0.0.0.0/0", "::/0"], "unknown", False),
        (["0.0.0.0/0"], "", False),
        (["0.0.0.0/0"], "010.0.0.1", False),
    ],
)
def test_allows(cidrs: list[str], peer: str, allowed: bool) -> None:
    assert addresses(*cidrs).allows(peer) is allowed


def test_every_address_of_a_network_and_its_neighbours() -> None:
    net = ipaddress.ip_network("172.16.4.0/22")
    inside = addresses(str(net), "fd00::/64")  # two networks: the loop, not the fast path
    one = addresses(str(net))
    for ip in net:
        assert inside.allows(str(ip)) and one.allows(str(ip)), ip
    for ip in (net.network_address - 1, net.broadcast_address + 1):
        assert not inside.allows(str(ip)) and not one.allows(str(ip)), ip


def test_the_first_refusal_is_logged_at_once_then_one_summary_per_interval() -> None:
    summary = RefusalSummary(interval=60)
    first = summary.note("192.0.2.1")
    assert first is not None and "192.0.2.1" in first and "proxy_protocol_from" in first
    assert all(summary.note(f"192.0.2.{i}") is None for i in range(2, 12))
    line = summary.flush()
    assert line is not None and "refused 10 more" in line and "192.0.2.11" in line
    # Still busy: the next refusal waits for the next summary.
    assert summary.note("192.0.2.50") is None
    assert summary.flush() is not None
    # A quiet interval: nothing to say, and the next refusal is news again.
    assert summary.flush() is None
    assert summary.note("192.0.2.60") is not None


def test_the_memo_of_allowed_peers_stays_bounded_and_never_holds_a_refused_one() -> None:
    trusted = addresses("10.0.0.0/8")
    memo = trusted._allowed  # the accept path's fast path: its bound is the point here
    peers = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(3 * _MEMO_SIZE)]
    for _ in range(2):  # the second round answers from the memo where it can
        assert all(trusted.allows(p) for p in peers)
        assert 0 < len(memo) <= _MEMO_SIZE
    for i in range(100):
        assert not trusted.allows(f"192.0.2.{i}")
    assert not any(p.startswith("192.") for p in memo)
