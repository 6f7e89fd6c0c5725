"""The benchmark harness still works: ``python -m bench.run --smoke``, end to end, once.

Seconds, not minutes: edgeproxy and HAProxy only, each workload for about a second, 200 idle
connections, two on-demand names against pebble. No figure's size is judged here (timings
belong to the benchmark); the scenarios check that the harness measured what its table
claims: every workload ran against both terminators and got answers, the handshake rows
really ran with session tickets off and on as labelled, the idle connections were real
end-to-end connections, each new name got a pebble certificate, the results were written, and
nothing the harness started outlived it.

The harness runs in its own session; teardown kills that whole process group, so a wedged
run cannot leave servers behind even when an assertion fails first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
NEEDED = ("haproxy", "nginx", "wrk", "openssl", "taskset", "pebble", "pebble-challtestsrv")
TERMINATORS = {"edgeproxy", "haproxy"}
THROUGHPUT = {"a", "a2", "b", "c"}
SMOKE_IDLE = 200
SMOKE_NAMES = 2

pytestmark = pytest.mark.slow


@dataclass
class SmokeRun:
    returncode: int
    stdout: str
    stderr: str
    results: Path
    leftovers: list[str]  # processes still in the harness's process group after it exited

    def only(self, suffix: str) -> Path:
        found = sorted(self.results.glob(f"bench-smoke-*{suffix}"))
        assert len(found) == 1, f"expected one *{suffix} in {self.results}: {found}"
        return found[0]

    def document(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.only(".json").read_text())
        return data


def _group_members(pgid: int) -> list[str]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5 of proc(5): the process group
            members.append(f"{entry.name} {raw[raw.index('(') + 1 : raw.rindex(')')]}")
    return members


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmokeRun]:
    missing = [p for p in NEEDED if shutil.which(p) is None]
    if missing:
        pytest.skip(f"the benchmark needs {', '.join(missing)} (tests/run installs them)")
    results = tmp_path_factory.mktemp("bench") / "results"
    proc = subprocess.Popen(
        # Two slices per workload: the interleaved measurement runs as in a full run.
        [sys.executable, "-m", "bench.run", "--smoke", "--slices", "2", "--out", str(results)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"bench.run --smoke did not finish in 300 s:\n{stderr[-4000:]}")
        leftovers = _group_members(proc.pid)
        yield SmokeRun(proc.returncode, stdout, stderr, results, leftovers)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_run_succeeds_and_prints_the_table(smoke: SmokeRun) -> None:
    assert smoke.returncode == 0, smoke.stderr[-4000:]
    assert "| workload | terminator | req/s | MB/s | p99 ms |" in smoke.stdout
    for name in TERMINATORS:
        assert f"| {name} |" in smoke.stdout


def test_nothing_the_harness_started_outlives_it(smoke: SmokeRun) -> None:
    assert smoke.leftovers == []


def test_every_workload_was_measured_against_both_terminators(smoke: SmokeRun) -> None:
    doc = smoke.document()
    seen = {(r["terminator"], r["workload"]) for r in doc["throughput"]}
    assert seen == {(t, w) for t in TERMINATORS for w in THROUGHPUT}
    for row in doc["throughput"]:
        where = f"{row['terminator']} {row['workload']}"
        assert row["requests"] > 0, where
        assert row["errors"] == {k: 0 for k in row["errors"]}, where
        assert row["proxy_cpu_s"] > 0, where  # the CPU was read from the right process
        assert row["tls"].startswith("TLSv1.3 TLS_AES_128_GCM_SHA256"), where
    # HAProxy is its own reference: a ratio of exactly 1 proves the pairing by repetition.
    for row in doc["summary"]["throughput"]:
        if row["terminator"] == "haproxy":
            assert row["ratio_to_haproxy"] == 1.0
        else:
            assert row["ratio_to_haproxy"] is not None and row["ratio_to_haproxy"] > 0


def test_each_row_adds_up_its_slices(smoke: SmokeRun) -> None:
    # --slices 2 of a 1 s smoke duration: two 1 s wrk runs per terminator and workload.
    for row in smoke.document()["throughput"]:
        where = f"{row['terminator']} {row['workload']}"
        assert row["slices"] == 2, where
        assert 1.8 < row["duration_s"] < 3.0, where


def test_handshake_rows_ran_with_tickets_as_labelled(smoke: SmokeRun) -> None:
    doc = smoke.document()
    probes = {(p["terminator"], p["tickets_on"]): p for p in doc["probes"]}
    for name in TERMINATORS:
        off, on = probes[(name, False)], probes[(name, True)]
        # Tickets off: none sent, and a second connection is a full handshake.
        assert off["tickets"] == 0 and off["resumed"] is False, off
        # Tickets on: the probe can see resumption, so "not resumed" above means something.
        assert on["tickets"] > 0 and on["resumed"] is True, on
    assert all(row["probe_ok"] for row in doc["throughput"])
    # And under load: HAProxy's own counters say wrk resumed in (a2) and not in (a). The
    # figure is 100 - 100 * key rate / session rate over the last second, two rates read a
    # moment apart: near 0 and near 100, not exactly.
    reuse = {
        r["workload"]: r["server_reuse_pct"]
        for r in doc["throughput"]
        if r["terminator"] == "haproxy"
    }
    assert reuse["a"] is not None and reuse["a"] < 10
    assert reuse["a2"] is not None and reuse["a2"] > 50


def test_idle_connections_were_held_end_to_end(smoke: SmokeRun) -> None:
    doc = smoke.document()
    assert {r["terminator"] for r in doc["idle"]} == TERMINATORS
    for row in doc["idle"]:
        assert row["opened"] == SMOKE_IDLE and row["failed"] == 0, row
        # Each one reached the origin through the terminator, not just the TLS listener.
        assert row["origin_connections"] >= SMOKE_IDLE, row
        assert row["rss_after_kib"] > row["rss_before_kib"], row


def test_each_new_name_was_issued_on_demand(smoke: SmokeRun) -> None:
    (edgeproxy,) = smoke.document()["issuance"]
    assert edgeproxy["system"] == "edgeproxy"
    assert edgeproxy["failures"] == []
    assert edgeproxy["ok"] == SMOKE_NAMES and len(edgeproxy["times_ms"]) == SMOKE_NAMES
    assert edgeproxy["median_ms"] is not None


def test_results_are_written_as_json_markdown_and_png(smoke: SmokeRun) -> None:
    doc = smoke.document()
    assert doc["meta"]["plan"]["smoke"] is True
    assert smoke.only(".md").read_text().startswith("| workload |")
    assert smoke.only(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
