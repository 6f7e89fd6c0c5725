"""Running the edgeproxy command line as a subprocess, and the configs its commands are pointed at.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from testkit.proxy import base_config
from testkit.tomlw import toml_dumps

EP = [sys.executable, "-m", "edgeproxy"]


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process([*EP, *args], capture_stdout=True, capture_stderr=True, check=False)


def write_config(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
                      hostnames={"poll_interval": 0.1})  # fmt: skip
    path = tmp_path / "edgeproxy.toml"
    path.write_text(toml_dumps(cfg))
    return path, cfg


def config(tmp_path: Path) -> Path:
    # allow = []: nothing can be ordered, so whatever is served came from storage.
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
                      on_demand={"allow": []})  # fmt: skip
    path = tmp_path / "edgeproxy.toml"
    path.write_text(toml_dumps(cfg))
    return path
