"""``edgeproxy doctor NAME`` for the CLI: parse the arguments, assemble storage from the
config, run ``diagnose``, print, and turn the verdict into the exit code.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..addresses import parse_port
from ..config import Config
from ..names import is_ip, validate_hostname
from ..storage.base import Storage
from .diagnose import diagnose
from .report import Diagnosis


def parse_nameserver(value: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[v6]:PORT`` / ``HOST`` (port 53) with HOST an IP address."""
    value = value.strip()
    host, port_s = value, "53"
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not [IPv6]:PORT")
        port_s = rest[1:] or "53"
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    if not is_ip(host):
        raise ValueError(f"{value!r}: the nameserver must be an IP address (HOST:PORT)")
    return host, parse_port(port_s, value, lowest=1)


def doctor_command(
    cfg: Config,
    name: str,
    *,
    as_json: bool = False,
    port: int = 443,
    http_port: int = 80,
    nameserver: str | None = None,
    connect_to: str | None = None,
    timeout: float = 5.0,
    storage: Storage | None = None,
    echo: Callable[[str], None] = print,
    echo_err: Callable[[str], None] = print,
) -> int:
    """Run the diagnosis for the CLI; returns the exit code (0 only when the verdict is ok).

    ``cfg`` is a loaded ``Config``: targets from ``onboarding.target``, storage from
    ``build_storage(cfg)`` unless ``storage`` is given (closed afterwards either way).
    Usage errors (bad NAME or --nameserver) print to ``echo_err`` and return 2.
    """
    import json

    try:
        ns = parse_nameserver(nameserver) if nameserver else None
        name = validate_hostname(name)
    except ValueError as exc:
        echo_err(f"error: {exc}")
        return 2
    if storage is None:
        from ..app import build_storage

        storage = build_storage(cfg)
    store = storage

    async def run() -> Diagnosis:
        try:
            return await diagnose(
                name,
                targets=list(cfg.onboarding.target),
                storage=store,
                port=port,
                nameserver=ns,
                connect_to=connect_to,
                timeout=timeout,
                proxy_protocol=cfg.server.proxy_protocol,
                http_port=http_port if "http-01" in cfg.acme.challenges else None,
            )
        finally:
            await store.aclose()

    result = trio.run(run)
    echo(json.dumps(result.to_json(), indent=2) if as_json else result.render())
    return 0 if result.ok else 1
