"""``edgeproxy doctor NAME`` against the real thing, one onboarding story per test.

Every verdict is produced for real: pebble-challtestsrv is the customer's DNS (programmed
through its management API), edgeproxy runs in-process with file storage shared with the
doctor, Debian's HAProxy plays the load balancer (terminating TLS, or relaying TCP with
PROXY v2), and the CLI runs as a real subprocess where the exit code matters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from edgeproxy.doctor import Diagnosis, Finding, diagnose
from edgeproxy.storage.file import FileStorage
from testkit.pebble import CHALLTESTSRV, TlsAlpnResponder
from testkit.ports import free_port
from testkit.procs import stop_process
from testkit.proxy import RunningProxy, base_config, running_proxy, wait_port

pytestmark = pytest.mark.skipif(
    shutil.which(CHALLTESTSRV) is None, reason="pebble-challtestsrv is not installed"
)
needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy missing")

NAME = "shop.customer.test"
TARGET = "edge.example.test"
LB_ADDRESS = "127.0.0.20"  # the "load balancer" (HAProxy) in the stories that have one
REPO = Path(__file__).resolve().parents[2]


# --- the customer's DNS --------------------------------------------------------------------


@dataclass
class MockDns:
    """pebble-challtestsrv as an authoritative DNS with no default answers."""

    dns_port: int
    management_port: int

    @property
    def nameserver(self) -> tuple[str, int]:
        return "127.0.0.1", self.dns_port

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        async with httpx.AsyncClient() as http:
            response = await http.post(f"http://127.0.0.1:{self.management_port}{path}", json=body)
            response.raise_for_status()

    async def cname(self, host: str, target: str) -> None:
        await self._post("/set-cname", {"host": host, "target": target})

    async def a(self, host: str, *addresses: str) -> None:
        await self._post("/add-a", {"host": host, "addresses": list(addresses)})


@pytest.fixture
def mock_dns(tmp_path: Path) -> Iterator[MockDns]:
    dns = MockDns(free_port(), free_port())
    log = (tmp_path / "challtestsrv.log").open("wb")
    proc = subprocess.Popen(
        [
            CHALLTESTSRV,
            *("-http01", "", "-https01", "", "-tlsalpn01", ""),
            *("-dns01", f"127.0.0.1:{dns.dns_port}"),
            *("-management", f"127.0.0.1:{dns.management_port}"),
            # No default answers: a name resolves only if a test says so.
            *("-defaultIPv4", "", "-defaultIPv6", ""),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port("127.0.0.1", dns.management_port, timeout=10)
        yield dns
    finally:
        stop_process(proc)
        log.close()


# --- the load balancer ---------------------------------------------------------------------


@dataclass
class HAProxies:
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    async def start(
        self, backend_port: int, *, bind_options: str = "", server_options: str = ""
    ) -> int:
        """HAProxy in mode tcp on LB_ADDRESS:<returned port> in front of 127.0.0.1:backend."""
        port = free_port(LB_ADDRESS)
        conf = self.workdir / f"haproxy-{port}.cfg"
        conf.write_text(
            f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend fe
    bind {LB_ADDRESS}:{port} {bind_options}
    default_backend be
backend be
    server ep 127.0.0.1:{backend_port} {server_options}
"""
        )
        await trio.to_thread.run_sync(self._spawn, conf, self.workdir / f"haproxy-{port}.log")
        await trio.to_thread.run_sync(wait_port, LB_ADDRESS, port)
        return port

    def _spawn(self, conf: Path, log_path: Path) -> None:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


@pytest.fixture
def haproxies(tmp_path: Path) -> Iterator[HAProxies]:
    lbs = HAProxies(tmp_path)
    try:
        yield lbs
    finally:
        lbs.stop()


def lb_certificate(tmp_path: Path) -> Path:
    """What the operator put on the TLS listener: a valid-looking certificate for NAME."""
    leaf = trustme.CA().issue_cert(NAME)
    pem = tmp_path / "lb.pem"
    pem.write_bytes(
        b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + leaf.private_key_pem.bytes()
    )
    return pem


# --- edgeproxy and the doctor --------------------------------------------------------------


