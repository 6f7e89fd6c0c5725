"""The fuzz targets under libFuzzer for a bounded time, as CI runs them.

``python -m fuzz.run`` runs each target in its own process (atheris instruments the code as
it is imported, and libFuzzer owns its process); this test starts it as a subprocess with
``EDGEPROXY_FUZZ_SECONDS`` per target (20 in CI, the three targets side by side), prints the
executions per target and fails on any finding, with the libFuzzer log tail. The local mode
is the same command with minutes per target and a kept corpus (``tests/hardening/README.md``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.corpus import SEEDS

REPO_ROOT = Path(__file__).resolve().parents[1]
SECONDS = int(os.environ.get("EDGEPROXY_FUZZ_SECONDS", "20"))
TARGETS = ("client_hello", "proxy_protocol", "acme_messages")


def test_fuzz_targets_find_nothing(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris (the [test] extra) is not installed")
    workdir = tmp_path / "fuzz"
    # Its own process group: if the bound below runs out, the libFuzzer children go too.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            "--seconds",
            str(SECONDS),
            "--jobs",
            str(len(TARGETS)),
            "--workdir",
            str(workdir),
            "--json",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=SECONDS + 240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    print("\n" + res.stdout.rsplit("\n{", 1)[0])
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    results = {r["target"]: r for r in summary["results"]}
    assert set(results) == set(TARGETS)
    findings = {
        name: Path(r["log"]).read_text(errors="replace")[-4000:]
        for name, r in results.items()
        if r["returncode"] != 0 or r["artifacts"]
    }
    assert findings == {}, "\n\n".join(f"--- {n} ---\n{t}" for n, t in findings.items())
    for name, r in results.items():
        # The fuzzer really ran: thousands of inputs, and the corpus grew past the seeds.
        assert r["executions"] >= 20 * SECONDS, (name, r["executions"])
        seeds = {data for _, data in SEEDS[name]()}
        assert r["corpus_files"] > len(seeds), (name, r["corpus_files"])
    assert res.returncode == 0, res.stderr[-3000:]
