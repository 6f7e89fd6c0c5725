"""Server ``SSL.Context`` builders with edgeproxy's TLS defaults, and key/chain helpers.

Owns: protocol versions, cipher policy, session and buffer settings, ALPN selection, and turning
PEM/``cryptography`` objects into a ready context. Must not know: where certificates come from,
which name maps to which context (the certificate manager caches contexts), sockets, streams.

Defaults: TLS 1.2 and 1.3 only; for TLS 1.2 ECDHE with AES-GCM or ChaCha20-Poly1305 (the AEAD
suites), server preference; key exchange groups X25519MLKEM768 (where the OpenSSL has it),
X25519, P-256 and P-384, Mozilla's "intermediate" set plus the post-quantum hybrid browsers
send; no renegotiation, no compression; stateless session tickets on and
the server session cache off. ``SSL_MODE_RELEASE_BUFFERS`` lets an idle connection give its
record buffers back, and clearing ``SSL_MODE_ENABLE_PARTIAL_WRITE`` makes one ``SSL_write``
encrypt a whole buffer (a write to a memory BIO never blocks; on a socket, a write that has to
wait keeps its record for the retry).

ALPN is chosen per connection: ``new_server_connection(ctx, alpn=("h2", "http/1.1"))`` stores
the route's list on the connection, and the context's callback picks the first entry of that
list the client offered (server preference). No overlap means no ALPN, not a failed handshake:
the upstream then speaks whatever the client speaks by default.

Session ticket keys: shared keys across worker processes (nginx's ``ssl_session_ticket_key``)
would need ``SSL_CTX_set_tlsext_ticket_keys`` or a ticket key callback. pyOpenSSL 26 exposes
neither, and the OpenSSL binding it ships on (cryptography 50) binds neither ``SSL_CTX_ctrl``
nor ``SSL_CTX_set_tlsext_ticket_key_evp_cb`` nor the session cache callbacks, and exports no C
symbols to reach them another way. What does work with public calls: OpenSSL seals and opens
tickets with the keys of a connection's *initial* context, so ``new_server_connection`` can
start a connection on a certificate-less ``ticket_context()`` and switch to the certificate's
context before the handshake. ``tls/tickets.py`` owns those ticket contexts and rotates them.
Each certificate context has its own session id context (a hash of its leaf), so a ticket
issued for one certificate never resumes a handshake for another.
"""

from __future__ import annotations

import functools
import hashlib
import socket
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from .errors import InvalidCertificate, TLSHandshakeError, describe_openssl
from .openssl_internals import (
    parse_leaf,
    set_context_groups,
    set_context_session_id,
    use_leaf_and_key,
)

__all__ = [
    "ACME_TLS_ALPN",
    "KeyType",
    "ServerIdentity",
    "build_acme_challenge_context",
    "build_server_context",
    "chain_context",
    "check_key",
    "generate_private_key",
    "load_pem_chain",
    "new_server_connection",
    "ticket_context",
]

ACME_TLS_ALPN: Final = "acme-tls/1"  # RFC 8737 section 6.2

KeyType = Literal["ec256", "ec384", "rsa2048", "rsa4096"]

# TLS 1.2: forward secret AEAD only, ECDSA before RSA, AES-128 before AES-256 before ChaCha20
# (AES-NI makes AES cheapest; clients without it put ChaCha20 first in their own list, and
# OpenSSL's PRIORITIZE_CHACHA is not exposed, so server preference keeps this order).
_TLS12_CIPHERS: Final = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
_TLS13_SUITES: Final = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# Key exchange groups, preferred first. OpenSSL's default list adds X448 and P-521 (and FFDHE),
# which no mainstream client needs and Mozilla's intermediate profile says to refuse (sslyze's
# compliance check flags them). The post-quantum hybrid leads where this OpenSSL knows it
# (3.5+); an older one is given the classical list only.
_GROUPS: Final = (b"X25519MLKEM768:X25519:P-256:P-384", b"X25519:P-256:P-384")

