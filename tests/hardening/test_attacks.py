"""Attacks on a real edgeproxy process, each while a normal client keeps being served.

Every scenario runs ``edgeproxy run`` as a subprocess (internal issuer, ``*.example.test``
allowed, an echo upstream) and a bystander in its own process doing one verified request
after another. The attack is bounded in count and time; the test asserts what the proxy did
to the attackers (closed, refused, answered with an alert, counted in which metric), that the
bystander was served and that the process survived. The bystander's latency is printed
(``pytest -s`` shows it; ``python -m bench.attacks`` measures it properly): never asserted.

Scenarios: idle connections (closed by the handshake timeout; beyond ``max_handshakes`` see
``test_overload.py``), slowloris, random bytes, hellos for hostile and random names (with the
ACME issuer behind a recording ``FaultInjector`` and a counting ``ask`` endpoint),
``acme-tls/1`` hellos with no challenge, ``max_connections``, ``max_connections_per_ip``
with and without PROXY v2, and fd exhaustion (EMFILE) in the accept loop.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trustme

from edgeproxy.names import InvalidName, name_matches, validate_hostname
from edgeproxy.wire.proxy_protocol import build_v2
from testkit.clienthellos import CAPTURED
from testkit.hardening import (
    REPO_ROOT,
    AskServer,
    NormalClient,
    Outcome,
    client_context,
    edgeproxy_process,
    establish,
    garbage,
    hello_record,
    make_internal_ca,
    open_idle,
    proxy_config,
    random_names,
    send_and_watch,
    serve_echo,
    slowloris,
    still_echoes,
    tls_connect,
    unexpected_log_lines,
    wait_until,
    watch_until_closed,
)
from testkit.pebble import FaultInjector, Pebble
from testkit.ports import free_port

NORMAL = "normal.example.test"
CLOSED = "edgeproxy_connections_closed_total"
REFUSED = "edgeproxy_connections_refused_total"
HELLOS = "edgeproxy_client_hellos_total"
NO_CHALLENGE = "edgeproxy_acme_validation_without_pending_challenge_total"
ALERT = b"\x15\x03"  # a TLS alert record: how the proxy says "not here" to a ClientHello

# Names an attacker may put in SNI: printable, so the hello parser passes them on, but not
# hostnames. None may take the process down or make it log a traceback.
HOSTILE_NAMES = [
    "a+b.example.test",
    "x/../../y.example.test",
    "..",
    "a..example.test",
    "under_score.example.test",
    "%2f.example.test",
    "1.2.3.4",
    "[::1]",
    "-lead.example.test",
    "x" * 64 + ".example.test",
    ("a." * 130) + "example.test",
    "LOUD.Example.TEST.",
    "*.example.test",
    "xn--zz.example.test",
]


def report(what: str, normal: NormalClient, outcome: Outcome | None = None) -> None:
    extra = f"; attackers: {outcome}" if outcome is not None else ""
    print(f"\n[{what}] normal client: {normal.result.summary()}{extra}")


def assert_served(normal: NormalClient) -> None:
    assert normal.result.seconds, normal.result.errors[:5]
    assert not normal.result.errors, normal.result.errors[:5]


async def start_proxy_config(
    tmp_path: Path, echo_upstream: str, **server: Any
) -> tuple[Path, Path, int, dict[str, Any]]:
    """(state, CA PEM, listen port, config) for the usual target: the internal CA exists
    before the proxy starts, so the bystander can verify from its first connection, and an
    admin port serves the metrics the tests diff. ``server`` overrides ``[server]``."""
    state = tmp_path / "state"
    ca = await make_internal_ca(state)
    port = free_port()
    cfg = proxy_config(state, port, echo_upstream, admin_port=free_port(), server=server)
    return state, ca, port, cfg


# --- silence --------------------------------------------------------------------------------


async def test_idle_connections_are_closed_by_the_handshake_timeout(
    tmp_path: Path, echo_upstream: str
) -> None:
    # Under 80% of the handshake slots in use: the full timeout applies (above, it shrinks
    # and silent connections are shed: test_overload.py).
    state, ca, port, cfg = await start_proxy_config(
        tmp_path, echo_upstream, handshake_timeout=3, max_handshakes=5000
    )
    async with edgeproxy_process(tmp_path, cfg) as ep:
        timeouts = await ep.metric(CLOSED, reason="handshake_timeout")
        async with NormalClient(port, NORMAL, ca) as normal:
            socks, outcome = await open_idle(port, 2000)
            await watch_until_closed(socks, outcome, limit=60)
        report("2000 idle connections", normal, outcome)
        assert outcome.ended_by_proxy == 2000, outcome
        assert await ep.metric(CLOSED, reason="handshake_timeout") - timeouts >= 2000
        assert_served(normal)
        assert ep.alive()


async def test_slowloris_hellos_are_cut_off_at_the_handshake_timeout(
    tmp_path: Path, echo_upstream: str
) -> None:
    state, ca, port, cfg = await start_proxy_config(tmp_path, echo_upstream, handshake_timeout=4)
    hello = (CAPTURED / "curl-http1.1.bin").read_bytes()
    async with edgeproxy_process(tmp_path, cfg) as ep:
        timeouts = await ep.metric(CLOSED, reason="handshake_timeout")
        async with NormalClient(port, NORMAL, ca) as normal:
            outcome, sent_max = await slowloris(port, 500, hello, interval=0.5, limit=60)
        report("500 slowloris clients", normal, outcome)
        print(f"  most bytes a slowloris client got in: {sent_max} of {len(hello)}")
        assert outcome.opened == 500 and outcome.ended_by_proxy == 500, outcome
        assert sent_max < len(hello)
        assert await ep.metric(CLOSED, reason="handshake_timeout") - timeouts >= 500
        assert_served(normal)
        assert ep.alive()


# --- garbage and hostile hellos -------------------------------------------------------------


async def test_random_bytes_flood(tmp_path: Path, echo_upstream: str) -> None:
    state, ca, port, cfg = await start_proxy_config(tmp_path, echo_upstream)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        not_tls = await ep.metric(HELLOS, result="not_tls")
        async with NormalClient(port, NORMAL, ca) as normal:
            outcome = await send_and_watch(port, garbage(2000, 4096), parallel=100, limit=60)
        report("2000 x 4 KB random bytes", normal, outcome)
        assert outcome.opened == 2000 and outcome.still_open == 0, outcome
        # Random first bytes are "not TLS" but for the odd 0x16 0x03 (1 in 65536).
        assert await ep.metric(HELLOS, result="not_tls") - not_tls >= 1900
        assert not any(a.startswith(b"HTTP") for a in outcome.answered)
        assert_served(normal)
        assert ep.alive()
        assert unexpected_log_lines(ep.log_text()) == []


async def test_hostile_sni_never_takes_the_process_down(tmp_path: Path, echo_upstream: str) -> None:
    # Regression: an SNI that is printable but not a hostname ("a+b.example.test") reached
    # the certificate manager, whose status write raised ValueError (not a storage key) in
    # its nursery and killed the whole process with one ClientHello.
    state, ca, port, cfg = await start_proxy_config(tmp_path, echo_upstream)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        async with NormalClient(port, NORMAL, ca) as normal:
            hellos = [hello_record(name) for name in HOSTILE_NAMES for _ in range(3)]
            outcome = await send_and_watch(port, hellos, limit=30)
            challenges = [hello_record(n, ["acme-tls/1"]) for n in HOSTILE_NAMES]
            outcome_acme = await send_and_watch(port, challenges, limit=30)
            assert ep.alive(), ep.log_text()[-3000:]
        report("hostile SNI names", normal, outcome)
        assert outcome.still_open == 0 and outcome_acme.still_open == 0
        assert_served(normal)
        assert ep.alive()
        assert unexpected_log_lines(ep.log_text()) == []
    # Certificates exist only for real hostnames the allow pattern covers (an IP literal
    # counts as no SNI: the default name).
    expected = {NORMAL, "default.example.test"}
    for name in HOSTILE_NAMES:
        with contextlib.suppress(InvalidName):
            if name_matches("*.example.test", valid := validate_hostname(name)):
                expected.add(valid)
    stored = {p.name.removesuffix(".json") for p in (state / "data" / "certs").iterdir()}
    assert stored == expected


async def test_acme_tls_hellos_without_a_challenge(tmp_path: Path, echo_upstream: str) -> None:
    state, ca, port, cfg = await start_proxy_config(tmp_path, echo_upstream)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        before = await ep.metric(NO_CHALLENGE)
        names = random_names(2000, "example.test")
        async with NormalClient(port, NORMAL, ca) as normal:
            outcome = await send_and_watch(
                port, (hello_record(n, ["acme-tls/1"]) for n in names), parallel=64, limit=90
            )
        report("2000 acme-tls/1 hellos, no challenge", normal, outcome)
        assert outcome.opened == 2000 and outcome.still_open == 0, outcome
        assert len(outcome.answered) == 2000 and all(a.startswith(ALERT) for a in outcome.answered)
        assert await ep.metric(NO_CHALLENGE) - before >= 2000
        assert_served(normal)
        assert ep.alive()
        assert unexpected_log_lines(ep.log_text()) == []
    # Validation attempts for names nobody ordered leave nothing behind.
    assert sorted(p.name for p in (state / "data" / "certs").iterdir()) == [f"{NORMAL}.json"]


async def test_random_name_flood_makes_no_acme_request_and_spares_the_ask_endpoint(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble]
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port)
    injector = FaultInjector(pebble)
    await nursery.start(injector.serve)
    ask = AskServer()
    await nursery.start(ask.serve)
    upstream_port = await nursery.start(serve_echo)
    # The bystander's name has a certificate from a file: the flood is the only thing that
    # could make the proxy talk to the CA.
    normal_ca = trustme.CA()
    leaf = normal_ca.issue_cert(NORMAL)
    cert_path, key_path, ca_path = (tmp_path / n for n in ("n.pem", "n.key", "nca.pem"))
    cert_path.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_path))
    normal_ca.cert_pem.write_to_path(str(ca_path))
    cfg = proxy_config(
        tmp_path / "state",
        port,
        f"127.0.0.1:{upstream_port}",
        admin_port=free_port(),
        tls={"issuer": "acme", "default_sni": None},
        acme={"directory": injector.directory_url, "trust": str(pebble.ca_bundle_path)},
        on_demand={"allow": ["*.example.test"], "ask": ask.url, "wait": 5},
    )
    cfg["certificates"] = [{"cert": str(cert_path), "key": str(key_path)}]
    hostile = [re.sub(r"example\.test", "attack.test", n, flags=re.I) for n in HOSTILE_NAMES]
    unique = random_names(600, "attack.test")
    repeated = random_names(30, "attack.test") * 20
    names = [n for pair in zip(unique, repeated, strict=True) for n in pair] + hostile
    async with edgeproxy_process(tmp_path, cfg) as ep:
        async with NormalClient(port, NORMAL, ca_path) as normal:
            t0 = trio.current_time()
            outcome = await send_and_watch(
                port, (hello_record(n) for n in names), parallel=64, limit=120
            )
            elapsed = trio.current_time() - t0
        report(f"{len(names)} hellos for random names (ACME issuer)", normal, outcome)
        print(
            f"  {elapsed:.1f} s; ask endpoint hits: {len(ask.hits)}; "
            f"ACME requests: {len(injector.seen)}"
        )
        assert outcome.still_open == 0, outcome
        assert len(outcome.answered) == len(names)
        assert all(a.startswith(ALERT) for a in outcome.answered)
        assert injector.seen == []
        # The ask rate limit (20/s after a burst of 40) bounds the endpoint's load whatever
        # the flood, and the deny cache means no name is asked about twice.
        assert 0 < len(ask.hits) <= 40 + 20 * elapsed * 1.1 + 5
        assert len(ask.hits) < len(names) // 2
        assert len(set(ask.hits)) == len(ask.hits), "a denied name was asked twice"
        assert_served(normal)
        assert ep.alive()
        assert unexpected_log_lines(ep.log_text()) == []


async def test_random_name_flood_does_not_grow_state_per_name(
    tmp_path: Path, echo_upstream: str
) -> None:
    state, ca, port, cfg = await start_proxy_config(tmp_path, echo_upstream)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        outcome = await send_and_watch(
            port, (hello_record(n) for n in random_names(1000, "not-allowed.test")), limit=60
        )
        assert outcome.still_open == 0 and ep.alive()
        await trio.sleep(1.0)  # status writes are fire-and-forget tasks
    status_dir = state / "data" / "status"
    files = list(status_dir.iterdir()) if status_dir.exists() else []
    print(f"\n  status files after 1000 refused names: {len(files)}")
    assert len(files) <= 100


# --- connection limits ----------------------------------------------------------------------


async def test_max_connections_refuses_new_while_established_keep_working(
    tmp_path: Path, echo_upstream: str
) -> None:
    state, ca, port, cfg = await start_proxy_config(tmp_path, echo_upstream, max_connections=50)
    ctx = client_context(ca)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        refused = await ep.metric(REFUSED, limit="max_connections")
        established = await establish(port, 50, NORMAL, ctx)
        try:
            socks, outcome = await open_idle(port, 200)
            await watch_until_closed(socks, outcome, limit=30)
            print(f"\n[max_connections=50] 200 extra connections: {outcome}")
            assert outcome.reset == 200, outcome
            assert await ep.metric(REFUSED, limit="max_connections") - refused >= 200
            assert await still_echoes(established) == 50
            # Room again once some leave (as soon as the proxy has seen them go).
            for tls in established[:5]:
                await tls.aclose()
            with trio.fail_after(20):
                while True:
                    try:
                        later = await tls_connect(port, NORMAL, ctx)
                        break
                    except (trio.BrokenResourceError, OSError):
                        await trio.sleep(0.1)
            await later.aclose()
            assert await still_echoes(established[5:]) == 45
        finally:
            for tls in established:
                await trio.aclose_forcefully(tls)
        assert ep.alive()


async def test_max_connections_per_ip_without_proxy_protocol(
    tmp_path: Path, echo_upstream: str
) -> None:
    state, ca, port, cfg = await start_proxy_config(
        tmp_path, echo_upstream, max_connections_per_ip=20
    )
    ctx = client_context(ca)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        refused = await ep.metric(REFUSED, limit="max_connections_per_ip")
        established = await establish(port, 20, NORMAL, ctx)
        try:
            # The bystander comes from another loopback address: its own budget.
            async with NormalClient(port, NORMAL, ca, source="127.0.0.2") as normal:
                socks, outcome = await open_idle(port, 100)
                await watch_until_closed(socks, outcome, limit=30)
            report("max_connections_per_ip=20, 100 more from 127.0.0.1", normal, outcome)
            assert outcome.reset == 100, outcome
            assert await ep.metric(REFUSED, limit="max_connections_per_ip") - refused >= 100
            assert await still_echoes(established) == 20
            assert_served(normal)
        finally:
            for tls in established:
                await trio.aclose_forcefully(tls)
        assert ep.alive()


async def test_max_connections_per_ip_counts_the_proxy_v2_client_address(
    tmp_path: Path, echo_upstream: str
) -> None:
    state, ca, port, cfg = await start_proxy_config(
        tmp_path,
        echo_upstream,
        max_connections_per_ip=20,
        proxy_protocol="v2",
        proxy_protocol_from=["127.0.0.1/32"],
    )
    ctx = client_context(ca)
    local = ("127.0.0.1", port)

    def header(client_ip: str, client_port: int) -> bytes:
        # The address is only text in the header: nothing ever connects to it.
        return build_v2((client_ip, client_port), local)

    attacker, bystander = "203.0.113.7", "203.0.113.8"
    async with edgeproxy_process(tmp_path, cfg) as ep:
        refused = await ep.metric(REFUSED, limit="max_connections_per_ip")
        established = []
        try:
            for i in range(20):
                established.append(
                    await tls_connect(port, NORMAL, ctx, proxy_header=header(attacker, 40000 + i))
                )
            hellos = [header(attacker, 50000 + i) + hello_record(NORMAL) for i in range(100)]
            outcome = await send_and_watch(port, hellos, limit=30)
            print(f"\n[per-ip via PROXY v2] 100 more from {attacker}: {outcome}")
            assert outcome.still_open == 0 and not outcome.answered, outcome
            assert await ep.metric(REFUSED, limit="max_connections_per_ip") - refused >= 100
            # Same balancer connection source (127.0.0.1), another client address: served.
            other = await tls_connect(port, NORMAL, ctx, proxy_header=header(bystander, 1234))
            await other.aclose()
            assert await still_echoes(established) == 20
        finally:
            for tls in established:
                await trio.aclose_forcefully(tls)
        assert ep.alive()


# --- fd exhaustion --------------------------------------------------------------------------


async def test_emfile_in_accept_pauses_and_keeps_accepting(
    tmp_path: Path, echo_upstream: str
) -> None:
    state, ca, port, cfg = await start_proxy_config(
        tmp_path, echo_upstream, handshake_timeout=3, max_handshakes=5000
    )
    # 160 descriptors: ~12 at rest, so a burst of 400 idle connections runs accept() into
    # EMFILE until handshake timeouts free descriptors again, round after round.
    async with edgeproxy_process(tmp_path, cfg, nofile=160) as ep:
        # The bystander's certificate exists before the storm: an issuance that meets EMFILE
        # fails (storage writes need descriptors too) and backs off for its own reasons.
        async with NormalClient(port, NORMAL, ca, min_ok=1):
            pass
        baseline = ep.fd_count()
        async with NormalClient(port, NORMAL, ca, interval=0.1) as normal:
            socks, outcome = await open_idle(port, 400)
            await watch_until_closed(socks, outcome, limit=90)
        report(f"400 idle at RLIMIT_NOFILE=160 ({baseline} fds at rest)", normal, outcome)
        # Every connection of the burst was eventually accepted and dealt with.
        assert outcome.opened == 400 and outcome.ended_by_proxy == 400, outcome
        assert "accept failed" in ep.log_text()
        assert await ep.metric(REFUSED, limit="accept_error") >= 1
        assert ep.alive()
        assert await wait_until(lambda: ep.fd_count() <= baseline + 5, limit=30)
        async with NormalClient(port, NORMAL, ca, interval=0.1) as after:
            pass
        report("after the fd burst", after)
        assert_served(after)
        # Logged on purpose while descriptors ran out: accept pauses, and an upstream socket
        # that could not be created.
        errors = unexpected_log_lines(
            ep.log_text(), allowed=["accept failed", "no upstream reachable"]
        )
        assert errors == [], errors[:10]


# Run in a child with a tiny RLIMIT_NOFILE, every descriptor used up: what the data path
# does when the upstream socket cannot even be created.
_EMFILE_UPSTREAM_SCRIPT = """
import resource, socket, sys, trio
from edgeproxy.config import load_config_data
from edgeproxy.errors import UpstreamError
from edgeproxy.app import route_table
from edgeproxy.proxy.upstream import UpstreamPool

cfg = load_config_data({"on_demand": {"allow": ["*.example.test"]},
                        "routes": [{"default": True, "upstreams": ["127.0.0.1:9"]}]})
route = route_table(cfg.routes).match(None)
pool = UpstreamPool()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main():
    hog = []  # inside trio.run: the event loop has its own descriptors already
    try:
        while True:
            hog.append(socket.socket())
    except OSError:
        pass
    pending = pool.start(route)
    try:
        await pool.finish(route, pending, 1.0)
    except UpstreamError as exc:
        print("upstream error:", exc)

trio.run(main)
"""


def test_upstream_socket_under_emfile_is_an_upstream_failure() -> None:
    # Regression: UpstreamPool.start created its socket outside the try, so EMFILE escaped the
    # data path as an "unexpected error" with a traceback instead of an unreachable upstream.
    res = subprocess.run(
        [sys.executable, "-c", _EMFILE_UPSTREAM_SCRIPT],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "upstream error:" in res.stdout and "Too many open files" in res.stdout, res.stdout
