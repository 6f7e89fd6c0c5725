"""DNS-01 (RFC 8555 s8.4): TXT records written by RFC 2136 dynamic updates signed with TSIG.

Owns: where a name's challenge record goes, writing it, waiting until the zone's servers
answer it, and removing it. Must not know: the ACME flow (the client calls ``present`` and
``cleanup``), certificates or storage.

Where the record goes: ``_acme-challenge.<name>`` (a wildcard's ``*.`` dropped, s8.4). When
that name is a CNAME (the delegated pattern: the customer's zone points its challenge name
into a zone we may update), the chain is followed (at most ``MAX_CNAME_HOPS``) and the TXT is
written at the end of it, in the configured zone that contains the target. A name inside a
configured zone is asked of that zone's server; any other of the system's resolver.

Propagation: after the update, every server of the zone (the configured primary and any
``check_servers``) is asked for the TXT until each returns the value, within
``propagation_timeout``; only then does ``present`` return and the CA get told to validate.

The TSIG secret comes from the environment (``tsig_secret_env``, read by the assembler through
``secret_env``) when the solver is built: it is never in the config file, and never logged
(dnspython's keyring holds it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.tsig
import dns.tsigkeyring
import dns.update
import trio

from ..acme.errors import SolverError
from ..acme.jws import b64url
from ..addresses import parse_hostport
from ..config import DnsZoneConfig
from ..errors import ConfigError
from ..reasons import Reason

log = logging.getLogger("edgeproxy.dns01")

MAX_CNAME_HOPS = 8
TXT_TTL = 60  # short: a stale challenge value must not outlive the next attempt by much
QUERY_TIMEOUT = 3.0
POLL_FIRST = 0.2
POLL_CAP = 2.0


def txt_value(key_authorization: str) -> str:
    """The TXT record's value: base64url(SHA-256(key authorization)), unpadded (s8.4)."""
    digest = hashlib.sha256(key_authorization.encode()).digest()
    return b64url(digest)


def challenge_name(identifier: str) -> dns.name.Name:
    """``_acme-challenge.`` before the name; a wildcard's ``*.`` is dropped (RFC 8555 s8.4)."""
    base = identifier[2:] if identifier.startswith("*.") else identifier
    return dns.name.from_text(f"_acme-challenge.{base}")


@dataclass(frozen=True, slots=True)
class Zone:
    origin: dns.name.Name
    server: tuple[str, int]
    check_servers: tuple[tuple[str, int], ...]
    keyring: dict[dns.name.Name, dns.tsig.Key]
    key_name: dns.name.Name
    propagation_timeout: float

    @classmethod
    def from_config(cls, cfg: DnsZoneConfig, secret: str) -> Zone:
        """The zone's settings with its TSIG ``secret`` (``secret_env.tsig_secret``)."""
        key_name = dns.name.from_text(cfg.tsig_key_name)
        try:
            keyring = dns.tsigkeyring.from_text({cfg.tsig_key_name: (cfg.tsig_algorithm, secret)})
        except (ValueError, dns.exception.DNSException) as exc:
            # Not the secret itself: only that it could not be read.
            raise ConfigError(
                [f"acme.dns zone {cfg.zone}: {cfg.tsig_secret_env} is not base64 ({exc})"]
            ) from None

        def hp(value: str) -> tuple[str, int]:
            p = parse_hostport(value, what="acme.dns server")
            return p.host, p.port

        return cls(
            origin=dns.name.from_text(cfg.zone),
            server=hp(cfg.server),
            check_servers=tuple(hp(s) for s in cfg.check_servers),
            keyring=keyring,
            key_name=key_name,
            propagation_timeout=cfg.propagation_timeout,
        )

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        return (self.server, *self.check_servers)


def zone_for(zones: Sequence[Zone], name: dns.name.Name) -> Zone | None:
    """The most specific configured zone containing ``name``."""
    best: Zone | None = None
    for z in zones:
        if name.is_subdomain(z.origin) and (best is None or len(z.origin) > len(best.origin)):
            best = z
    return best


class DnsUpdateError(SolverError):
    """The challenge record could not be written or seen (an AcmeError: the issuer reports
    it as a failed attempt for the name, typed by ``reason`` for the status's hint)."""


