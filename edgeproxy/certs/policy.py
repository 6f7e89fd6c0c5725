"""The on-demand allow-check: may we obtain a certificate for this name?

Order: the name must be a valid DNS hostname (refused before any request leaves), then the
hostname registry (a removed name is refused whatever else would allow it; with
``[on_demand] registry = true`` a registered one is allowed), then static ``allow`` patterns,
then the ``ask`` endpoint (GET ?domain=NAME, 2xx allows; errors and timeouts deny). The ask
URL's own query parameters (an API key, a tenant) are kept as written and ``domain=NAME`` is
appended; a URL that already has a ``domain`` parameter is refused, since the endpoint would
see two and could read either (``ask_url``).

Decisions are cached briefly, both ways, and asks are rate limited so a flood of random names
cannot turn into a flood against the customer's endpoint.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import trio

from .. import metrics
from ..names import InvalidName, name_matches, validate_hostname
from ..reasons import Failure, Reason

log = logging.getLogger("edgeproxy.policy")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    source: str  # static | ask | cache | invalid | ratelimit | none
    reason: Reason  # ALLOWED, or why not: DENIED, REMOVED, INVALID_NAME, ASK_UNAVAILABLE ...
    detail: str = ""

    @property
    def refusal(self) -> Failure:
        """This refusal as the failure a status records (its detail, else the reason)."""
        return Failure(self.reason, self.detail or self.reason.value)


#: The query parameter that carries the name to the ask endpoint.
ASK_PARAMETER = "domain"


def ask_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the ask endpoint, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f'{url!r} is not an http(s) URL (e.g. "http://127.0.0.1:8080/allowed")'
    if any(k == ASK_PARAMETER for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return (
            f"{url!r} has its own {ASK_PARAMETER!r} parameter, which edgeproxy sets to the name "
            f"being checked (remove it from the URL)"
        )
    return None


def ask_url(base: str, name: str) -> str:
    """``base`` with ``domain=name`` appended; the URL's own query is kept byte for byte."""
    parts = urlsplit(base)
    ours = urlencode({ASK_PARAMETER: name})
    query = f"{parts.query}&{ours}" if parts.query else ours
    # The fragment never leaves the client anyway; dropping it keeps the query last.
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


class RegistryView(Protocol):
    def is_registered(self, name: str, /) -> bool: ...

    def is_removed(self, name: str, /) -> bool: ...


