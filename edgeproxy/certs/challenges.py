"""Pending TLS-ALPN-01 and HTTP-01 challenges: published by the issuing process, answered by any.

``present`` writes the key authorization to storage (so whichever worker or replica the CA
reaches can answer) and to a local map (so this process answers without a storage round trip).
The data path asks ``context_for(name)`` and gets an ``SSL.Context`` with the RFC 8737
certificate, or None when no challenge is pending here: the caller then sends a deliberate
``unrecognized_name`` alert and logs why, instead of the mysterious ``internal_error``.

``HttpChallenges`` does the same for HTTP-01 (RFC 8555 s8.3), keyed by token: the port-80
listener asks ``key_authorization(token)``. Tokens are mixed-case base64url and storage keys
are lower case, so a token is stored under its SHA-256; the stored key authorization starts
with the token itself, which is checked on the way out.
"""

from __future__ import annotations

import hashlib
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


def http_challenge_key(token: str) -> str:
    """The storage name of a pending HTTP-01 challenge (never a hostname: no dots after it)."""
    return "http-01." + hashlib.sha256(token.encode("ascii")).hexdigest()


class HttpChallenges:
    """A ``ChallengeSolver`` for HTTP-01 and the lookup the port-80 listener answers from."""

    challenge_type = "http-01"

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._local: dict[str, str] = {}

    async def present(self, identifier: str, token: str, key_authorization: str) -> None:
        self._local[token] = key_authorization
        await self._storage.put_challenge(
            http_challenge_key(token), key_authorization, CHALLENGE_TTL
        )

    async def cleanup(self, identifier: str, token: str) -> None:
        self._local.pop(token, None)
        try:
            await self._storage.delete_challenge(http_challenge_key(token))
        except StorageError as exc:
            log.warning("could not withdraw HTTP-01 challenge for %s: %s", identifier, exc)

    async def key_authorization(self, token: str) -> str | None:
        """The key authorization to serve for ``token``, or None when none is pending."""
        found = self._local.get(token)
        if found is None:
            try:
                found = await self._storage.get_challenge(http_challenge_key(token))
            except StorageError as exc:
                log.warning("HTTP-01 challenge lookup failed: %s", exc)
                return None
        # RFC 8555 s8.1: keyAuthorization = token || '.' || thumbprint.
        if found is None or not found.startswith(token + "."):
            return None
        return found
