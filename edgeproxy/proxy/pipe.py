"""The hot loop: plaintext between a TLS client and an upstream socket, both ways.

Owns: the two directions' loops, half-close, back-pressure, the idle deadline and why a pipe
ended (``PipeEnd``). Must not know: OpenSSL (the client side is a ``tls.server.ServerTLS``:
``receive``, ``send``, ``send_eof``), certificates, routes.

Theory of operation
-------------------
Raw non-blocking sockets and ``trio.lowlevel.wait_readable``: profiles of a stream-stacked
version showed trio's per-call machinery (checkpoints, conflict detectors, cancel-scope
bookkeeping) costing more than OpenSSL itself on small exchanges. The client side's own
rules (socket and memory modes, when a read tries before waiting) are ``tls/server.py``'s.

On the upstream side, reads wait first, then read: in a request/response exchange the next
bytes are almost never there yet. The exceptions: more reads after a wake-up while reads fill
the buffer (a bulk body), or one more after a short read until one finds nothing (an
upstream's FIN usually follows its last answer at once); see ``upstream_to_client``. Writes
try first: the socket buffer nearly always has room. The wait for readable data is also what
keeps each loop fair to other tasks.

Half-close is honoured in both directions. Client close_notify or FIN: shut the upstream's
write side, keep forwarding the answer. Upstream FIN: send close_notify and FIN to the client,
keep forwarding what the client still sends. The pipe ends when both directions ended.

Memory is bounded: each direction holds one chunk in flight and reads again only after the
write finished, so a slow reader back-pressures a fast writer. A chunk is ``CHUNK`` bytes,
except upstream reads while the client takes everything at once: they grow to ``MAX_READ``
(fewer, bigger chunks: each one costs a round of Python calls) and drop back to ``CHUNK`` as
soon as a write has to wait. One idle deadline covers both directions; it is moved at most
about once a second, because moving a trio deadline is a heap operation.
"""

from __future__ import annotations

import contextlib
import enum
import socket
from dataclasses import dataclass

import trio
from trio.lowlevel import wait_readable

from ..tls.server import ClientBroken, Failure, ServerTLS, send_all

__all__ = ["CHUNK", "MAX_READ", "PipeEnd", "PipeResult", "pipe", "send_all"]

CHUNK = 65536
MAX_READ = 262144  # upstream reads grow to this while the client keeps up
_READS_PER_WAKE = 8  # at most this many upstream reads between two waits (fairness)


class PipeEnd(enum.StrEnum):
    """Why a pipe ended (``DONE``: both directions ended in order)."""

    DONE = "done"
    IDLE_TIMEOUT = "idle_timeout"
    CLIENT_RESET = "client_reset"
    UPSTREAM_RESET = "upstream_reset"
    CLIENT_TLS_ERROR = "client_tls_error"


_CLIENT_FAILURE = {Failure.RESET: PipeEnd.CLIENT_RESET, Failure.TLS_ERROR: PipeEnd.CLIENT_TLS_ERROR}


@dataclass(slots=True)
class PipeResult:
    to_upstream: int = 0
    to_client: int = 0
    reason: PipeEnd = PipeEnd.DONE


async def pipe(
    tls: ServerTLS,
    upstream: socket.socket,
    *,
    idle_timeout: float,
    scope: trio.CancelScope | None = None,
    result: PipeResult | None = None,
) -> PipeResult:
    """Forward until both directions ended, a side resets, or ``idle_timeout`` passes.

    ``tls``: the client's connection, its handshake done (``ServerTLS.accept``).

    ``scope``: the caller's cancel scope, already entered, with its deadline already set for
    the idle timeout. The pipe moves that deadline on activity and cancels the scope to end
    early, so the caller must read ``result`` (pass one in) after its own ``with`` block,
    and treat a cancelled scope whose reason is still ``DONE`` as the idle timeout. Without
    it the pipe makes and enters a scope of its own. (The data path shares one scope
    between the handshake and the pipe: each scope costs measurably per connection.)
    """
    result = PipeResult() if result is None else result
    own_scope = scope is None
    if scope is None:
        scope = trio.CancelScope(deadline=trio.current_time() + idle_timeout)
    slack = min(1.0, idle_timeout / 10)

    def touch() -> None:
        t = trio.current_time()
        if scope.deadline - t < idle_timeout - slack:
            scope.deadline = t + idle_timeout

    def abort(reason: PipeEnd) -> None:
        if result.reason is PipeEnd.DONE:
            result.reason = reason
        scope.cancel()

    async def client_to_upstream() -> None:
        while True:
            try:
                data = await tls.receive(CHUNK)
            except ClientBroken as exc:
                abort(_CLIENT_FAILURE[exc.failure])
                return
            if not data:
                break  # close_notify, or a FIN
            touch()
            try:
                await send_all(upstream, data)
            except OSError:
                abort(PipeEnd.UPSTREAM_RESET)
                return
            result.to_upstream += len(data)
        try:
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def upstream_to_client() -> None:
        # Reading: after a wake-up, keep reading while reads fill the buffer (a bulk body
        # has more queued), up to _READS_PER_WAKE reads, which keeps the loop fair. After a
        # short read, one more try (an upstream that closes after its answer has usually
        # sent its FIN with it), until the first such try finds nothing (a keep-alive
        # upstream waiting for the next request): then short reads go straight back to
        # waiting, so idle pauses cost one failed call per connection, not one per answer.
        # Read size: from CHUNK, doubled after each full read the client took without the
        # write having to wait, up to MAX_READ, and back to CHUNK as soon as a write waits.
        # Each chunk costs a round of Python calls, so a fast bulk transfer wants few, big
        # ones; a client that cannot keep up holds one chunk of at most MAX_READ when its
        # first write waits, and CHUNK-sized ones after that until it keeps up again.
        speculate = True
        size = CHUNK
        budget = 0  # reads left before the next wait
        probe = False  # the last read came up short: the next one is a guess
        while True:
            data: bytes | None = None
            if budget:
                budget -= 1
                try:
                    data = upstream.recv(size)
                except BlockingIOError:
                    if probe:
                        speculate = False
                    budget = 0
                except OSError:
                    abort(PipeEnd.UPSTREAM_RESET)
                    return
            if data is None:
                await wait_readable(upstream)
                try:
                    data = upstream.recv(size)
                except BlockingIOError:
                    continue
                except OSError:
                    abort(PipeEnd.UPSTREAM_RESET)
                    return
                budget = _READS_PER_WAKE
            if not data:
                break
            full = len(data) == size
            probe = not full
            if probe and not speculate:
                budget = 0
            touch()
            blocked = tls.blocked
            try:
                await tls.send(data)
            except ClientBroken:
                abort(PipeEnd.CLIENT_RESET)
                return
            result.to_client += len(data)
            if tls.blocked != blocked:
                size = CHUNK
            elif full and size < MAX_READ and tls.on_socket:
                size *= 2
        await tls.send_eof()

    with scope if own_scope else contextlib.nullcontext():
        if tls.held:
            # Ciphertext the handshake held back (TLS 1.3 session tickets) goes out first.
            try:
                await tls.send_held()
            except ClientBroken:
                abort(PipeEnd.CLIENT_RESET)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream_to_client, name="edgeproxy.pipe.upstream_to_client")
            await client_to_upstream()
    if scope.cancelled_caught and result.reason is PipeEnd.DONE:
        result.reason = PipeEnd.IDLE_TIMEOUT
    return result
