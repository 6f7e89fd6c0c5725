"""Progress and Ctrl-C of ``edgeproxy hostnames import`` (and ``certs list``), as real
subprocesses.

10,000 JSON lines (each with an upstream and metadata, so an entry written halfway would
show). Under a pseudo-terminal (Python's ``pty``) the command draws a tqdm bar that moves;
with pipes it prints plain periodic lines; SIGINT halfway stops it after the batch in flight,
it says how many entries it stored, and storage holds exactly those, each whole, and nothing
half-written (``edgeproxy storage check``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from edgeproxy.storage import FileStorage
from testkit.cli import write_config
from testkit.terminal import DEADLINE, assert_bar_moved, env, interrupted, on_a_terminal

N = 10_000



def names_file(tmp_path: Path) -> Path:
    path = tmp_path / "names.jsonl"
    with path.open("w") as f:
        for i in range(N):
            line = {"hostname": f"c{i:05d}.customer.test", "upstream": f"10.0.{i // 250}.{i % 250 + 1}:8080",
                    "metadata": {"customer": i, "plan": "gold"}}  # fmt: skip
            f.write(json.dumps(line) + "\n")
    return path


def command(tmp_path: Path) -> list[str]:
    config, _ = write_config(tmp_path)
    return [sys.executable, "-m", "edgeproxy", "hostnames", "import", str(names_file(tmp_path)),
            "-c", str(config)]  # fmt: skip










def test_on_a_terminal_a_progress_bar_moves(tmp_path: Path) -> None:
    text = on_a_terminal(command(tmp_path))
    assert_bar_moved(text, N)
    assert f"{N} added, 0 already registered, 0 bad line(s)" in text


def test_without_a_terminal_plain_periodic_lines(tmp_path: Path) -> None:
    res = subprocess.run(command(tmp_path), capture_output=True, timeout=DEADLINE,
                         env=env(EDGEPROXY_PROGRESS_INTERVAL="0.01"), check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    err = res.stderr.decode()
    assert "\r" not in err and "\x1b" not in err  # no bar, no terminal codes
    lines = err.splitlines()
    counts = [int(m.group(1)) for line in lines if (m := re.fullmatch(r"hostnames: (\d+)/10000 \(\d+%\)", line))]
    assert len(counts) == len(lines), lines  # nothing else on stderr
    assert counts[-1] == N and len(counts) >= 3 and counts == sorted(counts), counts
    assert f"{N} added".encode() in res.stdout


async def test_ctrl_c_halfway_stops_between_batches_and_keeps_every_entry_whole(
    tmp_path: Path,
) -> None:
    # A progress line per batch: interrupt after the third.
    out, err_rest = interrupted(command(tmp_path), "hostnames", 3000)
    m = re.search(rb"stopped by Ctrl-C: (\d+) of 10000 entries imported \(up to line (\d+) of",
                  err_rest)  # fmt: skip
    assert m is not None, err_rest
    imported = int(m.group(1))
    assert 3000 <= imported < N and imported % 1000 == 0 and int(m.group(2)) == imported
    assert f"{imported} added".encode() in out
    assert b"Traceback" not in err_rest

    storage = FileStorage(tmp_path / "state")
    try:
        stored = []
        after = None
        while page := await storage.list_hostnames(after=after, limit=1000):
            stored.extend(page)
            after = page[-1].hostname
    finally:
        await storage.aclose()
    assert [e.hostname for e in stored] == [f"c{i:05d}.customer.test" for i in range(imported)]
    for i, e in enumerate(stored):
        assert e.upstream == f"10.0.{i // 250}.{i % 250 + 1}:8080"
        assert json.loads(e.metadata) == {"customer": i, "plan": "gold"}
    check = subprocess.run(command(tmp_path)[:3] + ["storage", "check", "-c", str(tmp_path / "edgeproxy.toml")],
                           capture_output=True, env=env(), timeout=DEADLINE, check=False)  # fmt: skip
    assert check.returncode == 0 and b"storage OK" in check.stdout, check.stdout + check.stderr


async def test_certs_list_shows_progress_on_stderr_and_keeps_stdout_clean(tmp_path: Path) -> None:
    from edgeproxy.certs import status_store
    from edgeproxy.certs.status import DomainStatus

    config, _ = write_config(tmp_path)
    storage = FileStorage(tmp_path / "state")
    try:
        for i in range(300):
            st = DomainStatus(f"s{i:03d}.customer.test", "valid", not_after=2e9)
            await status_store.write(storage, st)
    finally:
        await storage.aclose()
    res = subprocess.run(command(tmp_path)[:3] + ["certs", "list", "--json", "-c", str(config)],
                         capture_output=True, env=env(EDGEPROXY_PROGRESS_INTERVAL="0"),
                         timeout=DEADLINE, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)  # stdout is the JSON alone
    assert len(rows) == 300
    lines = res.stderr.decode().splitlines()
    assert lines[0] == "statuses: 1/300 (0%)" and lines[-1] == "statuses: 300/300 (100%)", lines
