"""sslyze (PyPI) in a venv of its own, built on first use: it pins its own cryptography and
nassl, which must never meet the project's venv.

``python -m testkit.sslyze`` builds it ahead of time (``tests/run`` does, so the suite's
timings do not include a pip install). The venv lives in ``.cache/sslyze-venv`` at the
repository root (gitignored), or where ``EDGEPROXY_SSLYZE_VENV`` says.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

SSLYZE_REQUIREMENT = "sslyze==6.3.1"  # a known release: its Mozilla profile is part of the test
_REPO = Path(__file__).resolve().parents[1]


def venv_dir() -> Path:
    return Path(os.environ.get("EDGEPROXY_SSLYZE_VENV") or _REPO / ".cache" / "sslyze-venv")


def sslyze_command() -> list[str]:
    """The argv prefix that runs sslyze, building its venv first if needed (minutes, once).

    ``python -m sslyze`` rather than the ``sslyze`` script: the venv is built under a
    temporary name and renamed, which a script's absolute shebang would not survive.
    """
    venv = venv_dir()
    python = venv / "bin" / "python"
    marker = venv / "requirement.txt"
    if marker.is_file() and marker.read_text() == SSLYZE_REQUIREMENT:
        return [str(python), "-m", "sslyze"]
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and reuse its venv
        if not (marker.is_file() and marker.read_text() == SSLYZE_REQUIREMENT):
            building = venv.with_name(f"{venv.name}.building")
            shutil.rmtree(building, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
            subprocess.run(
                [
                    str(building / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    SSLYZE_REQUIREMENT,
                ],
                check=True,
            )
            (building / "requirement.txt").write_text(SSLYZE_REQUIREMENT)
            shutil.rmtree(venv, ignore_errors=True)
            building.rename(venv)
    return [str(python), "-m", "sslyze"]


if __name__ == "__main__":
    print(" ".join(sslyze_command()))
