"""Latency of a normal client while edgeproxy is under attack (a benchmark, not a test).

    python -m bench.attacks                      # every attack, ~3 minutes
    python -m bench.attacks --only slowloris --only garbage --json out.json

For each attack a fresh ``edgeproxy run`` (internal issuer, ``*.example.test`` allowed) is
started, a bystander in its own process does one full request after another (TCP connect,
verified TLS handshake, a line echoed by the upstream) and the attack from
``testkit/hardening.py`` runs in this process; the upstream is an echo server in a third
process, so neither the attackers nor the upstream share an event loop with the bystander's
measurements. The table gives the bystander's median, p99 and max latency, its errors, and
what the proxy did to the attackers. ``baseline`` is the same bystander with no attack.

The attacks are those of ``tests/hardening/test_attacks.py``: idle connections (closed by
the handshake timeout, and beyond ``max_handshakes``), slowloris, random bytes, hostile SNI,
hellos for random names (refused by the allow patterns alone, and checked against an
``ask`` endpoint), ``acme-tls/1`` hellos with no
challenge, a per-IP limit flood, and an fd burst at a low ``RLIMIT_NOFILE`` (EMFILE).
Numbers depend on the machine: compare runs on the same one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from testkit.clienthellos import CAPTURED
from testkit.hardening import (
    REPO_ROOT,
    AskServer,
    Latencies,
    NormalClient,
    Outcome,
    edgeproxy_process,
    garbage,
    hello_record,
    make_internal_ca,
    open_idle,
    proxy_config,
    raise_nofile_limit,
    random_names,
    send_and_watch,
    slowloris,
    watch_until_closed,
)
from testkit.ports import free_port
from testkit.procs import kill_process

NORMAL = "normal.example.test"


@dataclass
class Row:
    attack: str
    requests: int
    errors: int
    median_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    attackers: str

    @classmethod
    def of(cls, attack: str, latencies: Latencies, outcome: Outcome | str | None) -> Row:
        ms = sorted(s * 1000 for s in latencies.seconds)
        mid = ms[len(ms) // 2] if ms else None
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else None
        return cls(
            attack,
            len(ms),
            len(latencies.errors),
            mid,
            p99,
            ms[-1] if ms else None,
            str(outcome) if outcome is not None else "-",
        )


@dataclass
class Bench:
    workdir: Path
    upstream: str
    rows: list[Row]


Attack = Callable[[Bench, int], Awaitable[Outcome | str | None]]


async def baseline(b: Bench, port: int) -> None:
    await trio.sleep(5)


async def idle(b: Bench, port: int) -> Outcome:
    socks, outcome = await open_idle(port, 2000)
    return await watch_until_closed(socks, outcome, limit=60)


async def slowloris_500(b: Bench, port: int) -> Outcome:
    hello = (CAPTURED / "curl-http1.1.bin").read_bytes()
    outcome, _ = await slowloris(port, 500, hello, interval=0.5, limit=60)
    return outcome


async def garbage_2000(b: Bench, port: int) -> Outcome:
    return await send_and_watch(port, garbage(2000, 4096), parallel=100, limit=60)


async def acme_tls_2000(b: Bench, port: int) -> Outcome:
    names = random_names(2000, "example.test")
    return await send_and_watch(
        port, (hello_record(n, ["acme-tls/1"]) for n in names), parallel=64, limit=90
    )


async def random_names_ask(b: Bench, port: int) -> Outcome:
    unique = random_names(1000, "attack.test")
    repeated = random_names(50, "attack.test") * 20
    names = [n for pair in zip(unique, repeated, strict=True) for n in pair]
    return await send_and_watch(port, (hello_record(n) for n in names), parallel=64, limit=120)


async def per_ip_flood(b: Bench, port: int) -> Outcome:
    # The attacker (127.0.0.1) is over its budget at once; the bystander is 127.0.0.2.
    total = Outcome()
    for _ in range(10):
        socks, outcome = await open_idle(port, 200)
        await watch_until_closed(socks, outcome, limit=10)
        total.opened += outcome.opened
        total.reset += outcome.reset
        total.closed += outcome.closed
    return total


async def emfile_burst(b: Bench, port: int) -> Outcome:
    socks, outcome = await open_idle(port, 400)
    return await watch_until_closed(socks, outcome, limit=90)


@dataclass
class Scenario:
    name: str
    attack: Attack
    server: dict[str, Any]
    nofile: int | None = None
    ask: bool = False
    bystander_source: str = "127.0.0.1"


SCENARIOS = [
    Scenario("baseline", baseline, {}),
    Scenario("idle-2000", idle, {"handshake_timeout": 3, "max_handshakes": 3000}),
    Scenario("idle-2000-maxhs-500", idle, {"handshake_timeout": 3, "max_handshakes": 500}),
    Scenario("slowloris-500", slowloris_500, {"handshake_timeout": 4}),
    Scenario("garbage-2000x4KB", garbage_2000, {}),
    Scenario("acme-tls-2000", acme_tls_2000, {}),
    Scenario("random-names-2000", random_names_ask, {}),
    Scenario("random-names-2000-ask", random_names_ask, {}, ask=True),
    Scenario(
        "per-ip-flood",
        per_ip_flood,
        {"max_connections_per_ip": 20},
        bystander_source="127.0.0.2",
    ),
    Scenario(
        "emfile-400-at-160-fds",
        emfile_burst,
        {"handshake_timeout": 3, "max_handshakes": 5000},
        nofile=160,
    ),
]


async def run_scenario(b: Bench, sc: Scenario) -> Row:
    workdir = b.workdir / sc.name
    workdir.mkdir()
    state = workdir / "state"
    ca = await make_internal_ca(state)
    port = free_port()
    async with trio.open_nursery() as nursery:
        extra: dict[str, Any] = {}
        if sc.ask:
            ask = AskServer()
            await nursery.start(ask.serve)
            extra["on_demand"] = {"allow": ["*.example.test"], "ask": ask.url}
        cfg = proxy_config(state, port, b.upstream, server=sc.server, **extra)
        async with edgeproxy_process(workdir, cfg, nofile=sc.nofile):
            # Warm: the bystander's certificate exists before the clock starts.
            async with NormalClient(port, NORMAL, ca, source=sc.bystander_source, min_ok=1):
                pass
            async with NormalClient(
                port, NORMAL, ca, interval=0.02, source=sc.bystander_source
            ) as normal:
                outcome = await sc.attack(b, port)
        nursery.cancel_scope.cancel()
    row = Row.of(sc.name, normal.result, outcome)
    if sc.ask:
        row.attackers += f"; ask endpoint hits {len(ask.hits)}"
    return row


def print_table(rows: list[Row]) -> None:
    def ms(v: float | None) -> str:
        return f"{v:.1f}" if v is not None else "-"

    print(
        f"{'attack':24} {'requests':>8} {'errors':>6} {'median ms':>9} {'p99 ms':>8} {'max ms':>8}"
    )
    for r in rows:
        print(
            f"{r.attack:24} {r.requests:>8} {r.errors:>6} {ms(r.median_ms):>9} "
            f"{ms(r.p99_ms):>8} {ms(r.max_ms):>8}"
        )
    print()
    for r in rows:
        print(f"{r.attack}: {r.attackers}")


async def main_async(names: list[str] | None, json_path: Path | None) -> None:
    raise_nofile_limit()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "testkit.hardening", "echo-upstream"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert upstream.stdout is not None
        port = int(await trio.to_thread.run_sync(upstream.stdout.readline))
        with tempfile.TemporaryDirectory(prefix="edgeproxy-attacks-") as tmp:
            b = Bench(Path(tmp), f"127.0.0.1:{port}", [])
            for sc in SCENARIOS:
                if names and sc.name not in names:
                    continue
                print(f"running {sc.name} ...", flush=True)
                b.rows.append(await run_scenario(b, sc))
        print()
        print(f"edgeproxy under attack (bystander latency; {os.cpu_count()} CPUs)")
        print_table(b.rows)
        if json_path is not None:
            json_path.write_text(json.dumps([asdict(r) for r in b.rows], indent=2))
    finally:
        kill_process(upstream)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attacks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--only", action="append", choices=[s.name for s in SCENARIOS], help="repeatable"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    trio.run(main_async, args.only, args.json)


if __name__ == "__main__":
    main()
