"""`edgeproxy certs import --cert --key`: a certificate made elsewhere is served from storage
without any order, renewed through the configured issuer on schedule later, and a bad pair is
reported by path with nothing stored. Real files, the real CLI, the real proxy."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeproxy.certs.importer import IMPORTED_ISSUER, import_pair, read_pair
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.issuers.base import IssueRequest
from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.file import FileStorage
from testkit.cli import cli, config
from testkit.ondemand import NO_NONCE_CHAOS
from testkit.pebble import Pebble
from testkit.ports import free_port
from testkit.procs import stop_process
from testkit.proxy import base_config, running_proxy

NAMES = ["imp.example.test", "www.imp.example.test"]


def write_pair(tmp_path: Path, leaf: trustme.LeafCert, stem: str = "site") -> tuple[Path, Path]:
    cert, key = tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key




async def served_leaf(port: int, name: str, ca: trustme.CA) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        with trio.fail_after(10):
            await tls.do_handshake()
        der = tls.getpeercert(binary_form=True)
    finally:
        await trio.aclose_forcefully(tls)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_imported_certificate_is_served_without_an_order(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.create_child_ca().issue_cert(*NAMES)
    cert, key = write_pair(tmp_path, leaf)
    cfg_path = config(tmp_path)
    res = await cli("certs", "import", "-c", str(cfg_path), "--cert", str(cert), "--key", str(key))
    assert res.returncode == 0, res.stderr.decode()
    for name in NAMES:
        assert f"{name}: imported".encode() in res.stdout
    expected = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    storage = FileStorage(tmp_path / "state")
    assert sorted(await storage.scheduled_names()) == sorted(NAMES)  # renewal gets planned
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
                      on_demand={"allow": []})  # fmt: skip
    async with running_proxy(tmp_path, cfg) as p:
        for name in NAMES:  # the chain's intermediate comes along: the client trusts the root
            assert (await served_leaf(p.port, name, ca)).serial_number == expected.serial_number
    again = await cli("certs", "import", "-c", str(cfg_path), "--cert", str(cert), "--key", str(key))
    assert again.returncode == 0 and b"kept the stored certificate" in again.stdout


def expired_pair(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=100))
        .not_valid_after(now - datetime.timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("old.example.test")]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    c, k = tmp_path / "old.crt", tmp_path / "old.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))  # fmt: skip
    return c, k


async def test_bad_pairs_are_reported_by_path_and_nothing_is_stored(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, _ = write_pair(tmp_path, ca.issue_cert("a.example.test"), "a")
    _, other_key = write_pair(tmp_path, ca.issue_cert("b.example.test"), "b")
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"not a certificate\n")
    old_cert, old_key = expired_pair(tmp_path)
    wildcard_cert, wildcard_key = write_pair(tmp_path, ca.issue_cert("*.example.test"), "w")
    cfg_path = config(tmp_path)
    cases = [
        (cert, other_key, other_key, "does not belong to the leaf"),
        (garbage, other_key, garbage, "no PEM certificate"),
        (cert, tmp_path / "missing.key", tmp_path / "missing.key", "cannot read"),
        (cert, cert, cert, "not an unencrypted PEM private key"),
        (old_cert, old_key, old_cert, "expired"),
        (wildcard_cert, wildcard_key, wildcard_cert, "no DNS name"),
    ]
    for c, k, blamed, why in cases:
        res = await cli("certs", "import", "-c", str(cfg_path), "--cert", str(c), "--key", str(k))
        err = res.stderr.decode()
        assert res.returncode == 1, (c, k, err)
        assert str(blamed) in err and why in err, err
    assert await FileStorage(tmp_path / "state").list("certs/") == []


async def test_imported_certificate_is_renewed_on_schedule(tmp_path: Path) -> None:
    # Made by another CA (a second internal issuer's storage), adopted, then renewed by ours
    # when its backstop time comes: an ordinary renewal, no ARI, no replaces.
    elsewhere = FileStorage(tmp_path / "elsewhere")
    key = ec.generate_private_key(ec.SECP256R1())
    issued = await InternalIssuer(elsewhere).issue(IssueRequest(("renew.example.test",), key))
    cert_path, key_path = tmp_path / "r.crt", tmp_path / "r.key"
    cert_path.write_bytes(issued.chain_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    storage = FileStorage(tmp_path / "state")
    (rec,) = read_pair(cert_path, key_path)
    assert rec.issuer_id == IMPORTED_ISSUER
    await import_pair(storage, [rec])

    class Clock:
        now = time.time()

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    issuer = InternalIssuer(storage)
    mgr = CertificateManager(storage=storage, issuer=issuer, clock=clock,
                             policy=OnDemandPolicy(allow=["*.example.test"]))  # fmt: skip
    # Passes called directly, on the injected clock.
    await mgr.maintenance_once()  # planned: not due yet
    st = mgr.status("renew.example.test")
    assert st is not None and st.renew_at is not None and st.renew_at > clock.now
    assert st.renewal_source == "backstop"
    raw = await storage.get(cert_key("renew.example.test"))
    assert raw is not None and CertRecord.from_json(raw).serial == rec.serial
    clock.now = st.renew_at + 1
    await mgr.maintenance_once()
    raw = await storage.get(cert_key("renew.example.test"))
    assert raw is not None
    renewed = CertRecord.from_json(raw)
    assert renewed.serial != rec.serial and renewed.issuer_id == issuer.id


# -- from a Caddy storage folder ---------------------------------------------------------------

CADDY_NAMES = ["one.caddy.example.test", "two.caddy.example.test"]


def caddy_config(tmp_path: Path, pebble: Pebble, port: int) -> Path:
    cfg = {
        "admin": {"disabled": True},
        "storage": {"module": "file_system", "root": str(tmp_path / "caddy")},
        "apps": {
            "http": {
                "http_port": free_port(),  # never 80
                "https_port": port,
                "servers": {"s": {"listen": [f"127.0.0.1:{port}"],
                                  "automatic_https": {"disable_redirects": True},
                                  "routes": [{"handle": [{"handler": "static_response",
                                                          "body": "caddy"}]}]}},
            },
            "tls": {
                "certificates": {"automate": CADDY_NAMES},
                "automation": {"policies": [{
                    "subjects": CADDY_NAMES,
                    "key_type": "p256",
                    "issuers": [{
                        "module": "acme", "ca": pebble.directory_url,
                        "email": "caddy@example.org",
                        "trusted_roots_pem_files": [str(pebble.ca_bundle_path)],
                        "challenges": {"http": {"disabled": True},
                                       "tls-alpn": {"alternate_port": port}},
                    }],
                }]},
            },
        },
    }  # fmt: skip
    path = tmp_path / "caddy.json"
    path.write_text(json.dumps(cfg))
    return path


def caddy_files(tmp_path: Path) -> dict[str, Path]:
    found = {}
    for name in CADDY_NAMES:
        for crt in (tmp_path / "caddy" / "certificates").glob(f"*/{name}/{name}.crt"):
            if crt.with_suffix(".key").is_file():
                found[name] = crt
    return found


@pytest.mark.skipif(shutil.which("caddy") is None, reason="Debian's caddy is not installed")
async def test_a_caddy_storage_folder_is_adopted(
    tmp_path: Path, make_pebble: Callable[..., Pebble]
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    caddy = subprocess.Popen(["caddy", "run", "--config", str(caddy_config(tmp_path, pebble, port))],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        with trio.fail_after(90):  # real CertMagic files, from real ACME orders against pebble
            while len(caddy_files(tmp_path)) < len(CADDY_NAMES):
                if caddy.poll() is not None:
                    raise AssertionError(caddy.stderr.read().decode() if caddy.stderr else "")
                await trio.sleep(0.3)
    finally:
        stop_process(caddy, grace=10)
    validated_for_caddy = {name: pebble_validations(pebble, name) for name in CADDY_NAMES}
    assert all(validated_for_caddy.values())
    # A stray folder CertMagic would never write, and a key that belongs to another name.
    stray = tmp_path / "caddy" / "certificates" / "acme-x" / "bad.example.test"
    stray.mkdir(parents=True)
    shutil.copy(caddy_files(tmp_path)[CADDY_NAMES[0]], stray / "bad.example.test.crt")
    shutil.copy(caddy_files(tmp_path)[CADDY_NAMES[1]].with_suffix(".key"),
                stray / "bad.example.test.key")  # fmt: skip
    cfg_path = config(tmp_path)
    res = await cli("certs", "import", "-c", str(cfg_path), "--from-caddy", str(tmp_path / "caddy"))
    assert res.returncode == 1  # one pair skipped
    assert str(stray / "bad.example.test.key") in res.stderr.decode()
    for name in CADDY_NAMES:
        assert f"{name}: imported".encode() in res.stdout, res.stdout
    roots = tmp_path / "pebble-roots.pem"
    roots.write_bytes(pebble.roots_pem())
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
                      on_demand={"allow": []})  # fmt: skip
    async with running_proxy(tmp_path, cfg) as p:
        for name, crt in caddy_files(tmp_path).items():
            ctx = ssl.create_default_context(cafile=str(roots))
            tcp = await trio.open_tcp_stream("127.0.0.1", p.port)
            tls = trio.SSLStream(tcp, ctx, server_hostname=name)
            with trio.fail_after(10):
                await tls.do_handshake()
            der = tls.getpeercert(binary_form=True)
            await trio.aclose_forcefully(tls)
            assert der == x509.load_pem_x509_certificate(crt.read_bytes()).public_bytes(
                serialization.Encoding.DER
            )
    # Pebble validated for Caddy's orders and no other: edgeproxy ordered nothing.
    assert {name: pebble_validations(pebble, name) for name in CADDY_NAMES} == validated_for_caddy


def pebble_validations(pebble: Pebble, name: str) -> int:
    log = (pebble.workdir / "pebble.log").read_text(errors="replace")
    return len(re.findall(rf'Pulled a task .*Value:"{re.escape(name)}"', log))
