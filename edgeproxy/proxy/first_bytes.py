"""A connection's first bytes (PROXY header, ClientHello), left in the socket while they may stay.

Owns: the peek/consume bookkeeping between the parsers of a connection's first bytes and the
socket. Must not know: what the bytes mean (the parsers do), TLS.

Theory of operation: each parser is first shown a *peek* (``MSG_PEEK``): the bytes stay in the
socket, ``queued`` counts them. A parser done with peeked bytes leaves in the socket what it
did not use (``finish``): after a PROXY header, the ClientHello behind it; after a whole
ClientHello, all of it, so OpenSSL reads it from the socket itself. A parser that needs more
than the first peek showed has them read off (a socket stays readable while bytes are queued,
so waiting for more behind a peek would return at once, forever) and reads on with ``read``;
what it read past its own message is ``carried`` to the next parser, which sees it first.
Before a refusal, ``settle`` reads off what is still queued: closing a socket with unread data
sends a reset, which can destroy the alert before the client reads it.
"""

from __future__ import annotations

import socket
from typing import Final

from ..waits import wait_readable

_READ: Final = 16384
_CONSUME: Final = 65536


class FirstBytes:
    __slots__ = ("carried", "queued", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queued = 0  # bytes a parser was shown that are still in the socket
        self.carried = b""  # bytes read off past the last parser's message

    async def peek(self) -> bytes:
        """The next parser's first bytes: what was carried over, else what the socket holds,
        left in place (waits only if it holds nothing; b"" at EOF or on a reset)."""
        if self.carried:
            data, self.carried = self.carried, b""
            return data
        sock = self.sock
        while True:
            try:
                data = sock.recv(_READ, socket.MSG_PEEK)
            except BlockingIOError:
                await wait_readable(sock)
                continue
            except OSError:
                data = b""
            self.queued = len(data)
            return data

    async def read(self) -> bytes:
        """More bytes, taken off the socket (after reading off what the parser was shown).

        Tries before waiting: a client sends its PROXY header and ClientHello right after the
        TCP handshake, so under load they have usually arrived by the time the connection's
        task runs, and a failed ``recv`` costs far less than a round trip through the
        scheduler. b"" at EOF or on a reset.
        """
        if self.queued:
            self.settle()
        sock = self.sock
        while True:
            try:
                return sock.recv(_READ)
            except BlockingIOError:
                await wait_readable(sock)
            except OSError:
                return b""

    def finish(self, leftover: bytes) -> None:
        """The parser is done; ``leftover`` is what followed its message in its last bytes.

        Peeked: read off only what the parser used (the rest stays in the socket). Read off:
        the next parser gets ``leftover`` first.
        """
        if self.queued:
            self._consume(self.queued - len(leftover))
            self.queued = 0
        else:
            self.carried = leftover

    def settle(self) -> None:
        """Read off what the parser was shown and is still in the socket."""
        self._consume(self.queued)
        self.queued = 0

    def _consume(self, count: int) -> None:
        while count > 0:
            try:
                got = len(self.sock.recv(min(count, _CONSUME)))
            except OSError:
                return  # a reset just ends it early
            if not got:
                return
            count -= got
