"""Durable storage for certificates, leases and challenge tokens (see ``base`` for the contract).

Re-exports the public names so callers write ``from edgeproxy.storage import FileStorage``.
"""

from edgeproxy.storage.base import (
    HostnameEntry,
    LockInfo,
    OutboxEvent,
    Storage,
    StoredItem,
    check_key,
)
from edgeproxy.storage.file import FileStorage
from edgeproxy.storage.locks import LockLost, hold_lock, make_owner_id

__all__ = [
    "FileStorage",
    "HostnameEntry",
    "LockInfo",
    "LockLost",
    "OutboxEvent",
    "Storage",
    "StoredItem",
    "check_key",
    "hold_lock",
    "make_owner_id",
]
