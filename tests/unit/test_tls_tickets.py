"""Session ticket key rotation, by real in-memory handshakes (pyOpenSSL client and server).

Each connection is made the way the data path makes it: the client's first flight goes
through our ClientHello parser, ``TicketKeys.context_for`` picks the ticket context from the
ticket it offers, and ``new_server_connection`` starts there and switches to the certificate's
context. The clock is a plain counter, so "twelve hours later" is a number, not a wait.
"""

from __future__ import annotations

import pytest
import trustme
from OpenSSL import SSL

from edgeproxy.tls.contexts import build_server_context, new_server_connection
from edgeproxy.tls.tickets import KEY_NAME_LENGTH, TicketKeys
from edgeproxy.wire.clienthello import ClientHello, parse_client_hello
from testkit import tlsbuild
from testkit.tlsmem import (
    chain_and_key,
    client_context,
    exchange,
    proxy_handshake,
    session_reused,
)

HOUR = 3600.0
VERSIONS = [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert_ctx(ca: trustme.CA) -> SSL.Context:
    return build_server_context(*chain_and_key(ca.issue_cert("example.test")))


def connect(
    keys: TicketKeys,
    cert_ctx: SSL.Context,
    cctx: SSL.Context,
    session: SSL.Session | None = None,
    sni: bytes = b"example.test",
) -> tuple[SSL.Connection, SSL.Connection, ClientHello]:
    """One connection as the proxy makes it; returns (server, client, the parsed hello)."""

    def server_for(hello: ClientHello) -> SSL.Connection:
        return new_server_connection(cert_ctx, session_ctx=keys.context_for(hello.ticket))

    server, client, hello = proxy_handshake(cctx, sni, server_for, session)
    exchange(server, client, b"x")  # TLS 1.3 tickets arrive after the handshake
    return server, client, hello


def new_session(keys: TicketKeys, cert_ctx: SSL.Context, cctx: SSL.Context) -> SSL.Session:
    """A fresh session (with its ticket) from a full handshake under the current keys."""
    _, client, _ = connect(keys, cert_ctx, cctx)
    session = client.get_session()
    assert session is not None
    # A client freed without close_notify marks its session not resumable (OpenSSL's
    # ssl_clear_bad_session), as a browser drops a session after a broken connection.
    client.shutdown()
    return session


def resume(
    keys: TicketKeys, cert_ctx: SSL.Context, cctx: SSL.Context, session: SSL.Session
) -> tuple[bool, bytes]:
    """Whether the server resumed ``session``, and the ticket the client offered for it."""
    server, client, hello = connect(keys, cert_ctx, cctx, session)
    assert exchange(server, client, b"data flows either way") == b"data flows either way"
    assert hello.ticket is not None
    return session_reused(server), hello.ticket


def resumes(
    keys: TicketKeys, cert_ctx: SSL.Context, cctx: SSL.Context, session: SSL.Session
) -> bool:
    return resume(keys, cert_ctx, cctx, session)[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_tickets_resume_under_the_current_keys(
    ca: trustme.CA, cert_ctx: SSL.Context, version: int
) -> None:
    keys = TicketKeys(12 * HOUR)
    cctx = client_context(ca, max_version=version)
    reused, ticket = resume(keys, cert_ctx, cctx, new_session(keys, cert_ctx, cctx))
    assert reused
    # The learned key name is what OpenSSL really puts at the front of its tickets.
    assert ticket[:KEY_NAME_LENGTH] == keys.key_names[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_previous_keys_open_tickets_for_one_period_then_are_dropped(
    ca: trustme.CA, cert_ctx: SSL.Context, version: int
) -> None:
    clock = Clock()
    keys = TicketKeys(12 * HOUR, clock=clock)
    cctx = client_context(ca, max_version=version)
    first_name = keys.key_names[0]
    # TLS 1.3 clients use a ticket once: one session per resumption attempt below.
    sessions = [new_session(keys, cert_ctx, cctx) for _ in range(2)]

    clock.now += 12 * HOUR + 1  # one rotation: the first keys are now the previous ones
    reused, ticket = resume(keys, cert_ctx, cctx, sessions[0])
    assert reused and ticket[:KEY_NAME_LENGTH] == first_name
    assert keys.rotations == 1 and keys.key_names == (keys.key_names[0], first_name)
    assert keys.key_names[0] != first_name
    # New sessions get tickets from the new keys.
    _, new_ticket = resume(keys, cert_ctx, cctx, new_session(keys, cert_ctx, cctx))
    assert new_ticket[:KEY_NAME_LENGTH] == keys.key_names[0]

    clock.now += 12 * HOUR + 1  # a second rotation: the first keys are gone
    reused, ticket = resume(keys, cert_ctx, cctx, sessions[1])
    assert ticket[:KEY_NAME_LENGTH] == first_name
    assert not reused  # a full handshake, not a failure
    assert keys.rotations == 2 and first_name not in keys.key_names


def test_previous_keys_stop_opening_after_their_second_period_even_without_rotation(
    ca: trustme.CA, cert_ctx: SSL.Context
) -> None:
    # Rotation waits for a connection, so it can come late; the previous keys' second
    # period still ends two periods after they were made, not two after the rotation.
    clock = Clock()
    keys = TicketKeys(12 * HOUR, clock=clock)
    cctx = client_context(ca)
    sessions = [new_session(keys, cert_ctx, cctx) for _ in range(2)]
    clock.now += 13 * HOUR
    keys.context_for(None)  # the late rotation
    clock.now += 10 * HOUR  # 23 h: still inside the old keys' second period
    assert resumes(keys, cert_ctx, cctx, sessions[0])
    clock.now += 1.5 * HOUR  # 24.5 h: past it, and the current keys are only 11.5 h old
    assert not resumes(keys, cert_ctx, cctx, sessions[1])
    assert keys.rotations == 1


def test_an_idle_process_forgets_keys_older_than_two_periods(
    ca: trustme.CA, cert_ctx: SSL.Context
) -> None:
    # Nothing connected for days: the first connection rotates once, and the keys it moves to
    # "previous" are far past their second period, so they open nothing.
    clock = Clock()
    keys = TicketKeys(12 * HOUR, clock=clock)
    cctx = client_context(ca)
    session = new_session(keys, cert_ctx, cctx)
    clock.now += 72 * HOUR
    assert not resumes(keys, cert_ctx, cctx, session)


def test_a_ticket_from_another_process_falls_back_to_a_full_handshake(
    ca: trustme.CA, cert_ctx: SSL.Context
) -> None:
    # Another worker or replica: its keys are its own.
    cctx = client_context(ca)
    session = new_session(TicketKeys(), cert_ctx, cctx)
    assert not resumes(TicketKeys(), cert_ctx, cctx, session)


def test_tickets_survive_a_rebuilt_certificate_context(ca: trustme.CA) -> None:
    # Eviction from the context cache rebuilds the context: tickets belong to the process.
    chain, key = chain_and_key(ca.issue_cert("example.test"))
    keys = TicketKeys()
    cctx = client_context(ca)
    session = new_session(keys, build_server_context(chain, key), cctx)
    assert resumes(keys, build_server_context(chain, key), cctx, session)


def test_a_session_for_one_certificate_never_resumes_another(ca: trustme.CA) -> None:
    # All names share the ticket keys, so the session id context keeps sessions apart.
    keys = TicketKeys()
    a = build_server_context(*chain_and_key(ca.issue_cert("a.example.test")))
    b = build_server_context(*chain_and_key(ca.issue_cert("b.example.test")))
    cctx = client_context(ca)
    _, client, _ = connect(keys, a, cctx, sni=b"a.example.test")
    session = client.get_session()
    assert session is not None
    server, _, _ = connect(keys, b, cctx, session, sni=b"b.example.test")
    assert not session_reused(server)


def test_rotation_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TicketKeys(0)


# ---- the ticket in the ClientHello -----------------------------------------------------------


def hello_with(*extensions: tuple[int, bytes]) -> ClientHello:
    hello = parse_client_hello(
        tlsbuild.record(tlsbuild.client_hello(extra_extensions=extensions))
    )
    assert hello is not None
    return hello


def test_hello_reports_a_tls12_session_ticket() -> None:
    ticket = bytes(range(48))
    assert hello_with((35, ticket)).ticket == ticket


def test_empty_session_ticket_extension_is_no_ticket() -> None:
    assert hello_with((35, b"")).ticket is None


def psk(*identities: bytes, binder: bytes = bytes(32)) -> tuple[int, bytes]:
    ids = b"".join(tlsbuild.vec16(i) + (7).to_bytes(4, "big") for i in identities)
    return 41, tlsbuild.vec16(ids) + tlsbuild.vec16(tlsbuild.vec8(binder))


def test_hello_reports_the_first_psk_identity_before_a_tls12_ticket() -> None:
    hello = hello_with((35, b"old" * 20), psk(b"first" * 10, b"second"))
    assert hello.ticket == b"first" * 10


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", b"\x00\x05\x00\x09abc", b"\x00\x02\x00\x00", b"\xff\xff\x00\x04abcd"],
)
def test_a_malformed_psk_extension_is_ignored_not_refused(payload: bytes) -> None:
    # OpenSSL judges the extension; the peek only uses it to pick keys, so verdicts don't move.
    assert hello_with((41, payload)).ticket is None
