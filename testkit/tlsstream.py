"""TLS over any trio stream, driven through a pyOpenSSL ``Connection`` with memory BIOs: the
tests' general TLS endpoint (clients of the proxy, both ends of in-memory pairs).

Moved out of the product (it was ``edgeproxy/tls/stream.py``): the data path never used it. It
drives sockets and OpenSSL itself through ``edgeproxy.tls.server.ServerTLS``. It stays here as
the reference implementation of the memory-BIO technique, checked against trio's generic
stream conformance tests (``tests/unit/test_tls_stream.py``), and as the TLS client of many
tests. It uses the product's OpenSSL fence (``edgeproxy.tls.openssl_internals``) for BIO fill
levels and swaps, as the memory-mode data path does.

Owns: the byte shuffling between a transport ``trio.abc.Stream`` and OpenSSL, the locking that
makes one TLS connection usable from a sending and a receiving task at once, close_notify and
half-close, the mapping of OpenSSL failures to typed errors, keeping an idle connection's
OpenSSL buffers small. Must not know: certificates, routes, ALPN policy (the context decides),
how the ClientHello was peeked (we only receive the bytes already read).

Theory of operation
===================

This is the pyOpenSSL twin of ``trio.SSLStream`` (read the comment at the top of
``trio/_ssl.py``; the hard parts are the same and so is the shape of ``_retry``).

OpenSSL never touches the network here. The ``Connection`` was made with
``SSL.Connection(ctx, None)``, which gives it two memory BIOs: OpenSSL reads ciphertext from the
incoming BIO and appends ciphertext to the outgoing BIO. Each TLS operation (handshake, read,
write, shutdown) is a synchronous call that either finishes or says "want read": it cannot
progress until more ciphertext arrives. It may also have appended bytes to the outgoing BIO,
which we must put on the wire, in order, before anything produced later. (A memory BIO never
says "want write": it grows instead.)

``_retry(op)`` turns one such operation into an async call:

1. call ``op`` (touching OpenSSL only inside this synchronous step, so no other task can see
   OpenSSL mid-operation: trio only switches tasks at ``await``);
2. take everything from the outgoing BIO;
3. await exactly one thing: if there is something to send, send it (under a strict-FIFO send
   lock taken in the same step, so output leaves in the order OpenSSL produced it); otherwise,
   if the op wants to read, read the transport once and feed the incoming BIO (under a receive
   lock, skipping the read if another task read while we queued: its bytes may be all we
   needed, and a second read could block forever);
4. loop until the op has finished and its output is sent.

A write that reported "want read" must later be retried with the same bytes: ``_write_op``
keeps its position across retries. Want-read during a write only happens while a handshake is
in progress: our server contexts refuse renegotiation (``OP_NO_RENEGOTIATION``; TLS 1.3 has
none), but a client stream must cope with a server that starts one. (OpenSSL accepts
application data interleaved with a renegotiation only inside ``SSL_read``.)

Two more rules from trio: the caller-facing conflict detectors make concurrent ``send_all`` (or
concurrent ``receive_some``) a ``BusyResourceError`` while ``send_all`` plus ``receive_some`` is
fine; and a server's TLS 1.3 session tickets, which OpenSSL emits in the same step that reads
the client's Finished, are held back and sent in front of the first real output, so finishing
the handshake never blocks on a peer that is not reading yet (unbuffered transports would
deadlock) and the tickets share a TCP segment with the first response.

Closing: ``send_eof`` sends close_notify once (``SSL_shutdown`` called once) and half-closes the
transport; receiving keeps working until the peer's close_notify (``b""``) or a TCP EOF without
one (also ``b""``, with ``ragged_eof`` set: normal on the web). ``aclose`` sends close_notify
when it can do so without waiting behind another task's send, gives it a short grace period,
and always closes the transport.

Cost on the hot path: ``receive_some`` normally does one transport read and one ``SSL_read``
(if the incoming BIO is known to be empty we skip the ``SSL_read`` that could only say "want
read"); records already buffered are decrypted into the same result up to ``max_bytes``, so a
64 KiB transport read is handed on in one piece. ``send_all`` does one ``SSL_write`` (our
contexts clear ``SSL_MODE_ENABLE_PARTIAL_WRITE``) and one transport write per 256 KiB. Locks
are taken with ``acquire_nowait`` when free: the transport call that follows is the checkpoint.

Memory: a memory BIO keeps its largest-ever buffer (OpenSSL grows it by a third and never
shrinks it), so one 64 KiB burst each way would pin ~150 KiB per connection for its lifetime.
So once a BIO has held more than ``_BIO_KEEP`` bytes we swap in fresh, empty BIOs (both must be
empty) at the moments a connection is likely to go idle: after a transport read that returned
less than a chunk (we drained the socket: the next read will wait), and after a ``send_all``
shorter than a chunk (a proxied burst ends with a short read of the other side). Full 64 KiB
chunks keep the buffers, because regrowing them costs ~8 us per chunk (OpenSSL's clearing
realloc and fresh pages); a burst ending on an exact multiple of 64 KiB keeps them until the
next short read or write. With ``SSL_MODE_RELEASE_BUFFERS`` (set by our contexts) OpenSSL also
frees its record buffers: an idle server stream measures ~28 KiB (TLSStream and OpenSSL, after
256 KiB each way). pyOpenSSL has no public API for what this needs (BIO fill level, BIO swap,
``SSL_session_reused``); each is one cffi call on the binding pyOpenSSL itself uses, fenced in
``Internals`` (``edgeproxy/tls/openssl_internals.py``: the connection-level private calls
live there alone). If a future pyOpenSSL renames its private attributes we fall back to slower
code with unbounded BIOs, warn once, and ``test_openssl_internals_reachable`` fails.
"""

