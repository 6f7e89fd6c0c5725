"""The benchmark's Caddy and haproxy-bigbuf rows are what their labels say.

The smoke run (tests/integration/test_bench_smoke.py) drives edgeproxy and HAProxy only; these two rows are
checked here on their own, in seconds: each one started as ``bench.run`` starts it, with
tickets off and on, and probed as ``bench.run`` probes it. Tickets off must mean no ticket
and a full second handshake, on must mean a resumed one (Caddy's are switched in its own
config, not by ``OPENSSL_CONF``, so this is the check that the switch works), and every
answer must come from the origin through the terminator. haproxy-bigbuf must really run
with 64 KiB buffers where the plain row runs with HAProxy's default 16 KiB.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.loadgen import TlsProbe, probe_tls
from bench.pki import make_pki
from bench.procs import Supervisor
from bench.run import probe_ok
from bench.terminators import (
    TERMINATORS,
    Haproxy,
    HaproxyBigbuf,
    Stage,
    Terminator,
    start_origin,
)

NEEDED = ("caddy", "haproxy", "nginx", "openssl", "taskset")


@dataclass
class Bench:
    sup: Supervisor
    stage: Stage

    def probe(self, term: Terminator, *, tickets: bool) -> TlsProbe:
        server = term.start(self.sup, self.stage, tickets=tickets)
        try:
            assert server.port is not None
            pki = self.stage.pki
            session = self.stage.workdir / "session.pem"
            return probe_tls(server.port, pki.name, pki.ca_pem, session, "/empty.bin")
        finally:
            self.sup.stop(server)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    missing = [p for p in NEEDED if shutil.which(p) is None]
    if missing:
        pytest.skip(f"the benchmark needs {', '.join(missing)} (tests/run installs them)")
    workdir: Path = tmp_path_factory.mktemp("bench-terminators")
    with Supervisor(workdir) as sup:
        origin = start_origin(sup, workdir, cpu=None, nofile=1024, connections=256)
        stage = Stage(
            workdir=workdir,
            pki=make_pki(workdir / "pki"),
            origin_port=origin.port,
            cpu=None,
            max_connections=100,
            nofile=1024,
        )
        yield Bench(sup, stage)


@pytest.mark.parametrize("name", ["caddy", "haproxy-bigbuf"])
@pytest.mark.parametrize("tickets", [False, True], ids=["tickets-off", "tickets-on"])
def test_row_serves_the_origin_with_tickets_as_labelled(
    bench: Bench, name: str, tickets: bool
) -> None:
    probe = bench.probe(TERMINATORS[name](), tickets=tickets)
    assert probe.http_ok, probe
    if tickets:
        assert probe.tickets > 0 and probe.resumed, probe
    else:
        assert probe.tickets == 0 and not probe.resumed, probe
    assert probe_ok(probe, tickets=tickets)
    assert probe.protocol == "TLSv1.3" and probe.cipher == "TLS_AES_128_GCM_SHA256", probe


def _buffer_size(bench: Bench, term: Haproxy) -> int:
    server = term.start(bench.sup, bench.stage, tickets=True)
    try:
        # HAProxy may accept TLS a moment before its stats socket exists.
        deadline = time.monotonic() + 10
        while (pools := term.stats_command(bench.stage, server, "show pools")) is None:
            assert time.monotonic() < deadline, "no answer on the stats socket"
            time.sleep(0.05)
    finally:
        bench.sup.stop(server)
    # e.g. "  - Pool buffer (16384 bytes) : 2 allocated (32768 bytes), ..."
    found = re.search(r"Pool buffer \((\d+) bytes\)", pools)
    assert found, pools
    return int(found.group(1))


def test_bigbuf_row_runs_with_64_kib_buffers_and_the_plain_row_with_16(bench: Bench) -> None:
    assert _buffer_size(bench, HaproxyBigbuf()) == 65536
    assert _buffer_size(bench, Haproxy()) == 16384