class TokenBucket:
    """A plain token bucket; ``clock`` is injectable for tests."""

    def __init__(self, rate_per_second: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate_per_second
        self.burst = burst
        self.tokens = burst
        self.clock = clock
        self.last = clock()

    def wait_time(self) -> float:
        """Seconds until ``take`` would succeed (0 if it would now)."""
        tokens = min(self.burst, self.tokens + (self.clock() - self.last) * self.rate)
        if tokens >= 1:
            return 0.0
        return (1 - tokens) / self.rate if self.rate > 0 else float("inf")

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class OnDemandPolicy:
    def __init__(
        self,
        *,
        allow: Sequence[str] = (),
        ask: str | None = None,
        ask_timeout: float = 2.0,
        allow_ttl: float = 300.0,
        deny_ttl: float = 30.0,
        asks_per_second: float = 20.0,
        cache_size: int = 10000,
        http: httpx.AsyncClient | None = None,
        registry: RegistryView | None = None,
        registry_allows: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ask is not None and (problem := ask_url_problem(ask)) is not None:
            raise ValueError(f"on_demand.ask: {problem}")
        self.registry = registry
        self.registry_allows = registry_allows
        self.allow = tuple(allow)
        self.ask = ask
        self.ask_timeout = ask_timeout
        self.allow_ttl = allow_ttl
        self.deny_ttl = deny_ttl
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Decision]] = OrderedDict()
        self._cache_size = cache_size
        self._bucket = TokenBucket(asks_per_second, max(1.0, asks_per_second * 2), clock)
        self._http = http
        self._inflight: dict[str, trio.Event] = {}

    @property
    def http_client(self) -> httpx.AsyncClient | None:
        """The ask client, to hand over to the policy that replaces this one on reload."""
        return self._http

    def static_allows(self, name: str) -> bool:
        return any(name_matches(p, name) for p in self.allow)

    async def check(self, raw_name: str, *, fresh: bool = False) -> Decision:
        """May ``raw_name`` get a certificate? ``fresh`` skips remembered ask answers (a
        renewal must see the customer's current answer, not one from minutes ago)."""
        try:
            name = validate_hostname(raw_name)
        except InvalidName as exc:
            return self._count(Decision(False, "invalid", Reason.INVALID_NAME, str(exc)))
        registry = self.registry
        if registry is not None:
            if registry.is_removed(name):
                detail = "the hostname was removed from the registry"
                return self._count(Decision(False, "registry", Reason.REMOVED, detail))
            if self.registry_allows and registry.is_registered(name):
                return self._count(Decision(True, "registry", Reason.ALLOWED))
        if self.static_allows(name):
            return self._count(Decision(True, "static", Reason.ALLOWED))
        if not self.ask:
            detail = "not registered and no allow pattern matches" if self.registry_allows else (
                "no allow pattern matches"
            )
            return self._count(Decision(False, "none", Reason.DENIED, detail))
        cached = None if fresh else self._cached(name)
        if cached is not None:
            return self._count(cached)
        # Single-flight per name: concurrent handshakes for one name make one ask request.
        while (ev := self._inflight.get(name)) is not None:
            await ev.wait()
            cached = self._cached(name)
            if cached is not None:
                return self._count(cached)
        if not self._bucket.take():
            limited = Decision(False, "ratelimit", Reason.ASK_RATE_LIMITED, "too many asks")
            return self._count(limited)
        ev = self._inflight[name] = trio.Event()
        try:
            decision = await self._ask(name)
            ttl = self.allow_ttl if decision.allowed else self.deny_ttl
            self._remember(name, decision, ttl)
        finally:
            del self._inflight[name]
            ev.set()
        return self._count(decision)

    def _count(self, d: Decision) -> Decision:
        metrics.ON_DEMAND_DECISIONS.labels("allow" if d.allowed else "deny", d.source).inc()
        return d

    def _cached(self, name: str) -> Decision | None:
        hit = self._cache.get(name)
        if hit is None:
            return None
        expires, decision = hit
        if expires <= self._clock():
            del self._cache[name]
            return None
        self._cache.move_to_end(name)
        return Decision(decision.allowed, "cache", decision.reason, decision.detail)

    def _remember(self, name: str, decision: Decision, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[name] = (self._clock() + ttl, decision)
        self._cache.move_to_end(name)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _ask(self, name: str) -> Decision:
        assert self.ask is not None
        client = self._http
        if client is None:
            # One client for the policy's life: building one per ask reloads the CA bundle
            # (~45 ms of CPU each), which a flood of unknown names would turn into a DoS.
            client = self._http = httpx.AsyncClient()
        try:
            with trio.move_on_after(self.ask_timeout) as scope:
                resp = await client.get(ask_url(self.ask, name), timeout=self.ask_timeout)
            if scope.cancelled_caught:
                log.warning("ask endpoint timed out for %s after %.1fs", name, self.ask_timeout)
                return Decision(False, "ask", Reason.ASK_UNAVAILABLE, "ask endpoint timed out")
        except httpx.HTTPError as exc:
            log.warning("ask endpoint failed for %s: %s", name, type(exc).__name__)
            return Decision(
                False, "ask", Reason.ASK_UNAVAILABLE, f"ask endpoint error: {type(exc).__name__}"
            )
        if 200 <= resp.status_code < 300:
            return Decision(True, "ask", Reason.ALLOWED)
        return Decision(False, "ask", Reason.DENIED, f"ask endpoint answered {resp.status_code}")
