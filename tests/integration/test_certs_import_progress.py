"""Progress and Ctrl-C of ``edgeproxy certs import``, as real subprocesses.

A Caddy storage folder of 300 certificate pairs (trustme, as in test_certs_import). Under a
pseudo-terminal the command draws a tqdm bar that moves; with pipes it prints plain lines;
SIGINT halfway stops it after the pair in flight, it says how many pairs it imported, and
storage holds exactly those, each whole: the record loads, its chain and key are the input
pair's, and its renewal is planned.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.storage.file import FileStorage
from testkit.cli import EP, config
from testkit.terminal import assert_bar_moved, env, interrupted, on_a_terminal

N = 300
DEADLINE = 60.0


def name(i: int) -> str:
    return f"p{i:03d}.import.example.test"


def caddy_folder(tmp_path: Path) -> Path:
    """certificates/<issuer>/<name>/<name>.crt and .key, as CertMagic keeps them."""
    ca = trustme.CA().create_child_ca()
    root = tmp_path / "caddy"
    for i in range(N):
        folder = root / "certificates" / "acme-v02.example" / name(i)
        folder.mkdir(parents=True)
        leaf = ca.issue_cert(name(i))
        (folder / f"{name(i)}.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (folder / f"{name(i)}.key").write_bytes(leaf.private_key_pem.bytes())
    return root


def command(tmp_path: Path) -> list[str]:
    return [*EP, "certs", "import", "-c", str(config(tmp_path)),
            "--from-caddy", str(caddy_folder(tmp_path))]  # fmt: skip


def test_on_a_terminal_a_progress_bar_moves(tmp_path: Path) -> None:
    text = on_a_terminal(command(tmp_path))
    assert_bar_moved(text, N)
    assert text.count(": imported, valid until") == N


def test_without_a_terminal_plain_lines(tmp_path: Path) -> None:
    res = subprocess.run(command(tmp_path), capture_output=True, timeout=DEADLINE,
                         env=env(EDGEPROXY_PROGRESS_INTERVAL="0"), check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    err = res.stderr.decode()
    assert "\r" not in err and "\x1b" not in err  # no bar, no terminal codes
    lines = err.splitlines()
    counts = [int(m.group(1)) for line in lines
              if (m := re.fullmatch(r"certificates: (\d+)/300 \(\d+%\)", line))]  # fmt: skip
    assert len(counts) == len(lines), lines  # nothing else on stderr
    # Interval 0: a line per pair, and the last one again at the end.
    assert counts == [*range(1, N + 1), N], counts
    assert res.stdout.decode().count(": imported, valid until") == N


async def test_ctrl_c_halfway_stops_between_pairs_and_keeps_every_certificate_whole(
    tmp_path: Path,
) -> None:
    out, err_rest = interrupted(command(tmp_path), "certificates", N // 2)
    m = re.search(rb"stopped by Ctrl-C: (\d+) of 300 certificate pairs imported, each whole",
                  err_rest)  # fmt: skip
    assert m is not None, err_rest
    imported = int(m.group(1))
    assert N // 2 <= imported < N, imported
    assert b"Traceback" not in err_rest
    assert out.decode().count(": imported, valid until") == imported

    storage = FileStorage(tmp_path / "state")
    try:
        stored = sorted(item.key for item in await storage.list("certs/"))
        expected = [name(i) for i in range(imported)]  # the folder is imported in name order
        assert stored == sorted(cert_key(n) for n in expected)
        assert sorted(await storage.scheduled_names()) == expected  # renewal planned for each
        folder = tmp_path / "caddy" / "certificates" / "acme-v02.example"
        for n in expected:
            raw = await storage.get(cert_key(n))
            assert raw is not None
            rec = CertRecord.from_json(raw)
            given_chain = x509.load_pem_x509_certificates((folder / n / f"{n}.crt").read_bytes())
            assert rec.chain() == given_chain
            given_key = serialization.load_pem_private_key(
                (folder / n / f"{n}.key").read_bytes(), password=None)  # fmt: skip
            stored_key = rec.private_key()
            der = serialization.PublicFormat.SubjectPublicKeyInfo
            assert stored_key.public_key().public_bytes(serialization.Encoding.DER, der) == (
                given_key.public_key().public_bytes(serialization.Encoding.DER, der)
            )
    finally:
        await storage.aclose()