from __future__ import annotations

import contextlib
import enum
import operator
from collections.abc import Callable
from typing import Final, TypeVar

import trio
from OpenSSL import SSL

from edgeproxy.tls.errors import (
    PEER_CLOSED,
    RENEGOTIATION_REFUSED,
    TLSHandshakeError,
    describe_openssl,
    reason_from_openssl,
)
from edgeproxy.tls.openssl_internals import Internals

__all__ = ["TLSStream", "TLSStreamBroken"]

_T = TypeVar("_T")
_A = TypeVar("_A")

RECEIVE_CHUNK: Final = 65536  # largest transport read, and default receive_some size
_SEND_CHUNK: Final = 262144  # largest plaintext per SSL_write: bounds the outgoing BIO
_BIO_KEEP: Final = 8192  # a BIO that has held more than this is replaced when idle
_CLOSE_GRACE: Final = 1.0  # seconds aclose waits to put close_notify on the wire
_ALERT_GRACE: Final = 1.0  # seconds a failing handshake waits to deliver its fatal alert


class TLSStreamBroken(trio.BrokenResourceError):
    """An established TLS stream hit a fatal TLS error (bad record, refused renegotiation ...).

    A ``trio.BrokenResourceError`` like any other broken transport, with the same ``reason``
    vocabulary as ``TLSHandshakeError`` for logs and metrics.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"TLS stream broken: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _Sentinel(enum.Enum):
    WANT_READ = "want_read"  # the op needs more ciphertext before it can finish
    TRANSPORT_EOF = "transport_eof"  # ... and the transport has none left to give


_WANT_READ: Final = _Sentinel.WANT_READ
_TRANSPORT_EOF: Final = _Sentinel.TRANSPORT_EOF


def _entries(exc: BaseException) -> list[tuple[str, str, str]]:
    """The ``(library, function, reason)`` tuples of an ``SSL.Error`` (empty if none)."""
    arg = exc.args[0] if exc.args else None
    return arg if isinstance(arg, list) else []


class _ConflictDetector:
    """Raise ``BusyResourceError`` when two tasks use the same half of the stream at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


