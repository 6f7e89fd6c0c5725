"""Commands that must not silently do less (or more) than they say (issue 21, findings 10, 11).

Each test runs the real ``edgeproxy`` command line in a child process, as an operator would.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from edgeproxy.certs.record import cert_key
from edgeproxy.storage import FileStorage
from tests.support.certrecords import cert_record as record

EP = [sys.executable, "-m", "edgeproxy"]
ROUTE = '[[routes]]\nsni = ["*"]\ndefault = true\nupstreams = ["127.0.0.1:8080"]\n'


def write_config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(body + ROUTE)
    return cfg


# -- finding 11: storage clean ---------------------------------------------------------------


@pytest.mark.parametrize("grace", ["-60", "-1", "3651", "100000"])
def test_storage_clean_refuses_absurd_grace_and_keeps_valid_certificates(
    tmp_path: Path, grace: str
) -> None:
    root = tmp_path / "st"
    now = dt.datetime.now(dt.UTC)
    names = [f"valid{i}.example" for i in range(3)]

    async def fill() -> None:
        st = FileStorage(root)
        for i, name in enumerate(names):
            rec = record(name, now + dt.timedelta(days=10 + i * 20))
            await st.put(cert_key(name), rec.to_json(), secret=True)

    trio.run(fill)
    cfg = write_config(tmp_path, f'[tls]\nissuer = "internal"\n[storage]\npath = "{root}"\n')
    res = subprocess.run(
        [*EP, "storage", "clean", "-c", str(cfg), "--grace-days", grace],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "--grace-days" in res.stderr and "0<=x<=3650" in res.stderr
    assert "removed" not in res.stdout
    for name in names:
        assert FileStorage(root).path_of(cert_key(name)).is_file()


def test_storage_clean_with_zero_grace_keeps_valid_certificates(tmp_path: Path) -> None:
    root = tmp_path / "st"
    now = dt.datetime.now(dt.UTC)

    async def fill() -> None:
        st = FileStorage(root)
        for name, days in (("valid.example", 30), ("expired.example", -1)):
            rec = record(name, now + dt.timedelta(days=days))
            await st.put(cert_key(name), rec.to_json(), secret=True)

    trio.run(fill)
    cfg = write_config(tmp_path, f'[tls]\nissuer = "internal"\n[storage]\npath = "{root}"\n')
    res = subprocess.run(
        [*EP, "storage", "clean", "-c", str(cfg), "--grace-days", "0"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "certs/expired.example.json" in res.stdout
    assert FileStorage(root).path_of(cert_key("valid.example")).is_file()
    assert not FileStorage(root).path_of(cert_key("expired.example")).exists()
