"""Upstream connections: round-robin over a route's upstreams, skipping ones that fail.

A failed connect marks the upstream as suspect for a short while so the next connections try
healthy ones first (passive health checking); if every upstream is suspect they are all tried
anyway, because a stale mark must never turn a recovered backend into an outage.
"""

from __future__ import annotations

import logging
import time

import trio

from .. import metrics
from ..config import HostPort
from ..errors import UpstreamError
from .routes import Route

log = logging.getLogger("edgeproxy.upstream")

SUSPECT_FOR = 5.0


class UpstreamPool:
    def __init__(self) -> None:
        self._suspect_until: dict[HostPort, float] = {}

    async def connect(self, route: Route, per_attempt: float) -> tuple[trio.SocketStream, HostPort]:
        order = route.upstream_order()
        now = time.monotonic()
        if self._suspect_until:
            order.sort(key=lambda hp: self._suspect_until.get(hp, 0.0) > now)
        errors = []
        for hp in order:
            t0 = time.monotonic()
            try:
                with trio.fail_after(per_attempt):
                    stream = await trio.open_tcp_stream(hp.host, hp.port)
            except (OSError, trio.TooSlowError) as exc:
                reason = (
                    "timeout"
                    if isinstance(exc, trio.TooSlowError)
                    else (exc.strerror or type(exc).__name__)
                )
                metrics.UPSTREAM_CONNECT_FAILURES.labels(route.label, str(hp)).inc()
                self._suspect_until[hp] = time.monotonic() + SUSPECT_FOR
                log.warning("route %s: upstream %s connect failed: %s", route.label, hp, reason)
                errors.append(f"{hp}: {reason}")
                continue
            metrics.UPSTREAM_CONNECT_SECONDS.labels(route.label).observe(time.monotonic() - t0)
            self._suspect_until.pop(hp, None)
            return stream, hp
        raise UpstreamError(f"route {route.label}: no upstream reachable ({'; '.join(errors)})")