# OP_IGNORE_UNEXPECTED_EOF: on a socket, a TCP FIN without close_notify (how much of the web
# ends a connection) reads as an orderly end (ZeroReturnError), not as OpenSSL 3's "unexpected
# eof" error. Set here, copied by SSL_new, rather than per connection; a memory BIO never
# reports an EOF, so it changes nothing there.
_OPTIONS: Final = (
    SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_NO_COMPRESSION
    | SSL.OP_SINGLE_ECDH_USE
    | SSL.OP_SINGLE_DH_USE
    | SSL.OP_IGNORE_UNEXPECTED_EOF
)
# SSL_MODE_ENABLE_PARTIAL_WRITE (ssl.h, 0x1): pyOpenSSL turns it on for every context and
# does not export the constant.
_MODE_ENABLE_PARTIAL_WRITE: Final = 0x1
_SESSION_ID_CONTEXT: Final = b"edgeproxy"
_MAX_SID_LENGTH: Final = 32  # SSL_MAX_SID_CTX_LENGTH

# The key types pyOpenSSL can hand to OpenSSL (PKey.from_cryptography_key).
_SERVABLE_KEYS: Final = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)

_KEY_GENERATORS: Final[dict[str, Callable[[], PrivateKeyTypes]]] = {
    "ec256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "rsa4096": lambda: rsa.generate_private_key(public_exponent=65537, key_size=4096),
}


