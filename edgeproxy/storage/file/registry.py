"""The hostname registry as files: ``hostnames/`` under the root, with its change journal.

Owns one file per registry entry, the sorted listing and the journal that tells other
processes what changed. Must not know what an entry means (``edgeproxy.hostnames`` does).
Blocking: worker threads only.

Theory of operation
-------------------
One file per entry, so a change rewrites one small file. Paging sorts the folder's names (a
``scandir``, no file is opened) and reads only the page's files; the sorted list is cached until
the journal changes. Every registry update appends the hostname to ``.journal`` under the
registry guard, so the journal's (inode, size) is a change marker that other processes poll with
one ``stat``, and the bytes since their last marker say which entries to re-read. Past
``JOURNAL_MAX`` bytes the journal is replaced by an empty one (a new inode): readers holding the
old marker are told to reload everything.
"""

from __future__ import annotations

import bisect
import builtins
import os
from collections.abc import Sequence
from pathlib import Path

from edgeproxy.storage.base import HostnameEntry, check_hostname_key
from edgeproxy.storage.file.atomic import PUBLIC_MODE, FileTree, read_file, syncfs
from edgeproxy.storage.file.records import entry_json, parse_entry

__all__ = ["RegistryFiles"]

_JOURNAL_NAME = ".journal"
_ENTRY_SUFFIX = ".json"


class RegistryFiles:
    """``hostnames/``: the blocking half of the registry methods."""

    #: Journal size beyond which it is replaced by an empty one (readers then reload all).
    JOURNAL_MAX = 1 << 20

    def __init__(self, tree: FileTree) -> None:
        self._tree = tree
        self._folder = tree.root / "hostnames"
        # (journal marker, sorted hostnames): the listing is reused until the journal moves.
        self._listing: tuple[str, builtins.list[str]] | None = None

    def path(self, hostname: str) -> Path:
        return self._folder / (check_hostname_key(hostname) + _ENTRY_SUFFIX)

    def get(self, path: Path) -> HostnameEntry | None:
        return parse_entry(read_file(path))

    def add(self, entry: HostnameEntry) -> tuple[HostnameEntry, bool]:
        path = self.path(entry.hostname)
        with self._tree.guard(self._folder):
            current = parse_entry(read_file(path))
            if current is not None and current.live:
                return current, False
            self._tree.write_atomic(path, entry_json(entry), PUBLIC_MODE)
            self._journal(entry.hostname)
        return entry, True

    def add_many(
        self, entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        # One guard, one journal write and one filesystem sync for the whole batch: an fsync
        # per entry made a 10,000-name import take a minute. Nothing is reported before the
        # sync, so a crash mid-batch loses only entries whose adding was never confirmed.
        results: builtins.list[tuple[HostnameEntry, bool]] = []
        added: builtins.list[str] = []
        with self._tree.guard(self._folder):
            for entry in entries:
                path = self.path(entry.hostname)
                current = parse_entry(read_file(path))
                if current is not None and current.live:
                    results.append((current, False))
                    continue
                self._tree.write_atomic(path, entry_json(entry), PUBLIC_MODE, durable=False)
                added.append(entry.hostname)
                results.append((entry, True))
            if added:
                syncfs(self._folder)
                self._journal(*added)
        return results

    def update(self, entry: HostnameEntry) -> bool:
        path = self.path(entry.hostname)
        with self._tree.guard(self._folder):
            current = parse_entry(read_file(path))
            if current is None or not current.live:
                return False
            updated = HostnameEntry(
                current.hostname, entry.upstream, entry.metadata, current.created_at
            )
            self._tree.write_atomic(path, entry_json(updated), PUBLIC_MODE)
            self._journal(entry.hostname)
        return True

    def remove(self, path: Path, at: float) -> HostnameEntry | None:
        with self._tree.guard(self._folder):
            current = parse_entry(read_file(path))
            if current is None or not current.live:
                return None
            removed = HostnameEntry(
                current.hostname, current.upstream, current.metadata, current.created_at, at
            )
            self._tree.write_atomic(path, entry_json(removed), PUBLIC_MODE)
            self._journal(current.hostname)
        return current

    def purge(self, path: Path, removed_before: float) -> bool:
        with self._tree.guard(self._folder):
            current = parse_entry(read_file(path))
            if current is None or current.removed_at is None or current.removed_at > removed_before:
                return False
            self._tree.delete(path)
            self._journal(current.hostname)
        return True

    def _journal(self, *hostnames: str) -> None:
        """Append ``hostnames`` to the change journal (caller holds the registry guard)."""
        path = self._folder / _JOURNAL_NAME
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PUBLIC_MODE)
        try:
            # One write: readers only ever consume whole lines anyway.
            data = memoryview("".join(f"{h}\n" for h in hostnames).encode())
            while data:
                data = data[os.write(fd, data) :]
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.JOURNAL_MAX:
            self._tree.write_atomic(path, b"", PUBLIC_MODE)

    def _journal_marker(self) -> tuple[int, int]:
        try:
            st = os.stat(self._folder / _JOURNAL_NAME)
        except FileNotFoundError:
            return 0, 0
        return st.st_ino, st.st_size

    def changes(self, since: str | None) -> tuple[str, builtins.list[str] | None]:
        ino, size = self._journal_marker()
        marker = f"{ino}:{size}"
        if since is None:
            return marker, None
        old_ino, _, old_off = since.partition(":")
        if not (old_ino.isdigit() and old_off.isdigit()):
            return marker, None
        if int(old_ino) == 0 and ino != 0:
            old_ino, old_off = str(ino), "0"  # the journal's first write came after the marker
        if int(old_ino) != ino:
            return marker, None  # replaced: the journal cannot say what changed before
        offset = int(old_off)
        if offset > size:
            return marker, None
        if offset == size:
            return since, []
        with open(self._folder / _JOURNAL_NAME, "rb") as f:
            f.seek(offset)
            chunk = f.read(size - offset)
        whole = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        names = dict.fromkeys(chunk[:whole].decode("ascii", "replace").split())
        return f"{ino}:{offset + whole}", builtins.list(names)

    def _sorted_hostnames(self) -> builtins.list[str]:
        ino, size = self._journal_marker()
        marker = f"{ino}:{size}"  # read before listing: a change meanwhile only re-lists later
        cached = self._listing
        if cached is not None and cached[0] == marker:
            return cached[1]
        try:
            entries = os.listdir(self._folder)
        except FileNotFoundError:
            entries = []
        names = sorted(
            e[: -len(_ENTRY_SUFFIX)]
            for e in entries
            if e.endswith(_ENTRY_SUFFIX) and not e.startswith(".")
        )
        self._listing = (marker, names)
        return names

    def list_page(self, after: str | None, limit: int) -> builtins.list[HostnameEntry]:
        names = self._sorted_hostnames()
        start = bisect.bisect_right(names, after) if after is not None else 0
        found: builtins.list[HostnameEntry] = []
        for name in names[start:]:
            if len(found) >= limit:
                break
            entry = parse_entry(read_file(self._folder / (name + _ENTRY_SUFFIX)))
            if entry is not None:  # purged since the listing
                found.append(entry)
        return found
