"""``/v1/hostnames`` driven in memory (httpx ASGITransport): the real admin app, FileStorage,
registry mirror, policy and certificate manager with the internal CA as issuer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from edgeproxy.admin.app import make_admin_app
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.errors import CertificateUnavailable
from edgeproxy.events import Events
from edgeproxy.hostnames.registry import HostnameRegistry
from edgeproxy.storage import FileStorage
from testkit.admin import ProxyState
from testkit.managers import CountingIssuer

TOKEN = "hostnames-admin-token"
JSON_HEADERS = {"Edgeproxy-Request": "1"}
PROBLEM = "application/problem+json"


@dataclass
class Runtime:
    storage: FileStorage
    certs: CertificateManager
    hostnames: HostnameRegistry
    issuer: CountingIssuer
    events: Events
    proxy: ProxyState = field(default_factory=ProxyState)


@pytest.fixture
async def rt(tmp_path: Path, nursery: trio.Nursery) -> Runtime:
    storage = FileStorage(tmp_path / "store")
    registry = HostnameRegistry(storage)
    issuer = CountingIssuer(storage)
    policy = OnDemandPolicy(registry=registry, registry_allows=True)
    certs = CertificateManager(storage=storage, issuer=issuer, policy=policy, registry=registry)
    await nursery.start(certs.run)
    return Runtime(storage, certs, registry, issuer, Events(storage, url=None, secret=None))


def client_for(rt: Runtime, token: str | None = None) -> httpx.AsyncClient:
    app = make_admin_app(rt, token=token)  # type: ignore[arg-type]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9901", headers=headers
    )


@pytest.fixture
async def api(rt: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(rt) as c:
        yield c


async def wait_state(api: httpx.AsyncClient, name: str, state: str) -> dict[str, object]:
    with trio.fail_after(10):
        while True:
            got = (await api.get(f"/v1/hostnames/{name}")).json()
            if got["state"] == state:
                return got  # type: ignore[no-any-return]
            await trio.sleep(0.02)


def assert_problem(resp: httpx.Response, status: int, kind: str, *detail: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body = resp.json()
    assert body["type"].endswith("problem/" + kind) and body["status"] == status
    assert body["title"]
    for part in detail:
        assert part in body["detail"], body["detail"]


async def test_post_creates_issues_in_the_background_and_is_idempotent(
    api: httpx.AsyncClient, rt: Runtime
) -> None:
    body = {"hostname": "Shop.Customer.COM.", "upstream": "10.0.0.7:8080",
            "metadata": {"customer": 42, "plan": "pro"}}  # fmt: skip
    created = await api.post("/v1/hostnames", json=body)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/hostnames/shop.customer.com"
    obj = created.json()
    assert obj["hostname"] == "shop.customer.com" and obj["upstream"] == "10.0.0.7:8080"
    assert obj["metadata"] == {"customer": 42, "plan": "pro"}
    active = await wait_state(api, "shop.customer.com", "active")  # no visitor came
    cert = active["certificate"]
    assert isinstance(cert, dict)
    assert cert["serial"] and "edgeproxy" in cert["issuer"].lower()
    assert cert["renewal_at"] and cert["renewal_source"] == "backstop" and cert["not_after"]
    assert active["last_error"] is None
    again = await api.post("/v1/hostnames", json={**body, "upstream": "10.9.9.9:1"})
    assert again.status_code == 200
    assert again.json()["upstream"] == "10.0.0.7:8080"  # the existing entry, untouched
    assert again.json()["created_at"] == obj["created_at"]
    assert rt.issuer.calls == 1


async def test_issue_false_waits_for_the_first_visitor(
    api: httpx.AsyncClient, rt: Runtime
) -> None:
    resp = await api.post("/v1/hostnames", json={"hostname": "lazy.example.com", "issue": False})
    assert resp.status_code == 201 and resp.json()["state"] == "pending"
    await trio.sleep(0.1)
    assert rt.issuer.calls == 0
    await rt.certs.context_for("lazy.example.com")
    assert (await api.get("/v1/hostnames/lazy.example.com")).json()["state"] == "active"


@pytest.mark.parametrize(
    ("body", "status", "kind", "detail"),
    [
        ({"hostname": "bad_name.example.com"}, 400, "invalid-hostname", "'bad_name.example.com'"),
        ({"hostname": "localhost"}, 400, "invalid-hostname", "single-label"),
        ({"hostname": "192.0.2.1"}, 400, "ip-literal", "'192.0.2.1' is an IP address"),
        ({"hostname": "[2001:db8::1]"}, 400, "ip-literal", "IP address"),
        ({"hostname": "a.example.com", "metadata": {"x": "y" * 4090}}, 413,
         "metadata-too-large", "metadata is 4098 bytes as compact JSON; the limit is 4096"),
        ({"hostname": "a.example.com", "metadata": [1, 2]}, 400, "invalid-body", "metadata"),
        ({"hostname": "a.example.com", "upstream": "nohost"}, 400, "invalid-upstream", "port"),
        ({"hostname": "a.example.com", "colour": "red"}, 400, "invalid-body",
         "colour: unknown field"),
        ({"upstream": "10.0.0.1:80"}, 400, "invalid-body", "hostname: Field required"),
        ({"hostname": 7}, 400, "invalid-body", "hostname"),
    ],
)  # fmt: skip
async def test_bad_posts_get_problem_documents_and_change_nothing(
    api: httpx.AsyncClient, rt: Runtime, body: dict[str, object], status: int, kind: str,
    detail: str,
) -> None:  # fmt: skip
    resp = await api.post("/v1/hostnames", json=body)
    assert_problem(resp, status, kind, detail)
    assert await rt.storage.list_hostnames() == []
    assert rt.issuer.calls == 0


async def test_broken_json_and_oversized_bodies_are_problems(
    api: httpx.AsyncClient, rt: Runtime
) -> None:
    resp = await api.post(
        "/v1/hostnames", content=b'{"hostname": ', headers={"content-type": "application/json"}
    )
    assert_problem(resp, 400, "invalid-body", "JSON")
    big = json.dumps({"hostname": "a.example.com", "metadata": {"x": "y" * 70000}})
    resp = await api.post(
        "/v1/hostnames", content=big, headers={"content-type": "application/json"}
    )
    assert_problem(resp, 413, "body-too-large", "65536")
    assert await rt.storage.list_hostnames() == []


async def test_unknown_and_invalid_names_in_the_path(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get("/v1/hostnames/nope.example.com"), 404, "unknown-hostname",
                   "nope.example.com is not a registered hostname")  # fmt: skip
    assert_problem(await api.delete("/v1/hostnames/nope.example.com", headers=JSON_HEADERS),
                   404, "unknown-hostname")  # fmt: skip
    assert_problem(await api.patch("/v1/hostnames/nope.example.com", json={}), 404,
                   "unknown-hostname")  # fmt: skip
    assert_problem(await api.get("/v1/hostnames/10.1.2.3"), 400, "ip-literal")
    assert_problem(await api.get("/v1/hostnames/a..b"), 400, "invalid-hostname", "empty label")


async def test_patch_changes_upstream_and_metadata_and_bad_patches_change_nothing(
    api: httpx.AsyncClient, rt: Runtime
) -> None:
    await api.post("/v1/hostnames", json={"hostname": "p.example.com", "issue": False,
                                          "metadata": {"a": 1}})  # fmt: skip
    resp = await api.patch("/v1/hostnames/p.example.com", json={"upstream": "10.1.1.1:81"})
    assert resp.status_code == 200
    assert resp.json()["upstream"] == "10.1.1.1:81" and resp.json()["metadata"] == {"a": 1}
    route = rt.hostnames.route_for("p.example.com", None)
    assert route is not None and [str(u) for u in route.upstreams] == ["10.1.1.1:81"]
    for body, status, kind in (
        ({"upstream": "10.1.1.1"}, 400, "invalid-upstream"),
        ({"metadata": {"k": "v" * 5000}}, 413, "metadata-too-large"),
        ({"hostname": "other.example.com"}, 400, "invalid-body"),
    ):
        assert_problem(await api.patch("/v1/hostnames/p.example.com", json=body), status, kind)
    stored = await rt.storage.get_hostname("p.example.com")
    assert stored is not None and stored.upstream == "10.1.1.1:81"
    assert stored.metadata == '{"a":1}'
    resp = await api.patch("/v1/hostnames/p.example.com",
                           json={"upstream": None, "metadata": {"b": [1, 2]}})  # fmt: skip
    assert resp.json()["upstream"] is None and resp.json()["metadata"] == {"b": [1, 2]}
    assert rt.hostnames.route_for("p.example.com", None) is None


async def test_delete_stops_serving_and_readd_needs_no_new_order(
    api: httpx.AsyncClient, rt: Runtime
) -> None:
    await api.post("/v1/hostnames", json={"hostname": "d.example.com"})
    await wait_state(api, "d.example.com", "active")
    assert rt.certs.cached_context("d.example.com") is not None
    resp = await api.delete("/v1/hostnames/d.example.com", headers=JSON_HEADERS)
    assert resp.status_code == 204 and resp.content == b""
    assert rt.certs.cached_context("d.example.com") is None
    with pytest.raises(CertificateUnavailable) as ei:
        await rt.certs.context_for("d.example.com")
    assert ei.value.reason == "removed"
    gone = (await api.get("/v1/hostnames/d.example.com")).json()
    assert gone["state"] == "removed" and gone["removed_at"]
    assert_problem(await api.patch("/v1/hostnames/d.example.com", json={}), 404,
                   "unknown-hostname", "was removed")  # fmt: skip
    again = await api.post("/v1/hostnames", json={"hostname": "d.example.com"})
    assert again.status_code == 201
    await wait_state(api, "d.example.com", "active")
    assert rt.issuer.calls == 1


async def test_list_pages_with_a_cursor_and_filters_by_state(
    api: httpx.AsyncClient, rt: Runtime
) -> None:
    names = [f"n{i:03d}.example.com" for i in range(45)]
    for n in names:
        resp = await api.post("/v1/hostnames", json={"hostname": n, "issue": False})
        assert resp.status_code == 201
    await api.delete(f"/v1/hostnames/{names[5]}", headers=JSON_HEADERS)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "20", **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/v1/hostnames", params=params)).json()
        seen.extend(item["hostname"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == names
    removed = (await api.get("/v1/hostnames", params={"state": "removed"})).json()
    assert [i["hostname"] for i in removed["items"]] == [names[5]]
    assert_problem(await api.get("/v1/hostnames", params={"state": "sleepy"}), 400,
                   "invalid-query", "state")  # fmt: skip
    assert_problem(await api.get("/v1/hostnames", params={"limit": "0"}), 400, "invalid-query")
    assert_problem(await api.get("/v1/hostnames", params={"cursor": "!!"}), 400,
                   "invalid-query", "cursor")  # fmt: skip


async def test_openapi_document_describes_the_hostnames_api(api: httpx.AsyncClient) -> None:
    doc = (await api.get("/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert {"post", "get"} <= set(doc["paths"]["/v1/hostnames"])
    assert {"get", "patch", "delete"} <= set(doc["paths"]["/v1/hostnames/{name}"])
    assert "HostnameCreate" in doc["components"]["schemas"]


async def test_the_admin_trust_rules_guard_the_hostnames_api(rt: Runtime) -> None:
    app_client = client_for(rt, TOKEN)
    async with httpx.AsyncClient(
        transport=app_client._transport, base_url="http://127.0.0.1:9901"
    ) as no_token:
        assert (await no_token.post("/v1/hostnames", json={"hostname": "x.example.com"})
                ).status_code == 401  # fmt: skip
        assert (await no_token.get("/v1/openapi.json")).status_code == 401
    async with app_client as authed:
        # A form post from a web page: no JSON type, no custom header.
        resp = await authed.post("/v1/hostnames", content=b"hostname=x.example.com",
                                 headers={"content-type": "application/x-www-form-urlencoded"})
        assert resp.status_code == 403 and resp.json()["error"] == "cross_site_request"
        resp = await authed.post("/v1/hostnames", json={"hostname": "x.example.com"},
                                 headers={"origin": "https://evil.example"})  # fmt: skip
        assert resp.status_code == 403
        assert await rt.storage.list_hostnames() == []
        ok = await authed.post("/v1/hostnames", json={"hostname": "x.example.com"})
        assert ok.status_code == 201
        assert (await authed.delete("/v1/hostnames/x.example.com")).status_code == 403
