"""Where per-name statuses live in storage, and their stored form: the only module that knows.

Owns: the key layout (``status/NAME.json``, one per on-demand name or managed certificate),
encoding a ``DomainStatus`` as JSON and decoding one (fields another version added or dropped
are tolerated: replicas mid-upgrade share storage), and reading, listing, writing and deleting
them. Every writer (the manager's status book, managed certificates) and every reader (the
admin API and status page, ``edgeproxy certs list/status``, ``storage clean``) goes through it.
Must not know: what a status means or how it is chosen (``certs/status.py``).
"""

from __future__ import annotations

import builtins
import json
from dataclasses import asdict, fields
from typing import Protocol

from ..reasons import Reason
from ..storage.base import StoredItem
from .status import DomainStatus

PREFIX = "status/"
SUFFIX = ".json"

_FIELDS = frozenset(f.name for f in fields(DomainStatus))
_FIELD_ORDER = tuple(f.name for f in fields(DomainStatus))


class StatusReader(Protocol):
    async def get(self, key: str, /) -> bytes | None: ...


class StatusWriter(Protocol):
    async def put(self, key: str, value: bytes, /) -> None: ...


class StatusLister(Protocol):
    async def list(self, prefix: str = "", /) -> builtins.list[StoredItem]: ...


class UnreadableStatus(ValueError):
    """A stored status that does not decode (corrupt, or not a status at all)."""


def status_key(name: str) -> str:
    return f"{PREFIX}{name}{SUFFIX}"


def name_of(key: str) -> str | None:
    """The name a storage key holds the status of; None for any other key."""
    if not (key.startswith(PREFIX) and key.endswith(SUFFIX)):
        return None
    return key[len(PREFIX) : -len(SUFFIX)] or None


def as_record(st: DomainStatus) -> dict[str, object]:
    """The stored fields of ``st`` (what ``certs status --json`` prints)."""
    return dict(sorted(asdict(st).items()))


def encode(st: DomainStatus) -> bytes:
    # Not ``asdict``: its deep copy of every field was most of a cold-loaded name's status
    # write (about 0.1 ms); json.dumps reads the tuple, list and dict fields as they are.
    return json.dumps({k: getattr(st, k) for k in _FIELD_ORDER}, sort_keys=True).encode()


def decode(raw: bytes) -> DomainStatus:
    """Raises UnreadableStatus when ``raw`` is not a stored status."""
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        if d.get("ari_window") is not None:
            d["ari_window"] = tuple(d["ari_window"])
        # Records written by a newer or older version (rolling upgrades share storage): keep
        # the fields this version knows.
        stored_reason = d.pop("reason", None)
        st = DomainStatus(**{k: v for k, v in d.items() if k in _FIELDS})
    except (ValueError, TypeError) as exc:
        raise UnreadableStatus(str(exc)) from None
    if st.last_error_type:
        st.reason = _reason(stored_reason, st.last_error_type)
    return st


def _reason(stored: object, error_type: str) -> Reason:
    """The typed reason of a stored status: as stored, or (a record from before reasons were
    stored, or a reason this version does not know) read from its error type."""
    if isinstance(stored, str):
        try:
            return Reason(stored)
        except ValueError:
            pass
    return Reason.of_type(error_type)


async def read(storage: StatusReader, name: str) -> DomainStatus | None:
    """The stored status of ``name``; None when there is none or it names another name.

    Raises UnreadableStatus for a corrupt one, StorageError when storage fails, ValueError
    (from the backend) when ``name`` could not be a storage key at all.
    """
    raw = await storage.get(status_key(name))
    if raw is None:
        return None
    st = decode(raw)
    return st if st.name == name else None


async def write(storage: StatusWriter, st: DomainStatus) -> None:
    await storage.put(status_key(st.name), encode(st))


async def listed(storage: StatusLister) -> builtins.list[tuple[str, float]]:
    """(name, last modified) of every stored status, in the backend's listing order."""
    out = []
    for item in await storage.list(PREFIX):
        name = name_of(item.key)
        if name is not None:
            out.append((name, item.modified))
    return out
