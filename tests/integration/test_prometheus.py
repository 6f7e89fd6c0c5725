"""Operations proof, monitoring half: a real Prometheus scrapes a real edgeproxy process.

The story: ``edgeproxy run`` (a subprocess, so its metrics registry holds this test's traffic
and nothing else) serves known traffic; Debian's ``prometheus`` scrapes the admin ``/metrics``
every second with ``deploy/prometheus/edgeproxy-rules.yml`` loaded; its HTTP API must then
report exactly that traffic, evaluate every rule without error, and fire the one alert the
traffic deserves. The rules themselves are checked by ``promtool check rules`` and their unit
tests by ``promtool test rules``, so CI runs both.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.file import FileStorage
from testkit.ports import free_port
from testkit.prometheus import (
    DEADLINE,
    ROOT,
    RULES,
    Prometheus,
    acme_probe,
    needs_prometheus,
    wait_ready,
)
from testkit.proxy import base_config, edgeproxy_subprocess
from testkit.tomlw import toml_dumps
from testkit.upstreams import http_handler, start_upstream

RULE_TESTS = ROOT / "deploy" / "prometheus" / "edgeproxy-rules.test.yml"
PROMTOOL = shutil.which("promtool")

BODY = b"hello from upstream\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n"

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing (Debian package prometheus; tests/run installs it)"
)


# ---------------------------------------------------------------------- the rules, offline


@needs_promtool
def test_rules_file_passes_promtool_check() -> None:
    assert PROMTOOL is not None
    res = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
def test_rules_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    res = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULE_TESTS.parent,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\w+)\s*$", RULES.read_text(), flags=re.MULTILINE)


def test_every_alert_is_tested_both_firing_and_silent() -> None:
    """A rule with only a "fires" test may fire always; one with only "silent" may never fire."""
    fired: set[str] = set()
    silent: set[str] = set()
    current: str | None = None
    for line in RULE_TESTS.read_text().splitlines():
        m = re.match(r"^\s*alertname:\s*(\w+)\s*$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"^\s*exp_alerts:\s*(\[\])?\s*$", line)
        if m and current is not None:
            (silent if m.group(1) else fired).add(current)
            current = None
    names = alert_names()
    assert len(names) == len(set(names)), "duplicate alert names"
    assert len(names) >= 5
    assert set(names) - fired == set(), "alerts never shown firing"
    assert set(names) - silent == set(), "alerts never shown silent"
    assert (fired | silent) - set(names) == set(), "tests for alerts that do not exist"


# ---------------------------------------------------------------------- a real edgeproxy




@dataclass
class Edge:
    """An ``edgeproxy run`` subprocess and what a test needs to talk to it."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    ca_path: Path
    log_path: Path

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


async def prepare_edge(tmp_path: Path, upstream: str) -> tuple[Path, int, int, Path]:
    """Config file, ports and the internal CA (made now, so the test can trust it)."""
    port, admin_port = free_port(), free_port()
    cfg = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": [upstream], "alpn": ["http/1.1"]}],
        server={"listen": [f"127.0.0.1:{port}"]},
        admin={"listen": f"127.0.0.1:{admin_port}"},
        tls={"maintenance_interval": 1.0},
    )
    config_path = tmp_path / "edgeproxy.toml"
    config_path.write_text(toml_dumps(cfg))
    storage = FileStorage(cfg["storage"]["path"])
    try:
        ca_pem = await InternalIssuer(storage).ca_certificate_pem()
    finally:
        await storage.aclose()
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(ca_pem)
    return config_path, port, admin_port, ca_path


@pytest.fixture
async def edge(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Edge]:
    up = await start_upstream(nursery, http_handler(BODY))
    config_path, port, admin_port, ca_path = await prepare_edge(tmp_path, up.addr)
    log_path = tmp_path / "edgeproxy.log"
    # Wait on the admin port: a probe of the proxy port would count as traffic. The proxy
    # socket listens before the admin one, so connections made afterwards are queued.
    with edgeproxy_subprocess(
        config_path, host="127.0.0.1", port=admin_port, log_path=log_path
    ) as proc:
        yield Edge(proc, port, admin_port, ca_path, log_path)


async def tls_get(port: int, ca_path: Path, name: str = "app.example.test") -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca_path))
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname=name)
    try:
        await tls.send_all(REQUEST)
        return await read_to_eof(tls)
    finally:
        await trio.aclose_forcefully(tls)


async def raw_exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(data)
        return await read_to_eof(stream)
    finally:
        await trio.aclose_forcefully(stream)




async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(DEADLINE):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
    return data


def http() -> httpx.AsyncClient:
    # trust_env=False: a proxy set in the environment must never see these loopback requests.
    return httpx.AsyncClient(trust_env=False, timeout=DEADLINE)


