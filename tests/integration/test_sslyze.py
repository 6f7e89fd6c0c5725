"""An outside judge of the TLS configuration: sslyze's Mozilla "intermediate" compliance check.

sslyze (PyPI, its own venv: see testkit/sslyze.py) scans a running edgeproxy the way an
auditor would: protocol versions, cipher suites and their order, key exchange groups, the
certificate's key, signature and lifetime, and the chain against the issuer's CA. Nobody here
wrote the profile it checks against, so a default drifting from it (OpenSSL's X448 and P-521
groups were one) fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from testkit.http_proxy import proxy_to_http
from testkit.sslyze import sslyze_command


@pytest.mark.parametrize("key_type", ["ec256", "rsa2048"])
async def test_mozilla_intermediate_compliance(
    tmp_path: Path, nursery: trio.Nursery, key_type: str
) -> None:
    command = await trio.to_thread.run_sync(sslyze_command)  # builds its venv on first use
    async with proxy_to_http(tmp_path, nursery, tls={"key_type": key_type}) as p:
        assert p.ca_path is not None
        target = f"sslyze.example.test:{p.port}{{{p.host}}}"  # SNI name, then the address
        with trio.fail_after(180):
            done = await trio.run_process(
                [
                    *command,
                    "--mozilla_config=intermediate",
                    "--certinfo_ca_file",
                    str(p.ca_path),
                    target,
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out[-3000:] + done.stderr.decode(errors="replace")[-2000:]
    assert f"sslyze.example.test:{p.port}: OK - Compliant" in out, out[-3000:]
