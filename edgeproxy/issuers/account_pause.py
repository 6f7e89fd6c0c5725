"""The account-wide pause: after a CA says "rate limited", no new order goes to that account
until its Retry-After, from any worker or replica, and not after a restart either.

Owns: when a CA answer pauses an account (``pauses_account``: a ``rateLimited`` problem at any
HTTP status, RFC 8555 s6.6, or a 503 that carries Retry-After, RFC 9110 s15.6.4), how long
(``pause_seconds``: the CA's Retry-After clamped to [MIN_PAUSE, MAX_PAUSE], DEFAULT_PAUSE
when it gave none), the record in storage (``acme/pause/<host>-<digest>.json``, one per
account, the same stem as the account's own record: edgeproxy keeps one account per CA
directory), reading it cheaply, and the ``edgeproxy_acme_account_paused`` gauges.

Must not know: ACME messages beyond a problem's type, status and Retry-After (the caller
passes them), the certificate manager's schedule, which names wait.

Theory of operation
-------------------
``AcmeIssuer`` registers its account here (``watch``), checks ``current`` before each order
(a paused member raises ``account_paused`` at once, so a ``FallbackIssuer`` moves on to the
next CA) and ``record``s a pause when the CA answers with one. The certificate manager asks
one question before ordering a name, ``blocking``: the pause that holds every watched account,
if any (with several CAs the name can still go to an unpaused one). Reads are cached in memory
for ``cache_seconds``; ``fresh=True`` (the lease path, where an order is about to cost far more
than one storage read) always reads storage. Records only ever lengthen a pause: a replica that
learns of a shorter Retry-After a moment later does not cut another's longer one short.

Per-name failures (``backoff/<name>.json``) are the other, narrower layer: a rate limit also
backs off the name that met it, by the same Retry-After.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from .. import metrics
from ..errors import StorageError
from ..reasons import Reason, short_name
from ..storage.base import Storage, StoredItem
from ..timefmt import iso_utc

log = logging.getLogger("edgeproxy.acme")

PAUSE_PREFIX = "acme/pause/"
# A rateLimited problem without Retry-After (RFC 8555 s6.6 says the CA SHOULD send one; Let's
# Encrypt always does): ten minutes, long enough not to hammer a CA that is shedding load,
# short enough that a forgotten header does not stall a fleet for hours.
DEFAULT_PAUSE = 600.0
# Retry-After of 0 or a date in the past: still wait a moment, or every replica retries at once.
MIN_PAUSE = 1.0
# Beyond a day it is a confused CA (or a garbled date): the same cap as the per-name backoff.
MAX_PAUSE = 86400.0
# How stale a cached "not paused" may be before ``current`` reads storage again.
CACHE_SECONDS = 3.0

RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"
ACCOUNT_PAUSED = Reason.ACCOUNT_PAUSED  # the reason the issuer raises and statuses show


def account_stem(directory: str) -> str:
    """``<host>-<digest>``: one account's name in storage (its record and its pause)."""
    host = urlsplit(directory).hostname or "ca"
    digest = hashlib.sha256(directory.encode()).hexdigest()[:12]
    return f"{host.lower()}-{digest}"


def pause_key(directory: str) -> str:
    return f"{PAUSE_PREFIX}{account_stem(directory)}.json"


def pauses_account(problem_type: str, status: int, retry_after: float | None) -> bool:
    """Whether a CA's problem pauses the whole account: ``rateLimited`` at any status, or a
    503 with Retry-After (the CA shedding load and saying when to come back)."""
    return problem_type == RATE_LIMITED or (status == 503 and retry_after is not None)


def pause_seconds(retry_after: float | None) -> float:
    """How long to pause for the CA's Retry-After (seconds, already parsed from either form
    by ``acme.messages.parse_retry_after``): DEFAULT_PAUSE without one, clamped otherwise."""
    if retry_after is None or math.isnan(retry_after):
        return DEFAULT_PAUSE
    return min(max(retry_after, MIN_PAUSE), MAX_PAUSE)


class PauseRecordError(ValueError):
    """A pause record in storage cannot be read; the message names its key and the fix."""


@dataclass(frozen=True, slots=True)
class AccountPause:
    """One account's pause: no new order before ``until`` (unix time)."""

    directory: str
    label: str  # the CA's short name (acme.issuers name), for metrics and the status
    since: float
    until: float
    reason: str  # the CA's problem type ("HTTP 503" when it sent none)
    detail: str

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, key: str) -> AccountPause:
        try:
            d = json.loads(raw)
            pause = cls(
                directory=str(d["directory"]),
                label=str(d["label"]),
                since=float(d["since"]),
                until=float(d["until"]),
                reason=str(d["reason"]),
                detail=str(d.get("detail", "")),
            )
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise PauseRecordError(
                f"the account pause record {key} is unreadable ({type(exc).__name__}: {exc}); "
                "delete it to end the pause"
            ) from None
        if not (math.isfinite(pause.until) and math.isfinite(pause.since)):
            raise PauseRecordError(
                f"the account pause record {key} has a non-finite time; delete it"
            )
        return pause

    def describe(self) -> str:
        """What a waiting name's status says (the CA's own words included)."""
        short = short_name(self.reason)
        return (
            f"new orders to CA {self.label} are paused until {iso_utc(self.until)} "
            f"(it answered {short}: {self.detail})"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "until_iso": iso_utc(self.until),
            "since_iso": iso_utc(self.since),
        }


