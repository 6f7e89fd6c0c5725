"""Secrets the config names by environment variable, read from the environment by the assembler.

Owns every read of a secret from ``os.environ`` and the refusals that depend on what was read
(an admin API off loopback whose token variable is empty, at-rest encryption asked for with an
empty key, unsigned events). ``app.py`` and ``cli.py`` call these once, while assembling, and
hand the values to the parts; no other module reads a secret from the environment, so a part
can be given its secret in a test without touching the process environment.
Must not know what a secret guards beyond those checks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .addresses import HostPort, is_loopback_host, parse_hostport
from .config import AcmeIssuerConfig, AdminConfig, DnsZoneConfig, EventsConfig, StorageConfig
from .errors import ConfigError

__all__ = [
    "AdminSecrets",
    "admin_secrets",
    "eab_hmac_key",
    "events_secret",
    "storage_dsn",
    "storage_encryption_key",
    "tsig_secret",
]

log = logging.getLogger("edgeproxy.admin")  # the warning below is about the admin API


def _env(name: str | None) -> str | None:
    """The variable's value; None when no variable is named, or it is unset or empty."""
    return (os.environ.get(name) or None) if name else None


def storage_encryption_key(cfg: StorageConfig) -> str | None:
    """The at-rest key named by ``storage.encryption_key_env`` (either backend), or None."""
    if not cfg.encryption_key_env:
        return None
    enc = _env(cfg.encryption_key_env)
    if not enc:
        # Silently storing keys in clear when encryption was asked for is the worst
        # outcome: refuse to start instead.
        raise ConfigError(
            [
                f"storage.encryption_key_env: environment variable "
                f"{cfg.encryption_key_env} is empty (set it to a key from "
                "`python -c 'from edgeproxy.storage.sealing import "
                "generate_encryption_key as g; print(g())'`)"
            ]
        )
    return enc


def storage_dsn(cfg: StorageConfig) -> str:
    """The PostgreSQL DSN: ``storage.dsn_env``'s value, else ``storage.dsn``."""
    dsn = _env(cfg.dsn_env) or cfg.dsn
    if not dsn:
        raise ConfigError([f"storage.dsn_env: environment variable {cfg.dsn_env} is empty"])
    return dsn


def events_secret(cfg: EventsConfig) -> bytes | None:
    """The HMAC key signing events (``events.secret_env``); refused unset when events go out."""
    value = _env(cfg.secret_env)
    secret = value.encode() if value else None
    if cfg.url and secret is None:
        # Unsigned events would let anyone who can reach the receiver forge them: refuse.
        raise ConfigError(
            [f"events.secret_env: environment variable {cfg.secret_env} is empty (set it)"]
        )
    return secret


def eab_hmac_key(cfg: AcmeIssuerConfig) -> str | None:
    """One CA's external account binding key: its variable's value, else the config's."""
    return _env(cfg.eab_hmac_key_env) or cfg.eab_hmac_key


def tsig_secret(cfg: DnsZoneConfig) -> str:
    """A DNS-01 zone's TSIG secret (base64), which is never in the config file."""
    secret = _env(cfg.tsig_secret_env)
    if not secret:
        raise ConfigError(
            [
                f"acme.dns zone {cfg.zone}: environment variable {cfg.tsig_secret_env} "
                "(the TSIG secret, base64) is not set"
            ]
        )
    return secret


@dataclass(frozen=True, slots=True)
class AdminSecrets:
    """Where the admin API listens and the tokens guarding it, as plain values."""

    where: HostPort
    token: str | None  # None: every endpoint is open (loopback only)
    metrics_token: str | None  # read-only: /metrics and /readyz


def admin_secrets(admin: AdminConfig) -> AdminSecrets:
    """The admin listener's address and tokens, refused when they would open too much."""
    if not admin.listen:
        raise ValueError("admin_secrets called with admin.listen unset")
    where = parse_hostport(admin.listen, what="the admin address")
    token = _env(admin.token_env) or admin.token
    if token is None and not is_loopback_host(where.host):
        # Config validation accepts token_env; an unset variable must not open the API to all.
        raise ConfigError(
            [
                f"admin.token_env: environment variable {admin.token_env} is empty and admin "
                f"listens on {admin.listen} (set the variable, or listen on 127.0.0.1)"
            ]
        )
    return AdminSecrets(where, token, _metrics_token(admin, token))


def _metrics_token(admin: AdminConfig, token: str | None) -> str | None:
    """The read-only token, refused when it would grant more than metrics (or nothing)."""
    metrics_token = _env(admin.metrics_token_env) or admin.metrics_token
    if metrics_token is None:
        return None
    if token is None:
        # Only reachable with an unset token_env on loopback: every endpoint is open anyway.
        log.warning("admin.metrics_token is ignored: no admin token is set, nothing is guarded")
        return None
    if metrics_token == token:
        raise ConfigError(
            [
                "admin.metrics_token_env: the metrics token equals the admin token "
                "(give Prometheus a different secret)"
            ]
        )
    return metrics_token