class Dns01Solver:
    challenge_type = "dns-01"

    def __init__(self, zones: Sequence[Zone], resolver: str | None = None) -> None:
        if not zones:
            raise ValueError("Dns01Solver needs at least one zone")
        self._zones = tuple(zones)
        self._resolver: tuple[str, int] | None = None
        if resolver is not None:
            r = parse_hostport(resolver, what="acme.dns_resolver")
            self._resolver = (r.host, r.port)
        # (identifier, token) -> where the TXT went and what it says, for cleanup.
        self._written: dict[tuple[str, str], tuple[Zone, dns.name.Name, str]] = {}

    async def present(self, identifier: str, token: str, key_authorization: str) -> None:
        value = txt_value(key_authorization)
        target = await self._resolve_target(challenge_name(identifier))
        zone = zone_for(self._zones, target)
        if zone is None:
            raise DnsUpdateError(
                Reason.DNS_ZONE_NOT_FOUND,
                f"{target} (the challenge record of {identifier}) is in none of the "
                "[[acme.dns]] zones: add its zone, or CNAME _acme-challenge into one",
            )
        self._written[(identifier, token)] = (zone, target, value)
        upd = self._update(zone)
        # add, never replace: *.example.net and example.net share one challenge name, and both
        # values must be there at once while the CA validates the two authorizations.
        upd.add(target, TXT_TTL, "TXT", value)
        await self._send(zone, upd, f"add TXT {target}")
        log.info(
            "dns-01: TXT %s written for %s; waiting for the zone's servers", target, identifier
        )
        await self._wait_visible(zone, target, value)

    async def cleanup(self, identifier: str, token: str) -> None:
        written = self._written.pop((identifier, token), None)
        if written is None:
            return
        zone, target, value = written
        upd = self._update(zone)
        upd.delete(target, "TXT", value)
        await self._send(zone, upd, f"delete TXT {target}")

    def _update(self, zone: Zone) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(zone.origin, keyring=zone.keyring, keyname=zone.key_name)

    async def _send(self, zone: Zone, upd: dns.update.UpdateMessage, what: str) -> None:
        host, port = zone.server
        try:
            response = await dns.asyncquery.tcp(upd, host, port=port, timeout=QUERY_TIMEOUT)
        except dns.tsig.PeerError as exc:
            raise DnsUpdateError(
                Reason.DNS_TSIG_REJECTED,
                f"{what}: {host}:{port} rejected our TSIG key ({type(exc).__name__}; check "
                "tsig_key_name, tsig_algorithm and the secret)",
            ) from None
        except (OSError, dns.exception.DNSException) as exc:
            raise DnsUpdateError(
                Reason.DNS_UPDATE_FAILED, f"{what}: update to {host}:{port} failed: {exc!r}"
            ) from None
        if response.rcode() != dns.rcode.NOERROR:
            raise DnsUpdateError(
                Reason.DNS_UPDATE_REFUSED,
                f"{what}: {host}:{port} refused the update ({dns.rcode.to_text(response.rcode())}"
                "; check the TSIG key and the zone's update-policy)",
            )

    async def _ask(
        self, server: tuple[str, int], name: dns.name.Name, rdtype: str
    ) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype)
        return await dns.asyncquery.udp(q, server[0], port=server[1], timeout=QUERY_TIMEOUT)

    async def _resolve_target(self, name: dns.name.Name) -> dns.name.Name:
        """Follow ``name``'s CNAME chain to the name that holds (or will hold) the TXT."""
        seen = {name}
        for _ in range(MAX_CNAME_HOPS):
            cname = await self._cname(name)
            if cname is None:
                return name
            if cname in seen:
                raise DnsUpdateError(Reason.DNS_CNAME_LOOP, f"CNAME loop at {name}")
            seen.add(cname)
            name = cname
        raise DnsUpdateError(
            Reason.DNS_CNAME_LOOP, f"more than {MAX_CNAME_HOPS} CNAMEs from {min(seen)}"
        )

    async def _cname(self, name: dns.name.Name) -> dns.name.Name | None:
        zone = zone_for(self._zones, name)
        try:
            if zone is not None or self._resolver is not None:
                server = zone.server if zone is not None else self._resolver
                assert server is not None
                response = await self._ask(server, name, "CNAME")
                rrset = response.get_rrset(
                    response.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME
                )
            else:
                answer = await dns.asyncresolver.resolve(name, "CNAME", raise_on_no_answer=False)
                rrset = answer.rrset
        except dns.resolver.NXDOMAIN:
            return None
        except (OSError, dns.exception.DNSException) as exc:
            raise DnsUpdateError(
                Reason.DNS_LOOKUP_FAILED, f"cannot look up CNAME {name}: {exc!r}"
            ) from None
        if rrset is None or rrset.rdtype != dns.rdatatype.CNAME:
            return None
        return rrset[0].target.derelativize(name.parent())  # type: ignore[no-any-return]

    async def _wait_visible(self, zone: Zone, name: dns.name.Name, value: str) -> None:
        pending = set(zone.servers)
        pause = POLL_FIRST
        with trio.move_on_after(zone.propagation_timeout):
            while pending:
                for server in sorted(pending):
                    try:
                        response = await self._ask(server, name, "TXT")
                    except (OSError, dns.exception.DNSException):
                        continue
                    if value in _txt_strings(response, name):
                        pending.discard(server)
                if pending:
                    await trio.sleep(pause)
                    pause = min(pause * 2, POLL_CAP)
            return
        raise DnsUpdateError(
            Reason.DNS_PROPAGATION_TIMEOUT,
            f"TXT {name} not answered by {', '.join(f'{h}:{p}' for h, p in sorted(pending))} "
            f"within {zone.propagation_timeout:.0f}s",
        )


def _txt_strings(response: dns.message.Message, name: dns.name.Name) -> set[str]:
    out = set()
    for rrset in response.answer:
        if rrset.name == name and rrset.rdtype == dns.rdatatype.TXT:
            for rd in rrset:
                out.add(b"".join(rd.strings).decode(errors="replace"))
    return out
