"""TOML configuration to a typed, validated ``Config``.

Owns the config schema, its defaults and the wording of config errors: every problem is
reported as ``key.path: what is wrong (how to fix)`` so ``edgeproxy check`` can list them all
at once. Knows nothing of sockets or certificates beyond parsing their settings.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .addresses import HostPort, is_loopback_host, parse_hostport, parse_network
from .certs.policy import ask_url_problem
from .errors import ConfigError
from .names import InvalidName, normalize_name, normalize_pattern, validate_hostname


def _needs(has: object, needed: object, problem: str) -> None:
    """The rule "a setting that has ``has`` needs ``needed`` too"; ``problem`` says what to add."""
    if has and not needed:
        raise ValueError(problem)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ProxyMode = Literal["off", "v1", "v2", "any"]


class ServerConfig(_Model):
    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:443"], min_length=1)
    proxy_protocol: ProxyMode = "off"
    # Who may send PROXY headers (the load balancer's networks). Required when proxy_protocol
    # is on: a header from anyone else would let them pick the client address we log, limit
    # and forward upstream.
    proxy_protocol_from: list[str] | None = None
    workers: Annotated[int, Field(ge=0, le=256)] = 1
    handshake_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    idle_timeout: Annotated[float, Field(gt=0)] = 300.0
    connect_timeout: Annotated[float, Field(gt=0, le=120)] = 5.0
    drain_timeout: Annotated[float, Field(ge=0, le=3600)] = 30.0
    max_connections: Annotated[int, Field(ge=1)] = 20000
    max_connections_per_ip: Annotated[int, Field(ge=0)] = 0  # 0 = unlimited
    max_handshakes: Annotated[int, Field(ge=1)] = 2000  # connections before TLS is up

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: list[str]) -> list[str]:
        return _check_listen_list(v, 443)

    def listen_addresses(self) -> list[HostPort]:
        return [parse_hostport(x, what="a listen address") for x in self.listen]

    @field_validator("proxy_protocol_from")
    @classmethod
    def _check_proxy_from(cls, v: list[str] | None) -> list[str] | None:
        return _check_proxy_from_list(v)

    @model_validator(mode="after")
    def _proxy_from_matches_mode(self) -> ServerConfig:
        _needs(
            self.proxy_protocol != "off",
            self.proxy_protocol_from is not None,
            f'proxy_protocol = "{self.proxy_protocol}" needs server.proxy_protocol_from: '
            "list the networks of the load balancer that sends the headers (its subnets' "
            'CIDRs, e.g. ["10.0.0.0/16"]); anyone else could claim any client address. '
            'Write ["0.0.0.0/0", "::/0"] only if nothing but the balancer can reach the port',
        )
        if self.proxy_protocol == "off" and self.proxy_protocol_from is not None:
            raise ValueError(
                'server.proxy_protocol_from is set but proxy_protocol is "off": it would do '
                "nothing (set proxy_protocol, or remove proxy_protocol_from)"
            )
        return self

    def proxy_senders(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The networks allowed to send PROXY headers ([] when proxy_protocol is off)."""
        return [parse_network(x) for x in self.proxy_protocol_from or ()]


def _check_proxy_from_list(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    if not v:
        raise ValueError(
            "an empty list refuses every connection: list the load balancer's networks "
            '(e.g. ["10.0.0.0/16"])'
        )
    return [str(parse_network(item)) for item in v]


def _check_hostports(v: list[str], what: str) -> list[str]:
    """``v`` unchanged once every item parses as ``host:port``."""
    for item in v:
        parse_hostport(item, what=what)
    return v


def _check_listen_list(v: list[str], example_port: int) -> list[str]:
    for item in v:
        hp = parse_hostport(item, what="a listen address")
        try:
            ipaddress.ip_address(hp.host)
        except ValueError:
            if hp.host != "localhost":
                raise ValueError(
                    f"{item!r}: listen on an IP address (e.g. "
                    f'"0.0.0.0:{example_port}" or "[::]:{example_port}")'
                ) from None
    return v


ChallengeType = Literal["tls-alpn-01", "http-01"]


def _default_challenges() -> list[ChallengeType]:
    return ["tls-alpn-01"]


class HttpConfig(_Model):
    """The plain-HTTP listener (port 80): ACME HTTP-01 answers and redirects to HTTPS."""

    listen: list[str] = Field(default_factory=list)  # empty: no plain-HTTP listener
    proxy_protocol: ProxyMode | None = None  # None: as [server] proxy_protocol
    proxy_protocol_from: list[str] | None = None  # None: as [server] proxy_protocol_from
    timeout: Annotated[float, Field(gt=0, le=300)] = 10.0  # PROXY header + whole request
    max_connections: Annotated[int, Field(ge=1)] = 1000
    max_header_bytes: Annotated[int, Field(ge=1024, le=65536)] = 8192

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: list[str]) -> list[str]:
        return _check_listen_list(v, 80)

    @field_validator("proxy_protocol_from")
    @classmethod
    def _check_proxy_from(cls, v: list[str] | None) -> list[str] | None:
        return _check_proxy_from_list(v)

    def listen_addresses(self) -> list[HostPort]:
        return [parse_hostport(x, what="a listen address") for x in self.listen]