def proxy_config(tmp_path: Path, proxy_protocol: str = "off") -> dict[str, Any]:
    # The upstream is never dialled: acme-tls/1 connections end after the handshake.
    return base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
        server={"proxy_protocol": proxy_protocol}
        | ({"proxy_protocol_from": ["127.0.0.0/8"]} if proxy_protocol != "off" else {}),
        onboarding={"target": [TARGET]},
    )


@asynccontextmanager
async def edgeproxy(tmp_path: Path, proxy_protocol: str = "off") -> AsyncIterator[RunningProxy]:
    async with running_proxy(tmp_path, proxy_config(tmp_path, proxy_protocol)) as p:
        yield p


async def doctor(
    tmp_path: Path, dns: MockDns, port: int, *, storage_dir: str = "state", **kw: Any
) -> Diagnosis:
    storage = FileStorage(tmp_path / storage_dir)
    try:
        return await diagnose(
            NAME, targets=[TARGET], storage=storage, port=port, nameserver=dns.nameserver, **kw
        )
    finally:
        await storage.aclose()


def finding(d: Diagnosis, check: str) -> Finding:
    found = [f for f in d.findings if f.check == check]
    assert len(found) == 1, (check, d.render())
    return found[0]


async def no_challenge_left(tmp_path: Path) -> bool:
    storage = FileStorage(tmp_path / "state")
    try:
        return await storage.get_challenge(NAME) is None
    finally:
        await storage.aclose()


def write_toml(path: Path, cfg: dict[str, Any]) -> Path:
    """The few shapes our test configs use: tables of scalars/lists, and [[routes]]."""

    def table(header: str, values: dict[str, Any]) -> list[str]:
        rows = [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
        return [header, *rows, ""]

    lines: list[str] = []
    for key, value in cfg.items():
        if key != "routes":
            lines += table(f"[{key}]", value)
    for route in cfg["routes"]:
        lines += table("[[routes]]", route)
    path.write_text("\n".join(lines))
    return path


async def doctor_cli(
    tmp_path: Path, dns: MockDns, port: int, *, proxy_protocol: str = "off"
) -> tuple[int, dict[str, Any]]:
    config = write_toml(tmp_path / "doctor.toml", proxy_config(tmp_path, proxy_protocol))
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "edgeproxy",
            "doctor",
            NAME,
            "-c",
            str(config),
            "--json",
            "--port",
            str(port),
            "--nameserver",
            "{}:{}".format(*dns.nameserver),
        ],
        cwd=REPO,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr.decode()
    return result.returncode, json.loads(result.stdout)


# --- the stories ---------------------------------------------------------------------------


async def test_cname_pointing_elsewhere_is_dns_not_here(tmp_path: Path, mock_dns: MockDns) -> None:
    await mock_dns.cname(NAME, "elsewhere.example.")
    await mock_dns.a("elsewhere.example", "127.0.0.9")
    await mock_dns.a(TARGET, "127.0.0.1")
    async with edgeproxy(tmp_path) as p:
        d = await doctor(tmp_path, mock_dns, p.port)

    assert d.verdict == "dns_not_here", d.render()
    dns = finding(d, "dns")
    assert not dns.ok
    assert "CNAME elsewhere.example -> 127.0.0.9" in dns.detail
    assert dns.fix is not None and f"create a CNAME {NAME} -> {TARGET}" in dns.fix
    # The path the CA will take once DNS is fixed was probed at the target, and it works.
    assert "DNS does not point here" in finding(d, "tcp").detail
    assert finding(d, "tls").ok
    assert await no_challenge_left(tmp_path)


async def test_closed_port_is_port_closed_with_exit_code_1(
    tmp_path: Path, mock_dns: MockDns
) -> None:
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, "127.0.0.1")
    closed = free_port()  # nothing listens there

    code, doc = await doctor_cli(tmp_path, mock_dns, closed)

    assert code == 1
    assert doc["verdict"] == "port_closed" and doc["ok"] is False
    tcp = next(f for f in doc["findings"] if f["check"] == "tcp")
    assert "connection refused" in tcp["detail"]
    assert "security group" in tcp["fix"] and f"TCP {closed}" in tcp["fix"]
    assert await no_challenge_left(tmp_path)


