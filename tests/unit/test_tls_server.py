"""The TLS seam of the data path: its one OpenSSL error mapping, and who may reach OpenSSL.

The seam's behaviour over real sockets is covered by ``test_pipe.py`` (both modes, half-close,
bulk, stalls) and the proxy's integration tests; here are the parts that need no connection.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from OpenSSL import SSL

from edgeproxy.tls.errors import PEER_CLOSED, TLSHandshakeError
from edgeproxy.tls.server import ClientBroken, Failure, _classify, _Next

PACKAGE = Path(__file__).resolve().parents[2] / "edgeproxy"

# What OpenSSL puts on its queue for a garbled record (pyOpenSSL's (library, function, reason)).
BAD_RECORD = SSL.Error([("SSL routines", "", "bad record mac")])


@pytest.mark.parametrize(
    ("exc", "step"),
    [
        (SSL.WantReadError(), _Next.READ),
        (SSL.WantWriteError(), _Next.WRITE),
        (SSL.ZeroReturnError(), _Next.END),  # close_notify
        (SSL.SysCallError(-1, "Unexpected EOF"), _Next.END),  # a FIN without close_notify
    ],
)
def test_after_the_handshake_waits_and_ends_are_values(exc: SSL.Error, step: _Next) -> None:
    assert _classify(exc) is step


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (SSL.SysCallError(104, "ECONNRESET"), Failure.RESET),
        (BAD_RECORD, Failure.TLS_ERROR),
        (SSL.Error([]), Failure.TLS_ERROR),
    ],
)
def test_after_the_handshake_failures_are_client_broken(exc: SSL.Error, failure: Failure) -> None:
    with pytest.raises(ClientBroken) as info:
        _classify(exc)
    assert info.value.failure is failure


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (SSL.ZeroReturnError(), PEER_CLOSED),
        (SSL.SysCallError(-1, "Unexpected EOF"), PEER_CLOSED),
        (SSL.SysCallError(104, "ECONNRESET"), PEER_CLOSED),
        (BAD_RECORD, "bad_record"),
        (SSL.Error([("SSL routines", "", "no shared cipher")]), "no_shared_cipher"),
        (SSL.Error([]), "protocol_error"),
    ],
)
def test_during_the_handshake_failures_carry_their_reason(exc: SSL.Error, reason: str) -> None:
    with pytest.raises(TLSHandshakeError) as info:
        _classify(exc, handshake=True)
    assert info.value.reason == reason
    # Waiting is still waiting during the handshake.
    assert _classify(SSL.WantReadError(), handshake=True) is _Next.READ


def _imports(path: Path) -> set[str]:
    """The absolute module names ``path`` imports (relative imports resolved)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*parts[: -node.level], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_only_tls_reaches_the_private_openssl_calls_and_proxy_only_the_seam() -> None:
    fence = "edgeproxy.tls.openssl_internals"
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50  # the walk found the package
    outside = [
        str(p.relative_to(PACKAGE))
        for p in modules
        if fence in _imports(p) and p.parent.name != "tls"
    ]
    assert outside == []
    proxy_openssl = [
        str(p.relative_to(PACKAGE))
        for p in (PACKAGE / "proxy").glob("*.py")
        if any(name == "OpenSSL" or name.startswith("OpenSSL.") for name in _imports(p))
    ]
    assert proxy_openssl == []
    users = sorted(str(p.relative_to(PACKAGE)) for p in modules if fence in _imports(p))
    assert users == ["tls/contexts.py", "tls/identities.py", "tls/server.py"]
    # pyOpenSSL's private module is reached through the fence alone.
    private = sorted(
        str(p.relative_to(PACKAGE))
        for p in modules
        if any(n == "OpenSSL._util" or n.startswith("OpenSSL._util.") for n in _imports(p))
    )
    assert private == ["tls/openssl_internals.py"]
