"""Every OpenSSL call edgeproxy makes that pyOpenSSL does not expose, behind feature checks.

Owns: the private calls (pyOpenSSL's ``Connection._ssl``, ``_into_ssl``, ``_from_ssl``,
``_raise_ssl_error``, ``Context._context``, ``OpenSSL._util`` and cryptography's OpenSSL
binding). On a live connection, for the data path (``tls/server.py``): handshake steps that
return "not yet" instead of raising it, memory BIO fill levels, swapping a connection's grown
BIOs for fresh ones, ``SSL_session_reused``, moving a connection from its memory BIOs onto its
socket, and one-call plaintext reads and writes (also straight into and out of a reusable
``Scratch`` buffer). For ``tls/contexts.py`` and
``tls/identities.py``: the key exchange groups, the session id context of a context already
used, a key's ``EVP_PKEY``, a DER leaf parsed, a parsed leaf and a key put on a connection.
Must not know: streams, sockets beyond a file descriptor, anything about connections' lives.
In the product only ``tls/server.py``, ``tls/contexts.py`` and ``tls/identities.py`` import
this module, and nothing else imports ``OpenSSL._util`` (``tests/unit/test_tls_server.py``
checks both); of the tests, the fence's own and the test-side ``TLSStream``
(``testkit/tlsstream.py``).

Theory of operation: each helper is one cffi call on the binding pyOpenSSL itself uses for
the same functions. If a future pyOpenSSL renames what ``Internals`` relies on, ``available``
(or ``usable_for``) reads False, a warning is issued once at import, and every connection
helper falls back to pyOpenSSL's public (slower) calls or reports "unknown"; the unit test
``test_openssl_internals_reachable`` then fails so the upgrade does not go unnoticed. The
context helpers have no fallback: a context without its groups or session id context would
be a weaker one, so they raise ``RuntimeError`` instead.
"""

from __future__ import annotations

import warnings
from typing import Any, Final, NoReturn

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from OpenSSL import _util as _openssl_util

__all__ = [
    "HANDSHAKE_DONE",
    "HANDSHAKE_WANTS_READ",
    "HANDSHAKE_WANTS_WRITE",
    "Internals",
    "Scratch",
    "attach_socket",
    "handshake_step",
    "incoming_pending",
    "outgoing_pending",
    "parse_leaf",
    "private_key_pointer",
    "read_into",
    "read_plaintext",
    "release_idle_buffers",
    "set_context_groups",
    "set_context_session_id",
    "use_leaf_and_key",
    "write_from",
    "write_plaintext",
]


try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - depends on the installed pyOpenSSL
    _ffi = _lib = None


_NEEDED: Final = (
    "BIO_get_mem_data",
    "BIO_new",
    "BIO_s_mem",
    "SSL_set_bio",
    "SSL_session_reused",
    "SSL_read",
    "SSL_write",
    "SSL_do_handshake",
    "SSL_get_error",
)


class Internals:
    """OpenSSL calls pyOpenSSL does not expose (or wraps at a cost the data path notices),
    behind one feature check.

    ``Connection._ssl`` / ``_into_ssl`` / ``_from_ssl`` are pyOpenSSL's SSL* and memory BIO*
    pointers (stable names since pyOpenSSL 0.13); ``lib`` is cryptography's OpenSSL binding,
    which pyOpenSSL itself uses for these very functions.
    """

    lib: Any = _lib
    ffi: Any = _ffi
    available: bool = _lib is not None and all(hasattr(_lib, name) for name in _NEEDED)

    @classmethod
    def usable_for(cls, conn: SSL.Connection) -> bool:
        return (
            cls.available
            and getattr(conn, "_ssl", None) is not None
            and getattr(conn, "_into_ssl", None) is not None
            and getattr(conn, "_from_ssl", None) is not None
        )

    @classmethod
    def incoming_pending(cls, conn: SSL.Connection) -> int:
        # BIO_get_mem_data(bio, NULL) is BIO_ctrl(BIO_CTRL_INFO): the unread byte count.
        return int(cls.lib.BIO_get_mem_data(conn._into_ssl, cls.ffi.NULL))

    @classmethod
    def outgoing_pending(cls, conn: SSL.Connection) -> int:
        return int(cls.lib.BIO_get_mem_data(conn._from_ssl, cls.ffi.NULL))

    @classmethod
    def renew_bios(cls, conn: SSL.Connection) -> bool:
        """Replace both (empty) memory BIOs with fresh ones, freeing their grown buffers."""
        lib, ffi = cls.lib, cls.ffi
        rbio = lib.BIO_new(lib.BIO_s_mem())
        wbio = lib.BIO_new(lib.BIO_s_mem())
        if rbio == ffi.NULL or wbio == ffi.NULL:  # pragma: no cover - out of memory
            for bio in (rbio, wbio):
                if bio != ffi.NULL:
                    lib.BIO_free(bio)
            return False
        # Both differ from the current pair, so SSL_set_bio takes one reference to each and
        # frees the old pair (SSL_set_bio(3), "both are different to their previous values").
        lib.SSL_set_bio(conn._ssl, rbio, wbio)
        conn._into_ssl = rbio
        conn._from_ssl = wbio
        return True

    @classmethod
    def session_reused(cls, conn: SSL.Connection) -> bool:
        return bool(cls.lib.SSL_session_reused(conn._ssl))

    # ``Connection._raise_ssl_error`` is how pyOpenSSL turns a failed call into its
    # exceptions; calling it for failures keeps read_plaintext/write_plaintext's errors
    # exactly those of ``recv``/``send``.
    plaintext_calls: bool = available and hasattr(SSL.Connection, "_raise_ssl_error")
    no_zero: Any = ffi.new_allocator(should_clear_after_alloc=False) if ffi is not None else None


