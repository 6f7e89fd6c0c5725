"""SIGKILL ``edgeproxy run`` at random moments of issuance, renewal and storage writes, many
times over; after every restart storage must be consistent, and in the end every name that
was ever attempted gets its certificate.

Two phases against pebble, each with its own storage:

* issuance: each round starts the proxy, checks storage, pokes a new name (a bare TLS
  handshake starts an on-demand ACME order) and kills the process at a moment chosen at
  random among: a random delay, the issuance lease appearing, the challenge being published,
  any temp file appearing under ``data/`` (a storage write in flight) and the certificate
  record appearing (right after the atomic rename).
* renewal: pebble issues 20-second certificates and ``maintenance_interval = 0.5``, so the
  backstop renews each one 10 s after issuance; each round kills the process while a renewal
  holds its lease (at a random delay into it) or while a storage write is in flight.

After each restart (``check_storage_now``): every record under ``data/certs`` parses and its
key matches its leaf (``CertRecord.from_json``), none was quarantined (a torn file would have
been), and no lease of a killed process expires later than ``kill time + lock_ttl`` (the
owner id carries the pid). At the end: a fresh process serves every attempted name, then
``edgeproxy storage check`` is clean.

``EDGEPROXY_CRASH_ROUNDS`` (default 50, the CI figure) sets the number of kills; 40% of them
land in the renewal phase. Local runs can use hundreds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from edgeproxy.certs.record import CertRecord
from edgeproxy.storage.file import FileStorage
from testkit.hardening import REPO_ROOT, toml_dumps, wait_accepting
from testkit.pebble import NO_LIMITS, Pebble
from testkit.ports import free_port
from testkit.procs import kill_process

ROUNDS = int(os.environ.get("EDGEPROXY_CRASH_ROUNDS", "50"))
RENEWAL_SHARE = 0.4
LOCK_TTL = 2.0
RENEWAL_VALIDITY = 20  # seconds; short lifetimes renew at half: 10 s after issuance
SEED = int(os.environ.get("EDGEPROXY_CRASH_SEED", str(random.randrange(1 << 30))))


def config(state: Path, port: int, pebble: Pebble) -> dict[str, Any]:
    return {
        "server": {"listen": [f"127.0.0.1:{port}"], "handshake_timeout": 30},
        "admin": {"listen": ""},
        "tls": {"issuer": "acme", "maintenance_interval": 0.5},
        # Hundreds of orders in a few minutes are the point here, not abuse.
        "acme": {
            "directory": pebble.directory_url,
            "trust": str(pebble.ca_bundle_path),
            "limits": NO_LIMITS,
        },
        "on_demand": {"allow": ["*.example.test"], "wait": 25, "max_orders_per_minute": 100000},
        "storage": {"backend": "file", "path": str(state), "lock_ttl": LOCK_TTL},
        "log": {"level": "info"},
        "routes": [{"sni": ["*"], "default": True, "upstreams": [f"127.0.0.1:{free_port()}"]}],
    }


@dataclass
class Kill:
    pid: int
    at: float  # unix time of the SIGKILL
    moment: str
    hit: bool  # the moment's marker was seen (else the bound ran out and we killed anyway)


@dataclass
class Harness:
    tmp_path: Path
    state: Path
    port: int
    pebble: Pebble
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    attempted: list[str] = field(default_factory=list)
    checks: int = 0

    @property
    def config_path(self) -> Path:
        return self.state.parent / f"{self.state.name}.toml"

    def write_config(self) -> None:
        self.config_path.write_text(toml_dumps(config(self.state, self.port, self.pebble)))

    async def start(self) -> subprocess.Popen[bytes]:
        log_path = self.state.parent / f"{self.state.name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeproxy", "run", "-c", str(self.config_path)],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            await wait_accepting(self.port, proc, log_path)
        except BaseException:
            kill_process(proc)
            raise
        return proc

    async def check_storage_now(self) -> None:
        """The invariants that must hold right after any restart."""
        self.checks += 1
        certs = self.state / "data" / "certs"
        for path in sorted(certs.iterdir()) if certs.exists() else []:
            if path.name.startswith(".tmp-"):
                continue  # a killed writer's temp file: invisible to readers, swept later
            # Raises RecordError if torn, unparseable, or the key is not the leaf's.
            record = CertRecord.from_json(path.read_bytes())
            assert record.name == path.name.removesuffix(".json")
        quarantine = self.state / "quarantine"
        if quarantine.exists():
            assert not any(quarantine.iterdir()), sorted(quarantine.iterdir())
        storage = FileStorage(self.state)
        try:
            locks = await storage.list_locks()
        finally:
            await storage.aclose()
        dead = {k.pid: k for k in self.kills}
        for lock in locks:
            kill = dead.get(_owner_pid(lock.owner) or -1)
            if kill is not None:
                # A killed holder refreshed at most at the moment of its death.
                assert lock.expires_at <= kill.at + LOCK_TTL + 0.25, (kill, lock)


def _owner_pid(owner: str) -> int | None:
    # make_owner_id(): "host:pid:random", a per-attempt suffix may follow.
    parts = owner.split(":")
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def poke(port: int, name: str) -> None:
    """Start a handshake for ``name`` in the background and forget it."""

    def go() -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                with ctx.wrap_socket(sock, server_hostname=name):
                    pass
        except OSError:
            pass

    threading.Thread(target=go, daemon=True).start()


def _temp_file_under(root: Path) -> bool:
    return any(f.startswith(".tmp-") for _dir, _subdirs, files in os.walk(root) for f in files)


def _lease_taken_after(state: Path, names: list[str], since: float) -> bool:
    for name in names:
        path = state / "locks" / f"issue-{name}.lock"
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        try:
            created = float(json.loads(raw)["created_at"])
        except (ValueError, KeyError, TypeError):
            continue
        if created >= since:
            return True
    return False


def kill_when(
    proc: subprocess.Popen[bytes], marker: Callable[[], bool], limit: float, extra_delay: float
) -> tuple[bool, float]:
    """Poll ``marker`` (sub-millisecond) in this thread, then SIGKILL after ``extra_delay``."""
    deadline = time.monotonic() + limit
    hit = False
    while time.monotonic() < deadline:
        if marker():
            hit = True
            break
        time.sleep(0.0005)
    if extra_delay:
        time.sleep(extra_delay)
    at = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return hit, at


def issuance_moments(
    state: Path, name: str, rng: random.Random
) -> Iterator[tuple[str, Callable[[], bool], float]]:
    """(label, marker, delay after the marker) for one issuance round, in rotation."""
    data = state / "data"
    start = time.monotonic()
    delay = rng.uniform(0, 1.2)
    yield "random-delay", (lambda: time.monotonic() - start >= delay), 0.0
    yield "lease", (lambda: (state / "locks" / f"issue-{name}.lock").exists()), rng.uniform(0, 0.05)
    yield "challenge", (lambda: (state / "challenges" / f"{name}.json").exists()), 0.0
    yield "storage-write", (lambda: _temp_file_under(data)), 0.0
    yield "record-stored", (lambda: (data / "certs" / f"{name}.json").exists()), 0.0


async def fetch_leaf(port: int, name: str, roots: Path, limit: float = 60) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(roots))
    with trio.fail_after(limit):
        while True:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = trio.SSLStream(tcp, ctx, server_hostname=name)
            try:
                await tls.do_handshake()
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return x509.load_der_x509_certificate(der)
            except (trio.BrokenResourceError, ssl.SSLError):
                # A handshake refused while the name is in backoff or its lease is still
                # held by a killed process: try again until the bound.
                await trio.sleep(0.5)
            finally:
                await trio.aclose_forcefully(tls)


async def finish_and_verify(h: Harness, roots: Path) -> None:
    """A clean process serves every attempted name; then storage check is clean."""
    proc = await h.start()
    try:
        await h.check_storage_now()
        limiter = trio.CapacityLimiter(8)

        async def one(name: str) -> None:
            async with limiter:
                leaf = await fetch_leaf(h.port, name, roots)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert san.value.get_values_for_type(x509.DNSName) == [name]

        async with trio.open_nursery() as nursery:
            for name in dict.fromkeys(h.attempted):
                nursery.start_soon(one, name)
        # Let the leases of killed processes run out and the startup sweep of one more
        # process remove them, as an operator's restart would.
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait) == 0
        await trio.sleep(LOCK_TTL + 0.5)
        proc = await h.start()
        await trio.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait) == 0
    finally:
        kill_process(proc)
    result = await trio.run_process(
        [sys.executable, "-m", "edgeproxy", "storage", "check", "-c", str(h.config_path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO_ROOT,
    )
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0 and "storage OK" in out, out
    await h.check_storage_now()


async def issuance_phase(h: Harness, rounds: int) -> None:
    for i in range(rounds):
        proc = await h.start()
        try:
            await h.check_storage_now()
            name = f"crash{i}.example.test"
            h.attempted.append(name)
            moments = list(issuance_moments(h.state, name, h.rng))
            label, marker, delay = moments[i % len(moments)]
            poke(h.port, name)
            hit, at = await trio.to_thread.run_sync(kill_when, proc, marker, 15.0, delay)
            h.kills.append(Kill(proc.pid, at, f"issuance:{label}", hit))
        finally:
            kill_process(proc)


def renewal_marker(h: Harness, names: list[str], i: int) -> tuple[Callable[[], bool], str, float]:
    """Every third round a certificate write in flight, else a renewal's fresh lease."""
    if i % 3 == 2:
        certs = h.state / "data" / "certs"
        return (lambda: _temp_file_under(certs)), "storage-write", 0.0
    since = time.time()
    return (
        (lambda: _lease_taken_after(h.state, names, since)),
        "renewal-lease",
        h.rng.uniform(0, 0.4),
    )


