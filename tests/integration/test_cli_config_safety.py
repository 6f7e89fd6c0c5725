"""Commands that must not silently do less (or more) than they say (issue 21, findings 10, 11).

Each test runs the real ``edgeproxy`` command line in a child process, as an operator would.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from edgeproxy.certs.record import cert_key
from edgeproxy.storage import FileStorage
from testkit.certrecords import cert_record as record
from testkit.ports import free_port
from testkit.procs import kill_process

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


# -- finding 10: allow = ["*"] with the ACME issuer --------------------------------------------

ACME = '[tls]\nissuer = "acme"\n[acme]\ndirectory = "http://127.0.0.1:9/directory"\n'


def test_check_warns_about_allow_star_with_acme_but_passes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, ACME + '[on_demand]\nallow = ["*"]\n')
    res = subprocess.run([*EP, "check", "-c", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert 'warning: on_demand.allow: "*" allows every name' in res.stderr
    assert "order a certificate" in res.stderr and "1 warning(s) above" in res.stdout
    narrow = write_config(tmp_path, ACME + '[on_demand]\nallow = ["*.example.net"]\n')
    res = subprocess.run([*EP, "check", "-c", str(narrow)], capture_output=True, text=True)
    assert res.returncode == 0 and "warning" not in res.stderr + res.stdout, res.stderr
    # The internal CA orders nothing from anyone: "*" is the demo's normal setting there.
    internal = write_config(tmp_path, '[tls]\nissuer = "internal"\n[on_demand]\nallow = ["*"]\n')
    res = subprocess.run([*EP, "check", "-c", str(internal)], capture_output=True, text=True)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr


def run_until(cfg: Path, marker: str, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Start ``edgeproxy run``; stop it once ``marker`` is logged. (exit code or None, log)."""
    proc = subprocess.Popen(
        [*EP, "run", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break  # exited
            lines.append(line)
            if marker in line:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
                return None, "".join(lines)
        return proc.wait(timeout=30), "".join(lines)
    finally:
        kill_process(proc)


def serving_config(tmp_path: Path, body: str, root: Path) -> Path:
    return write_config(
        tmp_path,
        f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n[admin]\nlisten = ""\n'
        f'[storage]\npath = "{root}"\n' + body,
    )


def test_run_logs_the_allow_star_warning_at_start(tmp_path: Path) -> None:
    cfg = serving_config(tmp_path, ACME + '[on_demand]\nallow = ["*"]\n', tmp_path / "st")
    code, log = run_until(cfg, "edgeproxy listening on")
    assert code is None, log  # it started (a warning, not an error) and was stopped
    warning = log.index('config: on_demand.allow: "*" allows every name')
    assert warning < log.index("edgeproxy listening on")


# -- finding 10: a storage root others could swap ----------------------------------------------

INTERNAL = '[tls]\nissuer = "internal"\n[on_demand]\nallow = ["*.example.test"]\n'


def test_run_refuses_a_world_writable_storage_root(tmp_path: Path) -> None:
    root = tmp_path / "st"
    root.mkdir()
    os.chmod(root, 0o777)
    code, log = run_until(serving_config(tmp_path, INTERNAL, root), "edgeproxy listening on")
    assert code == 2, log
    assert f"storage.path: storage root {root} is writable by everyone" in log


def test_run_refuses_a_symlinked_storage_root_and_storage_check_reports_it(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "st"
    link.symlink_to(real)
    cfg = serving_config(tmp_path, INTERNAL, link)
    code, log = run_until(cfg, "edgeproxy listening on")
    assert code == 2, log
    assert f"storage.path: storage root {link} is a symbolic link (to {real})" in log
    res = subprocess.run([*EP, "storage", "check", "-c", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 1, res.stdout
    assert f"storage root {link} is a symbolic link" in res.stdout


def test_storage_check_reports_a_parent_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (shared / "st").mkdir(mode=0o700)
    cfg = serving_config(tmp_path, INTERNAL, shared / "st")
    res = subprocess.run([*EP, "storage", "check", "-c", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 1, res.stdout
    assert f"parent folder {shared} (mode 0777" in res.stdout


# -- finding 10: encryption_key_env with the file backend --------------------------------------


def keyed_config(tmp_path: Path, root: Path) -> Path:
    cfg = serving_config(tmp_path, INTERNAL, root)
    text = cfg.read_text().replace(
        f'path = "{root}"\n', f'path = "{root}"\nencryption_key_env = "EP_KEY"\n'
    )
    cfg.write_text(text)
    return cfg


def test_file_backend_encrypts_private_keys_with_encryption_key_env(tmp_path: Path) -> None:
    from edgeproxy.storage.sealing import generate_encryption_key

    root = tmp_path / "st"
    cfg = keyed_config(tmp_path, root)
    env = {**os.environ, "EP_KEY": generate_encryption_key()}
    res = subprocess.run(
        [*EP, "certs", "issue", "shop.example.test", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    files = [p for p in (root / "data").rglob("*") if p.is_file()]
    assert any("certs" in p.parts for p in files) and any("internal-ca" in p.parts for p in files)
    for path in files:
        assert b"PRIVATE KEY" not in path.read_bytes(), f"{path} holds a private key in clear"
    ok = subprocess.run(
        [*EP, "storage", "check", "-c", str(cfg)], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and "storage OK" in ok.stdout, ok.stdout
    # The key's variable empty: a config error, as at start.
    empty = subprocess.run(
        [*EP, "storage", "check", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env={**env, "EP_KEY": ""},
    )
    assert empty.returncode == 2, empty
    assert "storage.encryption_key_env: environment variable EP_KEY is empty" in empty.stderr
    # The key dropped from the config: the sealed values are reported, never served as garbage.
    forgot = serving_config(tmp_path, INTERNAL, root)
    no_key = subprocess.run(
        [*EP, "storage", "check", "-c", str(forgot)], capture_output=True, text=True
    )
    assert no_key.returncode == 1, no_key
    assert "value 'certs/shop.example.test.json' is encrypted at rest but no encryption key" in (
        no_key.stdout
    )


def test_file_backend_with_an_empty_encryption_key_env_refuses_to_start(tmp_path: Path) -> None:
    root = tmp_path / "st"
    cfg = keyed_config(tmp_path, root)
    code, log = run_until(cfg, "edgeproxy listening on", env={"EP_KEY": ""})
    assert code == 2, log
    assert "storage.encryption_key_env: environment variable EP_KEY is empty" in log
    assert not (root / "data").exists()