if not Internals.available:  # pragma: no cover - depends on the installed pyOpenSSL
    warnings.warn(
        "edgeproxy.tls.openssl_internals: pyOpenSSL internals not reachable; idle memory-BIO "
        "TLS connections will keep their largest BIO buffers and session_reused will read False",
        RuntimeWarning,
        stacklevel=1,
    )


def release_idle_buffers(conn: SSL.Connection) -> bool:
    """Give back the memory BIOs' grown buffers when both are empty (an idle connection).

    Returns False when nothing was done (pending bytes, or internals unavailable).
    """
    if not Internals.usable_for(conn):
        return False
    if Internals.incoming_pending(conn) or Internals.outgoing_pending(conn):
        return False
    return Internals.renew_bios(conn)


def outgoing_pending(conn: SSL.Connection) -> int:
    """Bytes OpenSSL has written to the outgoing memory BIO and nobody has sent yet.

    -1 when unknown (pyOpenSSL internals unavailable): callers must then try ``bio_read``.
    """
    if Internals.usable_for(conn):
        return Internals.outgoing_pending(conn)
    return -1


def read_plaintext(conn: SSL.Connection, size: int) -> bytes:
    """``conn.recv(size)``, with the same results and exceptions, in fewer Python steps.

    The pipe reads a record per call; pyOpenSSL's ``recv`` spends more Python on each call
    than the call itself (flag checks, and its error mapping even on success), about a
    tenth of the Python work of a keep-alive request. Successes are handled here; failures
    go through pyOpenSSL's own mapping.
    """
    if not Internals.plaintext_calls:
        return conn.recv(size)
    buf = Internals.no_zero("char[]", size)
    n = Internals.lib.SSL_read(conn._ssl, buf, size)
    if n > 0:
        return Internals.ffi.buffer(buf, n)[:]  # type: ignore[no-any-return]
    conn._raise_ssl_error(conn._ssl, n)
    return b""


HANDSHAKE_DONE: Final = 0
HANDSHAKE_WANTS_READ: Final = 1
HANDSHAKE_WANTS_WRITE: Final = 2


def handshake_step(conn: SSL.Connection) -> int:
    """``conn.do_handshake()`` with "not yet" as a value: ``HANDSHAKE_DONE``, or what the
    handshake waits for (``HANDSHAKE_WANTS_READ``/``_WRITE``) instead of pyOpenSSL's
    ``WantReadError``/``WantWriteError``, whose raising and classifying cost more Python
    than the rest of a handshake step. Failures raise what ``do_handshake`` raises.
    """
    if not Internals.plaintext_calls:
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            return HANDSHAKE_WANTS_READ
        except SSL.WantWriteError:
            return HANDSHAKE_WANTS_WRITE
        return HANDSHAKE_DONE
    lib = Internals.lib
    ssl = conn._ssl
    rc = lib.SSL_do_handshake(ssl)
    if rc == 1:
        return HANDSHAKE_DONE
    err = lib.SSL_get_error(ssl, rc)
    if err == lib.SSL_ERROR_WANT_READ:
        return HANDSHAKE_WANTS_READ
    if err == lib.SSL_ERROR_WANT_WRITE:
        return HANDSHAKE_WANTS_WRITE
    _raise_failure(conn, rc, "SSL_do_handshake")