class AdminConfig(_Model):
    listen: str | None = "127.0.0.1:9901"
    token: str | None = None
    token_env: str | None = None
    # Read-only: GET /metrics and /readyz (what Prometheus and probes need), nothing else.
    metrics_token: str | None = None
    metrics_token_env: str | None = None
    # One expiry series per domain: fine for tens of names, unbounded for a SaaS fleet.
    per_domain_metrics: bool = False

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str | None) -> str | None:
        if v:
            parse_hostport(v, what="the admin address")
        return v

    @model_validator(mode="after")
    def _non_loopback_needs_token(self) -> AdminConfig:
        host = parse_hostport(self.listen, what="").host if self.listen else "localhost"
        _needs(
            not is_loopback_host(host),
            self.token or self.token_env,
            f"admin listens on {self.listen} which is not loopback: set admin.token "
            "(or admin.token_env) or listen on 127.0.0.1",
        )
        return self

    @model_validator(mode="after")
    def _metrics_token_needs_admin_token(self) -> AdminConfig:
        _needs(
            self.metrics_token or self.metrics_token_env,
            self.token or self.token_env,
            "admin.metrics_token (or metrics_token_env) is set without admin.token: "
            "without an admin token every endpoint is open, so set admin.token "
            "(or token_env) as well",
        )
        if self.metrics_token and self.metrics_token == self.token:
            raise ValueError(
                "admin.metrics_token equals admin.token: give Prometheus a different secret"
            )
        return self


KeyType = Literal["ec256", "ec384", "rsa2048", "rsa4096"]


class TLSConfig(_Model):
    issuer: Literal["acme", "internal"] = "acme"
    default_sni: str | None = None
    key_type: KeyType = "ec256"
    # Certificates kept ready in memory (LRU); a cold name loads from storage, never re-issues.
    # Each costs ~4 KiB per worker (README "Memory per cached certificate"): size it to the fleet.
    cache_size: Annotated[int, Field(ge=1)] = 10000
    # TLS session resumption (stateless tickets). Off only to measure full-handshake cost.
    session_tickets: bool = True
    # Seconds between new session ticket keys (the previous ones still open tickets for one
    # more period): bounds how long a stolen process memory decrypts recorded sessions.
    ticket_key_rotation: Annotated[float, Field(gt=0, le=7 * 86400)] = 12 * 3600.0
    # How often each process checks stored certificates for renewal and ARI updates.
    maintenance_interval: Annotated[float, Field(gt=0, le=86400)] = 60.0

    @field_validator("default_sni")
    @classmethod
    def _norm(cls, v: str | None) -> str | None:
        return normalize_name(v) if v else v


