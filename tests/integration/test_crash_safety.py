"""kill -9 the proxy while an issuance is in flight, at different moments; after each restart
storage is consistent (`edgeproxy storage check` clean, every key matches its certificate, no
lease outlives its expiry) and the issuance completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio
from cryptography import x509

from edgeproxy.certs.record import CertRecord
from edgeproxy.storage.file import FileStorage
from testkit.pebble import Pebble
from testkit.ports import free_port
from testkit.proxy import edgeproxy_subprocess
from testkit.syncclients import fetch_cert, poke, wait_for


def write_config(path: Path, port: int, pebble: Pebble, state: Path, upstream_port: int) -> None:
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
handshake_timeout = 30

[admin]
listen = ""

[tls]
issuer = "acme"
maintenance_interval = 1.0

[acme]
directory = "{pebble.directory_url}"
trust = "{pebble.ca_bundle_path}"

[on_demand]
allow = ["*.example.test"]
wait = 25

[storage]
backend = "file"
path = "{state}"
lock_ttl = 2

[[routes]]
sni = ["*"]
default = true
upstreams = ["127.0.0.1:{upstream_port}"]
""")








def storage_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeproxy", "storage", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_kill_9_during_issuance_then_recover(
    tmp_path: Path, make_pebble: Callable[..., Pebble]
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    state = tmp_path / "state"
    config = tmp_path / "edgeproxy.toml"
    # The upstream is irrelevant here: only handshakes matter.
    write_config(config, port, pebble, state, free_port())
    log = tmp_path / "proxy.log"

    # Kill at distinct moments of an issuance, observed through storage rather than guessed
    # from timings: the lease just taken, the challenge published (validation in flight), the
    # ACME account being created, and two plain delays.
    def lease_file(name: str) -> Callable[[], bool]:
        return lambda: (state / "locks" / f"issue-{name}.lock").exists()

    def challenge_file(name: str) -> Callable[[], bool]:
        return lambda: (state / "challenges" / f"{name}.json").exists()

    def account_file() -> bool:
        return (state / "data" / "acme" / "accounts").exists()

    def after(seconds: float) -> Callable[[], bool]:
        t = time.monotonic() + seconds
        return lambda: time.monotonic() >= t

    moments: list[tuple[str, Callable[[str], Callable[[], bool]]]] = [
        ("account", lambda n: account_file),
        ("lease", lease_file),
        ("challenge", challenge_file),
        ("delay-50ms", lambda n: after(0.05)),
        ("delay-150ms", lambda n: after(0.15)),
        ("challenge-again", challenge_file),
    ]
    hit = []
    for i, (moment, marker) in enumerate(moments):
        name = f"crash{i}.example.test"
        with edgeproxy_subprocess(config, host="127.0.0.1", port=port, log_path=log) as proc:
            poke(port, name)
            hit.append((moment, wait_for(marker(name))))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with edgeproxy_subprocess(config, host="127.0.0.1", port=port, log_path=log) as proc:
            # The same name completes after restart (taking over a dead holder's lease).
            cert = fetch_cert(port, name, roots)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert san.value.get_values_for_type(x509.DNSName) == [name]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    assert all(ok for _, ok in hit), hit
    # Let every lease the killed processes held run out (lock_ttl = 2 s); a restart sweeps.
    time.sleep(2.5)
    with edgeproxy_subprocess(config, host="127.0.0.1", port=port, log_path=log) as proc:
        time.sleep(2.0)  # one maintenance pass sweeps expired leases
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    res = storage_check(config)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "storage OK" in res.stdout

    fs = FileStorage(state)
    certs_dir = state / "data" / "certs"
    records = sorted(certs_dir.iterdir())
    assert len(records) == 6
    for path in records:
        rec = CertRecord.from_json(path.read_bytes())  # raises if the key does not match
        assert rec.name == path.name.removesuffix(".json")
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    now = time.time()
    locks = trio.run(fs.list_locks)
    assert all(lock.expires_at > now for lock in locks), locks
