"""The ``Storage`` protocol: what the certificate manager needs from durable storage.

Storage owns bytes under slash-separated keys, leases (locks with an owner and an expiry) and
pending ACME challenge tokens. It knows nothing of ACME or TLS: a certificate is just a value.

Contract every backend keeps (the conformance suite in ``tests/unit/test_storage_*`` checks it):

* ``put`` is atomic: a reader sees the old value or the new one, never a torn mix, even if the
  process is killed mid-write. ``secret=True`` values hold private keys: files are 0600 (and a
  backend may encrypt them at rest).
* A lock is a lease: ``try_lock`` succeeds when nobody holds it, the holder's lease expired,
  or the holder is gone (its process died, or its database session ended); the holder keeps it
  alive with ``refresh_lock``; a lock abandoned by a holder that hangs frees itself at expiry.
* Challenge tokens are visible to every process sharing the storage, so whichever process or
  replica the CA reaches can answer.
* The event outbox holds lifecycle events until one process delivered them: ids sort in
  creation order (``due_events`` returns the oldest due first), entries survive restarts.
* The next-action index holds at most one time per name (``set_due`` replaces it);
  ``due_names`` returns the earliest first and touches only what is due.
* Walks over everything stored come in bounded steps: ``key_pages`` hands out plain key strings
  at most ``page`` at a time, each page one short trip to a worker thread (or one query), and
  ``unscheduled`` answers for one such page. A reconciliation of 100,000 names is then a few
  hundred small steps with the event loop free between them, never one long listing that
  holds the interpreter (and builds 100,000 objects for the collector) while handshakes wait.
* The hostname registry holds one ``HostnameEntry`` per customer hostname. Listing pages by
  hostname (``after`` is the last name of the previous page), so a cursor stays valid however
  many entries are added or removed meanwhile. ``hostname_changes`` is a cheap change feed:
  given the marker of the previous call it names the entries changed since, or None when the
  caller must reload everything (first call, or the backend lost track).

Optional features are declared, never probed for: ``capabilities`` says which a backend
offers (its own upkeep of its layout, a push feed of other writers' changes), and callers
use what is there.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# fullmatch, never ``match`` with ``$``: that would accept a key ending in a newline.
_SEGMENT = r"[a-z0-9_.\-*]+"
_KEY_RE = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
_SEGMENT_RE = re.compile(_SEGMENT)


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root or collide after normalisation."""
    if not _KEY_RE.fullmatch(key) or any(part in {".", ".."} for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def is_key_segment(part: str) -> bool:
    """Is ``part`` one valid key segment (no slash)? A walk asks it of each entry under a folder
    whose key is valid already: cheaper than ``check_key`` on the whole key, and the same."""
    return _SEGMENT_RE.fullmatch(part) is not None and part not in {".", ".."}


def check_hostname_key(hostname: str) -> str:
    """A registry key is one storage key segment (the caller normalised the hostname)."""
    if not is_key_segment(hostname):
        raise ValueError(f"invalid hostname key {hostname!r}")
    return hostname


@dataclass(frozen=True, slots=True)
class LockInfo:
    name: str
    owner: str
    expires_at: float  # unix time


@dataclass(frozen=True, slots=True)
class StoredItem:
    key: str
    modified: float  # unix time
    size: int


@dataclass(frozen=True, slots=True)
class HostnameEntry:
    """A registered customer hostname (see ``edgeproxy.hostnames``)."""

    hostname: str  # normalised (``names.validate_hostname``)
    upstream: str | None  # "host:port" overriding the SNI routes, or None
    metadata: str  # a JSON object's text, as stored
    created_at: float  # unix time
    removed_at: float | None = None  # set by a removal; the entry is purged after the grace

    @property
    def live(self) -> bool:
        return self.removed_at is None


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A lifecycle event waiting for delivery (see ``edgeproxy.events``)."""

    id: str  # sortable by creation time; a valid storage key segment
    body: bytes  # the CloudEvent, JSON
    created_at: float
    attempts: int = 0
    next_attempt: float = 0.0


@dataclass(frozen=True, slots=True)
class DueEntry:
    """When a managed name next needs attention (renewal, ARI check, retry after a failure)."""

    name: str
    at: float  # unix time


class BackendUpkeep(Protocol):
    """A backend's own checks and sweeps of its layout (what ``storage check``/``clean`` and
    the maintenance pass add on top of the ``Storage`` methods)."""

    async def check(self) -> builtins.list[str]:
        """Problems found, one line each; empty when healthy. Changes nothing."""

    async def clean(self, *, now: float | None = None) -> builtins.list[str]:
        """Remove what crashed writers left behind; say what went."""


class ChangeFeed(Protocol):
    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(key)`` whenever another process or replica changes ``key``."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The optional features a backend offers beyond ``Storage``; None: not offered."""

    upkeep: BackendUpkeep | None = None
    change_feed: ChangeFeed | None = None