class TLSStream(trio.abc.HalfCloseableStream):
    """A TLS connection over ``transport_stream``, driven by a memory-BIO ``connection``.

    ``connection`` must come from ``SSL.Connection(ctx, None)`` with ``set_accept_state()``
    (server) or ``set_connect_state()`` (client). ``initial_data`` are ciphertext bytes already
    read from the transport (the peeked ClientHello); they are fed to OpenSSL before anything
    else, so only a server stream can be primed.

    Errors: a failed handshake raises ``TLSHandshakeError`` (``.reason`` token); afterwards, a
    TLS failure raises ``TLSStreamBroken`` (a ``trio.BrokenResourceError`` with ``.reason``) and
    transport failures propagate as the transport raised them (trio convention). Cancelling a
    send, or a handshake, leaves the stream broken; cancelling a receive that is waiting for
    the transport does not.
    """

    __slots__ = (
        "_bio_peak",
        "_close_notify_sent",
        "_deferred_error",
        "_delayed_outgoing",
        "_handshake_done",
        "_handshake_error",
        "_handshake_event",
        "_internals",
        "_primed",
        "_received_eof",
        "_recv_conflict",
        "_recv_count",
        "_recv_lock",
        "_refused_renegotiation",
        "_send_conflict",
        "_send_lock",
        "_server_side",
        "_short_read",
        "_state",
        "_transport_eof",
        "_write_pos",
        "connection",
        "ragged_eof",
        "transport_stream",
    )

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        connection: SSL.Connection,
        *,
        initial_data: bytes | bytearray | memoryview = b"",
    ) -> None:
        self.transport_stream: trio.abc.Stream = transport_stream
        self.connection: SSL.Connection = connection
        # True once the peer ended the stream with a TCP EOF instead of a close_notify.
        self.ragged_eof = False
        self._internals = Internals.usable_for(connection)
        if Internals.available and getattr(connection, "_into_ssl", None) is None:
            raise ValueError("connection must be made with SSL.Connection(ctx, None)")
        self._state = _State.OK
        self._handshake_done = False
        self._handshake_event: trio.Event | None = None  # set while/after the handshake runs
        self._handshake_error: TLSHandshakeError | None = None
        self._server_side: bool | None = None  # learnt from the first handshake step
        self._send_lock = trio.StrictFIFOLock()
        self._recv_lock = trio.Lock()
        self._recv_count = 0
        self._send_conflict = _ConflictDetector("another task is sending on this TLSStream")
        self._recv_conflict = _ConflictDetector("another task is receiving on this TLSStream")
        self._delayed_outgoing = b""
        self._deferred_error: SSL.Error | None = None
        self._write_pos = 0
        self._transport_eof = False
        self._received_eof = False
        self._close_notify_sent = False
        self._refused_renegotiation = False
        self._bio_peak = 0
        self._short_read = True  # the last transport read drained it (returned < a chunk)
        self._primed = bool(initial_data)
        if initial_data:
            connection.bio_write(initial_data)
            self._bio_peak = len(initial_data)

    # ---- what the handshake decided -------------------------------------------------------

    @property
    def selected_alpn(self) -> str | None:
        """The ALPN protocol agreed in the handshake, or None."""
        proto = self.connection.get_alpn_proto_negotiated()
        return proto.decode("ascii", "replace") if proto else None

    @property
    def server_name(self) -> str | None:
        """The SNI host name the client sent, or None."""
        name = self.connection.get_servername()
        return name.decode("ascii", "replace") if name else None

    @property
    def tls_version(self) -> str | None:
        """``"TLSv1.2"`` / ``"TLSv1.3"`` once the handshake is done, else None."""
        return self.connection.get_protocol_version_name() if self._handshake_done else None

    @property
    def session_reused(self) -> bool:
        """True when the handshake resumed an earlier session (a session ticket)."""
        if not (self._handshake_done and self._internals):
            return False
        return Internals.session_reused(self.connection)

    # ---- the engine ----------------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLSStream was closed")
        raise trio.BrokenResourceError("this TLSStream is broken")

    def _break(self) -> None:
        if self._state is _State.OK:  # a closed stream stays closed
            self._state = _State.BROKEN

    def _take_outgoing(self) -> bytes:
        conn = self.connection
        if self._internals:
            pending = Internals.outgoing_pending(conn)
            if not pending:
                return b""
            if pending > self._bio_peak:
                self._bio_peak = pending
            return conn.bio_read(pending)
        chunks = []
        while True:
            try:
                chunks.append(conn.bio_read(RECEIVE_CHUNK))
            except SSL.WantReadError:
                return b"".join(chunks)

    def _maybe_renew_bios(self) -> None:
        """Swap in fresh BIOs if the current ones grew big and hold nothing."""
        if self._bio_peak <= _BIO_KEEP or not self._internals:
            return
        conn = self.connection
        if Internals.incoming_pending(conn) or Internals.outgoing_pending(conn):
            return
        if Internals.renew_bios(conn):
            self._bio_peak = 0

    async def _retry(
        self,
        op: Callable[[_A], _T | _Sentinel],
        arg: _A,
        *,
        handshake: bool = False,
        ignore_want_read: bool = False,
    ) -> _T | _Sentinel:
        """Run one OpenSSL operation to completion; see "Theory of operation" above.

        Returns the op's result, or ``_TRANSPORT_EOF`` when it wants to read and the
        transport has ended. Every OpenSSL failure is mapped here and nowhere else.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        while True:
            try:
                result = op(arg)
            except (SSL.Error, TLSHandshakeError) as exc:
                # TLSHandshakeError arrives here when our ALPN callback refused the client:
                # pyOpenSSL re-raises a callback's exception from the failing SSL call.
                raise await self._failed(exc, handshake) from exc
            want_read = result is _WANT_READ and not ignore_want_read
            to_send = self._take_outgoing()
            if handshake:
                if self._server_side is None:
                    # A client speaks first: its first step writes the ClientHello with nothing
                    # to read. A server never writes before it has read something.
                    self._server_side = not (to_send and not self._primed)
                if (
                    not want_read
                    and self._server_side
                    and self.connection.get_protocol_version_name() == "TLSv1.3"
                ):
                    # Only session tickets are produced by the step that completes a TLS 1.3
                    # server handshake; hold them back (see module docstring).
                    self._delayed_outgoing += to_send
                    to_send = b""
            if to_send:
                await self._send_ciphertext(to_send)
                yielded = True
            elif want_read:
                if self._transport_eof:
                    result = _TRANSPORT_EOF
                    break
                await self._receive_ciphertext()
                yielded = True
            if not want_read:
                break
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    async def _send_ciphertext(self, data: bytes) -> None:
        lock = self._send_lock
        try:
            # Uncontended: take the lock without a schedule point (send_all checkpoints).
            try:
                lock.acquire_nowait()
            except trio.WouldBlock:
                await lock.acquire()
            try:
                if self._delayed_outgoing:
                    data = self._delayed_outgoing + data
                    self._delayed_outgoing = b""
                await self.transport_stream.send_all(data)
            finally:
                lock.release()
        except BaseException:
            # The records are consumed from OpenSSL and an unknown part reached the peer: the
            # record sequence is lost for good, whatever interrupted us.
            self._break()
            raise

    async def _receive_ciphertext(self) -> None:
        # If another task read the transport while we waited for the lock, loop back and let
        # OpenSSL look at its bytes instead of reading again (see module docstring, step 3).
        count = self._recv_count
        lock = self._recv_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if count != self._recv_count:
                await trio.lowlevel.checkpoint()
                return
            if self._short_read:
                # The transport had less than a chunk last time: this read will likely wait,
                # maybe for long. (After a full chunk more is queued: keep the buffers.)
                self._maybe_renew_bios()
            data = await self.transport_stream.receive_some(RECEIVE_CHUNK)
            self._recv_count += 1
            if not data:
                self._transport_eof = True
                return
            size = len(data)
            self._short_read = size < RECEIVE_CHUNK
            if size > self._bio_peak:
                self._bio_peak = size
            self.connection.bio_write(data)
        finally:
            lock.release()

    async def _failed(self, exc: BaseException, handshake: bool) -> Exception:
        """Mark the stream broken, try to deliver OpenSSL's fatal alert, build our error."""
        self._break()
        await self._flush_alert()
        if isinstance(exc, TLSHandshakeError):
            reason, detail = exc.reason, exc.detail
        elif self._refused_renegotiation:
            # The client's answer to our no_renegotiation warning is usually a fatal
            # handshake_failure alert; the cause is the refusal.
            reason, detail = RENEGOTIATION_REFUSED, describe_openssl(_entries(exc))
        elif isinstance(exc, (SSL.ZeroReturnError, SSL.SysCallError)):
            reason, detail = PEER_CLOSED, str(exc)
        else:
            entries = _entries(exc)
            reason, detail = reason_from_openssl(entries), describe_openssl(entries)
        if handshake:
            return exc if isinstance(exc, TLSHandshakeError) else TLSHandshakeError(reason, detail)
        return TLSStreamBroken(reason, detail)

    async def _flush_alert(self) -> None:
        # A fatal alert tells the peer why (e.g. protocol_version); worth a short wait, never
        # worth queueing behind another task's send or hanging on a peer that does not read.
        data = self._take_outgoing()
        if not data or self._send_lock.locked():
            return
        with trio.move_on_after(_ALERT_GRACE):
            try:
                self._send_lock.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                await self.transport_stream.send_all(self._delayed_outgoing + data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass
            finally:
                self._send_lock.release()

    # ---- OpenSSL operations (synchronous; run only inside _retry) ------------------------

    def _handshake_op(self, _: None) -> _Sentinel | None:
        try:
            self.connection.do_handshake()
        except SSL.WantReadError:
            return _WANT_READ
        return None

    def _read_op(self, max_bytes: int) -> bytes | _Sentinel:
        if self._deferred_error is not None:
            exc, self._deferred_error = self._deferred_error, None
            raise exc
        conn = self.connection
        internals = self._internals
        if internals and not conn.pending() and not Internals.incoming_pending(conn):
            return _WANT_READ  # nothing buffered: SSL_read could only say so
        try:
            data = conn.recv(max_bytes)
        except SSL.WantReadError:
            if (
                internals
                and self._server_side
                and Internals.outgoing_pending(conn)
                and conn.get_protocol_version_name() == "TLSv1.2"
            ):
                # A TLS 1.2 server read that writes without failing is OpenSSL answering a
                # renegotiation ClientHello with a no_renegotiation warning. (TLS 1.3 reads
                # may write a KeyUpdate; that is fine.)
                self._refused_renegotiation = True
            return _WANT_READ
        except SSL.ZeroReturnError:
            self._received_eof = True
            return b""
        if not internals or len(data) >= max_bytes:
            return data
        # One SSL_read yields one record (<= 16 KiB); decrypt whatever else is already here.
        chunks = [data]
        total = len(data)
        while total < max_bytes and (conn.pending() or Internals.incoming_pending(conn)):
            try:
                more = conn.recv(max_bytes - total)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._received_eof = True
                break
            except SSL.Error as exc:
                self._deferred_error = exc  # raised by the next receive_some, after this data
                break
            chunks.append(more)
            total += len(more)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _write_op(self, view: memoryview) -> _Sentinel | None:
        conn = self.connection
        pos = self._write_pos
        end = len(view)
        try:
            while pos < end:
                pos += conn.send(view[pos:] if pos else view)
        except SSL.WantReadError:
            self._write_pos = pos  # retry with the same remaining bytes (SSL_write(3))
            return _WANT_READ
        self._write_pos = 0
        return None

    def _shutdown_op(self, _: None) -> None:
        # Called once: writes close_notify. Whether the peer's arrived already is irrelevant.
        with contextlib.suppress(SSL.WantReadError):
            self.connection.shutdown()

    # ---- the trio Stream interface -------------------------------------------------------

    def take_delayed_output(self) -> bytes:
        """Hand over ciphertext held back for the first write (TLS 1.3 session tickets).

        For code that takes over the connection after the handshake: send these bytes before
        any other output, and never use this stream for I/O again.
        """
        data, self._delayed_outgoing = self._delayed_outgoing, b""
        return data

    async def do_handshake(self) -> None:
        """Run the handshake if nobody has yet; wait for it if another task is running it.

        Idempotent. Raises ``TLSHandshakeError`` (again, on every call) if it failed.
        """
        if self._handshake_error is not None:
            raise TLSHandshakeError(self._handshake_error.reason, self._handshake_error.detail)
        self._check_status()
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def _ensure_handshake(self) -> None:
        if self._handshake_done:
            return
        self._check_status()
        event = self._handshake_event
        if event is not None:
            await event.wait()
            if not self._handshake_done:
                if self._handshake_error is not None:
                    err = self._handshake_error
                    raise TLSHandshakeError(err.reason, err.detail)
                raise trio.BrokenResourceError("the TLS handshake was interrupted")
            return
        event = self._handshake_event = trio.Event()
        try:
            result = await self._retry(self._handshake_op, None, handshake=True)
            if result is _TRANSPORT_EOF:
                raise TLSHandshakeError(PEER_CLOSED, "EOF during the handshake")
        except TLSHandshakeError as exc:
            self._break()
            self._handshake_error = exc
            raise
        except trio.BrokenResourceError as exc:
            # SSL failures became TLSHandshakeError in _retry; this one is the transport.
            self._break()
            self._handshake_error = TLSHandshakeError(PEER_CLOSED, str(exc) or type(exc).__name__)
            raise self._handshake_error from exc
        except BaseException:
            self._break()
            raise
        else:
            self._handshake_done = True
        finally:
            # Waiters hold their own reference; a finished handshake needs no event.
            event.set()
            self._handshake_event = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` (default 64 KiB) of plaintext; ``b""`` at the end of the stream.

        The end is the peer's close_notify, or a transport EOF without one (then
        ``ragged_eof`` is True).
        """
        with self._recv_conflict:
            if max_bytes is None:
                max_bytes = RECEIVE_CHUNK
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_status()
            if not self._handshake_done:
                await self._ensure_handshake()
            if self._received_eof:
                await trio.lowlevel.checkpoint()
                return b""
            data = await self._retry(self._read_op, max_bytes)
            if isinstance(data, bytes):
                if self._short_read and self._bio_peak > _BIO_KEEP:
                    # The transport was drained and now so is OpenSSL: likely idle from here.
                    self._maybe_renew_bios()
                return data
            # _TRANSPORT_EOF: the peer closed TCP without a close_notify.
            self.ragged_eof = True
            self._received_eof = True
            return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``."""
        with self._send_conflict:
            self._check_status()
            if self._close_notify_sent:
                raise trio.ClosedResourceError("send_eof() was called on this TLSStream")
            if not self._handshake_done:
                await self._ensure_handshake()
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            end = len(view)
            start = 0
            try:
                while start < end:
                    piece = view if end <= _SEND_CHUNK else view[start : start + _SEND_CHUNK]
                    if await self._retry(self._write_op, piece) is _TRANSPORT_EOF:
                        raise TLSStreamBroken(PEER_CLOSED, "EOF during renegotiation")
                    start += len(piece)
            except BaseException:
                if start:
                    self._break()  # a prefix went out: the caller cannot resume
                raise
            if end < RECEIVE_CHUNK:
                # Less than a chunk usually ends a burst (a proxy forwards what one read of
                # the other side gave). Full chunks keep the buffers: more is coming.
                self._maybe_renew_bios()

    async def send_eof(self) -> None:
        """Send close_notify and half-close the transport; receiving continues to work."""
        with self._send_conflict:
            self._check_status()
            if self._close_notify_sent:
                await trio.lowlevel.checkpoint()
                return
            if not self._handshake_done:
                await self._ensure_handshake()
            self._close_notify_sent = True
            await self._retry(self._shutdown_op, None, ignore_want_read=True)
            transport = self.transport_stream
            if isinstance(transport, trio.abc.HalfCloseableStream):
                async with self._send_lock:
                    await transport.send_eof()

    async def wait_send_all_might_not_block(self) -> None:
        """See ``trio.abc.SendStream.wait_send_all_might_not_block``."""
        with self._send_conflict:
            self._check_status()
            # The receive side may be sending (an alert, a key update): share the transport.
            async with self._send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Best-effort close_notify, then close the transport. Never hangs, always closes."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        polite = (
            self._state is _State.OK
            and self._handshake_done
            and not self._close_notify_sent
            and not self._send_lock.locked()
        )
        self._state = _State.CLOSED
        try:
            if polite:
                self._close_notify_sent = True
                # BrokenResourceError: the peer left first, nothing to be polite to.
                with (
                    trio.move_on_after(_CLOSE_GRACE),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await self._retry(self._shutdown_op, None, ignore_want_read=True)
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        await self.transport_stream.aclose()
