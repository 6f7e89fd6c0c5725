"""The CA says rateLimited once; the whole cluster stops ordering until its Retry-After.

    visitors --> replica 127.0.0.1:P --+                       +--> pebble (tlsPort = P)
             --> replica 127.0.0.2:P --+--> PostgreSQL         |
             --> replica 127.0.0.3:P --+    (shared storage)   |
                 every replica's ACME --> FaultInjector (HTTPS) +

Everything is real: pebble and its DNS, PostgreSQL, three ``edgeproxy run`` processes, and
the ``FaultInjector`` (testkit/pebble.py) that relays to pebble, rewriting its URLs so the
traffic keeps going through it, and that answers newOrder with ``rateLimited`` and
``Retry-After`` on command while counting requests per endpoint. Pebble resolves every name
to 127.0.0.1, so its validations land on the first replica, which answers the challenges the
others published in storage.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit import postgres as pg
from testkit.pebble import (
    FaultInjector,
    Pebble,
    pebble_available,
    rate_limited,
    serve_in_thread,
    start_pebble,
)
from testkit.ports import free_port
from testkit.procs import kill_process
from testkit.proxy import wait_port

postgres_server = pg.postgres_server
postgres_database = pg.postgres_database
postgres_dsn = pg.postgres_dsn

REPLICAS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
# Seconds: long enough to visit every replica at least once on a loaded machine, short enough
# to wait out.
RETRY_AFTER = 12
ISSUER = "127.0.0.1"  # the injector's host: the CA's label in metrics

pytestmark = pytest.mark.skipif(not pebble_available(), reason="pebble not installed")


def config(ip: str, port: int, admin: int, inj: FaultInjector, pebble: Pebble) -> str:
    return f"""
[server]
listen = ["{ip}:{port}"]
handshake_timeout = 30

[admin]
listen = "{ip}:{admin}"

[tls]
issuer = "acme"
maintenance_interval = 1.0

[acme]
directory = "{inj.directory_url}"
trust = "{pebble.ca_bundle_path}"

[on_demand]
allow = ["*.example.test"]
wait = 20

[storage]
backend = "postgres"
dsn_env = "EDGEPROXY_TEST_DSN"
lock_ttl = 3

