"""Secrets stay secret: file modes after real issuance, nothing signed or secret in debug logs,
an admin API that refuses to open up without a token, and one name however it is spelled.

* FileStorage after a real issuance (internal CA, and ACME through pebble): every folder
  0700, every file holding a private key 0600 (the ACME account key, the CA, the records).
* ``[log] level = "debug"`` (text and JSON) during an ACME issuance: no PEM private key, no
  JWS member names (``"protected"``, ``"signature"``) and no base64url JSON (a JWS part
  starts with ``eyJ``) anywhere in the log.
* Admin API: a non-loopback ``admin.listen`` without a token fails config validation, and
  ``edgeproxy run`` with an unset ``token_env`` refuses to start rather than bind; with a
  token, every endpoint but ``/healthz`` answers 401 without the right bearer token.
* SNI ``SHOP.Example.TEST.`` routes by and is issued for ``shop.example.test``: one
  certificate, one storage record, whatever case and trailing dot the clients use.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from OpenSSL import SSL

from edgeproxy.config import load_config_data
from edgeproxy.errors import ConfigError
from testkit.hardening import (
    PING,
    REPO_ROOT,
    client_context,
    edgeproxy_process,
    establish,
    make_internal_ca,
    proxy_config,
    receive_exactly,
    toml_dumps,
)
from testkit.pebble import Pebble, pebble_for_proxy
from testkit.ports import free_port
from testkit.tlsstream import TLSStream

TOKEN = "hardening-admin-token-7f3c"
# A JWS (RFC 7515) part: base64url of a JSON object starts with "eyJ" ('{"').
BASE64URL_JSON = re.compile(r"eyJ[A-Za-z0-9_-]{12,}")
MINIMAL: dict[str, Any] = {
    "on_demand": {"allow": ["*.example.test"]},
    "routes": [{"default": True, "upstreams": ["127.0.0.1:1"]}],
}


def modes(root: Path) -> tuple[dict[Path, int], dict[Path, int]]:
    """(folder -> mode, key-holding file -> mode) under ``root``, root included."""
    folders = {root: stat.S_IMODE(root.stat().st_mode)}
    keys: dict[Path, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            path = Path(dirpath) / d
            folders[path] = stat.S_IMODE(path.stat().st_mode)
        for f in filenames:
            path = Path(dirpath) / f
            if b"PRIVATE KEY" in path.read_bytes():
                keys[path] = stat.S_IMODE(path.stat().st_mode)
    return folders, keys


def assert_private(root: Path, expect_keys: int) -> None:
    folders, keys = modes(root)
    assert {p: oct(m) for p, m in folders.items() if m != 0o700} == {}
    assert {p: oct(m) for p, m in keys.items() if m != 0o600} == {}
    assert len(keys) >= expect_keys, sorted(keys)


# --- file modes ---------------------------------------------------------------------------


async def test_internal_issuance_leaves_keys_0600_in_0700_folders(
    tmp_path: Path, echo_upstream: str
) -> None:
    state = tmp_path / "state"
    port = free_port()
    # No pre-made CA: the proxy creates it, so its own writes are what is checked.
    cfg = proxy_config(state, port, echo_upstream)
    async with edgeproxy_process(tmp_path, cfg):
        for tls in await establish(port, 1, "modes.example.test", client_context(None)):
            await tls.aclose()
    # The CA record and the certificate record both hold a private key.
    assert_private(state, expect_keys=2)
    assert (state / "data" / "certs" / "modes.example.test.json").exists()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_acme_issuance_debug_logs_hold_no_secret_and_keys_are_private(
    tmp_path: Path, echo_upstream: str, make_pebble: Callable[..., Pebble], log_format: str
) -> None:
    roots = tmp_path / "roots.pem"
    port, pebble = pebble_for_proxy(make_pebble, roots)
    state = tmp_path / "state"
    cfg = proxy_config(
        state,
        port,
        echo_upstream,
        tls={"issuer": "acme", "default_sni": None},
        acme={"directory": pebble.directory_url, "trust": str(pebble.ca_bundle_path)},
        on_demand={"allow": ["*.example.test"], "wait": 30},
        log={"level": "debug", "format": log_format},
    )
    async with edgeproxy_process(tmp_path, cfg) as ep:
        for tls in await establish(port, 1, "secret.example.test", client_context(roots)):
            await tls.aclose()
        log = ep.log_text()
    # The log really is at debug level and really covers the ACME conversation.
    assert ("DEBUG" in log) or ('"level": "debug"' in log)
    assert "secret.example.test" in log
    assert "PRIVATE KEY" not in log
    assert '"protected"' not in log and "'protected'" not in log
    assert '"signature"' not in log and "'signature'" not in log
    assert BASE64URL_JSON.findall(log) == []
    # The account key, the certificate record: both secret, in private folders.
    account_keys = list((state / "data" / "acme" / "accounts").iterdir())
    assert account_keys
    assert_private(state, expect_keys=2)


# --- the admin API ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9901", "[::]:9901", "192.0.2.1:9901", "10.1.2.3:0", "127.1:9901"]
)
def test_config_refuses_a_non_loopback_admin_without_token(listen: str) -> None:
    cfg = {"admin": {"listen": listen}, **MINIMAL}
    with pytest.raises(ConfigError) as err:
        load_config_data(cfg)
    assert any("admin" in p and "token" in p for p in err.value.problems), err.value.problems
    # The same address with a token is accepted.
    load_config_data({**cfg, "admin": {"listen": listen, "token": TOKEN}})


@pytest.mark.parametrize("listen", ["127.0.0.1:9901", "[::1]:9901", "localhost:9901"])
def test_config_accepts_a_loopback_admin_without_token(listen: str) -> None:
    load_config_data({"admin": {"listen": listen}, **MINIMAL})


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "edgeproxy.toml"
    path.write_text(toml_dumps(cfg))
    return path


def test_check_and_run_refuse_an_open_admin_api(tmp_path: Path) -> None:
    base = proxy_config(tmp_path / "state", free_port(), "127.0.0.1:1")
    # No token at all: validation fails, `check` says which key and exits 2.
    open_cfg = _write(tmp_path, {**base, "admin": {"listen": "0.0.0.0:9901"}})
    res = subprocess.run(
        [sys.executable, "-m", "edgeproxy", "check", "-c", str(open_cfg)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert res.returncode == 2 and "admin" in res.stderr and "token" in res.stderr, res.stderr
    # token_env names a variable that is unset: `run` must refuse before binding anything.
    # (192.0.2.1 is TEST-NET-1, never local: even a regression could not listen there.)
    env_cfg = _write(
        tmp_path,
        {**base, "admin": {"listen": "192.0.2.1:9901", "token_env": "EDGEPROXY_HARDENING_UNSET"}},
    )
    env = {k: v for k, v in os.environ.items() if k != "EDGEPROXY_HARDENING_UNSET"}
    res = subprocess.run(
        [sys.executable, "-m", "edgeproxy", "run", "-c", str(env_cfg)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "admin.token_env" in res.stderr and "EDGEPROXY_HARDENING_UNSET" in res.stderr


@pytest.mark.parametrize("via_env", [False, True])
async def test_admin_api_answers_401_without_the_bearer_token(
    tmp_path: Path, echo_upstream: str, via_env: bool
) -> None:
    admin_port = free_port()
    admin: dict[str, Any] = {"listen": f"127.0.0.1:{admin_port}"}
    env: dict[str, str] = {}
    if via_env:
        admin["token_env"] = "EDGEPROXY_HARDENING_TOKEN"
        env["EDGEPROXY_HARDENING_TOKEN"] = TOKEN
    else:
        admin["token"] = TOKEN
    cfg = proxy_config(tmp_path / "state", free_port(), echo_upstream, admin=admin)
    base = f"http://127.0.0.1:{admin_port}"
    requests = [
        ("GET", "/metrics"),
        ("GET", "/readyz"),
        ("GET", "/v1/domains"),
        ("GET", "/v1/domains/shop.example.test"),
        ("POST", "/v1/domains/shop.example.test/issue"),
        ("GET", "/no/such/endpoint"),
        ("HEAD", "/metrics"),
    ]
    wrong = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"X-Admin-Token": TOKEN},
    ]
    async with edgeproxy_process(tmp_path, cfg, env=env):
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=20) as http:
            for method, path in requests:
                for headers in wrong:
                    r = await http.request(method, path, headers=headers)
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert TOKEN not in r.text
                good = {"Authorization": f"Bearer {TOKEN}", "Edgeproxy-Request": "1"}
                r = await http.request(method, path, headers=good)
                assert r.status_code not in (401, 403), (method, path, r.status_code)
            # Liveness stays open: a load balancer probes it without credentials.
            assert (await http.get("/healthz")).status_code == 200


# --- one name, however spelled --------------------------------------------------------------


def _client(ca: Path, sni: bytes) -> SSL.Connection:
    """pyOpenSSL sends the SNI bytes exactly as given (no lower-casing, dot kept)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    conn = SSL.Connection(ctx, None)
    conn.set_tlsext_host_name(sni)
    conn.set_connect_state()
    return conn


