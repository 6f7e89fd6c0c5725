"""The server side of one TLS connection on the data path: the only way ``proxy/`` reaches OpenSSL.

Owns: the handshake (on the socket, or on memory BIOs primed with bytes already read), reading
and writing plaintext, close_notify, the move from memory BIOs onto the socket, handing back
the buffers an idle memory-BIO connection grew, and the one mapping of OpenSSL's exceptions
(``_classify``) to ours: ``TLSHandshakeError`` during the handshake, ``ClientBroken`` after it,
"want read" / "want write" / "end" as values. Must not know: routes, certificates (the caller
passes a context), upstreams, metrics, how the ClientHello was found (we get the bytes already
taken off the socket, if any).

Theory of operation
===================

No stream layers: a raw non-blocking socket, ``waits.wait_readable/wait_writable`` (trio's
in a task, the reactor's in a driven connection: ``edgeproxy/waits.py``) and one
``SSL.Connection``. Profiles of a stream-stacked version showed trio's per-call
machinery (checkpoints, conflict detectors, cancel-scope bookkeeping) costing more than OpenSSL
itself on small exchanges. Each OpenSSL call either finishes or says what it waits for, and
the caller awaits exactly that (as in ``trio/_ssl.py``'s ``_retry``, but one task owns the
handshake and each direction after it, so there are no locks).

Two modes. *Socket mode* (the usual one): the ClientHello was only peeked, so it is still in
the socket; OpenSSL reads it, and everything after it, from the socket and writes its flights
and records there itself: no ciphertext passes through Python, and reading or writing a record
is one call (``read_plaintext``/``write_plaintext``: one ``SSL_read``/``SSL_write`` on
success). Without read-ahead, which pyOpenSSL does not expose, OpenSSL reads a record in two
small syscalls, header then body; still far cheaper than the Python round trips it saves.
*Memory mode*: the ClientHello had to be read off the socket (it arrived in pieces, or behind a
PROXY header in one segment we read), so the connection starts on memory BIOs primed with those
bytes and ciphertext moves between BIOs and socket in Python. ``receive`` moves the connection
onto the socket (``attach_socket``) at the first moment both BIOs are empty and no task is
sending; memory mode also remains the fallback when pyOpenSSL's internals are not reachable.

On the memory-BIO path, TLS 1.3 session tickets, which OpenSSL emits in the step that
completes the handshake, are not sent but held (``held``) and go out in front of the first
response (``send_held``), so they share its segment and a handshake never waits on a client
that is not reading yet. On the socket OpenSSL writes them at once: a fresh socket's send
buffer always has room.

Reads (``receive``) wait first, then read, unless OpenSSL already holds data: in a
request/response exchange the next bytes are almost never there yet, so trying first would add
a failing call and an exception per request. The exception is the first read: a client sends
its request right behind its Finished, so it has usually arrived. Writes (``send``) try first:
the socket buffer nearly always has room. Partial writes are off on our contexts, so a write
is all of the buffer or an error with the record kept for the retry (which passes the same
bytes, as ``SSL_write(3)`` requires).

For a caller that does its own waiting (the pipe's reactor), socket mode also offers one
step that never waits each way: ``receive_into`` and ``send_from`` read into and write from a
shared ``Scratch`` buffer (one ``SSL_read``/``SSL_write``, no bytes object), answering
"would wait" as a value, and ``send_eof_nowait``; ``receive``, ``send`` and ``send_eof`` go
on from there.

Memory mode, memory: a memory BIO keeps its largest buffer, so when a burst grew one and the
connection is about to wait (maybe long), both BIOs are swapped for empty ones
(``release_idle_buffers``).

Invariants: only the task running ``receive`` (or, while that task is parked, the caller of
``receive_into``) reads the socket and only one task at a time
drains the outgoing BIO (``_busy``; a second sender waits for the first, keeping its
back-pressure); after ``attach_socket`` nothing touches the BIOs.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Sequence
from typing import Final

import trio
from OpenSSL import SSL

from ..waits import handover, wait_readable, wait_writable
from .contexts import ServerIdentity, new_server_connection
from .errors import PEER_CLOSED, TLSHandshakeError, describe_openssl, reason_from_openssl
from .openssl_internals import (
    HANDSHAKE_DONE,
    HANDSHAKE_WANTS_WRITE,
    READ_AGAIN,
    READ_AGAIN_WRITE,
    Internals,
    Scratch,
    attach_socket,
    handshake_step,
    incoming_pending,
    outgoing_pending,
    read_into,
    read_plaintext,
    release_idle_buffers,
    write_from,
    write_plaintext,
)

__all__ = [
    "AGAIN",
    "AGAIN_WRITE",
    "ClientBroken",
    "Failure",
    "Scratch",
    "Servable",
    "ServerTLS",
    "send_all",
    "send_quietly",
]

# What a connection can be served with: a context with its certificate, or an identity on its
# chain's shared context (``tls/identities.py``).
Servable = SSL.Context | ServerIdentity

_RECV: Final = 65536  # socket reads during a memory-BIO handshake, and BIO drains
_SMALL: Final = 16384  # memory-mode socket reads above this may have grown the BIOs
_CLOSE_GRACE: Final = 1.0  # seconds a best-effort close may spend sending close_notify
_SHUTDOWN_TRIES: Final = 8  # SSL_shutdown calls that may wait for room in the socket


class Failure(enum.Enum):
    """Why the client's side broke after the handshake."""

    RESET = "reset"  # the transport failed: reset, broken pipe
    TLS_ERROR = "tls_error"  # the peer broke the TLS protocol (bad record, bad MAC ...)


