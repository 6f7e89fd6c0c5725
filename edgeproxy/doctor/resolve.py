"""DNS observation: follow a name's CNAME chain to its addresses, as a ``DnsAnswer``.

Owns: talking to the resolver (dnspython) and the address spellings the judgements compare.
Must not know: what the answer means for the deployment (``judge.judge_dns``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from ..names import normalize_name

_MAX_CNAME_HOPS: Final = 16


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """What resolving one name gave: its CNAME chain (targets in order) and final addresses.

    ``error`` is set when the resolver could not answer (timeout, SERVFAIL); a name that does
    not exist has ``nxdomain`` set and no error: that is an answer.
    """

    name: str
    chain: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    nxdomain: bool = False
    error: str | None = None


def norm_ip(text: str) -> str:
    return ipaddress.ip_address(text).compressed


def target_key(target: str) -> str:
    try:
        return normalize_name(target)
    except ValueError:  # InvalidName: judged as unresolvable rather than crashing the report
        return target.lower()


def ip_sort_key(text: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(text)
    return ip.version, int(ip)


def make_resolver(nameserver: tuple[str, int] | None, timeout: float) -> dns.asyncresolver.Resolver:
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.lifetime = timeout
    return resolver


def _text(n: dns.name.Name) -> str:
    return n.to_text(omit_final_dot=True).lower()


async def resolve_chain(resolver: dns.asyncresolver.Resolver, name: str) -> DnsAnswer:
    """Follow NAME's CNAME chain and collect the A and AAAA addresses at its end.

    A recursive resolver hands back the whole chain in one answer; an authoritative or mock
    server may stop at the first CNAME whose target it does not hold, so we keep asking for
    the chain's end ourselves, up to ``_MAX_CNAME_HOPS``, refusing loops.
    """
    chain: list[str] = []
    seen = {name}
    current = name
    addresses: list[str] = []
    try:
        for _ in range(_MAX_CNAME_HOPS):
            answer = await resolver.resolve(
                current, dns.rdatatype.A, raise_on_no_answer=False, search=False
            )
            for rrset in answer.chaining_result.cnames:
                for rdata in rrset:
                    target = _text(rdata.target)
                    if target in seen:
                        return DnsAnswer(name, tuple(chain), error=f"CNAME loop at {target}")
                    seen.add(target)
                    chain.append(target)
            canonical = _text(answer.canonical_name)
            if answer.rrset is not None:
                addresses.extend(rdata.address for rdata in answer.rrset)
            if answer.rrset is None and canonical != current:
                current = canonical
                continue
            current = canonical
            break
        else:
            return DnsAnswer(name, tuple(chain), error=f"CNAME chain longer than {_MAX_CNAME_HOPS}")
        six = await resolver.resolve(
            current, dns.rdatatype.AAAA, raise_on_no_answer=False, search=False
        )
        if six.rrset is not None:
            addresses.extend(rdata.address for rdata in six.rrset)
    except dns.resolver.NXDOMAIN:
        return DnsAnswer(name, tuple(chain), tuple(addresses), nxdomain=True)
    except dns.exception.DNSException as exc:
        return DnsAnswer(name, tuple(chain), tuple(addresses), error=str(exc) or type(exc).__name__)
    return DnsAnswer(name, tuple(chain), tuple(dict.fromkeys(addresses)))