@needs_haproxy
async def test_haproxy_terminating_tls_in_front_is_named(
    tmp_path: Path, mock_dns: MockDns, haproxies: HAProxies
) -> None:
    """The incident: the LB terminates TLS, so the CA meets the LB's certificate instead of
    the RFC 8737 one (AWS NLB's TLS listener answers internal_error; HAProxy, with no ALPN
    configured, completes the handshake with its own certificate: both are named)."""
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, LB_ADDRESS)
    async with edgeproxy(tmp_path) as p:
        lb_port = await haproxies.start(p.port, bind_options=f"ssl crt {lb_certificate(tmp_path)}")
        d = await doctor(tmp_path, mock_dns, lb_port)

    assert d.verdict == "tls_terminated_in_front", d.render()
    tls = finding(d, "tls")
    assert "negotiated ALPN none" in tls.detail
    assert f"DNS names: {NAME}" in tls.detail and "no acmeIdentifier extension" in tls.detail
    assert tls.fix is not None and "mode tcp without 'ssl'" in tls.fix
    assert await no_challenge_left(tmp_path)


async def test_edgeproxy_expecting_proxy_v2_reached_directly_is_a_mismatch(
    tmp_path: Path, mock_dns: MockDns
) -> None:
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, "127.0.0.1")
    async with edgeproxy(tmp_path, proxy_protocol="v2") as p:
        d = await doctor(tmp_path, mock_dns, p.port, proxy_protocol="v2")

    assert d.verdict == "proxy_protocol_mismatch", d.render()
    assert "without a byte" in finding(d, "tls").detail
    pp = finding(d, "proxy_protocol")
    assert pp.fix is not None
    assert "enable proxy protocol v2 on the target group" in pp.fix
    assert 'server.proxy_protocol = "off"' in pp.fix
    # Behind the header it is us: the PROXY setting is the only thing to fix.
    assert finding(d, "tls+proxy_v2").ok


@needs_haproxy
async def test_lb_sending_proxy_v2_to_edgeproxy_without_it_is_reported_as_observed(
    tmp_path: Path, mock_dns: MockDns, haproxies: HAProxies
) -> None:
    """The other direction cannot be told from "no healthy target" from outside: the doctor
    says so instead of guessing, and names the metric that tells them apart."""
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, LB_ADDRESS)
    async with edgeproxy(tmp_path, proxy_protocol="off") as p:
        lb_port = await haproxies.start(p.port, server_options="send-proxy-v2")
        d = await doctor(tmp_path, mock_dns, lb_port, proxy_protocol="off")

    assert d.verdict == "error", d.render()
    pp = finding(d, "proxy_protocol")
    assert "load balancer sends PROXY headers" in pp.detail
    assert 'server.proxy_protocol = "off"' in pp.detail
    assert pp.fix is not None
    assert 'edgeproxy_client_hellos_total{result="proxy_protocol"}' in pp.fix


async def test_healthy_direct_path_is_ok_and_leaves_storage_clean(
    tmp_path: Path, mock_dns: MockDns
) -> None:
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, "127.0.0.1")
    async with edgeproxy(tmp_path) as p:
        d = await doctor(tmp_path, mock_dns, p.port)

    assert d.verdict == "ok", d.render()
    assert all(f.ok for f in d.findings)
    assert [f.check for f in d.findings] == ["dns", "storage", "tcp", "tls"]
    assert await no_challenge_left(tmp_path)


@needs_haproxy
async def test_healthy_path_through_haproxy_with_proxy_v2_exits_0_through_the_cli(
    tmp_path: Path, mock_dns: MockDns, haproxies: HAProxies
) -> None:
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, LB_ADDRESS)
    async with edgeproxy(tmp_path, proxy_protocol="v2") as p:
        lb_port = await haproxies.start(p.port, server_options="send-proxy-v2")
        code, doc = await doctor_cli(tmp_path, mock_dns, lb_port, proxy_protocol="v2")

    assert code == 0, doc
    assert doc["verdict"] == "ok" and doc["ok"] is True and doc["name"] == NAME
    assert all(f["ok"] and f["fix"] is None for f in doc["findings"])
    tcp = next(f for f in doc["findings"] if f["check"] == "tcp")
    assert f"{LB_ADDRESS}:{lb_port}" in tcp["detail"]
    assert await no_challenge_left(tmp_path)


