"""Where the PostgreSQL backend connects: the DSN parsed once, with our defaults.

Owns the connection parameters (keepalives, the names our sessions show in
``pg_stat_activity``) and keeping the password out of logs, errors and ``repr``. Must not know
what the connections are for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["Target"]

# Filled in unless the DSN sets them: a dead peer must be noticed, and sessions identifiable.
_CONNECTION_DEFAULTS = {
    "application_name": "edgeproxy",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
_DESCRIBED_PARAMS = ("host", "hostaddr", "port", "dbname", "user")


@dataclass(frozen=True, slots=True)
class Target:
    conninfo: str  # with the password: handed to libpq only
    listener_conninfo: str  # the same, named "<application_name>-listener" in pg_stat_activity
    session_conninfo: str  # the same, named "<application_name>-leases"
    description: str  # without it: for logs, errors and repr
    password: str | None

    @classmethod
    def parse(cls, dsn: str, connect_timeout: float) -> Target:
        try:
            parsed = conninfo_to_dict(dsn)
        except psycopg.Error:
            # The parser's message quotes the DSN, password included; keep it out.
            raise ValueError("invalid PostgreSQL DSN (not shown: it may hold a password)") from None
        params = {key: str(value) for key, value in parsed.items() if value is not None}
        for key, value in _CONNECTION_DEFAULTS.items():
            params.setdefault(key, value)
        # libpq's connect_timeout is whole seconds and treats anything below 2 as 2.
        params.setdefault("connect_timeout", str(max(2, math.ceil(connect_timeout))))
        described = " ".join(f"{k}={params[k]}" for k in _DESCRIBED_PARAMS if k in params)
        listener = {**params, "application_name": params["application_name"] + "-listener"}
        session = {**params, "application_name": params["application_name"] + "-leases"}
        return cls(
            conninfo=make_conninfo("", **params),
            listener_conninfo=make_conninfo("", **listener),
            session_conninfo=make_conninfo("", **session),
            description=described or "(libpq defaults)",
            password=params.get("password"),
        )

    def scrub(self, text: str) -> str:
        """``text`` with the password blanked, should libpq ever quote it."""
        return text.replace(self.password, "***") if self.password else text
