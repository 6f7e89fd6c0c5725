"""The file backend's record formats: leases, challenges, registry entries, outbox events.

Owns how each record is written as bytes and read back, refusing anything incomplete (a file
that does not parse is treated as absent or stale by its owner module). Must not know where
the files live or when they are written.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import TypeGuard

from edgeproxy.storage.base import HostnameEntry, OutboxEvent

__all__ = [
    "Challenge",
    "Lease",
    "entry_json",
    "event_json",
    "parse_due",
    "parse_entry",
    "parse_event",
]


def parse_due(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        at = float(raw)
    except ValueError:
        return None
    return at if math.isfinite(at) else None


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fields(raw: bytes, *names: str) -> list[object] | None:
    """The named fields of a JSON object (None where absent); None if ``raw`` is not one."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return [record.get(name) for name in names] if isinstance(record, dict) else None


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    expires_at: float
    created_at: float
    bound: bool = False  # the holder flocks ``<name>.held`` while its process lives

    def to_json(self) -> bytes:
        record = {
            "owner": self.owner,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "bound": self.bound,
        }
        return json.dumps(record, sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Lease | None:
        """None for anything but a complete record: such a file is stale by definition."""
        fields = _fields(raw, "owner", "expires_at", "created_at", "bound")
        if fields is None:
            return None
        owner, expires_at, created_at, bound = fields
        if not isinstance(owner, str) or not is_number(expires_at) or not is_number(created_at):
            return None
        return cls(owner, float(expires_at), float(created_at), bound is True)


@dataclass(frozen=True, slots=True)
class Challenge:
    key_authorization: str
    expires_at: float

    def to_json(self) -> bytes:
        record = {"key_authorization": self.key_authorization, "expires_at": self.expires_at}
        return json.dumps(record, sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Challenge | None:
        fields = _fields(raw, "key_authorization", "expires_at")
        if fields is None:
            return None
        key_authorization, expires_at = fields
        if not isinstance(key_authorization, str) or not is_number(expires_at):
            return None
        return cls(key_authorization, float(expires_at))


def entry_json(entry: HostnameEntry) -> bytes:
    record = {
        "hostname": entry.hostname,
        "upstream": entry.upstream,
        "metadata": entry.metadata,
        "created_at": entry.created_at,
        "removed_at": entry.removed_at,
    }
    return json.dumps(record).encode()


def parse_entry(raw: bytes | None) -> HostnameEntry | None:
    """None for a missing or unreadable record (a torn write cannot happen: temp + rename)."""
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        hostname, upstream, metadata = record["hostname"], record["upstream"], record["metadata"]
        created_at, removed_at = record["created_at"], record["removed_at"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
    if not (
        isinstance(hostname, str)
        and (upstream is None or isinstance(upstream, str))
        and isinstance(metadata, str)
        and is_number(created_at)
        and (removed_at is None or is_number(removed_at))
    ):
        return None
    return HostnameEntry(
        hostname,
        upstream,
        metadata,
        float(created_at),
        None if removed_at is None else float(removed_at),
    )


def event_json(event: OutboxEvent) -> bytes:
    record = {
        "body": base64.b64encode(event.body).decode(),
        "created_at": event.created_at,
        "attempts": event.attempts,
        "next_attempt": event.next_attempt,
    }
    return json.dumps(record).encode()


def parse_event(event_id: str, raw: bytes | None) -> OutboxEvent | None:
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        body = base64.b64decode(record["body"], validate=True)
        created_at, attempts = record["created_at"], record["attempts"]
        next_attempt = record["next_attempt"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
    if not (is_number(created_at) and isinstance(attempts, int) and is_number(next_attempt)):
        return None
    return OutboxEvent(event_id, body, float(created_at), attempts, float(next_attempt))
