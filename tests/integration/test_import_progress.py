"""Progress and Ctrl-C of ``edgeproxy hostnames import`` (and ``certs list``), as real
subprocesses.

10,000 JSON lines (each with an upstream and metadata, so an entry written halfway would
show). Under a pseudo-terminal (Python's ``pty``) the command draws a tqdm bar that moves;
with pipes it prints plain periodic lines; SIGINT halfway stops it after the batch in flight,
it says how many entries it stored, and storage holds exactly those, each whole, and nothing
half-written (``edgeproxy storage check``).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from edgeproxy.storage import FileStorage
from tests.integration.test_hostnames_cli import write_config

N = 10_000
ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 120.0


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


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def on_a_terminal(cmd: list[str]) -> str:
    """Everything ``cmd`` writes to a 100x24 pseudo-terminal; it must exit 0."""
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100x24
    proc = subprocess.Popen(cmd, stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env(),
                            close_fds=True)  # fmt: skip
    os.close(child_fd)
    out = b""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main_fd], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main_fd)
    assert proc.wait(timeout=DEADLINE) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def interrupted(cmd: list[str], what: str, after: int) -> tuple[bytes, bytes]:
    """Run ``cmd`` with a progress line per step, SIGINT it once ``after`` items of ``what``
    are reported done; its stdout and the rest of its stderr (it must exit 130)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(EDGEPROXY_PROGRESS_INTERVAL="0"))  # fmt: skip
    assert proc.stderr is not None
    seen = 0
    while seen < after:
        line = proc.stderr.readline().decode()
        assert line, "the import ended before it could be interrupted"
        if m := re.match(rf"{what}: (\d+)/", line):
            seen = int(m.group(1))
    proc.send_signal(signal.SIGINT)
    out, err_rest = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, err_rest
    return out, err_rest


def assert_bar_moved(text: str, total: int) -> None:
    """``text`` shows a tqdm bar that went forward through ``total`` items."""
    # tqdm redraws one line with carriage returns: "  30%|███       | 3000/10000 ..."
    frames = re.findall(rf"(\d+)%\|[^|]*\| ?(\d+)/{total}", text)
    done = [int(count) for _, count in frames]
    assert "\r" in text
    assert done and done[-1] == total, text[-500:]
    assert len(set(done)) >= 3 and any(0 < d < total for d in done), done  # it moved
    assert done == sorted(done)


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
