"""The admin API over real TCP: hypercorn on trio, binding, auth, graceful stop, a whole process.

First ``serve_admin`` alone with a hand-made runtime (its socket, its shutdown), then the real
thing: ``run_process`` with the demo config, spoken to with httpx on loopback while it serves,
issues a certificate on request, and drains after SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.admin import server
from edgeproxy.admin.server import serve_admin
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.status import DomainStatus
from edgeproxy.config import AdminConfig, Config
from edgeproxy.demo import demo_config, start_hello_upstream
from edgeproxy.errors import ConfigError
from edgeproxy.secret_env import admin_secrets
from edgeproxy.storage.base import StoredItem
from testkit.ports import free_port

TOKEN = "integration-admin-token"
ACCEPTED = "edgeproxy_connections_accepted_total"
DEADLINE = 20.0  # generous bound on any single wait; never a timing assertion


def http() -> httpx.AsyncClient:
    # trust_env=False: a proxy set in the environment must never see these loopback requests.
    return httpx.AsyncClient(trust_env=False, timeout=DEADLINE)


def url(addr: tuple[str, int], path: str) -> str:
    return f"http://{addr[0]}:{addr[1]}{path}"


def sample_value(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in the exposition")


async def refused(addr: tuple[str, int]) -> bool:
    try:
        stream = await trio.open_tcp_stream(*addr)
    except OSError:
        return True
    await stream.aclose()
    return False


# ---------------------------------------------------------------------- serve_admin alone


class GatedStorage:
    """Storage whose listing waits for the test to let it answer."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()

    async def get(self, key: str) -> bytes | None:
        return None

    async def list(self, prefix: str = "") -> list[StoredItem]:
        self.entered.set()
        await self.release.wait()
        return []


@dataclass
class ProxyState:
    draining: bool = False
    bound: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 8443)])


class NoCerts:
    def __init__(self) -> None:
        self.policy = OnDemandPolicy(allow=[])

    def statuses(self) -> list[DomainStatus]:
        return []

    def status(self, name: str) -> DomainStatus | None:
        return None

    async def issue_now(self, name: str, *, force: bool = False) -> object:
        raise AssertionError("nothing is allowed, so nothing is issued")


class RecordingCerts(NoCerts):
    """Allows ``*.example.net`` and records what it was asked to issue."""

    def __init__(self) -> None:
        self.policy = OnDemandPolicy(allow=["*.example.net"])
        self.obtained: list[tuple[str, bool]] = []

    async def issue_now(self, name: str, *, force: bool = False) -> object:
        self.obtained.append((name, force))
        return object()


@dataclass
class HandmadeRuntime:
    cfg: Config
    storage: GatedStorage = field(default_factory=GatedStorage)
    certs: NoCerts = field(default_factory=NoCerts)
    proxy: ProxyState = field(default_factory=ProxyState)
    admin_bound: tuple[str, int] | None = None


def config_with_admin(tmp_path: Path, **admin: Any) -> Config:
    cfg = demo_config(tmp_path / "state", "127.0.0.1:0", ("127.0.0.1", 9), admin="127.0.0.1:0")
    return cfg.model_copy(update={"admin": AdminConfig(**admin)})


@dataclass
class RunningAdmin:
    addr: tuple[str, int]
    stop: Callable[[], None]
    stopped: trio.Event


@pytest.fixture
async def start_admin(
    nursery: trio.Nursery,
) -> AsyncIterator[Callable[[HandmadeRuntime], Awaitable[RunningAdmin]]]:
    """``await start_admin(rt)`` serves the admin API; pytest-trio cancels it at test end."""

    async def start(rt: HandmadeRuntime) -> RunningAdmin:
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            try:
                with scope:
                    await serve_admin(rt, admin_secrets(rt.cfg.admin), task_status=task_status)
            finally:
                stopped.set()

        addr = await nursery.start(run)
        return RunningAdmin(addr, scope.cancel, stopped)

    yield start