class AcmeIssuerConfig(_Model):
    """One ACME CA: its directory, account binding, profile and trust."""

    # A short label for metrics and status (default: the directory's host name).
    name: str | None = None
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str | None = None
    trust: str = ""
    eab_kid: str | None = None
    eab_hmac_key: str | None = None
    eab_hmac_key_env: str | None = None
    profile: str | None = None
    preferred_chain: str | None = None

    @field_validator("name")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", v):
            raise ValueError(f"{v!r}: use lower-case letters, digits, '.', '_' or '-'")
        return v

    @field_validator("directory")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise ValueError(f"{v!r} is not an http(s) URL of an ACME directory")
        return v

    @field_validator("trust")
    @classmethod
    def _trust(cls, v: str) -> str:
        if v and not Path(v).is_file():
            raise ValueError(
                f"file {v!r} does not exist (point it at a PEM CA bundle or leave empty)"
            )
        return v

    @model_validator(mode="after")
    def _eab_pair(self) -> Self:
        has_key = bool(self.eab_hmac_key or self.eab_hmac_key_env)
        if bool(self.eab_kid) != has_key:
            raise ValueError(
                "set both acme.eab_kid and acme.eab_hmac_key (or eab_hmac_key_env), or neither"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or (urlsplit(self.directory).hostname or "ca").lower()


class DnsZoneConfig(_Model):
    """``[[acme.dns]]``: a zone edgeproxy may write DNS-01 TXT records into (RFC 2136 + TSIG)."""

    zone: str
    server: str  # the primary that takes updates, "IP:port"
    tsig_key_name: str
    tsig_algorithm: Literal["hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224"] = (
        "hmac-sha256"
    )
    # The name of the environment variable holding the base64 secret (never the secret).
    tsig_secret_env: str
    # More authoritative servers that must answer the TXT before the CA is told (secondaries).
    check_servers: list[str] = Field(default_factory=list)
    propagation_timeout: float = Field(default=60.0, gt=0)

    @field_validator("zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        v = v.strip().lower()
        v = v if v.endswith(".") else v + "."
        try:
            # A label in front: a zone may be a single label (a private TLD), a name may not.
            validate_hostname("x." + v.rstrip("."))
        except InvalidName as exc:
            raise ValueError(f"{v!r}: {exc}") from None
        return v

    @field_validator("server")
    @classmethod
    def _server(cls, v: str) -> str:
        parse_hostport(v, what="acme.dns server")
        return v

    @field_validator("check_servers")
    @classmethod
    def _checks(cls, v: list[str]) -> list[str]:
        return _check_hostports(v, "acme.dns check_servers")


class ManagedCertificateConfig(_Model):
    """``[[acme.managed]]``: one certificate for the listed names (wildcards too), by DNS-01."""

    names: list[str] = Field(min_length=1, max_length=100)

    @field_validator("names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if "*" in (n.strip() for n in v):
            raise ValueError('"*" is no name: list *.example.net and example.net')
        try:
            out = [normalize_pattern(n) for n in v]
            for n in out:
                validate_hostname(n[2:] if n.startswith("*.") else n)
        except InvalidName as exc:
            raise ValueError(str(exc)) from None
        if len(set(out)) != len(out):
            raise ValueError(f"{v}: list each name once")
        return out


class AcmeLimitsConfig(_Model):
    """``[acme.limits]``: CA budgets kept by edgeproxy, shared by the cluster (certs/budgets.py).
    Let's Encrypt's figures by default; 0 switches a limit off."""

    new_orders_per_account: Annotated[int, Field(ge=0)] = 300  # per 3 hours
    certificates_per_registered_domain: Annotated[int, Field(ge=0)] = 50  # per 7 days
    failed_validations_per_hostname: Annotated[int, Field(ge=0)] = 5  # per hour
    duplicate_certificates: Annotated[int, Field(ge=0)] = 5  # per exact name set, per 7 days


class AcmeConfig(AcmeIssuerConfig):
    """``[acme]``: one CA in the table itself, or an ordered ``[[acme.issuers]]`` list."""

    key_type: KeyType = "ec256"
    # In order of preference: when one fails validation for a name, the next is tried at once.
    challenges: list[ChallengeType] = Field(default_factory=_default_challenges, min_length=1)
    # In order: when one cannot issue for a name, the next is tried at once; renewals start
    # again with the first.
    issuers: list[AcmeIssuerConfig] = Field(default_factory=list)
    # DNS-01: the zones we may update, and the certificates issued through them at start-up.
    dns: list[DnsZoneConfig] = Field(default_factory=list)
    managed: list[ManagedCertificateConfig] = Field(default_factory=list)
    limits: AcmeLimitsConfig = Field(default_factory=AcmeLimitsConfig)
    # Where a delegated _acme-challenge CNAME outside every [[acme.dns]] zone is looked up
    # ("IP:port"); unset: the system's resolver.
    dns_resolver: str | None = None

    @field_validator("dns_resolver")
    @classmethod
    def _resolver(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v, what="acme.dns_resolver")
        return v

    @field_validator("challenges")
    @classmethod
    def _unique(cls, v: list[ChallengeType]) -> list[ChallengeType]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: list each challenge type once")
        return v

    @model_validator(mode="after")
    def _managed_needs_dns(self) -> Self:
        _needs(
            self.managed,
            self.dns,
            "[[acme.managed]] certificates are issued by DNS-01: add an [[acme.dns]] zone",
        )
        return self

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if not self.issuers:
            return self
        per_issuer = set(AcmeIssuerConfig.model_fields) - {"email"}
        both = sorted(per_issuer & self.model_fields_set)
        if both:
            raise ValueError(
                f"acme.{', acme.'.join(both)} set beside [[acme.issuers]]: put them in each "
                "[[acme.issuers]] entry (only email is shared)"
            )
        directories = [i.directory for i in self.issuers]
        if len(set(directories)) != len(directories):
            raise ValueError("[[acme.issuers]] lists a directory twice")
        labels = [i.label for i in self.issuers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"[[acme.issuers]] names {labels} repeat: give each a unique name")
        return self

    def issuer_configs(self) -> list[AcmeIssuerConfig]:
        """The CAs in order of preference (the single [acme] form is a list of one)."""
        if not self.issuers:
            fields = {k: getattr(self, k) for k in AcmeIssuerConfig.model_fields}
            return [AcmeIssuerConfig(**fields)]
        return [
            i if i.email is not None else i.model_copy(update={"email": self.email})
            for i in self.issuers
        ]


class OnDemandConfig(_Model):
    ask: str | None = None
    ask_timeout: Annotated[float, Field(gt=0, le=30)] = 2.0
    allow: list[str] = Field(default_factory=list)
    wait: Annotated[float, Field(gt=0, le=300)] = 20.0
    allow_cache_ttl: Annotated[float, Field(ge=0)] = 300.0
    deny_cache_ttl: Annotated[float, Field(ge=0)] = 30.0
    max_orders_per_minute: Annotated[int, Field(ge=1)] = 30
    backoff_max: Annotated[float, Field(gt=0)] = 86400.0
    # Registered hostnames (the /v1/hostnames registry) are allowed, before allow and ask.
    registry: bool = False

    @field_validator("ask")
    @classmethod
    def _ask(cls, v: str | None) -> str | None:
        if v and (problem := ask_url_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("allow")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return [_pattern(p) for p in v]


def _pattern(p: str) -> str:
    if p != "*" and "*" in p.removeprefix("*."):
        raise ValueError(f'{p!r}: only a leading "*." wildcard or "*" alone is supported')
    try:
        return normalize_pattern(p)
    except InvalidName as exc:
        raise ValueError(f"{p!r}: {exc}") from None


class StorageConfig(_Model):
    backend: Literal["file", "postgres"] = "file"
    path: str = "/var/lib/edgeproxy"
    dsn: str | None = None
    dsn_env: str | None = None
    encryption_key_env: str | None = None
    # Issuance leases: a holder refreshes every lock_ttl/3. A dead holder's lease frees at
    # once (its process's flock or database session ends); lock_ttl frees a hung holder's.
    lock_ttl: Annotated[float, Field(ge=1, le=3600)] = 30.0

    @model_validator(mode="after")
    def _postgres_dsn(self) -> StorageConfig:
        _needs(
            self.backend == "postgres",
            self.dsn or self.dsn_env,
            'backend "postgres" needs storage.dsn or storage.dsn_env',
        )
        return self


class HostnamesConfig(_Model):
    # A removed hostname's certificate is kept this long: re-adding it serves it again at once.
    removal_grace: Annotated[float, Field(ge=0)] = 7 * 86400.0
    # How often each process looks for registry changes (PostgreSQL also notifies at once).
    poll_interval: Annotated[float, Field(gt=0, le=60)] = 1.0


class EventsConfig(_Model):
    # CloudEvents are POSTed here (unset: no events); signed with the secret in secret_env.
    url: str | None = None
    secret_env: str | None = None
    source: str = "edgeproxy"  # the events' "source" attribute (a URI reference)
    timeout: Annotated[float, Field(gt=0, le=120)] = 10.0
    retry_max: Annotated[float, Field(gt=0)] = 3600.0  # cap of the retry backoff
    max_age: Annotated[float, Field(gt=0)] = 86400.0  # undelivered this long: dropped

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f'{v!r} is not an http(s) URL (e.g. "https://hooks.example/ep")')
        return v or None

    @model_validator(mode="after")
    def _signed(self) -> EventsConfig:
        _needs(
            self.url,
            self.secret_env,
            "events.url needs events.secret_env (receivers must be able to verify events)",
        )
        return self


class LogConfig(_Model):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class RouteConfig(_Model):
    sni: list[str] = Field(default_factory=list)
    default: bool = False
    upstreams: list[str] = Field(min_length=1)
    send_proxy: Literal["v1", "v2"] | None = None
    alpn: list[str] = Field(default_factory=list)

    @field_validator("sni")
    @classmethod
    def _sni(cls, v: list[str]) -> list[str]:
        return [_pattern(p) for p in v]

    @field_validator("upstreams")
    @classmethod
    def _ups(cls, v: list[str]) -> list[str]:
        return _check_hostports(v, "an upstream")

    @model_validator(mode="after")
    def _has_match(self) -> RouteConfig:
        if not self.sni and not self.default:
            raise ValueError("a route needs sni patterns or default = true")
        return self


class CertificateFileConfig(_Model):
    cert: str
    key: str

    @field_validator("cert", "key")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"file {v!r} does not exist")
        return v


class OnboardingConfig(_Model):
    target: list[str] = Field(default_factory=list)


class Config(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    acme: AcmeConfig = Field(default_factory=AcmeConfig)
    on_demand: OnDemandConfig = Field(default_factory=OnDemandConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    hostnames: HostnamesConfig = Field(default_factory=HostnamesConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    onboarding: OnboardingConfig = Field(default_factory=OnboardingConfig)
    routes: list[RouteConfig] = Field(min_length=1)
    certificates: list[CertificateFileConfig] = Field(default_factory=list)

    def http_proxy_mode(self) -> str:
        """The port-80 listener's PROXY protocol: its own setting, else [server]'s."""
        return self.http.proxy_protocol or self.server.proxy_protocol

    def http_proxy_senders(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Who may send PROXY headers to the port-80 listener: its own list, else [server]'s."""
        if self.http.proxy_protocol_from is not None:
            return [parse_network(x) for x in self.http.proxy_protocol_from]
        return self.server.proxy_senders()

    @model_validator(mode="after")
    def _one_default(self) -> Config:
        defaults = [i for i, r in enumerate(self.routes) if r.default]
        if len(defaults) > 1:
            raise ValueError(f"routes {defaults} all set default = true; keep exactly one")
        od = self.on_demand
        if self.http.listen and self.http_proxy_mode() != "off" and not self.http_proxy_senders():
            raise ValueError(
                f'http.proxy_protocol = "{self.http_proxy_mode()}" needs '
                "http.proxy_protocol_from (or server.proxy_protocol_from): the load balancer's "
                "networks, the only peers that may send PROXY headers"
            )
        if self.tls.issuer == "acme" and "http-01" in self.acme.challenges and not self.http.listen:
            raise ValueError(
                'acme.challenges has "http-01" but http.listen is empty: the CA validates '
                'HTTP-01 on port 80 (set http.listen = ["0.0.0.0:80"])'
            )
        if self.tls.issuer == "acme" and not (od.ask or od.allow or od.registry):
            raise ValueError(
                'issuer "acme" needs an allow-check: set on_demand.ask, on_demand.allow or '
                "on_demand.registry (edgeproxy never issues for names nobody allowed)"
            )
        return self


def config_warnings(cfg: Config) -> list[str]:
    """Valid but risky settings, worded like errors (``key.path: what (fix)``).

    ``check`` prints them and still exits 0; ``run`` logs them at start. They are not errors
    because a deployment may mean them (a private network, a CA without rate limits).
    """
    warnings = []
    if cfg.tls.issuer == "acme" and "*" in cfg.on_demand.allow:
        also = ""
        if cfg.on_demand.ask:
            also = " (it is checked before on_demand.ask, so ask never runs)"
        warnings.append(
            'on_demand.allow: "*" allows every name: anyone who points a DNS name at this '
            "proxy makes it order a certificate from the ACME CA, spending your account's "
            f'rate limits{also} (list your domains as "*.example.net" patterns, or decide '
            "with on_demand.ask)"
        )
    return warnings


# Hints keyed by pydantic error type: the "(how to fix)" part of each message.
_FIX_HINTS: Mapping[str, str] = {
    "extra_forbidden": "remove it or check its spelling against the README's config reference",
    "missing": "add it",
    "literal_error": "use one of the listed values",
    "int_parsing": "write a whole number",
    "float_parsing": "write a number",
    "bool_parsing": "write true or false",
    "list_type": 'write a list, e.g. ["a", "b"]',
    "string_type": "write a quoted string",
    "too_short": "add at least one entry",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
}


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        path = _loc_to_path(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        hint = _FIX_HINTS.get(err["type"])
        problems.append(f"{path}: {msg}" + (f" ({hint})" if hint else ""))
    return problems


def load_config_data(data: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read ({exc.strerror}; check the --config path)"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [f"{p}: not valid TOML: {exc} (fix the syntax at that position)"]
        ) from None
    return load_config_data(data)