def _raise_failure(conn: SSL.Connection, rc: int, call: str) -> NoReturn:
    """Raise what pyOpenSSL raises for a failed ``call`` that returned ``rc``: a callback's
    own exception (ALPN, SNI) first, then the error queue's."""
    conn._raise_ssl_error(conn._ssl, rc)
    raise SSL.Error(f"{call} failed")  # pragma: no cover - the line above raises


def write_plaintext(conn: SSL.Connection, data: bytes) -> int:
    """``conn.send(data)``, with the same results and exceptions (see ``read_plaintext``).

    After WantWriteError the retry must pass the same ``data`` object, as with ``send``.
    """
    if not Internals.plaintext_calls:
        return conn.send(data)
    ffi = Internals.ffi
    with ffi.from_buffer(data) as ptr:
        n = Internals.lib.SSL_write(conn._ssl, ptr, len(data))
    if n <= 0:
        conn._raise_ssl_error(conn._ssl, n)
    return int(n)


class Scratch:
    """A reusable plaintext buffer that sockets and OpenSSL both use without a copy.

    ``view`` (a writable ``memoryview``) is for ``socket.recv_into`` and ``socket.send``;
    ``pointer`` is the same memory for ``SSL_read``/``SSL_write`` (``read_into``,
    ``write_from``). Whatever is in it is overwritten by the next use: a caller keeping bytes
    across a wait copies them out. ``pointer`` is None when the internals are unreachable.
    """

    __slots__ = ("pointer", "size", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.pointer: Any = None
        if Internals.plaintext_calls:
            self.pointer = Internals.no_zero("char[]", size)
            self.view = memoryview(Internals.ffi.buffer(self.pointer))
        else:  # pragma: no cover - depends on the installed pyOpenSSL
            self.view = memoryview(bytearray(size))


READ_END: Final = 0
READ_AGAIN: Final = -1
READ_AGAIN_WRITE: Final = -2


def read_into(conn: SSL.Connection, scratch: Scratch) -> int:
    """One ``SSL_read`` into ``scratch``: the byte count (> 0), or what stopped it as a value
    (``READ_AGAIN``: no whole record yet; ``READ_AGAIN_WRITE``: OpenSSL must write first;
    ``READ_END``: close_notify, or a FIN), since raising and classifying pyOpenSSL's exception
    for these ordinary ends costs more Python than the read. Other failures raise pyOpenSSL's
    exception, as ``recv_into`` would. Needs ``Internals.plaintext_calls`` (``scratch.pointer``)."""
    ssl = conn._ssl
    n: int = _lib.SSL_read(ssl, scratch.pointer, scratch.size)
    if n > 0:
        return n
    err = _lib.SSL_get_error(ssl, n)
    if err == _lib.SSL_ERROR_WANT_READ:
        return READ_AGAIN
    if err == _lib.SSL_ERROR_ZERO_RETURN:
        return READ_END
    if err == _lib.SSL_ERROR_WANT_WRITE:
        return READ_AGAIN_WRITE
    _raise_failure(conn, n, "SSL_read")


def write_from(conn: SSL.Connection, scratch: Scratch, n: int) -> None:
    """One ``SSL_write`` of ``scratch``'s first ``n`` bytes, all of them or pyOpenSSL's
    exception (partial writes are off on our contexts). After ``WantWriteError`` the retry may
    pass a copy of those bytes: pyOpenSSL's contexts set ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER``."""
    ssl = conn._ssl
    r = _lib.SSL_write(ssl, scratch.pointer, n)
    if r <= 0:
        conn._raise_ssl_error(ssl, r)


def attach_socket(conn: SSL.Connection, fd: int) -> bool:
    """Move a connection from its (empty) memory BIOs onto socket ``fd`` (both directions).

    After the handshake, OpenSSL reading and writing the socket itself saves a copy and two
    Python calls per chunk. Only legal when both memory BIOs are empty (nothing would be lost)
    and the internals are reachable; returns False (and changes nothing) otherwise. The
    connection's ``bio_*`` calls must not be used afterwards.
    """
    lib = Internals.lib
    if not (
        Internals.usable_for(conn)
        and hasattr(lib, "SSL_set_fd")
        and hasattr(lib, "SSL_OP_IGNORE_UNEXPECTED_EOF")
    ):
        return False
    if Internals.incoming_pending(conn) or Internals.outgoing_pending(conn):
        return False
    if not lib.SSL_set_fd(conn._ssl, fd):
        return False
    # A TCP FIN without close_notify is how much of the web ends a connection: read it as
    # an end (ZeroReturnError), not as OpenSSL 3's "unexpected eof" error.
    conn.set_options(lib.SSL_OP_IGNORE_UNEXPECTED_EOF)
    # SSL_set_fd freed the memory BIOs: make pyOpenSSL's bio_* refuse instead of touching
    # freed memory (they check for None), and stop Internals from using them.
    conn._into_ssl = None
    conn._from_ssl = None
    return True


def incoming_pending(conn: SSL.Connection) -> int:
    """Ciphertext bytes written into the incoming BIO that OpenSSL has not consumed yet
    (-1 when unknown)."""
    if Internals.usable_for(conn):
        return Internals.incoming_pending(conn)
    return -1


# ---- contexts: no fallback, the calls are needed to build one (contexts.py's callers fail) --


def _raw_context(ctx: SSL.Context, what: str) -> Any:
    raw = getattr(ctx, "_context", None)  # pyOpenSSL's SSL_CTX*, stable since 0.13
    if raw is None or _lib is None:  # pragma: no cover - depends on the installed pyOpenSSL
        raise RuntimeError(f"pyOpenSSL internals changed: cannot {what}")
    return raw


def set_context_groups(ctx: SSL.Context, groups: bytes) -> bool:
    """``SSL_CTX_set1_groups_list`` (bound under its old name, ``..._curves_list``); False when
    OpenSSL refuses the list (its error is cleared: not a connection's)."""
    raw = _raw_context(ctx, "restrict the TLS groups")
    set_list = getattr(_lib, "SSL_CTX_set1_curves_list", None)
    if set_list is None:  # pragma: no cover - depends on the installed pyOpenSSL
        raise RuntimeError("pyOpenSSL internals changed: cannot restrict the TLS groups")
    if set_list(raw, groups) == 1:
        return True
    _lib.ERR_clear_error()
    return False


def set_context_session_id(ctx: SSL.Context, sid: bytes) -> bool:
    """``SSL_CTX_set_session_id_context``, also on a context already used (pyOpenSSL's own
    setter refuses that)."""
    raw = _raw_context(ctx, "bind sessions to a certificate")
    return bool(_lib.SSL_CTX_set_session_id_context(raw, sid, len(sid)) == 1)


def parse_leaf(leaf: bytes) -> Any:
    """``leaf`` (DER) as an ``X509 *`` that frees itself when it goes. Raises ``SSL.Error``."""
    bio = _lib.BIO_new_mem_buf(leaf, len(leaf))
    if bio == _ffi.NULL:
        raise MemoryError("BIO_new_mem_buf")
    try:
        x509 = _lib.d2i_X509_bio(bio, _ffi.NULL)
    finally:
        _lib.BIO_free(bio)
    if x509 == _ffi.NULL:
        _openssl_util.exception_from_error_queue(SSL.Error)
    return _ffi.gc(x509, _lib.X509_free)


def use_leaf_and_key(conn: SSL.Connection, leaf: Any, key: Any) -> None:
    """``SSL_use_certificate`` with ``leaf`` (an ``X509 *``, see ``parse_leaf``) and
    ``SSL_use_PrivateKey`` with ``key`` (an ``EVP_PKEY *``, see ``private_key_pointer``); the
    connection takes its own reference to each. Raises ``SSL.Error`` from OpenSSL's queue."""
    ssl = conn._ssl
    if _lib.SSL_use_certificate(ssl, leaf) != 1:
        _openssl_util.exception_from_error_queue(SSL.Error)
    if _lib.SSL_use_PrivateKey(ssl, key) != 1:
        # Includes a key that does not match the leaf.
        _openssl_util.exception_from_error_queue(SSL.Error)


def private_key_pointer(key: PrivateKeyTypes) -> Any:
    """The ``EVP_PKEY *`` of ``key`` as pyOpenSSL makes it (``PKey._pkey``): it owns the key
    and frees it when it goes, without the ``PKey`` object around it."""
    return crypto.PKey.from_cryptography_key(key)._pkey  # type: ignore[arg-type]
