"""The admin ASGI app driven in memory: every endpoint, auth, errors, readiness while draining.

The app runs under ``httpx.ASGITransport`` (no socket). Storage is the real ``FileStorage`` on a
temp dir and the allow-check is the real ``OnDemandPolicy``; only the certificate manager is a
small stand-in (``RecordingCerts``), because issuance itself is not what these tests are about.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy import metrics
from edgeproxy.admin.app import AdminApp, make_admin_app
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import status_key
from edgeproxy.certs.status import DomainStatus
from edgeproxy.storage.base import StoredItem
from edgeproxy.storage.file import FileStorage

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-admin-token"
NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z


@dataclass
class ProxyState:
    draining: bool = False
    bound: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 8443)])


class RecordingCerts:
    """Stands in for CertificateManager: keeps statuses, records ``obtain`` calls."""

    def __init__(self, policy: OnDemandPolicy) -> None:
        self.policy = policy
        self.known: dict[str, DomainStatus] = {}
        self.obtained: list[tuple[str, bool]] = []
        self.issuance_fails = False
        self.broken = False

    def statuses(self) -> list[DomainStatus]:
        if self.broken:
            raise RuntimeError("secret internal detail")
        return sorted(self.known.values(), key=lambda s: s.name)

    def status(self, name: str) -> DomainStatus | None:
        return self.known.get(name)

    async def obtain(self, name: str, *, force: bool = False) -> object:
        self.obtained.append((name, force))
        await trio.lowlevel.checkpoint()
        if self.issuance_fails:
            self.known[name] = DomainStatus(
                name, "failing", failures=1, last_error="CA said no",
                last_error_type="urn:ietf:params:acme:error:caa", hint="a CAA record ...",
                updated_at=NOW,
            )
            return None
        self.known[name] = DomainStatus(name, "valid", not_after=NOW + 90 * 86400, updated_at=NOW)
        return object()


class StalledStorage:
    """Storage that never answers: the database hangs."""

    async def get(self, key: str) -> bytes | None:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def list(self, prefix: str = "") -> list[StoredItem]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


@dataclass
class Runtime:
    storage: Any
    certs: RecordingCerts
    proxy: ProxyState = field(default_factory=ProxyState)


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "store")


@pytest.fixture
def rt(storage: FileStorage) -> Runtime:
    policy = OnDemandPolicy(allow=["*.example.net"])
    return Runtime(storage, RecordingCerts(policy))


def client_for(rt: Runtime, token: str | None = None) -> httpx.AsyncClient:
    app = make_admin_app(rt, token=token)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")


@pytest.fixture
async def client(rt: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(rt) as c:
        yield c


@pytest.fixture
async def authed(rt: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(rt, TOKEN) as c:
        yield c


def break_storage(storage: FileStorage) -> None:
    """A symlink loop where ``status/`` should be: every listing fails with ELOOP."""
    data = storage.root / "data"
    data.mkdir(parents=True)
    os.symlink("status", data / "status")


async def store_status(storage: FileStorage, st: DomainStatus) -> None:
    """What another process's certificate manager leaves behind."""
    await storage.put(status_key(st.name), st.to_json())


def sample_value(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in the exposition")


# ---------------------------------------------------------------------- health and readiness


async def test_healthz_says_ok(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok\n")
    assert r.headers["content-type"].startswith("text/plain")


async def test_head_answers_like_get_without_a_body(rt: Runtime) -> None:
    # Raw ASGI: an HTTP client would hide a body wrongly sent after a HEAD.
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "HEAD", "path": "/healthz", "query_string": b"",
             "headers": []}
    await AdminApp(rt, token=None)(scope, receive, send)  # type: ignore[arg-type]
    start, body = sent
    assert start["status"] == 200
    assert (b"content-length", b"3") in start["headers"]
    assert body == {"type": "http.response.body", "body": b""}


async def test_ready_when_listening_and_storage_answers(client: httpx.AsyncClient) -> None:
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "listeners": [["127.0.0.1", 8443]]}


async def test_not_ready_while_draining(client: httpx.AsyncClient, rt: Runtime) -> None:
    rt.proxy.draining = True
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["reason"] == "draining"


async def test_not_ready_before_listeners_are_bound(client: httpx.AsyncClient, rt: Runtime) -> None:
    rt.proxy.bound = []
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["reason"] == "not_listening"


async def test_not_ready_when_storage_fails(
    client: httpx.AsyncClient, storage: FileStorage
) -> None:
    break_storage(storage)
    r = await client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["reason"] == "storage_error"
    assert "list failed" in body["detail"]


