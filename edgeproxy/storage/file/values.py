"""Values as files: ``data/<key>`` (a key's slashes are folders) and ``quarantine/``.

Owns where a value lives, its mode (0600 for secrets), its sealing at rest and moving a bad
value aside. Must not know what a value means (a certificate is just bytes). The blocking
methods run on worker threads; ``seal``/``open`` are pure.

Theory of operation
-------------------
*Encryption at rest* (only with an ``encryption_key``). Values put with ``secret=True`` are
sealed (``sealing``: AES-256-GCM bound to the key) before they reach the disk, and opened on
``get``. A sealed file is ``_SEALED_MARK`` followed by the sealed value: values are arbitrary
bytes, so the mark is long and starts with NUL, which neither JSON nor PEM does (a clear value
that began with it would be misread; edgeproxy stores none). Clear values written before the key
was configured still read, and ``check`` lists them. A sealed value read without the key, or
with another, raises ``CorruptRecord``. ``list`` reports sizes on disk.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import stat
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path

from edgeproxy.errors import CorruptRecord
from edgeproxy.storage.base import StoredItem, check_key, is_key_segment
from edgeproxy.storage.file.atomic import (
    PUBLIC_MODE,
    SECRET_MODE,
    FileTree,
    fsync_dir,
    is_key,
    unlink,
)
from edgeproxy.storage.sealing import Sealer, key_id_of

__all__ = ["ValueFiles"]

_SEALED_MARK = b"\x00edgeproxy-sealed\x00"
_REASON_SUFFIX = ".reason"


def _utc_stamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S.%fZ")


class ValueFiles:
    """``data/`` and ``quarantine/``: the value methods' blocking half and their sealing."""

    def __init__(self, tree: FileTree, sealer: Sealer | None) -> None:
        self._tree = tree
        self._sealer = sealer
        self.data = tree.root / "data"
        self._quarantine = tree.root / "quarantine"

    def path_of(self, key: str) -> Path:
        return self.data / check_key(key)

    def seal(self, key: str, value: bytes, *, secret: bool) -> tuple[bytes, int]:
        """What to write for ``value``, and the file mode."""
        mode = SECRET_MODE if secret else PUBLIC_MODE
        if secret and self._sealer is not None:
            value = _SEALED_MARK + self._sealer.seal(key, value)
        return bytes(value), mode

    def open(self, key: str, raw: bytes | None) -> bytes | None:
        """The value read from ``raw`` (a file's content), opened if it is sealed."""
        if raw is None or not raw.startswith(_SEALED_MARK):
            return raw
        if self._sealer is None:
            raise CorruptRecord(
                f"value {key!r} is encrypted at rest but no encryption key is configured "
                "(set storage.encryption_key_env)"
            )
        return self._sealer.open(key, raw[len(_SEALED_MARK) :])

    def list(self, prefix: str) -> builtins.list[StoredItem]:
        items: builtins.list[StoredItem] = []
        for key, entry in self._files(prefix):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since scandir
            items.append(StoredItem(key, st.st_mtime, st.st_size))
        items.sort(key=lambda item: item.key)
        return items

    def keys(self, prefix: str) -> Generator[str, None, None]:
        """The keys under ``prefix`` one by one, as plain strings (``key_pages`` takes a page
        at a time: no list of the folder, no object the collector would have to track)."""
        return (key for key, _ in self._files(prefix))

    def _files(self, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        # Walk only the deepest folder the prefix names: "certs/exa" needs data/certs alone.
        start, _, _ = prefix.rpartition("/")
        if start and not is_key(start):
            return  # no valid key can start with this prefix
        yield from self._under(self.data / start if start else self.data, start, prefix)

    def _under(
        self, folder: str | Path, rel: str, prefix: str
    ) -> Iterator[tuple[str, os.DirEntry[str]]]:
        try:
            scan = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return  # absent, or removed while we walked
        with scan:  # an open stream, not a list: the walk may pause between pages
            for entry in scan:
                if not is_key_segment(entry.name):
                    continue  # temp files and strays are never keys (``rel`` is one already)
                key = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        yield from self._under(entry.path, key, prefix)
                elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                    yield key, entry

    def quarantine(self, key: str, path: Path, reason: str, now: float) -> None:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there (perhaps another process quarantined it first)
        self._tree.ensure_dir(self._quarantine)
        base = f"{_utc_stamp(now)}-{key.replace('/', '__')}"
        # link + unlink rather than rename: link refuses to overwrite an earlier quarantine of
        # the same key, and a crash in between leaves the value in place, to be retried.
        for attempt in range(1000):
            target = self._quarantine / (base if attempt == 0 else f"{base}-{attempt}")
            try:
                os.link(path, target)
            except FileExistsError:
                continue
            except FileNotFoundError:
                return  # quarantined (or deleted) by someone else meanwhile
            break
        else:
            raise FileExistsError(errno.EEXIST, "no free quarantine name", str(self._quarantine))
        fsync_dir(self._quarantine)
        if unlink(path):
            fsync_dir(path.parent)
        note = f"key: {key}\nquarantined_at: {_utc_stamp(now)}\nreason: {reason}\n"
        self._tree.write_atomic(
            target.with_name(target.name + _REASON_SUFFIX), note.encode(), 0o600
        )

    def encryption_problems(self) -> Iterator[str]:
        """Secret values in clear while a key is set; sealed ones the key cannot open."""
        for path, st in self._tree.walk():
            if not stat.S_ISREG(st.st_mode) or not path.is_relative_to(self.data):
                continue
            key = path.relative_to(self.data).as_posix()
            if not is_key(key):
                continue
            with contextlib.suppress(OSError):
                with open(path, "rb") as f:
                    head = f.read(len(_SEALED_MARK) + 9)
                if not head.startswith(_SEALED_MARK):
                    # The mode is the record of secrecy here (module doc): 0600 means secret.
                    if self._sealer is not None and stat.S_IMODE(st.st_mode) == SECRET_MODE:
                        yield (
                            f"secret value {key!r} is stored unencrypted "
                            "(store it again to encrypt it)"
                        )
                elif self._sealer is None:
                    yield (
                        f"value {key!r} is encrypted at rest but no encryption key is "
                        "configured (set storage.encryption_key_env)"
                    )
                elif key_id_of(head[len(_SEALED_MARK) :]) != self._sealer.key_id:
                    key_id = key_id_of(head[len(_SEALED_MARK) :])
                    yield (
                        f"secret value {key!r} is encrypted with another key (key id "
                        f"{key_id.hex()}, configured {self._sealer.key_id.hex()})"
                    )
