"""Server TLS handshake on a raw non-blocking socket, for the data path.

The data path's twin of ``TLSStream.do_handshake`` for the hot path: no stream layers, no
locks (one task owns the connection during its handshake), one ``SSL_do_handshake`` call per
flight. Two forms:

- ``accept_tls_on_socket``: the usual one. The ClientHello was only peeked (``MSG_PEEK``), so
  it is still in the socket and OpenSSL reads it, and everything after it, from the socket
  itself, and writes its flights there too: no ciphertext passes through Python.
- ``accept_tls``: memory BIOs primed with bytes already taken off the socket (a ClientHello
  that arrived in pieces, or after a PROXY header in the same segment); the hot loop in
  ``proxy/pipe.py`` moves the connection onto the socket once both BIOs are empty.

On the memory-BIO path, TLS 1.3 session tickets, which OpenSSL emits in the step that
completes the handshake, are not sent but returned, so they can share a segment with the first
response (and never make a handshake wait on a client that is not reading yet). On the socket
path OpenSSL writes them itself, at once: a fresh socket's send buffer always has room.
"""

from __future__ import annotations

import socket

from OpenSSL import SSL
from trio.lowlevel import wait_readable, wait_writable

from .errors import PEER_CLOSED, TLSHandshakeError, describe_openssl, reason_from_openssl
from .stream import outgoing_pending

_RECV = 65536


def _take_output(conn: SSL.Connection) -> bytes:
    size = outgoing_pending(conn)
    if size == 0:
        return b""
    if size > 0:
        # Exactly what is there: bio_read allocates its argument's size.
        return conn.bio_read(size)
    chunks = []
    while True:
        try:
            chunks.append(conn.bio_read(_RECV))
        except SSL.WantReadError:
            return b"".join(chunks)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await wait_writable(sock)
        except OSError as exc:
            raise TLSHandshakeError(PEER_CLOSED, str(exc)) from None


def _error(exc: SSL.Error) -> TLSHandshakeError:
    if isinstance(exc, (SSL.ZeroReturnError, SSL.SysCallError)):
        return TLSHandshakeError(PEER_CLOSED, str(exc))
    entries = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    return TLSHandshakeError(reason_from_openssl(entries), describe_openssl(entries))


async def accept_tls(conn: SSL.Connection, sock: socket.socket, initial: bytes) -> bytes:
    """Complete the server handshake; return ciphertext to send before the first response.

    ``conn`` is a fresh accept-state memory-BIO connection, ``initial`` the bytes already read
    from ``sock`` (the ClientHello and anything after it). Raises ``TLSHandshakeError``; a
    fatal alert OpenSSL produced is sent (best effort) before raising.
    """
    if initial:
        conn.bio_write(initial)
    while True:
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            done = False
        except SSL.Error as exc:
            alert = _take_output(conn)
            if alert:
                try:
                    sock.send(alert)  # best effort: one try, never wait for a failing peer
                except OSError:
                    pass
            raise _error(exc) from None
        else:
            done = True
        out = _take_output(conn)
        if done:
            return out  # TLS 1.3: the session tickets
        if out:
            await _send_all(sock, out)
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


async def accept_tls_on_socket(conn: SSL.Connection, sock: socket.socket) -> None:
    """Complete the server handshake of a connection made with ``sock`` as its transport.

    OpenSSL sends its own flights, alerts and (TLS 1.3) session tickets. Raises
    ``TLSHandshakeError``.
    """
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            await wait_readable(sock)
        except SSL.WantWriteError:
            await wait_writable(sock)
        except SSL.Error as exc:
            raise _error(exc) from None