async def test_port_zero_reports_the_bound_address(
    tmp_path: Path, start_admin: Callable[[HandmadeRuntime], Awaitable[RunningAdmin]]
) -> None:
    rt = HandmadeRuntime(config_with_admin(tmp_path, listen="127.0.0.1:0"))
    admin = await start_admin(rt)
    host, port = admin.addr
    assert host == "127.0.0.1" and port != 0
    assert rt.admin_bound == admin.addr
    async with http() as c:
        r = await c.get(url(admin.addr, "/healthz"))
        head = await c.head(url(admin.addr, "/healthz"))
    assert (r.status_code, r.text) == (200, "ok\n")
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "3")
    assert "server" not in r.headers


async def test_token_is_enforced_over_tcp(
    tmp_path: Path, start_admin: Callable[[HandmadeRuntime], Awaitable[RunningAdmin]]
) -> None:
    rt = HandmadeRuntime(config_with_admin(tmp_path, listen="127.0.0.1:0", token=TOKEN))
    rt.storage.release.set()
    admin = await start_admin(rt)
    async with http() as c:
        assert (await c.get(url(admin.addr, "/healthz"))).status_code == 200
        assert (await c.get(url(admin.addr, "/metrics"))).status_code == 401
        ok = await c.get(url(admin.addr, "/metrics"), headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert ACCEPTED in ok.text


async def test_token_from_environment(
    tmp_path: Path,
    start_admin: Callable[[HandmadeRuntime], Awaitable[RunningAdmin]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEPROXY_TEST_ADMIN_TOKEN", TOKEN)
    cfg = config_with_admin(tmp_path, listen="127.0.0.1:0", token_env="EDGEPROXY_TEST_ADMIN_TOKEN")
    rt = HandmadeRuntime(cfg)
    rt.storage.release.set()
    admin = await start_admin(rt)
    async with http() as c:
        assert (await c.get(url(admin.addr, "/v1/domains"))).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = await c.get(url(admin.addr, "/v1/domains"), headers=auth)
    assert (r.status_code, r.json()) == (200, [])


def curl(*args: str) -> tuple[int, str]:
    """``curl`` as an operator runs it: status code and body."""
    res = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", "20", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=60, check=True,
    )
    body, _, code = res.stdout.rpartition("\n")
    return int(code), body


async def test_cross_site_and_rebinding_requests_are_refused_over_tcp(
    tmp_path: Path, start_admin: Callable[[HandmadeRuntime], Awaitable[RunningAdmin]]
) -> None:
    certs = RecordingCerts()
    rt = HandmadeRuntime(config_with_admin(tmp_path, listen="127.0.0.1:0"), certs=certs)
    rt.storage.release.set()
    admin = await start_admin(rt)
    issue = url(admin.addr, "/v1/domains/shop.example.net/issue?force=1")
    # The review's probe: what a page on evil.example can send without a CORS preflight.
    attack = ["-X", "POST", "-H", "Origin: https://evil.example",
              "-H", "Content-Type: text/plain", "--data", "x", issue]
    code, body = await trio.to_thread.run_sync(lambda: curl(*attack))
    assert code == 403 and json.loads(body)["error"] == "cross_site_request"
    # A page that rebound its own name to 127.0.0.1 is "same origin"; its Host still says who.
    rebound = f"evil.example:{admin.addr[1]}"
    rebinding = ["-X", "POST", "-H", f"Host: {rebound}", "-H", f"Origin: http://{rebound}",
                 "-H", "Edgeproxy-Request: 1", issue]
    code, body = await trio.to_thread.run_sync(lambda: curl(*rebinding))
    assert code == 403 and json.loads(body)["error"] == "foreign_host"
    assert certs.obtained == []
    # What the README documents for operators.
    code, body = await trio.to_thread.run_sync(
        lambda: curl("-X", "POST", "-H", "Edgeproxy-Request: 1", issue)
    )
    assert code == 200, body
    assert certs.obtained == [("shop.example.net", True)]


async def test_metrics_token_over_tcp(
    tmp_path: Path,
    start_admin: Callable[[HandmadeRuntime], Awaitable[RunningAdmin]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEPROXY_TEST_METRICS_TOKEN", "prometheus-only")
    cfg = config_with_admin(
        tmp_path, listen="127.0.0.1:0", token=TOKEN, metrics_token_env="EDGEPROXY_TEST_METRICS_TOKEN"
    )
    rt = HandmadeRuntime(cfg, certs=RecordingCerts())
    rt.storage.release.set()
    admin = await start_admin(rt)
    scrape = {"Authorization": "Bearer prometheus-only"}
    async with http() as c:
        metrics = await c.get(url(admin.addr, "/metrics"), headers=scrape)
        ready = await c.get(url(admin.addr, "/readyz"), headers=scrape)
        domains = await c.get(url(admin.addr, "/v1/domains"), headers=scrape)
        issue = await c.post(
            url(admin.addr, "/v1/domains/shop.example.net/issue"),
            headers={**scrape, "Edgeproxy-Request": "1"},
        )
        full = await c.get(url(admin.addr, "/v1/domains"), headers={"Authorization": f"Bearer {TOKEN}"})
    assert (metrics.status_code, ready.status_code) == (200, 200)
    assert ACCEPTED in metrics.text
    assert (domains.status_code, issue.status_code) == (403, 403)
    assert full.status_code == 200


async def test_metrics_token_equal_to_the_admin_token_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEPROXY_TEST_METRICS_TOKEN", TOKEN)
    cfg = config_with_admin(
        tmp_path, listen="127.0.0.1:0", token=TOKEN, metrics_token_env="EDGEPROXY_TEST_METRICS_TOKEN"
    )
    with pytest.raises(ConfigError, match=r"admin\.metrics_token_env"):
        await serve_admin(HandmadeRuntime(cfg), admin_secrets(cfg.admin))


async def test_in_flight_request_finishes_when_cancelled(
    tmp_path: Path, start_admin: Callable[[HandmadeRuntime], Awaitable[RunningAdmin]]
) -> None:
    rt = HandmadeRuntime(config_with_admin(tmp_path, listen="127.0.0.1:0"))
    admin = await start_admin(rt)
    answers: list[httpx.Response] = []

    async def ask_ready() -> None:
        async with http() as c:
            answers.append(await c.get(url(admin.addr, "/readyz")))

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as clients:
            clients.start_soon(ask_ready)
            await rt.storage.entered.wait()  # the request is inside the app now
            admin.stop()
            # Let shutdown go as far as it can while the request is still in flight.
            await trio.testing.wait_all_tasks_blocked()
            rt.storage.release.set()
    assert [r.status_code for r in answers] == [200]
    with trio.fail_after(DEADLINE):
        await admin.stopped.wait()
    assert await refused(admin.addr)


async def test_a_stuck_request_cannot_hold_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "GRACEFUL_TIMEOUT", 0.2)
    rt = HandmadeRuntime(config_with_admin(tmp_path, listen="127.0.0.1:0"))
    failures: list[BaseException] = []

    async def ask_ready(addr: tuple[str, int]) -> None:
        try:
            async with http() as c:
                await c.get(url(addr, "/readyz"))
        except httpx.HTTPError as exc:
            failures.append(exc)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                with scope:
                    await serve_admin(rt, admin_secrets(rt.cfg.admin), task_status=task_status)

            addr = await nursery.start(run)
            nursery.start_soon(ask_ready, addr)
            await rt.storage.entered.wait()
            scope.cancel()  # storage never answers: only the grace deadline ends this
    assert len(failures) == 1  # the stuck request was cut off, and serve_admin returned
    assert await refused(addr)


async def test_busy_port_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        rt = HandmadeRuntime(config_with_admin(tmp_path, listen=f"127.0.0.1:{port}"))
        with pytest.raises(ConfigError, match=r"admin\.listen: cannot listen"):
            await serve_admin(rt, admin_secrets(rt.cfg.admin))


async def test_non_loopback_without_a_token_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validation accepts token_env; the variable being unset must not open the API to all.
    # 192.0.2.1 (TEST-NET-1) is not ours: even a regression could not listen there.
    monkeypatch.delenv("EDGEPROXY_TEST_UNSET_TOKEN", raising=False)
    cfg = config_with_admin(tmp_path, listen="192.0.2.1:0", token_env="EDGEPROXY_TEST_UNSET_TOKEN")
    with pytest.raises(ConfigError, match=r"admin\.token_env"):
        await serve_admin(HandmadeRuntime(cfg), admin_secrets(cfg.admin))


# ---------------------------------------------------------------------- a whole process


async def test_whole_process_admin_api(tmp_path: Path, nursery: trio.Nursery) -> None:
    from edgeproxy.app import Runtime, run_process

    upstream = await start_hello_upstream(nursery)
    cfg = demo_config(
        tmp_path / "state", f"127.0.0.1:{free_port()}", upstream, admin="127.0.0.1:0"
    ).model_copy(update={"admin": AdminConfig(listen="127.0.0.1:0", token=TOKEN)})
    proxy_addr = ("127.0.0.1", cfg.server.listen_addresses()[0].port)
    finished = trio.Event()

    async def run(*, task_status: trio.TaskStatus[Runtime]) -> None:
        try:
            await run_process(cfg, task_status=task_status)
        finally:
            finished.set()

    rt: Runtime = await nursery.start(run)
    admin: tuple[str, int] = getattr(rt, "admin_bound")  # noqa: B009 (lead: add the field)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async with http() as c:
        assert (await c.get(url(admin, "/healthz"))).status_code == 200
        assert (await c.get(url(admin, "/readyz"))).status_code == 401
        ready = await c.get(url(admin, "/readyz"), headers=auth)
        assert ready.status_code == 200, ready.text
        assert ready.json()["listeners"] == [list(proxy_addr)]

        before = sample_value((await c.get(url(admin, "/metrics"), headers=auth)).text, ACCEPTED)
        held = await trio.open_tcp_stream(*proxy_addr)  # sends nothing: keeps the drain waiting
        with trio.fail_after(DEADLINE):
            while True:
                text = (await c.get(url(admin, "/metrics"), headers=auth)).text
                if sample_value(text, ACCEPTED) > before:
                    break
                await trio.sleep(0.01)

        scripted = {**auth, "Edgeproxy-Request": "1"}
        issued = await c.post(url(admin, "/v1/domains/WWW.edgeproxy.test./issue"), headers=scripted)
        assert issued.status_code == 200, issued.text
        assert (issued.json()["name"], issued.json()["state"]) == ("www.edgeproxy.test", "valid")
        assert issued.json()["not_after_iso"].startswith("20")

        one = await c.get(url(admin, "/v1/domains/www.edgeproxy.test"), headers=auth)
        assert (one.status_code, one.json()["state"]) == (200, "valid")
        listed = await c.get(url(admin, "/v1/domains"), headers=auth)
        assert "www.edgeproxy.test" in [d["name"] for d in listed.json()]

        denied = await c.post(url(admin, "/v1/domains/shop.example.com/issue"), headers=scripted)
        assert denied.status_code == 403
        assert denied.json()["decision"]["allowed"] is False
        unknown = await c.get(url(admin, "/v1/domains/shop.example.com"), headers=auth)
        assert unknown.status_code == 404

        # SIGTERM: the process drains (the held connection keeps it busy) and says so.
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(DEADLINE):
            while True:
                r = await c.get(url(admin, "/readyz"), headers=auth)
                if r.status_code == 503:
                    break
                await trio.sleep(0.01)
        assert r.json()["reason"] == "draining"
        assert (await c.get(url(admin, "/healthz"))).status_code == 200

    await held.aclose()  # the last connection ends: drain completes, the process exits
    with trio.fail_after(DEADLINE):
        await finished.wait()
    assert await refused(admin)