def _select_route_alpn(
    conn: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    # The connection's app data is the route's preference list (see new_server_connection).
    allowed = conn.get_app_data()
    if isinstance(allowed, tuple):
        for proto in allowed:
            if isinstance(proto, bytes) and proto in offered:
                return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _select_acme_tls(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    if ACME_TLS_ALPN.encode() in offered:
        return ACME_TLS_ALPN.encode()
    # Raising makes OpenSSL answer no_application_protocol (RFC 7301 section 3.2) and
    # pyOpenSSL re-raises this from the handshake call, where ServerTLS.accept passes it on.
    raise TLSHandshakeError("no_application_protocol", "acme-tls/1 not offered")


def _accept_server_name(conn: SSL.Connection) -> None:
    # Returning normally is SSL_TLSEXT_ERR_OK: OpenSSL then records the name in the session, so
    # a resumed TLS 1.2 connection still reports it (without a callback it reports None).
    return None


def _set_groups(ctx: SSL.Context) -> None:
    """``SSL_CTX_set1_groups_list``: pyOpenSSL has only ``set_tmp_ecdh`` (a single curve).

    The lists are constants, so a refusal of both means this OpenSSL lacks a classical group:
    fail loudly rather than serve OpenSSL's defaults.
    """
    for groups in _GROUPS:
        if set_context_groups(ctx, groups):
            return
    raise RuntimeError(f"OpenSSL refuses the TLS groups {_GROUPS[-1]!r}")  # pragma: no cover


def _hardened_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_cipher_list(_TLS12_CIPHERS)
    ctx.set_tls13_ciphersuites(_TLS13_SUITES)
    _set_groups(ctx)
    ctx.set_options(_OPTIONS)
    # Stateless tickets carry the session, so nothing is kept server side; a cache would only
    # help the worker that filled it.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
    ctx.set_tlsext_servername_callback(_accept_server_name)
    return ctx


_ServableKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


def check_key(leaf: x509.Certificate, key: PrivateKeyTypes) -> _ServableKey:
    """``key`` if TLS can sign with it and it belongs to ``leaf``; InvalidCertificate if not."""
    if not isinstance(key, _SERVABLE_KEYS):
        raise InvalidCertificate("unsupported_key", f"{type(key).__name__} cannot sign for TLS")
    if key.public_key() != leaf.public_key():
        # OpenSSL would say "key values mismatch" from use_privatekey; say it plainly.
        raise InvalidCertificate("key_mismatch", "the private key does not belong to the leaf")
    return key


def _install_identity(
    ctx: SSL.Context, chain: Sequence[x509.Certificate], key: PrivateKeyTypes
) -> None:
    if not chain:
        raise InvalidCertificate("no_certificate", "the chain is empty")
    try:
        ctx.use_certificate(chain[0])
        for cert in chain[1:]:
            ctx.add_extra_chain_cert(cert)
    except SSL.Error as exc:
        raise InvalidCertificate("rejected", describe_openssl(exc.args[0])) from exc
    servable = check_key(chain[0], key)
    try:
        ctx.use_privatekey(servable)
    except SSL.Error as exc:
        raise InvalidCertificate("rejected", describe_openssl(exc.args[0])) from exc
    try:
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise InvalidCertificate("key_mismatch", describe_openssl(exc.args[0])) from exc


def build_server_context(
    chain: Sequence[x509.Certificate], key: PrivateKeyTypes, *, session_tickets: bool = True
) -> SSL.Context:
    """A server context for ``chain`` (leaf first) and its private ``key``.

    ``session_tickets=False`` turns resumption off (OP_NO_TICKET with the session cache off):
    every connection then pays a full handshake, as benchmarks of handshake cost need.

    Raises ``InvalidCertificate`` when the chain is empty, OpenSSL refuses a certificate or the
    key, or the key does not belong to the leaf.
    """
    ctx = _hardened_context()
    if not session_tickets:
        ctx.set_options(SSL.OP_NO_TICKET)
    _install_identity(ctx, chain, key)
    # Sessions are bound to this leaf: all certificates share the process's ticket keys
    # (tls/tickets.py), and a session authenticated for one name must not resume another.
    ctx.set_session_id(hashlib.sha256(chain[0].public_bytes(Encoding.DER)).digest())
    ctx.set_alpn_select_callback(_select_route_alpn)
    return ctx


def chain_context(
    intermediates: Sequence[x509.Certificate], *, session_tickets: bool = True
) -> SSL.Context:
    """A leaf-less server context sending ``intermediates`` after each connection's own leaf
    (see ``ServerIdentity``): many names with the same chain share it."""
    ctx = _hardened_context()
    if not session_tickets:
        ctx.set_options(SSL.OP_NO_TICKET)
    try:
        for cert in intermediates:
            ctx.add_extra_chain_cert(cert)
    except SSL.Error as exc:
        raise InvalidCertificate("rejected", describe_openssl(exc.args[0])) from exc
    ctx.set_alpn_select_callback(_select_route_alpn)
    return ctx


@dataclass(frozen=True, slots=True, eq=False)
class ServerIdentity:
    """One certificate served from a shared ``chain_context``: its leaf as DER and its parsed
    key. OpenSSL's parsed X509 holds about 4.5 KiB (its public key decoded, its extensions
    cached) against 0.4 KiB of DER, so a cached name keeps the DER and the leaf is parsed
    when served; the few hundred names served most recently keep theirs parsed
    (``_HotLeaves``): parsing costs about 170,000 instructions (30 us), a tenth of a full
    handshake. The key stays parsed, as loading one costs about 100 us (measured with
    ``bench.fleet``, OpenSSL 4.0).

    ``key`` is the ``EVP_PKEY`` pointer of a ``crypto.PKey`` (``PKey._pkey``, freed when it
    goes), not the ``PKey``: its instance dict cost 0.4 KiB and two garbage-collected objects
    per cached name.

    Built by ``tls.identities.IdentityContexts``; served by ``new_server_connection``.
    """

    leaf: bytes
    key: Any  # a cffi ``EVP_PKEY *`` owning its key
    context: SSL.Context

    @property
    def sid(self) -> bytes:
        """The session id context: a hash of the leaf, as ``build_server_context`` sets."""
        return hashlib.sha256(self.leaf).digest()


class _HotLeaves:
    """The parsed leaves (and session id contexts) of the identities served most recently,
    keyed by the leaf's DER: a busy name pays the parse and the hash once while it stays
    among the ``size`` most recent, and memory stays bounded however many names are cached
    (``size`` times about 4.5 KiB)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lru: OrderedDict[bytes, tuple[Any, bytes]] = OrderedDict()

    def get(self, identity: ServerIdentity) -> tuple[Any, bytes]:
        """``identity``'s leaf as an ``X509 *`` and its session id context."""
        leaf = identity.leaf
        hot = self._lru.get(leaf)
        if hot is not None:
            self._lru.move_to_end(leaf)
            return hot
        hot = (parse_leaf(leaf), identity.sid)  # raises SSL.Error for a leaf OpenSSL refuses
        self._lru[leaf] = hot
        if len(self._lru) > self.size:
            self._lru.popitem(last=False)
        return hot

    def __len__(self) -> int:
        return len(self._lru)


_HOT_LEAVES: Final = _HotLeaves(256)


def _set_template_sid(ctx: SSL.Context, sid: bytes) -> None:
    """Write ``sid`` into the shared context just before a connection copies it.

    OpenSSL's per-connection ``SSL_set_session_id_context`` is not bound by cryptography, but
    ``SSL_new`` and ``SSL_set_SSL_CTX`` copy the context's value into the connection and
    nothing reads the context's copy later; pyOpenSSL's own setter refuses a context already
    used. Single threaded, no await in between.
    """
    if len(sid) > _MAX_SID_LENGTH or not set_context_session_id(ctx, sid):
        raise RuntimeError("OpenSSL refused a session id context")  # pragma: no cover


def ticket_context() -> SSL.Context:
    """A certificate-less context whose only job is holding session ticket keys.

    Connections start on it (``new_server_connection(..., session_ctx=...)``) and switch to
    their certificate's context; OpenSSL keeps using the initial context's ticket keys.
    """
    return _hardened_context()


def build_acme_challenge_context(cert: x509.Certificate, key: PrivateKeyTypes) -> SSL.Context:
    """A context that serves an RFC 8737 challenge certificate over ALPN ``acme-tls/1`` only.

    A client that offers ALPN without ``acme-tls/1`` gets a no_application_protocol alert. (One
    that offers no ALPN at all never reaches the callback; the proxy routes only ClientHellos
    offering ``acme-tls/1`` here.)
    """
    ctx = _hardened_context()
    _install_identity(ctx, [cert], key)
    ctx.set_alpn_select_callback(_select_acme_tls)
    return ctx


def new_server_connection(
    ctx: SSL.Context | ServerIdentity,
    *,
    alpn: Sequence[str] = (),
    sock: socket.socket | None = None,
    session_ctx: SSL.Context | None = None,
) -> SSL.Connection:
    """A server-side connection on ``ctx`` that offers ``alpn`` in that order.

    ``ctx`` is a context with its certificate, or a ``ServerIdentity``: its shared context,
    with the identity's leaf, key and session id context set on the connection.

    ``session_ctx`` (a ``ticket_context()``): the connection starts on it, so its ticket keys
    seal and open this connection's tickets, then switches to ``ctx`` for everything else.

    Without ``sock``: memory BIOs (``tls/server.py``'s memory mode). With ``sock`` (a connected
    non-blocking socket whose unread bytes start with the ClientHello): OpenSSL reads and
    writes the socket itself, and a TCP FIN without close_notify reads as an orderly end
    (``ZeroReturnError``, ``_OPTIONS``) rather than OpenSSL 3's "unexpected eof" error. An
    empty ``alpn`` negotiates no protocol.
    """
    protos = _alpn_ids(tuple(alpn))
    identity = ctx if isinstance(ctx, ServerIdentity) else None
    if identity is not None:
        target = identity.context
        leaf, sid = _HOT_LEAVES.get(identity)
        _set_template_sid(target, sid)
    else:
        assert isinstance(ctx, SSL.Context)
        target = ctx
    if session_ctx is None:
        conn = SSL.Connection(target, sock)
    else:
        conn = SSL.Connection(session_ctx, sock)
        conn.set_context(target)
    if identity is not None:
        # After the switch: SSL_set_SSL_CTX replaces the connection's certificate slots.
        # pyOpenSSL's ``Connection.use_certificate`` warns when given its own X509
        # (deprecated) and re-parses a ``cryptography`` certificate on every call, so the
        # calls go straight to OpenSSL. Raises ``SSL.Error``, also for a key that does not
        # match the leaf.
        use_leaf_and_key(conn, leaf, identity.key)
    conn.set_accept_state()
    conn.set_app_data(protos)
    return conn


@functools.lru_cache(maxsize=256)
def _alpn_ids(alpn: tuple[str, ...]) -> tuple[bytes, ...]:
    """A route's ALPN list as wire ids, checked once per list rather than per connection."""
    protos = tuple(p.encode("ascii") for p in alpn)
    for proto in protos:
        if not 0 < len(proto) < 256:
            raise ValueError(f"ALPN protocol ids are 1..255 bytes, got {proto!r}")
    return protos


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in file order (leaf first for a served chain)."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InvalidCertificate("no_certificate", "no PEM CERTIFICATE block")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidCertificate("bad_pem", str(exc)) from exc


def generate_private_key(key_type: KeyType = "ec256") -> PrivateKeyTypes:
    """A fresh private key: ``ec256`` (P-256, the default), ``ec384``, ``rsa2048``, ``rsa4096``."""
    try:
        make = _KEY_GENERATORS[key_type]
    except KeyError:
        raise ValueError(
            f"unknown key type {key_type!r}; use one of {', '.join(_KEY_GENERATORS)}"
        ) from None
    return make()
