"""Atomic file primitives under one storage root: whole writes, durable folders, the guard.

Owns how a file reaches the disk (temp file, fsync, rename, folder fsync), the temp-file
naming, the folder and file modes, and the flock guard serialising read-modify-write updates.
Must not know what a file holds or which folder is for what (the other ``file`` modules do).

Theory of operation
-------------------
*Atomic writes.* Every file is written as a temp file in the target's own folder (``O_EXCL``),
written in full, fsynced, renamed over the target, and then the folder is fsynced. ``rename`` is
atomic within a filesystem, so a reader opens either the old inode or the new one, never a
half-written file, even when the writer is killed with SIGKILL or the machine loses power.

*Temp files* are named ``.tmp-`` plus 16 random upper-case letters. Valid keys are lower case
(``check_key``), so a temp name can never be mistaken for a key: ``get`` and ``list`` cannot see
one, and ``clean`` cannot delete a real value by accident.

*The guard* is an exclusive ``fcntl.flock`` on ``<folder>/.guard``. The kernel drops it when
its holder dies, so it can never go stale; waiting for it is bounded by ``GUARD_TIMEOUT`` so a
stopped process cannot hang everyone else forever. Everything here blocks: worker threads only.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import stat
import string
import time
from collections.abc import Generator, Iterator
from pathlib import Path

from edgeproxy.storage.base import check_key

__all__ = [
    "DIR_MODE",
    "PUBLIC_MODE",
    "SECRET_MODE",
    "FileTree",
    "fsync_dir",
    "is_key",
    "is_temp_name",
    "read_file",
    "syncfs",
    "unlink",
]

_TMP_PREFIX = ".tmp-"
_TMP_ALPHABET = string.ascii_uppercase
_TMP_LEN = 16
_GUARD_NAME = ".guard"

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
except OSError:  # pragma: no cover - no libc to load: fall back to sync()
    _LIBC = None

DIR_MODE = 0o700
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def is_temp_name(name: str) -> bool:
    if not name.startswith(_TMP_PREFIX):
        return False  # nearly every name: the sweep asks this of every file it walks
    suffix = name[len(_TMP_PREFIX) :]
    return len(suffix) == _TMP_LEN and all(c in _TMP_ALPHABET for c in suffix)


def is_key(rel: str) -> bool:
    try:
        check_key(rel)
    except ValueError:
        return False
    return True


def read_file(path: Path) -> bytes | None:
    """Whole content of a regular file, or None when there is none at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        # NotADirectoryError: a parent is a file (key "a/b" while "a" holds a value).
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` (Linux syncfs; else sync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _LIBC is None or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: Path) -> bool:
    """Remove a file; False if there was none (absence is never an error here)."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    return True


class FileTree:
    """The blocking primitives bound to one root (worker threads only)."""

    #: Longest wait for a guard before an operation fails (``StorageError`` in the backend).
    GUARD_TIMEOUT = 10.0

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure_dir(self, path: Path) -> None:
        """Create ``path`` and missing parents up to and including the root, 0700 each."""
        missing: builtins.list[Path] = []
        probe = path
        while not probe.is_dir():
            missing.append(probe)
            if probe == self.root or probe.parent == probe:
                break
            probe = probe.parent
        for folder in reversed(missing):
            try:
                os.mkdir(folder, DIR_MODE)
            except FileExistsError:
                continue  # another writer created it first; it did the fsync
            os.chmod(folder, DIR_MODE)  # umask may have taken bits; we want exactly 0700
            # The new entry must reach the disk too, or a crash can lose the whole subtree.
            fsync_dir(folder.parent)

    def _create_temp(self, folder: Path, mode: int) -> tuple[int, Path]:
        for _ in range(100):
            suffix = "".join(secrets.choice(_TMP_ALPHABET) for _ in range(_TMP_LEN))
            tmp = folder / (_TMP_PREFIX + suffix)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except FileExistsError:
                continue
            return fd, tmp
        raise FileExistsError(errno.EEXIST, "no free temp file name", str(folder))

    def write_atomic(self, path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
        """temp (O_EXCL) -> write all -> fsync -> rename over ``path`` -> fsync the folder.

        ``durable=False`` skips both fsyncs: for batches that sync the filesystem once at the
        end (``syncfs``) before reporting success."""
        folder = path.parent
        try:
            fd, tmp = self._create_temp(folder, mode)
        except FileNotFoundError:
            self.ensure_dir(folder)
            fd, tmp = self._create_temp(folder, mode)
        try:
            try:
                os.fchmod(fd, mode)  # the umask must not decide who may read a private key
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            unlink(tmp)
            raise
        if durable:
            fsync_dir(folder)

    def delete(self, path: Path) -> None:
        if unlink(path):
            fsync_dir(path.parent)

    @contextlib.contextmanager
    def guard(self, folder: Path) -> Iterator[None]:
        """Exclusive flock serialising ``folder``'s updates across threads and processes."""
        path = folder / _GUARD_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, SECRET_MODE)
        except FileNotFoundError:
            self.ensure_dir(folder)
            fd = os.open(path, flags, SECRET_MODE)
        try:
            # Non-blocking attempts with backoff instead of a blocking flock: the wait stays
            # bounded, and a worker thread is never parked forever behind a stopped process.
            deadline = time.monotonic() + self.GUARD_TIMEOUT
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            errno.ETIMEDOUT, "lease guard stayed busy", str(path)
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
            yield
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def entries(self) -> Generator[os.DirEntry[str], None, None]:
        """Every entry below the root, depth first, without following links, read from open
        directory streams: no folder is ever listed whole, so a caller may take a page of
        entries at a time (``islice``) and come back later for the next (``clean``)."""
        return _stream(self.root)

    def walk(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every folder and file under the root (root included), without following links."""
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                yield folder, os.lstat(folder)
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                try:
                    yield Path(entry.path), entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue


def _stream(folder: str | Path) -> Generator[os.DirEntry[str], None, None]:
    try:
        scan = os.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return  # absent, or removed while we walked
    with scan:  # closed when the walk ends or its consumer closes it early
        for entry in scan:
            yield entry
            if entry.is_dir(follow_symlinks=False):
                yield from _stream(entry.path)