def exported(text: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return {
        (s.name, frozenset(s.labels.items()))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_alerting_counters_are_exported_from_startup(edge: Edge) -> None:
    """``increase()`` needs a sample before the first event: a labelled counter that appears
    only when first incremented makes Prometheus miss that event, so an alert on the first
    failed renewal, rejected reload or refused connection after a restart never fires."""
    async with http() as c:
        text = (await c.get(f"{edge.admin_url}/metrics")).text
    series = exported(text)
    wanted = [
        ("edgeproxy_certificate_renewals_total", "outcome", "failed"),
        ("edgeproxy_acme_orders_total", "outcome", "failed"),
        ("edgeproxy_acme_orders_total", "outcome", "valid"),
        ("edgeproxy_connections_refused_total", "limit", "max_connections"),
        ("edgeproxy_connections_refused_total", "limit", "max_connections_per_ip"),
        ("edgeproxy_connections_refused_total", "limit", "accept_error"),
        ("edgeproxy_connections_closed_total", "reason", "upstream_unreachable"),
        ("edgeproxy_config_reloads_total", "result", "rejected"),
        ("edgeproxy_storage_errors_total", "operation", "corrupt_record"),
    ]
    missing = [
        f'{name}{{{label}="{value}"}}'
        for name, label, value in wanted
        if (name, frozenset({(label, value)})) not in series
    ]
    assert missing == []
    assert ("edgeproxy_acme_validation_without_pending_challenge_total", frozenset()) in series


# ---------------------------------------------------------------------- a real Prometheus










@needs_prometheus
async def test_prometheus_sees_exactly_the_traffic_and_alerts_on_it(
    edge: Edge, start_prometheus: Callable[[int], Prometheus]
) -> None:
    prom = start_prometheus(edge.admin_port)
    async with http() as c:
        await wait_ready(c, prom)
        # One scrape before the traffic: the counters' zeros are what increase() starts from.
        await prom.wait_for(c, 'up{job="edgeproxy"}', 1)
        await prom.wait_for(c, "edgeproxy_acme_validation_without_pending_challenge_total", 0)

        for _ in range(5):
            assert (await tls_get(edge.port, edge.ca_path)).endswith(BODY)
        for _ in range(2):
            answer = await raw_exchange(edge.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.")  # the "this port speaks TLS" hint
        await raw_exchange(edge.port, b"\x00\x01 not a TLS record at all\r\n")
        await acme_probe(edge.port, "app.example.test")

        # Every connection closed and counted, and a maintenance pass saw the certificate.
        await prom.wait_for(c, "sum(edgeproxy_connections_closed_total)", 9)
        await prom.wait_for(c, 'edgeproxy_certificates{state="valid"}', 1)

        expected = {
            "edgeproxy_connections_accepted_total": 9,
            "edgeproxy_connections_active": 0,
            'edgeproxy_connections_closed_total{reason="ok"}': 5,
            'edgeproxy_connections_closed_total{reason="plain_http"}': 2,
            'edgeproxy_connections_closed_total{reason="not_tls"}': 1,
            'edgeproxy_connections_closed_total{reason="acme_no_pending_challenge"}': 1,
            'edgeproxy_client_hellos_total{result="ok"}': 6,
            'edgeproxy_client_hellos_total{result="http"}': 2,
            'edgeproxy_client_hellos_total{result="not_tls"}': 1,
            'edgeproxy_tls_handshakes_total{result="ok"}': 5,
            'sum(edgeproxy_tls_handshakes_total{result!="ok"}) or vector(0)': 0,
            "edgeproxy_tls_handshake_duration_seconds_count": 5,
            "sum(edgeproxy_upstream_connect_duration_seconds_count)": 5,
            'edgeproxy_bytes_total{direction="to_upstream"}': 5 * len(REQUEST),
            "edgeproxy_acme_validation_without_pending_challenge_total": 1,
            'edgeproxy_acme_orders_total{outcome="valid"}': 1,  # one name, issued once
            'sum(edgeproxy_on_demand_decisions_total{result="allow"})': 1,
        }
        got = {q: await prom.value(c, q) for q in expected}
        assert got == expected
        to_client = await prom.value(c, 'edgeproxy_bytes_total{direction="to_client"}')
        assert to_client is not None and to_client > 5 * len(BODY)

        # Internal CA leaves live 30 days: far from the 7-day alert.
        expiry = await prom.value(c, "edgeproxy_certificate_earliest_expiry_timestamp_seconds")
        assert expiry is not None and 29 * 86400 < expiry - time.time() <= 30 * 86400

        await check_rules_and_alerts(c, prom)


async def check_rules_and_alerts(c: httpx.AsyncClient, prom: Prometheus) -> None:
    """Every rule evaluates cleanly against real series, and the one alert this traffic
    deserves (a validation with no pending challenge) fires, alone."""
    with trio.move_on_after(DEADLINE):
        while True:
            groups = (await c.get(f"{prom.url}/api/v1/rules")).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if rules and all(r["health"] == "ok" for r in rules):
                break
            await trio.sleep(0.2)
    assert sorted(r["name"] for r in rules) == sorted(alert_names())
    for r in rules:
        assert r["health"] == "ok", r
        assert r["labels"]["severity"] in {"critical", "warning"}, r["name"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["name"]

    want = {("EdgeproxyValidationWithoutPendingChallenge", "firing")}
    active: set[tuple[str, str]] = set()
    with trio.move_on_after(DEADLINE):
        while active != want:
            alerts = (await c.get(f"{prom.url}/api/v1/alerts")).json()["data"]["alerts"]
            active = {(a["labels"]["alertname"], a["state"]) for a in alerts}
            await trio.sleep(0.2)
    assert active == want, prom.logs()
