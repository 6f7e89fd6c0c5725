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
from edgeproxy.certs import status_store
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.status import DomainStatus
from edgeproxy.certs.status_store import status_key
from edgeproxy.storage.base import StoredItem
from edgeproxy.storage.file import FileStorage
from testkit.admin import ProxyState

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-admin-token"
NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z




class RecordingCerts:
    """Stands in for CertificateManager: keeps statuses, records ``issue_now`` calls."""

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

    async def issue_now(self, name: str, *, force: bool = False) -> object:
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


ADMIN_URL = "http://127.0.0.1:9901"
#: What scripts and the CLI send with state-changing requests (README, admin endpoints).
SCRIPTED = {"Edgeproxy-Request": "1"}


def client_for(
    rt: Runtime, token: str | None = None, metrics_token: str | None = None
) -> httpx.AsyncClient:
    app = make_admin_app(rt, token=token, metrics_token=metrics_token)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ADMIN_URL)


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
    await status_store.write(storage, st)


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
    r = await client.post("/v1/domains/Shop.Example.NET/issue", headers=SCRIPTED)
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["state"]) == ("shop.example.net", "valid")
    assert rt.certs.obtained == [("shop.example.net", False)]


async def test_issue_with_force(client: httpx.AsyncClient, rt: Runtime) -> None:
    r = await client.post("/v1/domains/shop.example.net/issue?force=true", headers=SCRIPTED)
    assert r.status_code == 200
    assert rt.certs.obtained == [("shop.example.net", True)]


async def test_issue_denied_name_never_reaches_the_issuer(
    client: httpx.AsyncClient, rt: Runtime
) -> None:
    r = await client.post("/v1/domains/evil.example.com/issue", headers=SCRIPTED)
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
    r = await client.post("/v1/domains/shop.example.net/issue", headers=SCRIPTED)
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


# ---------------------------------------------------------------------- cross-site requests


ATTACK = {"Origin": "https://evil.example", "Content-Type": "text/plain"}


async def test_the_cross_site_form_post_is_refused_and_issues_nothing(
    client: httpx.AsyncClient, rt: Runtime
) -> None:
    # What a page on https://evil.example sends with fetch(..., {mode: "no-cors"}) or a form:
    # a "simple" request, which the browser sends without asking first.
    r = await client.post(
        "/v1/domains/shop.example.net/issue?force=1", headers=ATTACK, content=b"x"
    )
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "cross_site_request"
    assert "evil.example" in body["detail"] and "Edgeproxy-Request: 1" in body["detail"]
    assert rt.certs.obtained == []


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Origin": "https://evil.example", **SCRIPTED}, id="foreign-origin+header"),
        pytest.param(
            {"Origin": "https://evil.example", "Content-Type": "application/json"},
            id="foreign-origin+json",
        ),
        pytest.param({"Origin": "null", **SCRIPTED}, id="opaque-origin"),
        pytest.param({"Origin": "http://127.0.0.1:9902", **SCRIPTED}, id="other-port"),
        pytest.param({"Sec-Fetch-Site": "cross-site", **SCRIPTED}, id="fetch-cross-site"),
        pytest.param({"Sec-Fetch-Site": "same-site", **SCRIPTED}, id="fetch-same-site"),
        pytest.param({}, id="nothing"),
        pytest.param({"Content-Type": "text/plain"}, id="text-plain"),
        pytest.param(
            {"Content-Type": "application/x-www-form-urlencoded"}, id="form-urlencoded"
        ),
        pytest.param({"Content-Type": "multipart/form-data; boundary=x"}, id="multipart"),
        pytest.param({"Edgeproxy-Request": ""}, id="empty-header"),
    ],
)
async def test_state_changing_requests_a_page_could_send_are_refused(
    client: httpx.AsyncClient, rt: Runtime, headers: dict[str, str]
) -> None:
    r = await client.post("/v1/domains/shop.example.net/issue", headers=headers)
    assert r.status_code == 403
    assert r.json()["error"] == "cross_site_request"
    assert rt.certs.obtained == []


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(SCRIPTED, id="custom-header"),
        pytest.param({"Content-Type": "application/json"}, id="json"),
        pytest.param({"Content-Type": "Application/JSON; charset=utf-8"}, id="json-params"),
        pytest.param({"Origin": ADMIN_URL, **SCRIPTED}, id="own-origin"),
        pytest.param(
            {"Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"},
            id="fetch-same-origin",
        ),
        pytest.param({"Sec-Fetch-Site": "none", **SCRIPTED}, id="fetch-none"),
    ],
)
async def test_scripted_state_changing_requests_pass(
    client: httpx.AsyncClient, rt: Runtime, headers: dict[str, str]
) -> None:
    r = await client.post("/v1/domains/shop.example.net/issue", headers=headers)
    assert r.status_code == 200, r.text
    assert rt.certs.obtained == [("shop.example.net", False)]


