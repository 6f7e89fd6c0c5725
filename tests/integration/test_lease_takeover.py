"""A name's issuance lease dies with its holder: kill -9 mid-order, and the next process (a
restart on the file backend, the other replica on PostgreSQL) issues the name at once, long
before the dead holder's lease would have expired.

``lock_ttl`` is 60 s and ``on_demand.wait`` 15 s here, so a lease that only expired would make
the first visitor after the kill fail. The time from the kill to the certificate is printed
(``pytest -s``), not asserted.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from cryptography import x509

from edgeproxy.certs.record import cert_key, lock_name
from testkit import postgres as pg
from testkit.pebble import Pebble
from testkit.ports import free_port
from testkit.proxy import edgeproxy_subprocess
from testkit.syncclients import fetch_cert, poke, wait_for
from testkit.tomlw import toml_dumps

postgres_server = pg.postgres_server
postgres_database = pg.postgres_database
postgres_dsn = pg.postgres_dsn

LOCK_TTL = 60
WAIT = 15
# Pebble's validation sleeps (0 to 2 s): the order stays in flight long enough to be killed in.
PEBBLE_ENV = {"PEBBLE_VA_SLEEPTIME": "2"}


def write_config(path: Path, port: int, pebble: Pebble, storage: dict[str, Any]) -> Path:
    cfg = {
        "server": {"listen": [f"127.0.0.1:{port}"], "handshake_timeout": 30},
        "admin": {"listen": ""},
        "tls": {"issuer": "acme", "maintenance_interval": 1.0},
        "acme": {"directory": pebble.directory_url, "trust": str(pebble.ca_bundle_path)},
        "on_demand": {"allow": ["*.example.test"], "wait": WAIT},
        "storage": {**storage, "lock_ttl": LOCK_TTL},
        # The upstream is irrelevant: only handshakes matter.
        "routes": [{"sni": ["*"], "default": True, "upstreams": [f"127.0.0.1:{free_port()}"]}],
    }
    path.write_text(toml_dumps(cfg))
    return path


@contextmanager
def proxy(config: Path, port: int, log: Path) -> Iterator[int]:
    with edgeproxy_subprocess(config, host="127.0.0.1", port=port, log_path=log) as proc:
        yield proc.pid


def kill_a_holder_mid_order(
    config: Path,
    port: int,
    log: Path,
    lease_held_by: Callable[[str], str | None],
    issued: Callable[[str], bool],
) -> tuple[str, float]:
    """Start a proxy, ask it for a name and SIGKILL it while it holds the name's lease.

    (name, monotonic time of the kill). Tries again with a new name when the order finished
    before the kill landed.
    """
    for attempt in range(3):
        name = f"killed{attempt}.example.test"
        with proxy(config, port, log) as pid:
            poke(port, name)
            assert wait_for(lambda n=name: lease_held_by(n) is not None, 20), "no lease taken"
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
        owner = lease_held_by(name)
        if owner is not None and f":{pid}:" in owner and not issued(name):
            return name, killed
    raise AssertionError("three orders in a row finished before the kill")


def assert_issued(port: int, name: str, roots: Path) -> None:
    cert = fetch_cert(port, name, roots, timeout=WAIT + 15)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == [name]


def test_kill_9_mid_order_then_restart_issues_at_once_file(
    tmp_path: Path, make_pebble: Callable[..., Pebble]
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port, env=PEBBLE_ENV)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "edgeproxy.toml", port, pebble, {"backend": "file", "path": str(state)}
    )
    log = tmp_path / "proxy.log"

    def lease_held_by(name: str) -> str | None:
        try:
            text = (state / "locks" / f"{lock_name(name)}.lock").read_text()
        except FileNotFoundError:
            return None
        return text if text else None

    def issued(name: str) -> bool:
        return (state / "data" / cert_key(name)).exists()

    name, killed = kill_a_holder_mid_order(config, port, log, lease_held_by, issued)
    with proxy(config, port, log):
        assert_issued(port, name, roots)
        took = time.monotonic() - killed
    print(f"\n[file] kill -9 to certificate issued by the restarted process: {took:.2f}s")
    assert "whose process is gone" in log.read_text()


def test_kill_9_of_a_replica_mid_order_the_other_issues_at_once_postgres(
    tmp_path: Path, make_pebble: Callable[..., Pebble], postgres_dsn: str
) -> None:
    # Replica A listens where pebble validates; replica B (the victim) on a port of its own.
    # Both share the database, so A answers validations for orders either placed.
    port_a, port_b = free_port(), free_port()
    pebble = make_pebble(tls_port=port_a, env=PEBBLE_ENV)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    storage = {"backend": "postgres", "dsn": postgres_dsn}
    config_a = write_config(tmp_path / "a.toml", port_a, pebble, storage)
    config_b = write_config(tmp_path / "b.toml", port_b, pebble, storage)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"

    with psycopg.connect(postgres_dsn, autocommit=True) as db:

        def lease_held_by(name: str) -> str | None:
            try:
                row = db.execute(
                    "SELECT owner FROM edgeproxy_locks WHERE name = %s", (lock_name(name),)
                ).fetchone()
            except psycopg.errors.UndefinedTable:
                return None  # schema not made yet
            return None if row is None else str(row[0])

        def issued(name: str) -> bool:
            row = db.execute(
                "SELECT 1 FROM edgeproxy_values WHERE key = %s", (cert_key(name),)
            ).fetchone()
            return row is not None

        with proxy(config_a, port_a, log_a):
            name, killed = kill_a_holder_mid_order(config_b, port_b, log_b, lease_held_by, issued)
            assert_issued(port_a, name, roots)
            took = time.monotonic() - killed
        print(f"\n[postgres] kill -9 of replica B to certificate issued by replica A: {took:.2f}s")
        assert "whose database session ended" in log_a.read_text()
