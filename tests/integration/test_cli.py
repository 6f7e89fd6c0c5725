"""The command line as a newcomer meets it: demo, check, --help, --version."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from testkit.ports import free_port
from testkit.procs import kill_process

EP = [sys.executable, "-m", "edgeproxy"]


def test_version_and_help_on_every_command() -> None:
    out = subprocess.run([*EP, "--version"], capture_output=True, text=True, check=True)
    assert re.search(r"edgeproxy, version \d+\.\d+", out.stdout)
    for cmd in (
        ["run"],
        ["check"],
        ["demo"],
        ["certs", "list"],
        ["certs", "status"],
        ["certs", "issue"],
        ["storage", "check"],
        ["storage", "clean"],
        ["doctor"],
    ):
        res = subprocess.run([*EP, *cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0, (cmd, res.stderr)
        assert "Usage:" in res.stdout


def test_check_valid_and_invalid(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[tls]\nissuer = "internal"\n[[routes]]\nsni = ["*"]\ndefault = true\nupstreams = ["127.0.0.1:8080"]\n'
    )
    res = subprocess.run([*EP, "check", "-c", str(good)], capture_output=True, text=True)
    assert res.returncode == 0 and "OK" in res.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nlisten = ["nope"]\nproxy_protocol = "v9"\n[[routes]]\nupstreams = []\n'
    )
    res = subprocess.run([*EP, "check", "-c", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert (
        "server.listen:" in res.stderr
        and "server.proxy_protocol:" in res.stderr
        and "routes[0]" in res.stderr
    )
    missing = subprocess.run(
        [*EP, "check", "-c", str(tmp_path / "nope.toml")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr


@pytest.mark.parametrize("default_sni", ["localhost", "127.0.0.1", "intranet"])
def test_check_and_run_refuse_a_default_sni_that_can_never_get_a_certificate(
    tmp_path: Path, default_sni: str
) -> None:
    # Every client without SNI would get no_certificate:invalid_name: say so before serving.
    cfg = tmp_path / "edge.toml"
    routes = '[[routes]]\nsni = ["*"]\ndefault = true\nupstreams = ["127.0.0.1:8080"]\n'
    tls = f'[tls]\nissuer = "internal"\ndefault_sni = "{default_sni}"\n'
    storage = f'[storage]\npath = "{tmp_path / "state"}"\n[admin]\nlisten = ""\n'
    cfg.write_text(tls + storage + routes)
    for cmd in ("check", "run"):
        res = subprocess.run([*EP, cmd, "-c", str(cfg)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, (cmd, res.stdout, res.stderr)
        assert f"tls.default_sni: '{default_sni}' can never get a certificate" in res.stderr
        assert "Traceback" not in res.stderr

    if default_sni[0].isdigit():
        return  # static certificates are matched by DNS names only
    # A static certificate for the name serves it: then the name is fine.
    ca = trustme.CA()
    leaf = ca.issue_cert(default_sni)
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "leaf.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "leaf.key"))
    static = (
        f'[[certificates]]\ncert = "{tmp_path / "leaf.pem"}"\nkey = "{tmp_path / "leaf.key"}"\n'
    )
    cfg.write_text(tls + storage + routes + static)
    res = subprocess.run([*EP, "check", "-c", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_demo_prints_a_curl_command_that_works(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *EP,
            "demo",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            "",
            "--state-dir",
            str(tmp_path / "demo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.strip().startswith("curl "):
                break
        assert line.strip().startswith("curl "), "demo did not print a curl command"
        res = subprocess.run(
            shlex.split(line.strip()) + ["-sS", "--fail"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        assert "Hello from the edgeproxy demo upstream" in res.stdout
        assert oct((tmp_path / "demo").stat().st_mode & 0o777) == oct(0o700)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        kill_process(proc)


def _start_demo(tmp_path: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*EP, "demo", "--listen", f"127.0.0.1:{port}", "--admin", ""]
        + ["--state-dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def test_demo_on_a_busy_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = _start_demo(tmp_path, busy.getsockname()[1])
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "cannot listen (Address already in use)" in lines[0]


def test_demo_serves_localhost_and_127_0_0_1_and_its_ca_exists_before_the_port_opens(
    tmp_path: Path,
) -> None:
    port = free_port()
    ca = tmp_path / "demo" / "ca.pem"
    proc = _start_demo(tmp_path, port)
    try:
        # Poll the port as a client would, and look for the CA the instant it accepts.
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the demo never opened its port"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                time.sleep(0.005)
                continue
            assert ca.is_file() and b"BEGIN CERTIFICATE" in ca.read_bytes()
            break
        # curl sends no SNI for an IP literal: the no-SNI certificate must carry the address.
        for url in (f"https://localhost:{port}/", f"https://127.0.0.1:{port}/"):
            res = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", str(ca), url],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert res.returncode == 0, (url, res.stderr)
            assert "Hello from the edgeproxy demo upstream" in res.stdout
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert f"curl --cacert {ca} https://localhost:{port}/" in out
    finally:
        kill_process(proc)


@pytest.mark.parametrize("cmd", [["certs", "list"], ["storage", "check"]])
def test_inspection_commands_on_fresh_storage(tmp_path: Path, cmd: list[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[tls]\nissuer = "internal"\n[storage]\npath = "{tmp_path / "st"}"\n'
        '[[routes]]\nsni = ["*"]\ndefault = true\nupstreams = ["127.0.0.1:8080"]\n'
    )
    (tmp_path / "st").mkdir(mode=0o700)
    res = subprocess.run(
        [*EP, *cmd, "-c", str(cfg)], capture_output=True, text=True, env={**os.environ}
    )
    assert res.returncode == 0, res.stderr
