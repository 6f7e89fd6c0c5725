"""The hot loop: plaintext between a TLS client socket and an upstream socket, both ways.

Theory of operation
-------------------
After the handshake (``tls/handshake.py``), the connection is driven here directly: raw
non-blocking sockets, ``trio.lowlevel.wait_readable/wait_writable``, and the
``SSL.Connection``. Profiles of the stream-stacked version showed trio's per-call machinery
(checkpoints, conflict detectors, cancel-scope bookkeeping) costing more than OpenSSL itself
on small exchanges.

Two modes. *Socket mode* (the normal one): the connection was made on the client socket
(its ClientHello was only peeked), or, as soon as both memory BIOs are empty, the SSL
object is moved onto the client socket (``attach_socket``), so reading and writing a record
is one Python call into OpenSSL, which does the syscalls and the crypto itself, as in HAProxy
or nginx. (Without read-ahead, which pyOpenSSL does not expose, OpenSSL reads a record in two
small syscalls, header then body; still far cheaper than the Python round trips it saves.)
*Memory mode* is the start for a connection whose ClientHello had to be read off the socket
(bytes that arrived with the client's Finished may still sit in the incoming BIO) and the
fallback when pyOpenSSL's internals are not reachable: ciphertext is moved between BIOs and
the socket in Python. The client-to-upstream
task switches modes at the first moment nothing is buffered and nobody is writing.

Reads wait first, then read (unless OpenSSL already holds data): in a request/response
exchange the next bytes are almost never there yet, so trying first would only add a failing
call and, with pyOpenSSL, an exception. The exceptions: the first read (a client sends its
request right behind its Finished, so it has usually arrived when the pipe starts), and on
the upstream side, more reads after a wake-up while reads fill the buffer (a bulk body), or
one more after a short read until one finds nothing (an upstream's FIN usually follows its
last answer at once); see ``upstream_to_client``. Writes try first: the socket buffer nearly
always has room. The wait for readable data is also what keeps each loop fair to other tasks.

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
import socket
from dataclasses import dataclass

import trio
from OpenSSL import SSL
from trio.lowlevel import wait_readable, wait_writable

from ..tls.stream import (
    attach_socket,
    incoming_pending,
    outgoing_pending,
    read_plaintext,
    release_idle_buffers,
    write_plaintext,
)

CHUNK = 65536
MAX_READ = 262144  # upstream reads grow to this while the client keeps up
_READS_PER_WAKE = 8  # at most this many upstream reads between two waits (fairness)
_SMALL = 16384  # reads above this may have grown OpenSSL's buffers
_BROKEN = (SSL.Error, OSError)


@dataclass(slots=True)
class PipeResult:
    to_upstream: int = 0
    to_client: int = 0
    reason: str = "done"  # done | idle_timeout | client_reset | upstream_reset | client_tls_error


async def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """Write everything; wait for writability only when the socket buffer is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await wait_writable(sock)
            continue
        view = view[sent:]


class _Client:
    """The TLS side: one SSL object, two tasks, two modes (see the module docstring)."""

    __slots__ = ("blocked", "busy", "conn", "done", "sock", "socket_mode")

    def __init__(self, conn: SSL.Connection, sock: socket.socket, socket_mode: bool) -> None:
        self.conn = conn
        self.sock = sock
        self.socket_mode = socket_mode
        # Memory mode: one task at a time drains the outgoing BIO, in BIO (FIFO) order.
        self.busy = False
        self.done: trio.Event | None = None
        self.blocked = 0  # socket-mode writes that had to wait for the client

    def try_socket_mode(self) -> None:
        conn = self.conn
        if self.busy or conn.pending():
            return
        if attach_socket(conn, self.sock.fileno()):
            self.socket_mode = True

    async def write(self, data: bytes) -> None:
        """Encrypt and send ``data`` (all of it, or raise)."""
        conn = self.conn
        if self.socket_mode:
            while True:
                try:
                    # Partial writes are off on our contexts: all of data, or an error with
                    # the record kept for the retry (which must pass the same bytes).
                    write_plaintext(conn, data)
                    return
                except SSL.WantWriteError:
                    self.blocked += 1
                    await wait_writable(self.sock)
                except SSL.WantReadError:
                    await wait_readable(self.sock)
        conn.sendall(data)
        await self.flush()

    async def flush(self) -> None:
        """Memory mode: send what OpenSSL wrote to the outgoing BIO."""
        if self.socket_mode:
            return
        if self.busy:
            # Another task is draining the BIO and will send our bytes too; wait for it so
            # the caller keeps its back-pressure.
            if self.done is None:
                self.done = trio.Event()
            await self.done.wait()
            return
        self.busy = True
        conn = self.conn
        try:
            while True:
                # Read exactly what is there: bio_read allocates its argument's size.
                size = outgoing_pending(conn)
                if size == 0:
                    break
                try:
                    out = conn.bio_read(size if size > 0 else CHUNK)
                except SSL.WantReadError:
                    break
                await send_all(self.sock, out)
        finally:
            self.busy = False
            if self.done is not None:
                self.done.set()
                self.done = None

    async def close_notify(self) -> None:
        conn = self.conn
        for _ in range(8):
            try:
                conn.shutdown()
                break
            except SSL.WantWriteError:
                await wait_writable(self.sock)
            except SSL.WantReadError:
                break  # our close_notify is out; we do not wait for theirs
        await self.flush()