class ClientBroken(Exception):
    """The client's side of an established connection cannot go on (``failure`` says why)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.value)
        self.failure = failure


class _Next(enum.Enum):
    """What an OpenSSL call that did not finish waits for."""

    READ = "read"  # more ciphertext from the client
    WRITE = "write"  # room in the socket
    END = "end"  # nothing more will come: close_notify, or a TCP FIN without one


# What ``ServerTLS.receive_into`` returns when it cannot finish without waiting.
AGAIN: Final = READ_AGAIN  # no whole record yet: wait until the socket is readable
AGAIN_WRITE: Final = READ_AGAIN_WRITE  # OpenSSL must write first: wait until it is writable
_NOWAIT_CODES: Final = {_Next.READ: AGAIN, _Next.WRITE: AGAIN_WRITE, _Next.END: 0}


def _classify(exc: SSL.Error, *, handshake: bool = False) -> _Next:
    """The one mapping of OpenSSL's exceptions: what to wait for, or our error raised.

    During the handshake a failure is ``TLSHandshakeError`` with its reason token (an EOF or a
    reset is ``peer_closed``). After it, a close_notify or a FIN (with or without close_notify:
    a ragged end is how much of the web closes) is ``END``; any other system error is
    ``ClientBroken(RESET)``, any other TLS error ``ClientBroken(TLS_ERROR)``.
    """
    if isinstance(exc, SSL.WantReadError):
        return _Next.READ
    if isinstance(exc, SSL.WantWriteError):
        return _Next.WRITE
    eof = isinstance(exc, SSL.ZeroReturnError)
    if handshake:
        if eof or isinstance(exc, SSL.SysCallError):
            raise TLSHandshakeError(PEER_CLOSED, str(exc)) from None
        entries = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        raise TLSHandshakeError(reason_from_openssl(entries), describe_openssl(entries)) from None
    if eof:
        return _Next.END
    if isinstance(exc, SSL.SysCallError):
        if exc.args and exc.args[0] == -1:
            return _Next.END  # unexpected EOF: a ragged but ordinary end
        raise ClientBroken(Failure.RESET) from None
    raise ClientBroken(Failure.TLS_ERROR) from None


async def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """Write everything to a non-blocking socket; wait for writability only when it is full.

    ``OSError`` (a reset, a broken pipe) propagates.
    """
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await wait_writable(sock)
            continue
        view = view[sent:]


async def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Best effort: at most ``_CLOSE_GRACE`` seconds, failures ignored (we are closing)."""
    try:
        sent = sock.send(data)  # a closing connection's few bytes nearly always fit at once
    except BlockingIOError:
        sent = 0
    except OSError:
        return
    if sent == len(data):
        return
    await handover()  # the grace is a trio timeout: a task's
    with trio.move_on_after(_CLOSE_GRACE):
        try:
            await send_all(sock, memoryview(data)[sent:])
        except OSError:
            pass