async def test_storage_failure_after_ready_degrades_but_stays_ready(
    client: httpx.AsyncClient, storage: FileStorage
) -> None:
    assert (await client.get("/readyz")).status_code == 200
    break_storage(storage)
    r = await client.get("/readyz")
    # Cached certificates still serve: pulling every replica out of the load balancer
    # during a database blip would turn it into an outage.
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True and body["degraded"] == "storage_error"


async def test_not_ready_when_storage_hangs(autojump_clock: trio.abc.Clock, rt: Runtime) -> None:
    rt.storage = StalledStorage()
    async with client_for(rt) as c:
        r = await c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["reason"] == "storage_timeout"


# ---------------------------------------------------------------------- metrics


async def test_metrics_exposes_the_default_registry(client: httpx.AsyncClient) -> None:
    accepted = "edgeproxy_connections_accepted_total"
    before = sample_value((await client.get("/metrics")).text, accepted)
    metrics.CONNECTIONS_ACCEPTED.inc(3)
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    assert sample_value(r.text, accepted) == before + 3


def count_connections_in_child(multiproc_dir: Path, n: int) -> None:
    """A separate process (a "worker") counts ``n`` accepted connections and exits."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    code = f"from edgeproxy import metrics; metrics.CONNECTIONS_ACCEPTED.inc({n})"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)


@pytest.fixture
def multiproc_dir(tmp_path: Path) -> Path:
    path = tmp_path / "prom"
    path.mkdir()
    return path


async def test_metrics_aggregate_worker_processes(
    client: httpx.AsyncClient, multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await trio.to_thread.run_sync(count_connections_in_child, multiproc_dir, 5)
    await trio.to_thread.run_sync(count_connections_in_child, multiproc_dir, 7)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc_dir))
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert sample_value(r.text, "edgeproxy_connections_accepted_total") == 12


# ---------------------------------------------------------------------- domains


async def test_domains_lists_this_process_then_stored_statuses(
    client: httpx.AsyncClient, rt: Runtime, storage: FileStorage
) -> None:
    rt.certs.known["a.example.net"] = DomainStatus(
        "a.example.net", "valid", not_after=NOW, ari_window=(NOW - 60, NOW), updated_at=NOW,
    )
    # Another replica stored a status for a name this process never saw...
    await store_status(storage, DomainStatus("b.example.net", "failing"))
    # ...and an older one for a name this process knows: the live status wins.
    await store_status(storage, DomainStatus("a.example.net", "issuing"))
    await storage.put(status_key("c.example.net"), b"{not json")

    r = await client.get("/v1/domains")
    assert r.status_code == 200
    body = r.json()
    assert [(d["name"], d["state"], d["source"]) for d in body] == [
        ("a.example.net", "valid", "process"),
        ("b.example.net", "failing", "storage"),
    ]
    a = body[0]
    assert a["not_after"] == NOW
    assert a["not_after_iso"] == "2025-06-15T15:06:40+00:00"
    assert a["ari_window_iso"] == ["2025-06-15T15:05:40+00:00", "2025-06-15T15:06:40+00:00"]
    assert a["renew_at"] is None and a["renew_at_iso"] is None


async def test_domains_still_lists_this_process_when_storage_fails(
    client: httpx.AsyncClient, rt: Runtime, storage: FileStorage
) -> None:
    rt.certs.known["a.example.net"] = DomainStatus("a.example.net", "valid")
    break_storage(storage)
    r = await client.get("/v1/domains")
    assert r.status_code == 200
    assert [d["name"] for d in r.json()] == ["a.example.net"]
    assert r.headers["edgeproxy-partial"] == "storage unavailable"


@pytest.mark.parametrize(
    ("asked", "stored_as"),
    [
        ("Shop.Example.NET.", "shop.example.net"),
        ("bücher.example.net", "xn--bcher-kva.example.net"),
    ],
)
async def test_one_domain_by_normalised_name(
    client: httpx.AsyncClient, rt: Runtime, asked: str, stored_as: str
) -> None:
    rt.certs.known[stored_as] = DomainStatus(stored_as, "valid")
    r = await client.get(f"/v1/domains/{asked}")
    assert r.status_code == 200
    assert r.json()["name"] == stored_as


async def test_one_domain_known_only_from_storage(
    client: httpx.AsyncClient, storage: FileStorage
) -> None:
    await store_status(storage, DomainStatus("far.example.net", "denied"))
    r = await client.get("/v1/domains/FAR.example.net")
    assert r.status_code == 200
    assert (r.json()["state"], r.json()["source"]) == ("denied", "storage")


async def test_unknown_domain_is_404_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/domains/Nobody.Example.NET")
    assert r.status_code == 404
    assert r.json()["error"] == "unknown_domain"
    assert r.json()["name"] == "nobody.example.net"


async def test_invalid_domain_name_is_400(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/domains/" + "a" * 300)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_name"


# ---------------------------------------------------------------------- issuance


async def test_issue_allowed_name(client: httpx.AsyncClient, rt: Runtime) -> None:
    r = await client.post("/v1/domains/Shop.Example.NET/issue")
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["state"]) == ("shop.example.net", "valid")
    assert rt.certs.obtained == [("shop.example.net", False)]


async def test_issue_with_force(client: httpx.AsyncClient, rt: Runtime) -> None:
    r = await client.post("/v1/domains/shop.example.net/issue?force=true")
    assert r.status_code == 200
    assert rt.certs.obtained == [("shop.example.net", True)]


async def test_issue_denied_name_never_reaches_the_issuer(
    client: httpx.AsyncClient, rt: Runtime
) -> None:
    r = await client.post("/v1/domains/evil.example.com/issue")
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "denied"
    assert body["decision"] == {
        "allowed": False, "source": "none", "reason": "denied",
        "detail": "no allow pattern matches",
    }
    assert rt.certs.obtained == []


async def test_issue_failure_is_502_with_the_status(client: httpx.AsyncClient, rt: Runtime) -> None:
    rt.certs.issuance_fails = True
    r = await client.post("/v1/domains/shop.example.net/issue")
    assert r.status_code == 502
    body = r.json()
    assert (body["state"], body["last_error_type"]) == ("failing", "urn:ietf:params:acme:error:caa")
    assert body["hint"]


# ---------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/metrics"), ("GET", "/readyz"), ("GET", "/v1/domains"),
     ("GET", "/v1/domains/a.example.net"), ("POST", "/v1/domains/a.example.net/issue"),
     ("GET", "/no/such/path")],
)
async def test_token_required_everywhere_but_healthz(
    authed: httpx.AsyncClient, rt: Runtime, authorization: str | None, method: str, path: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    r = await authed.request(method, path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == "unauthorized"
    assert rt.certs.obtained == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_right_token_is_accepted(authed: httpx.AsyncClient, scheme: str) -> None:
    r = await authed.get("/readyz", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert r.status_code == 200


async def test_healthz_needs_no_token(authed: httpx.AsyncClient) -> None:
    assert (await authed.get("/healthz")).status_code == 200


async def test_no_token_configured_means_no_auth(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 200


def test_empty_token_is_refused(rt: Runtime) -> None:
    with pytest.raises(ValueError, match="empty"):
        make_admin_app(rt, token="")


# ---------------------------------------------------------------------- routing and errors


@pytest.mark.parametrize(
    "path", ["/", "/v1", "/v1/domains/", "/v1/domains/a.example.net/renew", "/healthz/x"]
)
async def test_unknown_paths_are_404(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/v1/domains/a.example.net", "GET, HEAD"),
        ("GET", "/v1/domains/a.example.net/issue", "POST"),
        ("PUT", "/healthz", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405(
    client: httpx.AsyncClient, rt: Runtime, method: str, path: str, allow: str
) -> None:
    r = await client.request(method, path)
    assert r.status_code == 405
    assert r.headers["allow"] == allow
    assert rt.certs.obtained == []


async def test_a_failing_handler_gives_500_without_a_traceback(
    client: httpx.AsyncClient, rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    rt.certs.broken = True
    r = await client.get("/v1/domains")
    assert r.status_code == 500
    assert r.json()["error"] == "internal"
    assert "Traceback" not in r.text and "secret internal detail" not in r.text
    assert "secret internal detail" in caplog.text  # the operator finds it in the log


async def test_lifespan_startup_and_shutdown(rt: Runtime) -> None:
    app = AdminApp(rt, token=None)
    to_app_send, to_app_recv = trio.open_memory_channel[dict[str, Any]](2)
    from_app_send, from_app_recv = trio.open_memory_channel[dict[str, Any]](2)
    await to_app_send.send({"type": "lifespan.startup"})
    await to_app_send.send({"type": "lifespan.shutdown"})
    with trio.fail_after(5):
        await app({"type": "lifespan"}, to_app_recv.receive, from_app_send.send)  # type: ignore[arg-type]
    assert [(await from_app_recv.receive())["type"] for _ in range(2)] == [
        "lifespan.startup.complete", "lifespan.shutdown.complete",
    ]