async def test_reads_need_no_custom_header(client: httpx.AsyncClient) -> None:
    # A cross-site page cannot read the answer (no CORS headers): GETs stay plain for curl.
    r = await client.get("/v1/domains", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200


async def test_the_token_does_not_lift_the_cross_site_rule(
    authed: httpx.AsyncClient, rt: Runtime
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", **ATTACK}
    r = await authed.post("/v1/domains/shop.example.net/issue", headers=headers)
    assert r.status_code == 403
    assert rt.certs.obtained == []


# ---------------------------------------------------------------------- DNS rebinding


@pytest.mark.parametrize(
    "host",
    ["evil.example:9901", "evil.example", "attacker.127.0.0.1.nip.io:9901", "10.0.0.1:9901",
     "localhost.evil.example", "[2001:db8::1]:9901", "127.0.0.1.evil.example"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/domains"), ("GET", "/metrics"), ("POST", "/v1/domains/shop.example.net/issue")],
)
async def test_tokenless_admin_refuses_a_rebound_host(
    client: httpx.AsyncClient, rt: Runtime, host: str, method: str, path: str
) -> None:
    # After rebinding, the page is "same origin" with us: only its Host header gives it away.
    headers = {"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin",
               **SCRIPTED}
    r = await client.request(method, path, headers=headers)
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "foreign_host"
    assert "127.0.0.1" in body["detail"] and "admin.token" in body["detail"]
    assert rt.certs.obtained == []


@pytest.mark.parametrize(
    "host", ["127.0.0.1:9901", "127.0.0.1", "localhost:9901", "LOCALHOST", "[::1]:9901",
             "127.0.0.2:9901"],
)
async def test_tokenless_admin_answers_loopback_hosts(
    client: httpx.AsyncClient, rt: Runtime, host: str
) -> None:
    headers = {"Host": host, "Origin": f"http://{host}", **SCRIPTED}
    r = await client.post("/v1/domains/shop.example.net/issue", headers=headers)
    assert r.status_code == 200, r.text


async def test_with_a_token_any_host_is_fine(authed: httpx.AsyncClient) -> None:
    # Behind a Service or an ingress the Host is a cluster name; the token guards it.
    headers = {"Host": "edgeproxy-admin.edgeproxy.svc:9901", "Authorization": f"Bearer {TOKEN}"}
    assert (await authed.get("/v1/domains", headers=headers)).status_code == 200


# ---------------------------------------------------------------------- metrics token

METRICS_TOKEN = "read-only-metrics-token"


@pytest.fixture
async def monitored(rt: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(rt, TOKEN, METRICS_TOKEN) as c:
        yield c


@pytest.mark.parametrize("path", ["/metrics", "/readyz", "/healthz"])
async def test_metrics_token_grants_monitoring(monitored: httpx.AsyncClient, path: str) -> None:
    r = await monitored.get(path, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/domains"), ("GET", "/v1/domains/a.example.net"),
     ("POST", "/v1/domains/a.example.net/issue"), ("GET", "/no/such/path")],
)
async def test_metrics_token_is_refused_elsewhere(
    monitored: httpx.AsyncClient, rt: Runtime, method: str, path: str
) -> None:
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}", **SCRIPTED}
    r = await monitored.request(method, path, headers=headers)
    assert r.status_code == 403
    assert r.json()["error"] == "forbidden"
    assert "admin token" in r.json()["detail"]
    assert rt.certs.obtained == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/metrics"), ("GET", "/readyz"), ("GET", "/v1/domains"),
     ("POST", "/v1/domains/a.example.net/issue")],
)
async def test_admin_token_still_grants_everything(
    monitored: httpx.AsyncClient, method: str, path: str
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", **SCRIPTED}
    r = await monitored.request(method, path, headers=headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "authorization", [f"Bearer {METRICS_TOKEN}x", f"Bearer {METRICS_TOKEN[:-1]}",
                      f"Basic {METRICS_TOKEN}", METRICS_TOKEN],
)
async def test_a_wrong_metrics_token_is_401(monitored: httpx.AsyncClient, authorization: str) -> None:
    r = await monitored.get("/metrics", headers={"Authorization": authorization})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("token", "metrics_token"), [(None, METRICS_TOKEN), (TOKEN, TOKEN), (TOKEN, "")]
)
def test_a_metrics_token_that_would_guard_nothing_is_refused(
    rt: Runtime, token: str | None, metrics_token: str
) -> None:
    with pytest.raises(ValueError, match="token"):
        make_admin_app(rt, token=token, metrics_token=metrics_token)


async def test_a_managed_wildcard_is_found_under_its_first_name(
    client: httpx.AsyncClient, storage: FileStorage
) -> None:
    st = DomainStatus("*.example.net", "failing", last_error_type="dns_tsig_rejected")
    st.names = ["*.example.net", "example.net"]
    await store_status(storage, st)
    r = await client.get("/v1/domains/*.Example.NET")
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["names"]) == ("*.example.net", st.names)
    assert r.json()["last_error_type"] == "dns_tsig_rejected"
    # Only "*." as a whole first label: anything else is still not a hostname.
    assert (await client.get("/v1/domains/*example.net")).status_code == 400
    assert (await client.get("/v1/domains/*.*.example.net")).status_code == 400
