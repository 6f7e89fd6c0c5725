"""Shed, don't refuse: silent connections at ``max_handshakes`` lose their slot to newcomers.

An attacker holding ``max_handshakes`` silent sockets (and re-opening each one the proxy
closes) must not lock a normal client out: the proxy resets the oldest connection that has
sent no ClientHello to admit the newcomer, and shortens the time a connection may stay
silent as the slots fill. Connections past their ClientHello (waiting for their handshake to
finish) and established ones are never shed for this; when only those hold the slots, a
newcomer is refused as before.

The bystander's latency while the attacker churns is printed (``pytest -s``), not asserted.
``EDGEPROXY_SHED_SECONDS`` sets how long the attacker holds its sockets (default 30), and
``EDGEPROXY_SHED_SECONDS_10K`` the same for the 10,000-socket case (default 30, as the issue
asks; lower it for a quick local run).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import trio

from testkit.hardening import (
    NormalClient,
    SilentHolder,
    client_context,
    edgeproxy_process,
    establish,
    hello_record,
    make_internal_ca,
    open_idle,
    proxy_config,
    still_echoes,
    unexpected_log_lines,
    wait_until,
    watch,
)
from testkit.ports import free_port

NORMAL = "normal.example.test"
SHED = "edgeproxy_connections_shed_total"
REFUSED = "edgeproxy_connections_refused_total"
CLOSED = "edgeproxy_connections_closed_total"
HOLD_SECONDS = float(os.environ.get("EDGEPROXY_SHED_SECONDS", "30"))
HOLD_SECONDS_10K = float(os.environ.get("EDGEPROXY_SHED_SECONDS_10K", "30"))


async def _config(tmp_path: Path, echo_upstream: str, **server: Any) -> tuple[Path, dict[str, Any]]:
    state = tmp_path / "state"
    ca = await make_internal_ca(state)
    cfg = proxy_config(state, free_port(), echo_upstream, admin_port=free_port(), server=server)
    return ca, cfg


async def _hold_and_serve(
    tmp_path: Path,
    echo_upstream: str,
    silent: int,
    nofile: int | None,
    seconds: float,
    **server: Any,
) -> None:
    ca, cfg = await _config(tmp_path, echo_upstream, **server)
    async with edgeproxy_process(tmp_path, cfg, nofile=nofile) as ep:
        # The bystander's certificate exists before the attack (issuance is not under test).
        async with NormalClient(ep.port, NORMAL, ca, min_ok=1):
            pass
        async with SilentHolder(ep.port, silent) as holder:
            async with NormalClient(ep.port, NORMAL, ca, interval=0.2, min_ok=0) as normal:
                await trio.sleep(seconds)
            shed = await ep.metric(SHED, reason="max_handshakes") + await ep.metric(
                SHED, reason="hello_timeout_scaled"
            )
            refused = await ep.metric(REFUSED, limit="max_handshakes")
        print(
            f"\n[{silent} silent connections churned for {seconds:g}s] normal client: "
            f"{normal.result.summary()}; attacker: {holder.counts}; shed {shed:g}, "
            f"refused {refused:g}"
        )
        # Served throughout: no request failed (before shedding, nearly all were refused),
        # and requests kept completing: one every 0.2 s unloaded; a 2-core machine shared
        # with the attacker and other work manages far fewer, so the bound is loose.
        assert not normal.result.errors, normal.result.errors[:5]
        assert len(normal.result.seconds) >= seconds / 10, normal.result.summary()
        # The attacker's sockets were shed (and re-opened), and every shed one is counted.
        assert holder.counts["ended_by_proxy"] >= silent, holder.counts
        assert shed >= silent
        assert ep.alive()
        assert unexpected_log_lines(ep.log_text()) == []
        # One summary line at most every 10 s, and no access line per shed connection.
        text = ep.log_text()
        summaries = text.count("overload: shed")
        assert 1 <= summaries <= seconds / 10 + 2, summaries
        assert "result=shed" not in text


async def test_2000_silent_connections_do_not_lock_out_a_normal_client(
    tmp_path: Path, echo_upstream: str
) -> None:
    # The defaults: max_handshakes = 2000, handshake_timeout = 10 s.
    await _hold_and_serve(tmp_path, echo_upstream, 2000, None, HOLD_SECONDS)


async def test_10000_silent_connections_at_the_descriptor_limit(
    tmp_path: Path, echo_upstream: str
) -> None:
    # max_handshakes matched to RLIMIT_NOFILE, less a margin for listeners, upstream
    # sockets, storage and logs: the limit sheds before the descriptors run out.
    await _hold_and_serve(
        tmp_path,
        echo_upstream,
        10_000,
        10_240,
        HOLD_SECONDS_10K,
        max_handshakes=10_000,
        max_connections=10_100,
    )


async def test_connections_past_their_hello_and_established_ones_are_never_shed(
    tmp_path: Path, echo_upstream: str
) -> None:
    ca, cfg = await _config(tmp_path, echo_upstream, max_handshakes=40, handshake_timeout=8)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        ctx = client_context(ca)
        established = await establish(ep.port, 20, NORMAL, ctx)
        refused = await ep.metric(REFUSED, limit="max_handshakes")
        # 40 connections that sent a complete ClientHello and then nothing: the proxy has
        # answered and waits for the client's Finished. They fill every handshake slot.
        mid: list[trio.socket.SocketType] = []
        for _ in range(40):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", ep.port))
            await sock.send(hello_record(NORMAL))
            assert await sock.recv(5)  # the ServerHello's record header: past the hello
            mid.append(sock)
        silent, outcome = await open_idle(ep.port, 100)
        async with trio.open_nursery() as nursery:
            watch(nursery, silent, outcome)
            # Nothing to shed: every newcomer is refused (reset) while the slots are held.
            assert await wait_until(lambda: outcome.ended_by_proxy == 100, limit=30), outcome
            nursery.cancel_scope.cancel()
        assert outcome.reset == 100, outcome
        assert await ep.metric(REFUSED, limit="max_handshakes") - refused >= 100
        assert await ep.metric(SHED, reason="max_handshakes") == 0
        # The mid-handshake ones are still open, and the established ones still carry data.
        for sock in mid:
            with trio.move_on_after(0.05):
                assert await sock.recv(65536), "a mid-handshake connection was closed"
        assert await still_echoes(established) == 20
        for sock in [*mid, *silent]:
            sock.close()
        for tls in established:
            await trio.aclose_forcefully(tls)


async def test_the_silent_timeout_shrinks_as_the_handshake_slots_fill(
    tmp_path: Path, echo_upstream: str
) -> None:
    # Every slot held by a silent socket: the time they may stay silent falls from the 20 s
    # handshake timeout to 1 s, so some are closed long before 20 s; as each one goes the
    # pressure falls and the allowance grows back, so they are not all closed early.
    ca, cfg = await _config(tmp_path, echo_upstream, max_handshakes=100, handshake_timeout=20)
    async with edgeproxy_process(tmp_path, cfg) as ep:
        silent, outcome = await open_idle(ep.port, 100)
        assert outcome.opened == 100 and outcome.ended_by_proxy == 0, outcome
        async with trio.open_nursery() as nursery:
            watch(nursery, silent, outcome)
            assert await wait_until(lambda: outcome.ended_by_proxy >= 5, limit=15), outcome
            nursery.cancel_scope.cancel()
        assert outcome.ended_by_proxy < 100, outcome
        assert await ep.metric(SHED, reason="hello_timeout_scaled") >= 5
        assert await ep.metric(CLOSED, reason="shed") >= 5
        assert await ep.metric(CLOSED, reason="handshake_timeout") == 0
        for sock in silent:
            sock.close()


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


async def test_the_descriptor_limit_is_raised_so_shedding_starts_before_emfile(
    tmp_path: Path, echo_upstream: str
) -> None:
    # systemd's default soft limit (1024) is under the default max_handshakes (2000): the
    # proxy raises its soft limit to the hard one, or accept would fail (EMFILE) first and
    # the silent sockets would lock everyone out all the same.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    ca, cfg = await _config(tmp_path, echo_upstream)
    async with edgeproxy_process(tmp_path, cfg, rlimit=(1024, hard)) as ep:
        assert _soft_nofile(ep.pid) == hard
        assert "may open only" not in ep.log_text()
    # A hard limit under it cannot be raised: the operator is told what to change.
    ca, cfg = await _config(tmp_path, echo_upstream)
    async with edgeproxy_process(tmp_path, cfg, name="low", rlimit=(1500, 1500)) as ep:
        assert (
            "server.max_handshakes = 2000 but this process may open only 1500 descriptors"
            in ep.log_text()
        )
