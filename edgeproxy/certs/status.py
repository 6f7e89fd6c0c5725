"""Per-domain status: what state a name is in, what went wrong last, and how to fix it.

The status answers the operator's question "why doesn't shop.customer.com work?" without
reading logs. Hints are chosen from the error's type (ACME problem type or our own reason
token), never from message text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

State = Literal["allowed", "denied", "issuing", "valid", "renewing", "failing", "removed"]

_LB_HINT = (
    "the CA could not complete TLS-ALPN-01 with edgeproxy: the load balancer must forward TCP "
    "443 untouched (a TCP listener, never TLS; no TLS inspection), its PROXY protocol setting "
    "must match [server] proxy_protocol, and the name's CNAME must point at this deployment. "
    "Run `edgeproxy doctor NAME` to check each."
)

# Keyed by ACME problem type suffix or by our own reason token.
HINTS: dict[str, str] = {
    "connection": _LB_HINT,
    "tls": _LB_HINT,
    "incorrectResponse": _LB_HINT
    + " An 'incorrect response' usually means another TLS terminator answered.",
    "unauthorized": _LB_HINT,
    "dns": "the CA could not resolve the name: check the customer's CNAME/A record exists "
    "and has propagated.",
    "caa": "a CAA record on the domain forbids this CA: the customer must add a CAA record "
    "allowing it, or remove the restrictive one.",
    "rejectedIdentifier": "the CA will not issue for this name (policy or blocklist); "
    "nothing to retry until the name changes.",
    "rateLimited": "the CA's rate limit was hit; edgeproxy retries after the CA's Retry-After.",
    "serverInternal": "the CA had an internal error; edgeproxy retries with backoff.",
    "externalAccountRequired": "the CA requires External Account Binding: set acme.eab_kid and "
    "acme.eab_hmac_key.",
    "unreachable": "the ACME server is unreachable from this node: check acme.directory, "
    "egress firewall rules and acme.trust.",
    "denied": "the allow-check refused this name (on_demand.allow patterns / on_demand.ask "
    "endpoint); allow it there to get a certificate.",
    "ask_unavailable": "the on_demand.ask endpoint did not answer in time or failed; names "
    "are refused until it answers.",
    "removed": "the hostname was removed from the registry (DELETE /v1/hostnames/NAME); add it "
    "again to serve it (within hostnames.removal_grace its certificate is reused).",
    "invalid_name": "the SNI is not a valid DNS hostname; clients must connect by name.",
    "storage": "storage failed: check the storage path/database is reachable and writable.",
    "lock_timeout": "another process held the issuance lock too long; it will be retried.",
    "timeout": "issuance did not finish in time; it is retried with backoff.",
}


def hint_for(error_type: str | None) -> str | None:
    if not error_type:
        return None
    key = error_type.rsplit(":", 1)[-1]
    return HINTS.get(key)


@dataclass(slots=True)
class DomainStatus:
    name: str
    state: State
    not_after: float | None = None
    renew_at: float | None = None
    renewal_source: str | None = None  # "ari" | "backstop" | "expiring"
    renewal_reason: str | None = None  # why that source (e.g. the CA's ARI error)
    ari_window: tuple[float, float] | None = None
    next_attempt: float | None = None
    failures: int = 0
    last_error: str | None = None
    last_error_type: str | None = None
    hint: str | None = None
    issuer: str | None = None
    updated_at: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DomainStatus:
        d = json.loads(raw)
        if d.get("ari_window") is not None:
            d["ari_window"] = tuple(d["ari_window"])
        # Records written by a newer or older version (rolling upgrades share storage): keep
        # the fields this version knows.
        return cls(**{k: v for k, v in d.items() if k in _FIELDS})


_FIELDS = frozenset(f.name for f in fields(DomainStatus))
