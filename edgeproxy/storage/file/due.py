"""The next-action index as files: ``due/`` under the root.

Owns when each managed name next needs attention, filed so that a maintenance pass opens only
what is due. Must not know why a name is due (``certs/`` decides). Blocking: worker threads only.

Theory of operation
-------------------
due/names/<name> holds the name's time; due/t<hour>/<name> holds it too, in the folder of
its hour. A pass lists the folder names (one per hour that has names: a few thousand at
most) and opens only the folders up to now. The per-name file says which hour folder
holds the current entry, so a new time moves the entry; an entry whose time disagrees
with the per-name file (a writer died between the two writes) is dropped when met.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from edgeproxy.storage.base import DueEntry, check_hostname_key
from edgeproxy.storage.file.atomic import PUBLIC_MODE, FileTree, is_key, read_file, unlink
from edgeproxy.storage.file.records import parse_due

__all__ = ["DueFiles"]

_DUE_BUCKET = 3600.0  # seconds per folder of the next-action index
_DUE_BUCKET_RE = re.compile(r"t[0-9]{10}")


class DueFiles:
    """``due/``: the blocking half of the next-action index methods."""

    def __init__(self, tree: FileTree) -> None:
        self._tree = tree
        self._due = tree.root / "due"

    def _due_bucket(self, at: float) -> Path:
        return self._due / f"t{max(0, int(at // _DUE_BUCKET)):010d}"

    def set_due(self, name: str, at: float) -> None:
        pointer = self._due / "names" / name
        with self._tree.guard(self._due):
            old = parse_due(read_file(pointer))
            if old == at:
                return
            value = repr(at).encode()
            self._tree.write_atomic(self._due_bucket(at) / name, value, PUBLIC_MODE, durable=False)
            self._tree.write_atomic(pointer, value, PUBLIC_MODE, durable=False)
            if old is not None and self._due_bucket(old) != self._due_bucket(at):
                unlink(self._due_bucket(old) / name)

    def clear_due(self, name: str) -> None:
        pointer = self._due / "names" / name
        with self._tree.guard(self._due):
            old = parse_due(read_file(pointer))
            unlink(pointer)
            if old is not None:
                unlink(self._due_bucket(old) / name)

    def due_names(self, until: float, limit: int) -> builtins.list[DueEntry]:
        try:
            buckets = sorted(b for b in os.listdir(self._due) if _DUE_BUCKET_RE.fullmatch(b))
        except FileNotFoundError:
            return []
        last = self._due_bucket(until).name
        found: builtins.list[DueEntry] = []
        for bucket in buckets:
            if bucket > last or len(found) >= limit:
                break
            folder = self._due / bucket
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            if not names:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # drained; fails harmlessly if refilled meanwhile
                continue
            entries = []
            for name in names:
                if not is_key(name) or "/" in name:
                    continue  # temp files
                at = parse_due(read_file(folder / name))
                if at is None or at > until:
                    continue
                if parse_due(read_file(self._due / "names" / name)) != at:
                    with self._tree.guard(self._due):  # superseded: drop it unless rewritten
                        if parse_due(read_file(self._due / "names" / name)) != at:
                            unlink(folder / name)
                    continue
                entries.append(DueEntry(name, at))
            entries.sort(key=lambda e: (e.at, e.name))
            found.extend(entries)
        found.sort(key=lambda e: (e.at, e.name))
        return found[:limit]

    def unscheduled(self, names: Sequence[str]) -> builtins.list[str]:
        """One ``faccessat`` per name, relative to an open ``due/names``: a page costs what
        its names cost, however many are scheduled, and makes no object per name."""
        for name in names:
            check_hostname_key(name)
        try:
            fd = os.open(self._due / "names", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return builtins.list(names)
        try:
            return [name for name in names if not os.access(name, os.F_OK, dir_fd=fd)]
        finally:
            os.close(fd)

    def scheduled_names(self) -> builtins.list[str]:
        try:
            names = os.listdir(self._due / "names")
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_key(n))