@dataclass(eq=False)
class AccountPauses:
    """The pauses of the ACME accounts one process orders with (shared by its issuers and its
    certificate manager), read through ``storage`` and cached in memory."""

    storage: Storage
    _: KW_ONLY
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    cache_seconds: float = CACHE_SECONDS
    _accounts: dict[str, str] = field(default_factory=dict, init=False)  # directory -> label
    _cache: dict[str, tuple[float, AccountPause | None]] = field(default_factory=dict, init=False)
    # Unreadable records already logged.
    _complained: set[str] = field(default_factory=set, init=False)

    def watch(self, directory: str, label: str) -> None:
        """Track ``directory``'s account (its gauge starts at 0)."""
        self._accounts.setdefault(directory, label)
        self._gauge(directory, None)

    @property
    def accounts(self) -> dict[str, str]:
        return dict(self._accounts)

    async def current(self, directory: str, *, fresh: bool = False) -> AccountPause | None:
        """The pause in force for ``directory``'s account now, or None.

        Storage trouble keeps the last known answer (and None if there is none: a database
        blip must not invent a pause); an unreadable record is logged once and ignored."""
        now = self.monotonic()
        cached = self._cache.get(directory)
        if fresh or cached is None or now - cached[0] >= self.cache_seconds:
            key = pause_key(directory)
            try:
                pause = self._parse(await self.storage.get(key), key)
            except StorageError as exc:
                log.warning("could not read the account pause %s: %s", key, exc)
                pause = cached[1] if cached is not None else None
            cached = self._cache[directory] = (now, pause)
        pause = cached[1]
        if pause is not None and pause.until <= self.clock():
            pause = None
        self._gauge(directory, pause)
        return pause

    def _parse(self, raw: bytes | None, key: str) -> AccountPause | None:
        if raw is None:
            return None
        try:
            pause = AccountPause.from_json(raw, key)
        except PauseRecordError as exc:
            if key not in self._complained:
                self._complained.add(key)
                log.error("%s", exc)
            return None
        self._complained.discard(key)
        return pause

    async def record(
        self,
        directory: str,
        *,
        reason: str,
        detail: str,
        retry_after: float | None,
    ) -> AccountPause:
        """Pause ``directory``'s account for ``pause_seconds(retry_after)``; a longer pause
        already recorded (by any process) stays. Storage trouble is logged: this process
        still honours the pause from memory."""
        now = self.clock()
        label = self._accounts.get(directory) or urlsplit(directory).hostname or "ca"
        pause = AccountPause(
            directory, label, now, now + pause_seconds(retry_after), reason, detail[:500]
        )
        key = pause_key(directory)
        try:
            existing = self._parse(await self.storage.get(key), key)
            if existing is not None and existing.until >= pause.until:
                pause = existing
            else:
                await self.storage.put(key, pause.to_json())
        except StorageError as exc:
            log.warning("could not record the account pause %s: %s", key, exc)
        self._cache[directory] = (self.monotonic(), pause)
        self._gauge(directory, pause)
        log.warning(
            "ACME account at %s paused until %s: the CA answered %s (%s); no new orders go "
            "to it until then",
            directory,
            iso_utc(pause.until),
            reason,
            detail,
        )
        return pause

    async def blocking(self, *, fresh: bool = False) -> AccountPause | None:
        """The pause that holds every watched account (the one ending first), or None when
        any account may order (or none is watched: an issuer without ACME)."""
        first: AccountPause | None = None
        for directory in self._accounts:
            pause = await self.current(directory, fresh=fresh)
            if pause is None:
                return None
            if first is None or pause.until < first.until:
                first = pause
        return first

    async def active(self) -> list[AccountPause]:
        """Every watched account's pause in force now (the status API, the maintenance pass's
        gauge refresh)."""
        found = [await self.current(d) for d in self._accounts]
        return [p for p in found if p is not None]

    def _gauge(self, directory: str, pause: AccountPause | None) -> None:
        label = self._accounts.get(directory)
        if label is None:
            return
        metrics.ACME_ACCOUNT_PAUSED.labels(label).set(1 if pause is not None else 0)
        metrics.ACME_ACCOUNT_PAUSED_UNTIL.labels(label).set(pause.until if pause else 0)


class PauseReader(Protocol):
    async def get(self, key: str, /) -> bytes | None: ...

    async def list(self, prefix: str = "", /) -> builtins.list[StoredItem]: ...


async def stored_pauses(storage: PauseReader, now: float) -> list[dict[str, object]]:
    """Every account's pause record in storage (the admin API's ``/v1/acme/accounts``, the
    same on every replica): the record with ``paused`` (still in force at ``now``), or the
    key and why it cannot be read."""
    out: list[dict[str, object]] = []
    for item in await storage.list(PAUSE_PREFIX):
        raw = await storage.get(item.key)
        if raw is None:
            continue  # deleted meanwhile
        try:
            pause = AccountPause.from_json(raw, item.key)
        except PauseRecordError as exc:
            out.append({"key": item.key, "error": str(exc)})
            continue
        out.append({"key": item.key, **pause.as_dict(), "paused": pause.until > now})
    return out
