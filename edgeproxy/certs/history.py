"""A short per-name history of issuance attempts, kept in storage for the status page.

Owns the record's format and its bound: ``history/NAME.json`` holds the last ``LIMIT``
attempts (issue or renewal, outcome, error type, detail and hint), newest first. The
certificate manager appends one per finished attempt; anything may read it. The bound keeps a
name that fails every minute from growing a file without end; the history is informative, so
two processes appending at once may lose one line (the last writer wins), never corrupt it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from ..errors import StorageError

#: Attempts kept per name.
LIMIT = 20


def history_key(name: str) -> str:
    return f"history/{name}.json"


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float  # unix time the attempt finished
    kind: str  # "issue" | "renew"
    outcome: str  # "issued" | "renewed" | "failed"
    error_type: str | None = None
    detail: str | None = None
    hint: str | None = None


_FIELDS = frozenset(f.name for f in fields(Attempt))


class HistoryStorage(Protocol):
    async def get(self, key: str, /) -> bytes | None: ...

    async def put(self, key: str, value: bytes, /) -> None: ...


def parse(raw: bytes | None) -> list[Attempt]:
    """The attempts in ``raw``, newest first; an unreadable record reads as empty."""
    if raw is None:
        return []
    try:
        items = json.loads(raw)
        return [Attempt(**{k: v for k, v in d.items() if k in _FIELDS}) for d in items][:LIMIT]
    except (ValueError, TypeError, AttributeError):
        return []


def appended(raw: bytes | None, attempt: Attempt) -> bytes:
    kept = [attempt, *parse(raw)][:LIMIT]
    return json.dumps([asdict(a) for a in kept], sort_keys=True).encode()


async def read_history(storage: Any, name: str) -> list[Attempt]:
    try:
        return parse(await storage.get(history_key(name)))
    except (StorageError, ValueError):
        return []


async def record(storage: HistoryStorage, name: str, attempt: Attempt) -> None:
    key = history_key(name)
    await storage.put(key, appended(await storage.get(key), attempt))
