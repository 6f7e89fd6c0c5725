"""``POST /v1/domains/{name}/issue`` orders within the limits a handshake's order has.

It once called the manager's ``obtain`` directly: no order rate limit, no backoff, and
``force=1`` ordered anew every time (5 forced orders in 0.3 s with a limit of 2 a minute). The
real admin app (in memory, ``httpx.ASGITransport``) in front of the real CertificateManager,
real FileStorage and the real internal CA, whose issuances are counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from edgeproxy.admin.app import make_admin_app
from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.issuers.base import IssuanceError
from edgeproxy.reasons import Failure
from edgeproxy.storage.file import FileStorage
from testkit.admin import ProxyState
from testkit.managers import HookedIssuer

SCRIPTED = {"Edgeproxy-Request": "1"}


class CountingIssuer(HookedIssuer):
    def __init__(self, storage: FileStorage) -> None:
        super().__init__(storage)
        self.orders: list[str] = []
        self.fail = False

    async def before_issue(self, name: str) -> None:
        self.orders.append(name)
        if self.fail:
            raise IssuanceError(Failure.problem("urn:ietf:params:acme:error:dns", "no such host"))


@dataclass
class Runtime:
    storage: FileStorage
    certs: CertificateManager
    issuer: CountingIssuer
    proxy: ProxyState = field(default_factory=ProxyState)


@pytest.fixture
async def rt(tmp_path: Path, nursery: trio.Nursery) -> Runtime:
    storage = FileStorage(tmp_path / "state")
    issuer = CountingIssuer(storage)
    certs = CertificateManager(
        storage=storage,
        issuer=issuer,
        policy=OnDemandPolicy(allow=["*.example.net"]),
        max_orders_per_minute=2,
        renew_interval=3600,
    )
    await nursery.start(certs.run)
    return Runtime(storage, certs, issuer)


@pytest.fixture
async def client(rt: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    app = make_admin_app(rt, token=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        yield c


async def test_forced_orders_are_rate_limited(client: httpx.AsyncClient, rt: Runtime) -> None:
    answers = [
        await client.post("/v1/domains/shop.example.net/issue?force=1", headers=SCRIPTED)
        for _ in range(5)
    ]
    assert [r.status_code for r in answers] == [200, 200, 429, 429, 429]
    assert rt.issuer.orders == ["shop.example.net"] * 2
    refused = answers[2]
    body = refused.json()
    assert body["error"] == "rate_limited"
    assert body["limit"] == "on_demand.max_orders_per_minute"
    # 2 a minute: the next token comes within 30 s.
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert body["retry_after"] == int(refused.headers["retry-after"])


async def test_plain_issue_of_a_valid_certificate_spends_no_order(
    client: httpx.AsyncClient, rt: Runtime
) -> None:
    for _ in range(5):
        r = await client.post("/v1/domains/shop.example.net/issue", headers=SCRIPTED)
        assert r.status_code == 200 and r.json()["state"] == "valid"
    assert rt.issuer.orders == ["shop.example.net"]
    # The one order spent one token: a forced order still has the other.
    r = await client.post("/v1/domains/other.example.net/issue?force=1", headers=SCRIPTED)
    assert r.status_code == 200
    r = await client.post("/v1/domains/third.example.net/issue", headers=SCRIPTED)
    assert r.status_code == 429


async def test_a_failing_name_is_in_backoff_forced_or_not(
    client: httpx.AsyncClient, rt: Runtime
) -> None:
    rt.issuer.fail = True
    r = await client.post("/v1/domains/shop.example.net/issue", headers=SCRIPTED)
    assert r.status_code == 502 and r.json()["state"] == "failing"
    for query in ("", "?force=1"):
        r = await client.post(f"/v1/domains/shop.example.net/issue{query}", headers=SCRIPTED)
        assert r.status_code == 429
        body = r.json()
        assert body["limit"] == "backoff"
        assert "dns" in body["detail"] and "next attempt at" in body["detail"]
        assert int(r.headers["retry-after"]) >= 1
    assert rt.issuer.orders == ["shop.example.net"]