async def renewal_phase(h: Harness, rounds: int, roots: Path) -> None:
    names = [f"renew{i}.example.test" for i in range(3)]
    h.attempted.extend(names)
    proc = await h.start()
    try:
        for name in names:  # first issuance, undisturbed
            await fetch_leaf(h.port, name, roots)
    finally:
        kill_process(proc)
    for i in range(rounds):
        proc = await h.start()
        try:
            await h.check_storage_now()
            marker, label, delay = renewal_marker(h, names, i)
            # A renewal is due within ~10 s of the last one finishing.
            hit, at = await trio.to_thread.run_sync(kill_when, proc, marker, 14.0, delay)
            h.kills.append(Kill(proc.pid, at, f"renewal:{label}", hit))
        finally:
            kill_process(proc)


async def test_sigkill_at_random_moments_keeps_storage_consistent(
    tmp_path: Path, make_pebble: Callable[..., Pebble]
) -> None:
    print(f"\ncrash harness: {ROUNDS} kills, seed {SEED} (EDGEPROXY_CRASH_SEED to replay)")
    rng = random.Random(SEED)
    renewal_rounds = round(ROUNDS * RENEWAL_SHARE)
    issuance_rounds = ROUNDS - renewal_rounds
    port = free_port()

    pebble = make_pebble(tls_port=port)
    roots = tmp_path / "roots-issuance.pem"
    roots.write_bytes(pebble.roots_pem())
    h = Harness(tmp_path, tmp_path / "issuance", port, pebble, rng)
    h.write_config()
    await issuance_phase(h, issuance_rounds)
    await finish_and_verify(h, roots)
    report(h)
    pebble.stop()

    short = make_pebble(tls_port=port, validity=RENEWAL_VALIDITY)
    roots_b = tmp_path / "roots-renewal.pem"
    roots_b.write_bytes(short.roots_pem())
    r = Harness(tmp_path, tmp_path / "renewal", port, short, rng)
    r.write_config()
    await renewal_phase(r, renewal_rounds, roots_b)
    await finish_and_verify(r, roots_b)
    report(r)

    kills = h.kills + r.kills
    assert len(kills) == ROUNDS
    # Most kills must land where aimed, or the harness would test nothing.
    assert sum(k.hit for k in kills) >= 0.8 * len(kills), [k for k in kills if not k.hit]
    renewals = [k for k in r.kills if k.moment == "renewal:renewal-lease" and k.hit]
    assert len(renewals) >= renewal_rounds // 3


def report(h: Harness) -> None:
    by_moment: dict[str, list[int]] = {}
    for k in h.kills:
        hits = by_moment.setdefault(k.moment, [0, 0])
        hits[0] += 1
        hits[1] += int(k.hit)
    line = ", ".join(f"{m} {n} ({hit} on target)" for m, (n, hit) in sorted(by_moment.items()))
    print(f"  {h.state.name}: {len(h.kills)} kills: {line}; {h.checks} storage checks")
