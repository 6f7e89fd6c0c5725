"""The on-demand allow-check against a real HTTP ask endpoint on loopback."""

from __future__ import annotations

import pytest
import trio

from edgeproxy.certs.policy import OnDemandPolicy, TokenBucket
from edgeproxy.config import load_config_data
from edgeproxy.errors import ConfigError
from testkit.ask import serve_ask


async def ask_endpoint(
    nursery: trio.Nursery, allowed: set[str], hits: list[str], delay: float = 0.0
) -> str:
    async def respond(target: bytes) -> bytes:
        name = target.decode().split("domain=", 1)[-1]
        hits.append(name)
        await trio.sleep(delay)
        return b"204 No Content" if name in allowed else b"403 Forbidden"

    url, _ = await serve_ask(nursery, respond, "/check")
    return url


async def test_static_patterns_before_ask(nursery: trio.Nursery) -> None:
    hits: list[str] = []
    url = await ask_endpoint(nursery, set(), hits)
    p = OnDemandPolicy(allow=["*.example.test"], ask=url)
    d = await p.check("Shop.Example.Test.")
    assert (d.allowed, d.source) == (True, "static")
    assert hits == []


async def test_ask_allows_denies_and_caches(nursery: trio.Nursery) -> None:
    hits: list[str] = []
    url = await ask_endpoint(nursery, {"yes.customer.test"}, hits)
    p = OnDemandPolicy(ask=url)
    assert (await p.check("yes.customer.test")).allowed
    d = await p.check("no.customer.test")
    assert not d.allowed and d.reason == "denied" and "403" in d.detail
    # Both decisions are cached: no new requests.
    assert (await p.check("yes.customer.test")).source == "cache"
    assert not (await p.check("no.customer.test")).allowed
    assert hits == ["yes.customer.test", "no.customer.test"]


async def test_invalid_names_make_no_request(nursery: trio.Nursery) -> None:
    hits: list[str] = []
    url = await ask_endpoint(nursery, set(), hits)
    p = OnDemandPolicy(ask=url)
    for bad in ("10.0.0.1", "a..b.test", "x" * 300, "under_score.test"):
        d = await p.check(bad)
        assert not d.allowed and d.reason == "invalid_name"
    assert hits == []


async def test_concurrent_checks_share_one_request(nursery: trio.Nursery) -> None:
    hits: list[str] = []
    url = await ask_endpoint(nursery, {"c.customer.test"}, hits, delay=0.1)
    p = OnDemandPolicy(ask=url)
    results = []

    async def one() -> None:
        results.append((await p.check("c.customer.test")).allowed)

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(one)
    assert results == [True] * 10
    assert hits == ["c.customer.test"]


async def test_ask_down_or_slow_denies(nursery: trio.Nursery) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead = sock.getsockname()[1]
    sock.close()
    p = OnDemandPolicy(ask=f"http://127.0.0.1:{dead}/check")
    d = await p.check("a.customer.test")
    assert not d.allowed and d.reason == "ask_unavailable"
    hits: list[str] = []
    url = await ask_endpoint(nursery, {"slow.customer.test"}, hits, delay=5)
    p = OnDemandPolicy(ask=url, ask_timeout=0.2)
    d = await p.check("slow.customer.test")
    assert not d.allowed and d.reason == "ask_unavailable"


async def test_ask_rate_limit_protects_the_endpoint(nursery: trio.Nursery) -> None:
    hits: list[str] = []
    url = await ask_endpoint(nursery, set(), hits)
    p = OnDemandPolicy(ask=url, asks_per_second=1.0)  # burst of 2
    reasons = [(await p.check(f"n{i}.customer.test")).reason for i in range(6)]
    assert reasons.count("ask_rate_limited") >= 3
    assert len(hits) <= 3


def test_token_bucket() -> None:
    now = [0.0]
    b = TokenBucket(1.0, 2.0, lambda: now[0])
    assert [b.take(), b.take(), b.take()] == [True, True, False]
    now[0] = 1.0
    assert b.take() and not b.take()


async def test_one_http_client_serves_every_ask(nursery: trio.Nursery) -> None:
    # A client per ask reloads the CA bundle each time (~45 ms of CPU): a flood's DoS lever.
    hits: list[str] = []
    url = await ask_endpoint(nursery, {"a.customer.test", "b.customer.test"}, hits)
    p = OnDemandPolicy(ask=url)
    assert p.http_client is None
    await p.check("a.customer.test")
    first = p.http_client
    await p.check("b.customer.test")
    assert first is not None and p.http_client is first and not first.is_closed
    assert hits == ["a.customer.test", "b.customer.test"]


async def recording_endpoint(nursery: trio.Nursery, targets: list[bytes]) -> str:
    """An HTTP/1.1 server that records each request-target as sent and allows everything."""

    async def respond(target: bytes) -> bytes:
        targets.append(target)
        return b"204 No Content"

    url, _ = await serve_ask(nursery, respond, "")
    return url


@pytest.mark.parametrize(
    ("path_and_query", "expected"),
    [
        ("/allowed?key=abc", b"/allowed?key=abc&domain=shop.customer.test"),
        # The operator's encoding reaches the endpoint untouched, repeats and blanks included.
        ("/allowed?key=a%2Bb%20c&tag=1&tag=2&flag",
         b"/allowed?key=a%2Bb%20c&tag=1&tag=2&flag&domain=shop.customer.test"),
        ("/allowed?key=abc#frag", b"/allowed?key=abc&domain=shop.customer.test"),
        ("/allowed", b"/allowed?domain=shop.customer.test"),
        ("/allowed?", b"/allowed?domain=shop.customer.test"),
    ],
)
async def test_the_ask_urls_own_query_reaches_the_endpoint(
    nursery: trio.Nursery, path_and_query: str, expected: bytes
) -> None:
    targets: list[bytes] = []
    base = await recording_endpoint(nursery, targets)
    p = OnDemandPolicy(ask=base + path_and_query)
    d = await p.check("Shop.Customer.Test")
    assert (d.allowed, d.source) == (True, "ask")
    assert targets == [expected]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/allowed?domain=x", "http://127.0.0.1:8080/allowed?key=1&domain=",
     "http://127.0.0.1:8080/allowed?key=1&domain"],
)
def test_an_ask_url_with_its_own_domain_parameter_is_refused(url: str) -> None:
    # Two "domain" parameters: the endpoint might read the operator's fixed one and allow
    # every name. Refused at load (edgeproxy check) rather than silently overridden.
    with pytest.raises(ValueError, match="'domain' parameter"):
        OnDemandPolicy(ask=url)
    base = {"tls": {"issuer": "internal"}, "routes": [{"sni": ["*"], "upstreams": ["h:1"]}]}
    with pytest.raises(ConfigError) as ei:
        load_config_data({**base, "on_demand": {"ask": url}})
    assert "on_demand.ask" in str(ei.value) and "remove it from the URL" in str(ei.value)