class ServerTLS:
    """One server-side TLS connection on a non-blocking socket (see the module docstring).

    ``primed``: bytes already read off ``sock`` that start with the ClientHello (memory mode);
    ``None`` when the ClientHello is still in the socket (socket mode).
    """

    __slots__ = (
        "_busy",
        "_done",
        "_first",
        "_grown",
        "_internals",
        "blocked",
        "conn",
        "held",
        "on_socket",
        "primed",
        "sock",
    )

    def __init__(
        self,
        ctx: Servable,
        sock: socket.socket,
        *,
        alpn: Sequence[str] = (),
        session_ctx: SSL.Context | None = None,
        primed: bytes | None = None,
    ) -> None:
        self.sock = sock
        self.on_socket = primed is None
        self.primed = primed or b""
        self.conn = new_server_connection(
            ctx, alpn=alpn, sock=sock if primed is None else None, session_ctx=session_ctx
        )
        self.held = b""  # memory mode: ciphertext to send before the first response
        self.blocked = 0  # socket-mode writes that had to wait for the client
        self._busy = False  # memory mode: a task is draining the outgoing BIO
        self._done: trio.Event | None = None  # set when that task is done
        self._first = True  # the first read is tried before waiting
        self._grown = False  # memory mode: a big read may have grown the BIOs
        self._internals = False  # memory mode with BIO fill levels readable (set by accept)

    # ---- the handshake ---------------------------------------------------------------------

    async def accept(self) -> None:
        """Complete the server handshake. Raises ``TLSHandshakeError``.

        On the memory path a fatal alert OpenSSL produced is sent (one try, never waiting on a
        failing peer) before raising, and TLS 1.3 session tickets are kept in ``held``.
        """
        conn = self.conn
        if self.on_socket:
            while True:
                try:
                    step = handshake_step(conn)
                except SSL.Error as exc:
                    _classify(exc, handshake=True)  # raises: handshake_step returns "not yet"
                    raise  # pragma: no cover
                if step == HANDSHAKE_DONE:
                    return
                if step == HANDSHAKE_WANTS_WRITE:
                    await wait_writable(self.sock)
                else:
                    await wait_readable(self.sock)
        if self.primed:
            conn.bio_write(self.primed)
            self.primed = b""
        sock = self.sock
        while True:
            try:
                # A memory BIO never waits to write: anything but done wants more input.
                done = handshake_step(conn) == HANDSHAKE_DONE
            except SSL.Error as exc:
                try:
                    _classify(exc, handshake=True)  # raises: handshake_step returns "not yet"
                except TLSHandshakeError:
                    alert = self._take_output()
                    if alert:
                        try:
                            sock.send(alert)
                        except OSError:
                            pass
                    raise
                raise  # pragma: no cover
            out = self._take_output()
            if done:
                self.held = out  # TLS 1.3: the session tickets
                self._internals = incoming_pending(conn) >= 0
                return
            if out:
                try:
                    await send_all(sock, out)
                except OSError as exc:
                    raise TLSHandshakeError(PEER_CLOSED, str(exc)) from None
            while True:
                await wait_readable(sock)
                try:
                    data = sock.recv(_RECV)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise TLSHandshakeError(PEER_CLOSED, str(exc)) from None
                break
            if not data:
                raise TLSHandshakeError(PEER_CLOSED, "EOF during the handshake")
            conn.bio_write(data)

    @property
    def alpn(self) -> str | None:
        """The protocol ALPN agreed on, or None."""
        proto = self.conn.get_alpn_proto_negotiated()
        return proto.decode("ascii", "replace") if proto else None

    # ---- after the handshake ---------------------------------------------------------------

    async def send_held(self) -> None:
        """Send what the memory-BIO handshake held back; before anything else is sent."""
        held, self.held = self.held, b""
        try:
            await send_all(self.sock, held)
        except OSError:
            raise ClientBroken(Failure.RESET) from None

    async def receive(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext; ``b""`` at the end. Raises ``ClientBroken``."""
        conn = self.conn
        sock = self.sock
        waited = False  # socket mode: the socket was readable, so OpenSSL may have a record
        while True:
            # Ask OpenSSL only when it may have something: otherwise the call could only
            # raise WantReadError, and an exception per request is measurable here.
            ask = False
            if self.on_socket:
                if waited or self._first or conn.pending():
                    self._first = waited = False
                    ask = True
            elif not self._internals or conn.pending() or incoming_pending(conn):
                ask = True
            if ask:
                try:
                    data = read_plaintext(conn, size)
                except SSL.Error as exc:
                    step = _classify(exc)
                    if step is _Next.END:
                        return b""
                    if step is _Next.WRITE:
                        await wait_writable(sock)
                        continue
                else:
                    if not self.on_socket and outgoing_pending(conn):
                        await self.flush()  # e.g. a KeyUpdate answer
                    return data
            if self._internals and not self.on_socket:
                self._try_socket_mode()
                if not self.on_socket and self._grown:
                    # About to wait, maybe long: hand back buffers a burst grew.
                    self._grown = not release_idle_buffers(conn)
            await wait_readable(sock)
            if self.on_socket:
                waited = True
                continue
            try:
                raw = sock.recv(size)
            except BlockingIOError:
                continue
            except OSError:
                raise ClientBroken(Failure.RESET) from None
            if not raw:
                return b""  # FIN without close_notify
            self._grown = self._grown or len(raw) > _SMALL
            conn.bio_write(raw)

    def _try_socket_mode(self) -> None:
        conn = self.conn
        if self._busy or conn.pending():
            return
        if attach_socket(conn, self.sock.fileno()):
            self.on_socket = True

    async def send(self, data: bytes) -> None:
        """Encrypt and send all of ``data``. Raises ``ClientBroken`` (the client is gone)."""
        conn = self.conn
        if self.on_socket:
            while True:
                try:
                    write_plaintext(conn, data)
                    return
                except SSL.Error as exc:
                    step = _classify(exc)
                    if step is _Next.WRITE:
                        self.blocked += 1
                        await wait_writable(self.sock)
                    elif step is _Next.READ:
                        await wait_readable(self.sock)
                    else:
                        raise ClientBroken(Failure.RESET) from None
        try:
            conn.sendall(data)
        except SSL.Error as exc:
            _classify(exc)
            raise ClientBroken(Failure.RESET) from None
        await self.flush()

    # ---- without waiting (socket mode): for a caller that does its own waiting --------------

    @property
    def nowait(self) -> bool:
        """``receive_into`` and ``send_from`` may be used: socket mode, one-call reads and
        writes reachable, nothing held back."""
        return self.on_socket and Internals.plaintext_calls and not self.held

    def receive_into(self, scratch: Scratch) -> int:
        """One read of plaintext into ``scratch`` that never waits: the byte count; 0 at the
        end (close_notify, or a FIN); ``AGAIN`` or ``AGAIN_WRITE`` when it would have to wait
        (``receive`` then goes on from there). Raises ``ClientBroken``."""
        try:
            return read_into(self.conn, scratch)
        except SSL.Error as exc:
            return _NOWAIT_CODES[_classify(exc)]

    def send_from(self, scratch: Scratch, n: int) -> bool:
        """Encrypt and send ``scratch``'s first ``n`` bytes without waiting. False: the socket
        is full; ``send`` with a copy of the same bytes finishes the write (and waits).
        Raises ``ClientBroken``."""
        try:
            write_from(self.conn, scratch, n)
            return True
        except SSL.Error as exc:
            step = _classify(exc)
            if step is _Next.WRITE:
                self.blocked += 1
                return False
            if step is _Next.READ:
                return False
            raise ClientBroken(Failure.RESET) from None

    async def flush(self) -> None:
        """Memory mode: send what OpenSSL wrote to the outgoing BIO. Raises ``ClientBroken``."""
        if self.on_socket:
            return
        if self._busy:
            # Another task is draining the BIO and will send our bytes too; wait for it so
            # the caller keeps its back-pressure.
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()
            return
        self._busy = True
        try:
            while out := self._take_output(_RECV):
                await send_all(self.sock, out)
        except OSError:
            raise ClientBroken(Failure.RESET) from None
        finally:
            self._busy = False
            if self._done is not None:
                self._done.set()
                self._done = None

    async def send_eof(self) -> None:
        """close_notify, then FIN; best effort (a broken client needs neither)."""
        try:
            for _ in range(_SHUTDOWN_TRIES):
                step = self._close_notify()
                if step is None:
                    break
                if step is _Next.END:
                    return
                await wait_writable(self.sock)
            await self.flush()
            self.sock.shutdown(socket.SHUT_WR)
        except (ClientBroken, OSError):
            pass

    def send_eof_nowait(self) -> bool:
        """``send_eof`` in socket mode when it needs no wait; False: ``send_eof`` finishes it."""
        try:
            step = self._close_notify()
            if step is _Next.WRITE:
                return False
            if step is None:
                self.sock.shutdown(socket.SHUT_WR)
        except (ClientBroken, OSError):
            pass
        return True

    def _close_notify(self) -> _Next | None:
        """One ``SSL_shutdown``: None when our close_notify is out (we do not wait for theirs),
        else what it waits for. Raises ``ClientBroken``."""
        try:
            self.conn.shutdown()
        except SSL.Error as exc:
            step = _classify(exc)
            return None if step is _Next.READ else step
        return None

    async def close_quietly(self) -> None:
        """A clean TLS close before giving up on a connection (the client sees an orderly end,
        not a reset): close_notify once, sent with what the handshake held; never raises."""
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass  # not sent, or the client is gone: we are closing either way
        if self.on_socket:
            return  # OpenSSL wrote it to the socket itself (or could not, without waiting)
        out = self.held + self._take_output()
        self.held = b""
        await send_quietly(self.sock, out)

    def _take_output(self, limit: int = 0) -> bytes:
        """Everything in the outgoing BIO (at most ``limit`` bytes when the fill level is
        unknown and ``limit`` is set)."""
        conn = self.conn
        size = outgoing_pending(conn)
        if size == 0:
            return b""
        if size > 0:
            return conn.bio_read(size)  # exactly what is there: bio_read allocates its argument
        chunks = []
        while True:
            try:
                chunks.append(conn.bio_read(_RECV))
            except SSL.Error:
                return b"".join(chunks)
            if limit:
                return chunks[0]
