"""Session ticket keys for one process, rotated on a schedule, the previous key still accepted.

Owns: which OpenSSL context encrypts and decrypts this process's session tickets, when its
keys are replaced, and which context a connection presenting a ticket must start on. Must not
know: certificates (those stay in the per-name contexts), sockets, routes.

Theory of operation
-------------------
OpenSSL encrypts and decrypts tickets with the keys of a connection's *initial* context
(``SSL_new``'s, kept as ``session_ctx``), not with those of a context switched to later with
``SSL_set_SSL_CTX``. So every data-path connection starts on a certificate-less "ticket
context" from here and then switches to the certificate's context (``new_server_connection``):
all names share this process's ticket keys, and a renewed or evicted certificate context no
longer takes its tickets with it.

pyOpenSSL 26 has no way to set or read ticket keys, and cryptography 50's binding has neither
``SSL_CTX_ctrl`` nor the ticket key callback (see ``contexts.py``), so a key cannot be chosen
or copied: each ticket context holds the random keys OpenSSL gave it. Rotation therefore
makes a new ticket context every ``rotation`` seconds; the previous one is kept for one more
period so tickets it issued still resume. Which of the two a connection needs is read from
the ticket itself: OpenSSL's ticket format starts with the 16-byte key name of the keys that
sealed it, and we learn each context's key name once, when it is made, by resuming a session
against it in memory and reading the ticket from our own ClientHello parser. A ticket naming
neither key (older than two periods, another worker's, another replica's, forged) starts on
the current context: OpenSSL cannot decrypt it and falls back to a full handshake.

Key material stays inside OpenSSL and this process: worker processes and replicas each have
their own keys, so a ticket resumes only on the process that issued it.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from ..wire.clienthello import ClientHello, ClientHelloError, parse_client_hello
from .contexts import build_server_context, ticket_context
from .self_signed import self_signed

__all__ = ["DEFAULT_ROTATION", "KEY_NAME_LENGTH", "TicketKeys"]

log = logging.getLogger("edgeproxy.tls")

DEFAULT_ROTATION: Final = 12 * 3600.0
#: OpenSSL's ticket layout: key_name (16) | IV (16) | encrypted session | HMAC (32).
KEY_NAME_LENGTH: Final = 16
_PROBE_NAME: Final = "ticket-key-probe.invalid"


@dataclass(frozen=True, slots=True)
class _Generation:
    context: SSL.Context
    key_name: bytes | None  # None when it could not be learned: only "current" then works
    born: float


class TicketKeys:
    """The ticket contexts of one process: ``context_for(ticket)`` is where a connection starts.

    ``rotation`` is the period in seconds: a key seals tickets for one period and still opens
    them for the next. Rotation happens when a connection asks after the period is over (no
    timer task: an idle process has nothing to protect), and the clock is injectable for tests.
    """

    def __init__(
        self, rotation: float = DEFAULT_ROTATION, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rotation <= 0:
            raise ValueError(f"ticket key rotation must be positive, got {rotation!r}")
        self.rotation = rotation
        self._clock = clock
        self._probe = _probe_context()
        self._previous: _Generation | None = None
        self._current = self._new_generation()
        self.rotations = 0

    def context_for(self, ticket: bytes | None) -> SSL.Context:
        """The ticket context a connection offering ``ticket`` (or none) must start on."""
        now = self._clock()
        if now - self._current.born >= self.rotation:
            self.rotate()
        prev = self._previous
        if (
            ticket is not None
            and prev is not None
            and prev.key_name is not None
            and ticket[:KEY_NAME_LENGTH] == prev.key_name
            and now - prev.born < 2 * self.rotation
        ):
            return prev.context
        return self._current.context

    def rotate(self) -> None:
        """New keys now; the current ones only open tickets for the rest of their second period."""
        self._previous = self._current
        self._current = self._new_generation()
        self.rotations += 1
        log.info("session ticket keys rotated (every %.0fs)", self.rotation)

    @property
    def key_names(self) -> tuple[bytes | None, bytes | None]:
        """(current, previous) key names, for tests and diagnostics; never the keys."""
        prev = self._previous.key_name if self._previous is not None else None
        return self._current.key_name, prev

    def _new_generation(self) -> _Generation:
        ctx = ticket_context()
        return _Generation(ctx, _learn_key_name(ctx, self._probe), self._clock())


def _probe_context() -> SSL.Context:
    """A throwaway self-signed certificate context, only ever handshaking with ourselves."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = self_signed(
        key,
        _PROBE_NAME,
        now - datetime.timedelta(minutes=5),
        now + datetime.timedelta(days=3650),
    )
    return build_server_context([cert], key)


def _learn_key_name(ticket_ctx: SSL.Context, probe: SSL.Context) -> bytes | None:
    """The key name ``ticket_ctx`` seals tickets with, read from a ticket it issues to us."""
    try:
        client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        # TLS 1.2: the ticket is in the session once the handshake is done, no data needed.
        client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        first = _client(client_ctx)
        _handshake(_server(ticket_ctx, probe), first)
        session = first.get_session()
        if session is None:
            return None
        second = _client(client_ctx)
        second.set_session(session)
        try:
            second.do_handshake()
        except SSL.WantReadError:
            pass
        hello = parse_client_hello(_drain(second))
    except (SSL.Error, ClientHelloError) as exc:
        log.warning("cannot learn the ticket key name (%s): previous keys won't resume", exc)
        return None
    ticket = hello.ticket if isinstance(hello, ClientHello) else None
    if ticket is None or len(ticket) < KEY_NAME_LENGTH:
        log.warning("the probe ticket is missing or short: previous keys won't resume")
        return None
    return ticket[:KEY_NAME_LENGTH]


def _server(ticket_ctx: SSL.Context, cert_ctx: SSL.Context) -> SSL.Connection:
    conn = SSL.Connection(ticket_ctx, None)
    conn.set_context(cert_ctx)
    conn.set_accept_state()
    conn.set_app_data(())
    return conn


def _client(ctx: SSL.Context) -> SSL.Connection:
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(_PROBE_NAME.encode())
    return conn


def _drain(conn: SSL.Connection) -> bytes:
    out = []
    while True:
        try:
            out.append(conn.bio_read(65536))
        except SSL.WantReadError:
            return b"".join(out)


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    done = {id(server): False, id(client): False}
    for _ in range(10):
        for conn in (client, server):
            if not done[id(conn)]:
                try:
                    conn.do_handshake()
                    done[id(conn)] = True
                except SSL.WantReadError:
                    pass
        moved = False
        for src, dst in ((client, server), (server, client)):
            data = _drain(src)
            if data:
                dst.bio_write(data)
                moved = True
        if all(done.values()) and not moved:
            return
    raise SSL.Error("the in-memory probe handshake did not finish")
