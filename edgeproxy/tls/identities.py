"""Served certificates without a context each: one shared ``SSL.Context`` per chain, the leaf
and key given to each connection.

Owns: turning a chain and key into a ``ServerIdentity`` (the leaf's DER and the parsed key)
and keeping the shared contexts those identities are served from. Must not know: which name
has which identity (the certificate manager caches identities), sockets, routes.

Why: an ``SSL_CTX`` holding its certificate costs about 22 KiB of process memory, a parsed
leaf and key about 6.5 KiB, the leaf's DER and the parsed key about 2.5 KiB (measured with
``bench.fleet``; the leaf is parsed when served and stays parsed while among the names
served most recently, see ``ServerIdentity``). A fleet of
100,000 names shares a handful of intermediate chains, so a context is keyed by the chain
above the leaf: its extra chain certificates are what OpenSSL sends after each connection's
own leaf. Sessions stay bound to one certificate through a per-leaf session id context
(``contexts.new_server_connection``).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from .contexts import ServerIdentity, chain_context, check_key, new_server_connection
from .errors import InvalidCertificate, describe_openssl
from .openssl_internals import private_key_pointer

__all__ = ["IdentityContexts", "ServerIdentity"]


class IdentityContexts:
    """The shared contexts, one per intermediate chain. A context lives while an identity
    refers to it (weak values): a chain nobody serves any more costs nothing."""

    def __init__(self, *, session_tickets: bool = True) -> None:
        self.session_tickets = session_tickets
        self._by_chain: weakref.WeakValueDictionary[bytes, SSL.Context] = (
            weakref.WeakValueDictionary()
        )

    def __len__(self) -> int:
        return len(self._by_chain)

    def identity(
        self, chain: Sequence[x509.Certificate], key: PrivateKeyTypes
    ) -> ServerIdentity:
        """``chain`` (leaf first) and its private ``key`` as a servable identity.

        Raises ``InvalidCertificate`` for what ``build_server_context`` refuses: an empty
        chain, a key that is not the leaf's or that TLS cannot use, a certificate OpenSSL
        rejects.
        """
        if not chain:
            raise InvalidCertificate("no_certificate", "the chain is empty")
        servable = check_key(chain[0], key)
        chain_id = hashlib.sha256(
            b"".join(c.public_bytes(Encoding.DER) for c in chain[1:])
        ).digest()
        ctx = self._by_chain.get(chain_id)
        if ctx is None:
            ctx = chain_context(chain[1:], session_tickets=self.session_tickets)
            self._by_chain[chain_id] = ctx
        pkey = private_key_pointer(servable)
        ident = ServerIdentity(chain[0].public_bytes(Encoding.DER), pkey, ctx)
        # What OpenSSL would refuse per connection (e.g. a key below its security level) is
        # refused here, once, when the certificate is installed.
        try:
            new_server_connection(ident)
        except SSL.Error as exc:
            raise InvalidCertificate("rejected", describe_openssl(exc.args[0])) from exc
        return ident
