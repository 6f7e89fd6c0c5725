"""The two-way plaintext pipe between the client's TLS stream and the upstream.

Half-close is honoured in both directions: when one side ends its stream (TLS close_notify or
TCP FIN), we end ours towards the other side and keep the opposite direction flowing until it
ends too. That is what lets a client send a request, half-close, and still read the full answer.

Buffers are bounded by construction: each direction holds at most one chunk in flight
(``CHUNK`` bytes) and waits for the write to finish before reading again, so a slow reader
back-pressures a fast writer instead of growing memory. One idle deadline covers both
directions and moves forward whenever either side makes progress.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import trio

CHUNK = 65536


@dataclass(slots=True)
class PipeResult:
    to_upstream: int = 0
    to_client: int = 0
    reason: str = "done"  # done | idle_timeout | client_reset | upstream_reset


async def pipe(
    client: trio.abc.HalfCloseableStream,
    upstream: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float,
) -> PipeResult:
    result = PipeResult()
    scope = trio.CancelScope(deadline=trio.current_time() + idle_timeout)

    async def forward(
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        src_side: str,
        dst_side: str,
        to_upstream: bool,
    ) -> None:
        while True:
            try:
                data = await src.receive_some(CHUNK)
            except _BROKEN:
                _abort(f"{src_side}_reset")
                return
            if not data:
                break
            scope.deadline = trio.current_time() + idle_timeout
            try:
                await dst.send_all(data)
            except _BROKEN:
                _abort(f"{dst_side}_reset")
                return
            if to_upstream:
                result.to_upstream += len(data)
            else:
                result.to_client += len(data)
        with contextlib.suppress(*_BROKEN):
            await dst.send_eof()

    def _abort(reason: str) -> None:
        if result.reason == "done":
            result.reason = reason
        scope.cancel()

    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward, client, upstream, "client", "upstream", True)
            nursery.start_soon(forward, upstream, client, "upstream", "client", False)
    if scope.cancelled_caught and result.reason == "done":
        result.reason = "idle_timeout"
    return result


_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