async def test_a_pending_real_validation_is_used_and_left_alone(
    tmp_path: Path, mock_dns: MockDns
) -> None:
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, "127.0.0.1")
    real = "real-token.real-thumbprint"
    storage = FileStorage(tmp_path / "state")
    try:
        await storage.put_challenge(NAME, real, 600)
        async with edgeproxy(tmp_path) as p:
            d = await doctor(tmp_path, mock_dns, p.port)

        assert d.verdict == "ok", d.render()
        assert "left storage untouched" in finding(d, "storage").detail
        assert await storage.get_challenge(NAME) == real
    finally:
        await storage.aclose()


async def test_replica_with_other_storage_is_not_edgeproxy(
    tmp_path: Path, mock_dns: MockDns
) -> None:
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, "127.0.0.1")
    async with edgeproxy(tmp_path) as p:
        # The doctor's config points at other storage than the edgeproxy it reaches.
        d = await doctor(tmp_path, mock_dns, p.port, storage_dir="another-deployment")

    assert d.verdict == "not_edgeproxy", d.render()
    tls = finding(d, "tls")
    assert "unrecognized_name" in tls.detail
    assert tls.fix is not None and "storage" in tls.fix


async def test_another_acme_responder_with_another_digest_is_not_edgeproxy(
    tmp_path: Path, mock_dns: MockDns, nursery: trio.Nursery
) -> None:
    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, "127.0.0.1")
    other_client = TlsAlpnResponder(free_port(), tmp_path / "other-acme-client")
    await nursery.start(other_client.serve)
    await other_client.present(NAME, "token", "another-clients-token.thumbprint")

    d = await doctor(tmp_path, mock_dns, other_client.port)

    assert d.verdict == "not_edgeproxy", d.render()
    assert "acmeIdentifier digest is not the one of our self-test token" in finding(d, "tls").detail
    assert other_client.hellos.get(NAME) == 1
    assert await no_challenge_left(tmp_path)


@needs_haproxy
async def test_http01_port_80_is_checked_through_haproxy_and_a_dead_port_named(
    tmp_path: Path, mock_dns: MockDns, haproxies: HAProxies
) -> None:
    """HTTP-01 enabled: doctor fetches a self-test token from port 80 (here HAProxy, PROXY v2,
    in front of edgeproxy's [http] listener) and withdraws it; a port nothing answers on is
    its own verdict, naming port 80's fix."""
    from edgeproxy.certs.challenges import http_challenge_key

    await mock_dns.cname(NAME, TARGET)
    await mock_dns.a(TARGET, LB_ADDRESS)
    cfg = proxy_config(tmp_path, "v2")
    cfg["http"] = {"listen": ["127.0.0.1:0"], "proxy_protocol": "v2"}
    async with running_proxy(tmp_path, cfg) as p:
        assert p.rt.http is not None
        http_port = p.rt.http.bound[0][1]
        tls_lb = await haproxies.start(p.port, server_options="send-proxy-v2")
        http_lb = await haproxies.start(http_port, server_options="send-proxy-v2")
        good = await doctor(tmp_path, mock_dns, tls_lb, http_port=http_lb)
        bad = await doctor(tmp_path, mock_dns, tls_lb, http_port=free_port(LB_ADDRESS))
    assert good.verdict == "ok", good.render()
    assert [f.check for f in good.findings] == ["dns", "storage", "tcp", "tls", "http-01"]
    assert bad.verdict == "http01_unreachable", bad.render()
    assert "could not connect" in finding(bad, "http-01").detail
    assert "[http] listen" in (finding(bad, "http-01").fix or "")
    storage = FileStorage(tmp_path / "state")
    try:
        left = [n for n, _ in await storage.list_challenges() if n.startswith("http-01.")]
    finally:
        await storage.aclose()
    assert left == [] and http_challenge_key("x").startswith("http-01.")
