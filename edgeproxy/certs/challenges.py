"""Pending TLS-ALPN-01 challenges: published by the issuing process, answered by any.

``present`` writes the key authorization to storage (so whichever worker or replica the CA
reaches can answer) and to a local map (so this process answers without a storage round trip).
The data path asks ``context_for(name)`` and gets an ``SSL.Context`` with the RFC 8737
certificate, or None when no challenge is pending here: the caller then sends a deliberate
``unrecognized_name`` alert and logs why, instead of the mysterious ``internal_error``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from ..errors import StorageError
from ..names import InvalidName, validate_hostname
from ..storage.base import Storage
from ..tls.challenge_cert import build_challenge_certificate
from ..tls.contexts import build_acme_challenge_context

log = logging.getLogger("edgeproxy.challenges")

CHALLENGE_TTL = 600.0
_MAX_CONTEXTS = 256


class ChallengeResponder:
    challenge_type = "tls-alpn-01"

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._local: dict[str, str] = {}
        self._contexts: OrderedDict[tuple[str, str], SSL.Context] = OrderedDict()
        # One key for all challenge certificates: generating a key per validation is wasted
        # CPU, and the key proves nothing (the acmeIdentifier digest does).
        self._key = ec.generate_private_key(ec.SECP256R1())

    async def present(self, identifier: str, token: str, key_authorization: str) -> None:
        self._local[identifier] = key_authorization
        await self._storage.put_challenge(identifier, key_authorization, CHALLENGE_TTL)

    async def cleanup(self, identifier: str, token: str) -> None:
        self._local.pop(identifier, None)
        try:
            await self._storage.delete_challenge(identifier)
        except StorageError as exc:
            # Expired challenges are ignored by readers and removed by `storage clean`.
            log.warning("could not withdraw challenge for %s: %s", identifier, exc)

    async def context_for(self, name: str) -> SSL.Context | None:
        try:
            validate_hostname(name)
        except InvalidName:
            # We never order such a name, and storage could not even spell it as a key.
            return None
        key_auth = self._local.get(name)
        if key_auth is None:
            try:
                key_auth = await self._storage.get_challenge(name)
            except StorageError as exc:
                log.warning("challenge lookup for %s failed: %s", name, exc)
                return None
        if key_auth is None:
            return None
        ck = (name, key_auth)
        ctx = self._contexts.get(ck)
        if ctx is None:
            # An ECDSA signature is ~0.1 ms: cheaper inline than a thread hop.
            cert, key = build_challenge_certificate(name, key_auth, key=self._key)
            ctx = build_acme_challenge_context(cert, key)
            self._contexts[ck] = ctx
            while len(self._contexts) > _MAX_CONTEXTS:
                self._contexts.popitem(last=False)
        return ctx
