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

Anyone can send acme-tls/1 hellos, so a miss is remembered for ``negative_ttl`` (0.1 s; bounded
in size) and concurrent lookups of one name share one storage read: a flood for one name costs
at most ten reads a second, not one per hello. The cache must never hide a real challenge:
``present`` drops the name's entry here, and returns only ``negative_ttl`` after the challenge
is stored, so the CA is told to validate only once every replica's miss from before the write
has expired (a miss is dated from when its read *started*, which is before the write if it
could not see it).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
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
#: How long "no challenge pending for this name" is believed without asking storage again.
#: ``present`` waits this long before the CA is told, so it is added to every issuance: short
#: enough to be lost in an ACME round trip, long enough to turn a flood into ten reads a second.
NEGATIVE_TTL = 0.1
#: Names whose miss is remembered (oldest dropped first; a dropped one costs one more read).
_MAX_NEGATIVE = 4096


@dataclass(slots=True)
class _Lookup:
    """One storage read in flight for a name, shared by every hello that asks meanwhile."""

    done: trio.Event = field(default_factory=trio.Event)
    key_authorization: str | None = None


class ChallengeResponder:
    challenge_type = "tls-alpn-01"

    def __init__(
        self,
        storage: Storage,
        *,
        negative_ttl: float = NEGATIVE_TTL,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._storage = storage
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._local: dict[str, str] = {}
        # name -> when its miss stops being believed (clock time), oldest first.
        self._absent: OrderedDict[str, float] = OrderedDict()
        self._lookups: dict[str, _Lookup] = {}
        self._contexts: OrderedDict[tuple[str, str], SSL.Context] = OrderedDict()
        # One key for all challenge certificates: generating a key per validation is wasted
        # CPU, and the key proves nothing (the acmeIdentifier digest does).
        self._key = ec.generate_private_key(ec.SECP256R1())

    async def present(self, identifier: str, token: str, key_authorization: str) -> None:
        self._local[identifier] = key_authorization
        self._absent.pop(identifier, None)
        await self._storage.put_challenge(identifier, key_authorization, CHALLENGE_TTL)
        # Other processes and replicas may have remembered a miss for this name just before
        # the write; theirs have all expired by the time the CA is told to come.
        await trio.sleep(self._negative_ttl)

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
            key_auth = await self._lookup(name)
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

    async def _lookup(self, name: str) -> str | None:
        """The stored key authorization for ``name``, through the miss cache and one shared
        read per name at a time."""
        expires = self._absent.get(name)
        if expires is not None:
            if expires > self._clock():
                return None
            del self._absent[name]
        pending = self._lookups.get(name)
        if pending is not None:
            await pending.done.wait()
            return pending.key_authorization
        pending = self._lookups[name] = _Lookup()
        started = self._clock()
        try:
            pending.key_authorization = await self._storage.get_challenge(name)
        except StorageError as exc:
            log.warning("challenge lookup for %s failed: %s", name, exc)  # not remembered
        else:
            if pending.key_authorization is None and name not in self._local:
                self._absent[name] = started + self._negative_ttl
                self._absent.move_to_end(name)
                while len(self._absent) > _MAX_NEGATIVE:
                    self._absent.popitem(last=False)
        finally:
            del self._lookups[name]
            pending.done.set()
        return pending.key_authorization


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
