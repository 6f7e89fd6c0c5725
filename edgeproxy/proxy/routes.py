"""SNI routes: which upstream pool serves a server name.

Pure data and lookup: exact names win over ``*.suffix`` wildcards, which win over ``*``; the
route marked ``default`` takes connections without SNI. Lookups are dict probes because this
runs once per connection on the hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..addresses import HostPort


@dataclass(slots=True)
class Route:
    index: int
    patterns: tuple[str, ...]
    default: bool
    upstreams: tuple[HostPort, ...]
    send_proxy: str | None
    alpn: tuple[str, ...]
    # Round-robin cursor: per route object, replaced wholesale on reload.
    cursor: int = field(default=0, compare=False)
    # The route's name in logs and metrics: read on every connection, so set once.
    label: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.label = self.patterns[0] if self.patterns else "default"

    def upstream_order(self) -> list[HostPort]:
        """Upstreams starting at the round-robin cursor; advances the cursor."""
        n = len(self.upstreams)
        if n == 1:
            return [self.upstreams[0]]  # the usual route: no cursor to move
        start = self.cursor % n
        self.cursor = (start + 1) % n
        return [self.upstreams[(start + i) % n] for i in range(n)]


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._exact: dict[str, Route] = {}
        self._wild: dict[str, Route] = {}
        self._catch_all: Route | None = None
        self._default: Route | None = None
        # First definition wins for duplicate patterns, matching the file's reading order.
        for route in self.routes:
            if route.default and self._default is None:
                self._default = route
            for p in route.patterns:
                if p == "*":
                    self._catch_all = self._catch_all or route
                elif p.startswith("*."):
                    self._wild.setdefault(p[2:], route)
                else:
                    self._exact.setdefault(p, route)

    def match(self, sni: str | None) -> Route | None:
        """The route for normalised ``sni`` (None: no SNI sent)."""
        if sni is None:
            return self._default
        route = self._exact.get(sni)
        if route is not None:
            return route
        _, dot, parent = sni.partition(".")
        if dot:
            route = self._wild.get(parent)
            if route is not None:
                return route
        return self._catch_all
