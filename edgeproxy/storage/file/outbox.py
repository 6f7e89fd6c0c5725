"""The event outbox as files: ``events/<id>.json`` under the root, one file per event.

Owns the outbox files; ids sort in creation order, so listing the folder sorted gives the oldest
first. Must not know what an event says or where it goes (``edgeproxy.events``). Blocking:
worker threads only.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path

from edgeproxy.storage.base import OutboxEvent, check_hostname_key
from edgeproxy.storage.file.atomic import SECRET_MODE, FileTree, read_file
from edgeproxy.storage.file.records import event_json, parse_event

__all__ = ["OutboxFiles"]

_EVENT_SUFFIX = ".json"


class OutboxFiles:
    """``events/``: the blocking half of the outbox methods."""

    def __init__(self, tree: FileTree) -> None:
        self._tree = tree
        self._folder = tree.root / "events"

    def path(self, event_id: str) -> Path:
        return self._folder / (check_hostname_key(event_id) + _EVENT_SUFFIX)

    def delete(self, path: Path) -> None:
        self._tree.delete(path)

    def count(self) -> int:
        return len(self.names())

    def enqueue(self, event: OutboxEvent) -> None:
        path = self.path(event.id)
        if path.exists():
            return
        self._tree.write_atomic(path, event_json(event), SECRET_MODE)

    def update(self, path: Path, event: OutboxEvent) -> None:
        if path.exists():  # delivered meanwhile by someone else: leave it gone
            self._tree.write_atomic(path, event_json(event), SECRET_MODE)

    def names(self) -> builtins.list[str]:
        try:
            names = os.listdir(self._folder)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(_EVENT_SUFFIX) and not n.startswith("."))

    def due(self, now: float, limit: int) -> builtins.list[OutboxEvent]:
        due: builtins.list[OutboxEvent] = []
        for name in self.names():
            event = parse_event(name[: -len(_EVENT_SUFFIX)], read_file(self._folder / name))
            if event is not None and event.next_attempt <= now:
                due.append(event)
                if len(due) >= limit:
                    break
        return due