[[routes]]
sni = ["*"]
default = true
upstreams = ["127.0.0.1:9"]
"""


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[tuple[Pebble, int]]:
    port = free_port()
    # No injected bad nonces: every newOrder counted is one order.
    env = {"PEBBLE_AUTHZREUSE": "0", "PEBBLE_WFE_NONCEREJECT": "0"}
    with start_pebble(tmp_path, tls_port=port, env=env) as p:
        yield p, port


@pytest.fixture
def replicas(
    tmp_path: Path, pebble: tuple[Pebble, int], postgres_dsn: str
) -> Iterator[tuple[FaultInjector, int, int, Path]]:
    """(injector, proxy port, admin port, pebble roots) with three replicas running."""
    peb, port = pebble
    admin = free_port()
    roots = tmp_path / "roots.pem"
    roots.write_bytes(peb.roots_pem())
    procs: list[subprocess.Popen[bytes]] = []
    with serve_in_thread(FaultInjector(peb, advertise_renewal_info=False)) as inj:
        try:
            for ip in REPLICAS:
                path = tmp_path / f"replica-{ip}.toml"
                path.write_text(config(ip, port, admin, inj, peb))
                with open(tmp_path / f"replica-{ip}.log", "ab") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "edgeproxy", "run", "-c", str(path)],
                        stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "EDGEPROXY_TEST_DSN": postgres_dsn},
                    ))  # fmt: skip
            for ip in REPLICAS:
                wait_port(ip, port, timeout=30)
            yield inj, port, admin, roots
        finally:
            for proc in procs:
                kill_process(proc)


def served(ip: str, port: int, name: str, roots: Path) -> bool:
    """A real TLS handshake with one replica: did it serve a certificate for ``name``?"""
    ctx = ssl.create_default_context(cafile=str(roots))
    try:
        with socket.create_connection((ip, port), timeout=30) as s:
            with ctx.wrap_socket(s, server_hostname=name):
                return True
    except (ssl.SSLError, OSError):
        return False


def domain(ip: str, admin: int, name: str) -> dict[str, object]:
    r = httpx.get(f"http://{ip}:{admin}/v1/domains/{name}", timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def account(ip: str, admin: int) -> dict[str, object]:
    r = httpx.get(f"http://{ip}:{admin}/v1/acme/accounts", timeout=10)
    assert r.status_code == 200, r.text
    (only,) = r.json()["accounts"]
    return dict(only)


def paused_gauge(ip: str, admin: int) -> float:
    text = httpx.get(f"http://{ip}:{admin}/metrics", timeout=10).text
    m = re.search(rf'^edgeproxy_acme_account_paused\{{issuer="{ISSUER}"\}} (\S+)$', text, re.M)
    assert m is not None, "edgeproxy_acme_account_paused is missing"
    return float(m.group(1))


def test_rate_limited_pauses_every_replica_until_retry_after(
    tmp_path: Path, postgres_dsn: str, replicas: tuple[FaultInjector, int, int, Path]
) -> None:
    inj, port, admin, roots = replicas
    a, b, c = REPLICAS
    # Before: "cached" is ordered through b (cached there), "stored" through c; every other
    # replica has each only in storage.
    assert served(b, port, "cached.example.test", roots)
    assert served(c, port, "stored.example.test", roots)

    limit = rate_limited(str(RETRY_AFTER))
    inj.rules.append(limit)
    assert not served(a, port, "first.example.test", roots)
    inj.rules.remove(limit)  # from now on only edgeproxy's own pause holds orders back
    assert inj.count("newOrder", since=0) == 3  # cached, stored, and the refused one
    refused = [r for r in inj.seen if r.injected]
    assert len(refused) == 1 and refused[0].endpoint == "newOrder"
    first = domain(a, admin, "first.example.test")
    assert first["state"] == "account_paused", first
    until = float(str(first["next_attempt"]))
    # Counted from when the CA's answer came back (a moment after the injector saw the order).
    assert refused[0].at + RETRY_AFTER - 0.5 <= until <= refused[0].at + RETRY_AFTER + 5
    assert "paused until" in str(first["last_error"]) and first["hint"]

    # The CLI reads the same from storage (started now, read while the pause lasts).
    cli = subprocess.Popen(
        [sys.executable, "-m", "edgeproxy", "certs", "status", "first.example.test",
         "-c", str(tmp_path / f"replica-{c}.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "EDGEPROXY_TEST_DSN": postgres_dsn},
    )  # fmt: skip

    # While paused: new names at every replica wait, names already issued keep being served.
    mark = time.time()
    waiting: dict[str, str] = {}
    rounds = 0
    while time.time() < until - 2.0:
        for ip in REPLICAS:
            # New names for three rounds, then the same ones again (kept few: each is ordered
            # after the pause).
            name = f"wait-{min(rounds, 2)}-{ip.rsplit('.', 1)[1]}.example.test"
            started = time.time()
            ok = served(ip, port, name, roots)
            if started >= until - 0.5:
                break  # the pause may be over: what happens now proves nothing either way
            assert not ok, f"{name} was served at {ip} while the account was paused"
            waiting[name] = ip
            assert served(ip, port, "cached.example.test", roots)
            assert served(ip, port, "stored.example.test", roots)
            st = domain(ip, admin, name)
            assert st["state"] == "account_paused", st
            assert abs(float(str(st["next_attempt"])) - until) < 1.0, st
            assert paused_gauge(ip, admin) == 1.0
            acct = account(ip, admin)
            assert acct["paused"] is True and acct["label"] == ISSUER, acct
            assert abs(float(str(acct["until"])) - until) < 1.0, acct
        rounds += 1
    assert rounds >= 1 and len(waiting) >= len(REPLICAS)
    during = inj.count("newOrder", since=mark)
    assert during == 0
    out = cli.communicate(timeout=60)[0]
    assert re.search(r"^state +account_paused$", out, re.M), out
    assert re.search(r"^hint +the CA rate-limited this ACME account", out, re.M), out
    assert "paused until" in out, out

    # After Retry-After: every waiting name is ordered with no visitor asking again.
    deadline = until + 60
    while inj.count("newOrder", since=until) < len(waiting) and time.time() < deadline:
        time.sleep(0.5)
    resumed = [r for r in inj.seen if r.endpoint == "newOrder" and r.at >= mark]
    assert len(resumed) >= len(waiting), f"{len(resumed)} orders after the pause"
    assert min(r.at for r in resumed) >= until - 0.5  # none before Retry-After
    for name, ip in waiting.items():
        assert served(ip, port, name, roots)
    print(
        f"\nnewOrder at the injector: {len(refused)} answered rateLimited (Retry-After "
        f"{RETRY_AFTER}), {during} newOrder for {len(waiting)} waiting names in {rounds} round(s) of "
        f"visits to {len(REPLICAS)} replicas during the pause, {len(resumed)} after it "
        f"(first {min(r.at for r in resumed) - until:+.1f}s after Retry-After), "
        f"{inj.count('newOrder')} in all"
    )
    for ip in REPLICAS:
        gauge_deadline = time.time() + 30
        while paused_gauge(ip, admin) != 0.0 and time.time() < gauge_deadline:
            time.sleep(0.5)
        assert paused_gauge(ip, admin) == 0.0