async def pipe(
    conn: SSL.Connection,
    client: socket.socket,
    upstream: socket.socket,
    *,
    idle_timeout: float,
    pending: bytes = b"",
    on_socket: bool = False,
    scope: trio.CancelScope | None = None,
    result: PipeResult | None = None,
) -> PipeResult:
    """Forward until both directions ended, a side resets, or ``idle_timeout`` passes.

    ``on_socket``: ``conn`` was made with ``client`` as its transport (no memory BIOs), so
    the pipe starts in socket mode.

    ``scope``: the caller's cancel scope, already entered, with its deadline already set for
    the idle timeout. The pipe moves that deadline on activity and cancels the scope to end
    early, so the caller must read ``result`` (pass one in) after its own ``with`` block,
    and treat a cancelled scope whose reason is still "done" as the idle timeout. Without
    it the pipe makes and enters a scope of its own. (The data path shares one scope
    between the handshake and the pipe: each scope costs measurably per connection.)
    """
    result = PipeResult() if result is None else result
    own_scope = scope is None
    if scope is None:
        scope = trio.CancelScope(deadline=trio.current_time() + idle_timeout)
    tls = _Client(conn, client, on_socket)
    slack = min(1.0, idle_timeout / 10)
    internals = not on_socket and incoming_pending(conn) >= 0

    def touch() -> None:
        t = trio.current_time()
        if scope.deadline - t < idle_timeout - slack:
            scope.deadline = t + idle_timeout

    def abort(reason: str) -> None:
        if result.reason == "done":
            result.reason = reason
        scope.cancel()

    async def client_to_upstream() -> None:
        grown = False
        first = True
        while True:
            data: bytes | None = None
            # Ask OpenSSL only when it may have something: otherwise the call could only
            # raise WantReadError, and an exception per request is measurable here.
            if tls.socket_mode:
                if first or conn.pending():
                    first = False
                    data = b""
            elif not internals or conn.pending() or incoming_pending(conn):
                data = b""
            if data is not None:
                try:
                    data = read_plaintext(conn, CHUNK)
                except SSL.WantReadError:
                    data = None
                except SSL.WantWriteError:
                    await wait_writable(client)
                    continue
                except SSL.ZeroReturnError:
                    break  # close_notify (or, in socket mode, a plain FIN)
                except SSL.SysCallError as exc:
                    if exc.args[0] == -1:
                        break  # unexpected EOF: a ragged but ordinary end
                    abort("client_reset")
                    return
                except SSL.Error:
                    abort("client_tls_error")
                    return
            if data is None:
                if internals and not tls.socket_mode:
                    tls.try_socket_mode()
                    if not tls.socket_mode and grown:
                        # About to wait, maybe long: hand back buffers a burst grew.
                        grown = not release_idle_buffers(conn)
                await wait_readable(client)
                if tls.socket_mode:
                    try:
                        data = read_plaintext(conn, CHUNK)
                    except SSL.WantReadError:
                        continue
                    except SSL.WantWriteError:
                        await wait_writable(client)
                        continue
                    except SSL.ZeroReturnError:
                        break
                    except SSL.SysCallError as exc:
                        if exc.args[0] == -1:
                            break
                        abort("client_reset")
                        return
                    except SSL.Error:
                        abort("client_tls_error")
                        return
                else:
                    try:
                        raw = client.recv(CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError:
                        abort("client_reset")
                        return
                    if not raw:
                        break  # FIN without close_notify
                    grown = grown or len(raw) > _SMALL
                    conn.bio_write(raw)
                    continue
            if not tls.socket_mode and outgoing_pending(conn):
                await tls.flush()  # e.g. a KeyUpdate answer
            touch()
            try:
                await send_all(upstream, data)
            except OSError:
                abort("upstream_reset")
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
                    abort("upstream_reset")
                    return
            if data is None:
                await wait_readable(upstream)
                try:
                    data = upstream.recv(size)
                except BlockingIOError:
                    continue
                except OSError:
                    abort("upstream_reset")
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
                await tls.write(data)
            except _BROKEN:
                abort("client_reset")
                return
            result.to_client += len(data)
            if tls.blocked != blocked:
                size = CHUNK
            elif full and size < MAX_READ and tls.socket_mode:
                size *= 2
        try:
            await tls.close_notify()
            client.shutdown(socket.SHUT_WR)
        except _BROKEN:
            pass

    with scope if own_scope else contextlib.nullcontext():
        if pending:
            # Ciphertext made before the takeover (TLS 1.3 session tickets) goes out first.
            try:
                await send_all(client, pending)
            except OSError:
                abort("client_reset")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream_to_client, name="edgeproxy.pipe.upstream_to_client")
            await client_to_upstream()
    if scope.cancelled_caught and result.reason == "done":
        result.reason = "idle_timeout"
    return result
