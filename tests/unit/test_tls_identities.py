"""Identities on shared contexts: one context per intermediate chain, each connection serving
its own leaf, key and chain, sessions bound to one certificate (real in-memory handshakes)."""

from __future__ import annotations

import gc

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from edgeproxy.tls import contexts
from edgeproxy.tls.contexts import ServerIdentity, new_server_connection
from edgeproxy.tls.errors import InvalidCertificate
from edgeproxy.tls.identities import IdentityContexts
from edgeproxy.tls.tickets import TicketKeys
from edgeproxy.wire.clienthello import ClientHello
from testkit.tlsmem import (
    chain_and_key,
    client_context,
    exchange,
    proxy_handshake,
    session_reused,
)

VERSIONS = [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION]


@pytest.fixture(scope="module")
def root() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def intermediate(root: trustme.CA) -> trustme.CA:
    return root.create_child_ca()


def connect(
    ident: ServerIdentity,
    cctx: SSL.Context,
    sni: str,
    keys: TicketKeys | None,
    session: SSL.Session | None = None,
) -> tuple[SSL.Connection, SSL.Connection]:
    """One connection as the proxy makes it (ticket context first); (server, client)."""

    def server_for(hello: ClientHello) -> SSL.Connection:
        session_ctx = keys.context_for(hello.ticket) if keys is not None else None
        return new_server_connection(ident, session_ctx=session_ctx)

    server, client, _ = proxy_handshake(cctx, sni.encode(), server_for, session)
    assert exchange(server, client, b"ok") == b"ok"
    # A client freed without close_notify marks its session not resumable (OpenSSL's
    # ssl_clear_bad_session): end each connection as a browser would.
    client.shutdown()
    return server, client


def test_names_with_one_chain_share_one_context(
    root: trustme.CA, intermediate: trustme.CA
) -> None:
    ids = IdentityContexts()
    a = ids.identity(*chain_and_key(intermediate.issue_cert("a.example.test")))
    b = ids.identity(*chain_and_key(intermediate.issue_cert("b.example.test")))
    c = ids.identity(*chain_and_key(root.issue_cert("c.example.test")))
    assert a.context is b.context
    assert c.context is not a.context
    assert len(ids) == 2
    del c
    gc.collect()
    assert len(ids) == 1  # a chain nobody serves any more keeps no context


@pytest.mark.parametrize("version", VERSIONS)
def test_each_connection_serves_its_own_leaf_and_the_shared_chain(
    root: trustme.CA, intermediate: trustme.CA, version: int
) -> None:
    # The client trusts only the root: the intermediate must come from the shared context.
    ids = IdentityContexts()
    keys = TicketKeys()
    cctx = client_context(root, max_version=version)
    for name in ("a.example.test", "b.example.test"):
        chain, key = chain_and_key(intermediate.issue_cert(name))
        _, client = connect(ids.identity(chain, key), cctx, name, keys)
        assert client.get_peer_certificate(as_cryptography=True) == chain[0]
        chain = client.get_peer_cert_chain(as_cryptography=True)
        assert chain is not None and len(chain) == 2


def test_hot_leaves_are_parsed_once_and_their_number_is_bounded(
    root: trustme.CA, intermediate: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    hot = contexts._HotLeaves(2)
    monkeypatch.setattr(contexts, "_HOT_LEAVES", hot)
    parsed: list[bytes] = []
    real_parse = contexts.parse_leaf

    def counting_parse(leaf: bytes) -> object:
        parsed.append(leaf)
        return real_parse(leaf)

    monkeypatch.setattr(contexts, "parse_leaf", counting_parse)
    ids = IdentityContexts()
    keys = TicketKeys()
    cctx = client_context(root)
    chains = {}
    idents = {}
    for name in ("a.example.test", "b.example.test", "c.example.test"):
        chain, key = chain_and_key(intermediate.issue_cert(name))
        chains[name], idents[name] = chain, ids.identity(chain, key)
    parsed.clear()  # installing parses each once (the check connection); b and c stay hot
    for name in ("a.example.test", "a.example.test", "b.example.test", "c.example.test"):
        _, client = connect(idents[name], cctx, name, keys)
        assert client.get_peer_certificate(as_cryptography=True) == chains[name][0]
    # a: parsed on its first connection only; b: evicted by a, parsed again; c: by b.
    assert parsed == [idents[n].leaf for n in ("a.example.test", "b.example.test", "c.example.test")]
    assert len(hot) == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_a_session_resumes_only_for_its_own_certificate(
    root: trustme.CA, intermediate: trustme.CA, version: int
) -> None:
    # Both names share one context and the process's ticket keys; only the per-leaf session
    # id context keeps a's session from resuming b (RFC 6066 section 3 for TLS 1.2).
    ids = IdentityContexts()
    keys = TicketKeys()
    a = ids.identity(*chain_and_key(intermediate.issue_cert("a.example.test")))
    b = ids.identity(*chain_and_key(intermediate.issue_cert("b.example.test")))
    assert a.context is b.context
    cctx = client_context(root, max_version=version)
    _, client = connect(a, cctx, "a.example.test", keys)
    session = client.get_session()
    assert session is not None
    server, _ = connect(a, cctx, "a.example.test", keys, session)
    assert session_reused(server)
    server, _ = connect(b, cctx, "b.example.test", keys, session)
    assert not session_reused(server)
    server, _ = connect(a, cctx, "a.example.test", keys, session)
    assert session_reused(server)  # b's connection did not disturb a's binding


def test_session_tickets_off_means_no_resumption(root: trustme.CA) -> None:
    # Without tickets the proxy has no ticket keys: connections start on the shared context.
    ids = IdentityContexts(session_tickets=False)
    a = ids.identity(*chain_and_key(root.issue_cert("a.example.test")))
    cctx = client_context(root)
    _, client = connect(a, cctx, "a.example.test", None)
    session = client.get_session()
    server, _ = connect(a, cctx, "a.example.test", None, session)
    assert not session_reused(server)


def test_a_key_that_is_not_the_leafs_is_refused(root: trustme.CA) -> None:
    chain, _ = chain_and_key(root.issue_cert("a.example.test"))
    with pytest.raises(InvalidCertificate) as err:
        IdentityContexts().identity(chain, ec.generate_private_key(ec.SECP256R1()))
    assert err.value.reason == "key_mismatch"


def test_an_empty_chain_is_refused() -> None:
    with pytest.raises(InvalidCertificate) as err:
        IdentityContexts().identity([], ec.generate_private_key(ec.SECP256R1()))
    assert err.value.reason == "no_certificate"