async def _request(port: int, ca: Path, sni: bytes) -> tuple[x509.Certificate, bytes]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = TLSStream(tcp, _client(ca, sni))
    try:
        with trio.fail_after(30):
            await tls.do_handshake()
            await tls.send_all(PING)
            answer = await receive_exactly(tls, len(PING))
        cert = tls.connection.get_peer_certificate()
        assert cert is not None
        return cert.to_cryptography(), answer
    finally:
        await trio.aclose_forcefully(tls)


async def test_sni_is_normalised_before_routing_and_issuance(
    tmp_path: Path, echo_upstream: str, nursery: trio.Nursery
) -> None:
    state = tmp_path / "state"
    ca = await make_internal_ca(state)
    port = free_port()

    async def wrong_route(stream: trio.SocketStream) -> None:
        await stream.send_all(b"wrong route\n" + b"-" * len(PING))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, wrong_route, listeners)
    wrong = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    cfg = proxy_config(state, port, echo_upstream)
    cfg["routes"] = [
        {"sni": ["shop.example.test"], "upstreams": [echo_upstream]},
        {"sni": ["*"], "default": True, "upstreams": [wrong]},
    ]
    spellings = [
        b"SHOP.Example.TEST.",
        b"shop.example.test",
        b"Shop.Example.Test",
        b"SHOP.EXAMPLE.TEST",
    ]
    async with edgeproxy_process(tmp_path, cfg) as ep:
        results: list[tuple[x509.Certificate, bytes]] = []

        async def one(sni: bytes) -> None:
            results.append(await _request(port, ca, sni))

        # All at once first: whatever the spelling, one issuance (single flight per name).
        async with trio.open_nursery() as clients:
            for sni in spellings * 3:
                clients.start_soon(one, sni)
        results.append(await _request(port, ca, b"SHOP.Example.TEST."))
        log = ep.log_text()
    assert all(answer == PING for _, answer in results), "routed to the wrong upstream"
    serials = {cert.serial_number for cert, _ in results}
    assert len(serials) == 1
    san = results[0][0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["shop.example.test"]
    assert sorted(p.name for p in (state / "data" / "certs").iterdir()) == [
        "shop.example.test.json"
    ]
    assert log.count("certificate issued for shop.example.test") == 1
    assert "SHOP" not in log and "Shop" not in log
