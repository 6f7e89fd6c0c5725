"""Running an edgeproxy command under a pseudo-terminal or with progress lines on a pipe,
interrupting it halfway, and reading its progress bar.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 120.0  # a bound on one command; never a timing assertion


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