@runtime_checkable
class Storage(Protocol):
    @property
    def capabilities(self) -> Capabilities:
        """Which optional features this backend offers (declared, so nobody probes)."""

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None."""

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        """Store atomically; ``secret`` marks private-key material."""

    async def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""

    async def list(self, prefix: str = "") -> builtins.list[StoredItem]:
        """Items whose key starts with ``prefix`` (a folder-like prefix, e.g. ``certs/``)."""

    def key_pages(self, prefix: str, page: int) -> AsyncGenerator[builtins.list[str], None]:
        """The keys starting with ``prefix``, in pages of at most ``page`` (in no promised
        order), each page one bounded step. A key written or removed during the walk may be
        seen or not; every key there throughout is seen once. Close it (``aclosing``) when
        stopping early."""

    async def quarantine(self, key: str, reason: str) -> None:
        """Move an unparseable value aside so it neither crashes nor blocks re-issuance."""

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take the lease ``name`` for ``ttl`` seconds if free or expired."""

    async def refresh_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Extend our lease; False if we lost it (expired and taken over)."""

    async def unlock(self, name: str, owner: str) -> None:
        """Release the lease if we still hold it."""

    async def lock_info(self, name: str) -> LockInfo | None:
        """Who holds ``name`` and until when (expired leases may still be listed)."""

    async def list_locks(self) -> builtins.list[LockInfo]:
        """All lease records, including expired ones not yet cleaned."""

    async def put_challenge(self, name: str, key_authorization: str, ttl: float) -> None:
        """Publish a pending TLS-ALPN-01 challenge for ``name``."""

    async def get_challenge(self, name: str) -> str | None:
        """The key authorization for a pending, unexpired challenge, or None."""

    async def delete_challenge(self, name: str) -> None:
        """Withdraw a challenge once validation finished."""

    async def list_challenges(self) -> builtins.list[tuple[str, float]]:
        """(name, expires_at) of every stored challenge, expired included."""

    # -- next-action index -----------------------------------------------------------------
    # What maintenance reads instead of every certificate: one time per name, and the names
    # due by a time in time order, at a cost that follows the number due, not the number kept.

    async def set_due(self, name: str, at: float) -> None:
        """Record that ``name`` next needs attention at ``at`` (replacing its previous time)."""

    async def due_names(self, until: float, limit: int) -> builtins.list[DueEntry]:
        """Up to ``limit`` names whose time is at or before ``until``, earliest first."""

    async def clear_due(self, name: str) -> None:
        """Forget ``name``'s time (it is no longer managed); absent names are not an error."""

    async def scheduled_names(self) -> builtins.list[str]:
        """Every name with a time, sorted (tools and tests; maintenance pages with
        ``unscheduled`` instead)."""

    async def unscheduled(self, names: Sequence[str]) -> builtins.list[str]:
        """Those of ``names`` (one page, e.g. from ``key_pages``) that have no time."""

    # -- hostname registry --------------------------------------------------------------------

    async def add_hostname(self, entry: HostnameEntry) -> tuple[HostnameEntry, bool]:
        """Register ``entry``; a live entry of that name wins: (it, False). A removed one is
        replaced (re-added): (entry, True)."""

    async def add_hostnames(
        self, entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        """``add_hostname`` for each entry, as one batch (bulk import); results in order."""

    async def get_hostname(self, hostname: str) -> HostnameEntry | None:
        """The entry, live or removed (until purged), or None."""

    async def update_hostname(self, entry: HostnameEntry) -> bool:
        """Store ``entry``'s upstream and metadata if a live entry of that name exists."""

    async def remove_hostname(self, hostname: str, at: float) -> HostnameEntry | None:
        """Mark the live entry removed at ``at``; the entry as it was, or None if none lived."""

    async def purge_hostname(self, hostname: str, removed_before: float) -> bool:
        """Delete the entry if it was removed at or before ``removed_before``."""

    async def list_hostnames(
        self, *, after: str | None = None, limit: int = 100
    ) -> builtins.list[HostnameEntry]:
        """Up to ``limit`` entries (removed ones too) with hostname > ``after``, by hostname."""

    async def hostname_changes(self, since: str | None) -> tuple[str, builtins.list[str] | None]:
        """(new marker, hostnames changed after marker ``since``); None: reload everything."""

    # -- event outbox -------------------------------------------------------------------------

    async def enqueue_event(self, event: OutboxEvent) -> None:
        """Store ``event`` durably (an existing id is left as it is)."""

    async def due_events(self, now: float, limit: int) -> builtins.list[OutboxEvent]:
        """Up to ``limit`` events whose ``next_attempt`` <= ``now``, oldest first."""

    async def update_event(self, event: OutboxEvent) -> None:
        """Record a failed attempt: store ``attempts`` and ``next_attempt``."""

    async def delete_event(self, event_id: str) -> None:
        """Remove a delivered (or abandoned) event; absent ids are not an error."""

    async def count_events(self) -> int:
        """How many events wait for delivery."""

    async def aclose(self) -> None:
        """Release connections and background resources."""
