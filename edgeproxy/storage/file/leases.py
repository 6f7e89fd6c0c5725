"""Leases and pending challenges as files: ``locks/`` and ``challenges/`` under the root.

Owns the lease records, the liveness flocks binding a lease to its holder's process, the
challenge records, and their part of ``check``/``clean``. Must not know about values, the
registry or what a lease protects. Blocking: worker threads only.

Theory of operation
-------------------
*Leases.* Deciding whether a lease is free and then replacing it is a read-modify-write, so two
processes must never interleave one. All lease and challenge updates run under the guard on
``locks/`` (``FileTree.guard``). We chose flock over "rename the stale file aside first"
because the rename trick has an ABA hole: A and B both read the same expired record, B renames it
aside and creates a fresh lease, then A's rename moves B's *fresh* lease aside and A wins too.
Repairing that needs a re-check and a put-back that reopens the window. flock has no such hole,
and the kernel drops it when its holder dies, so the guard itself can never go stale. It also
lets lease files be written with the same temp+rename as values: a lease created with ``O_EXCL``
and filled afterwards is briefly empty, and a racer would read that as "unparseable, stale" and
take it over. The cost: flock is only trustworthy on a local filesystem, which is this backend's
scope anyway (replicas on several machines share ``PostgresStorage``). Critical sections last a
read, a write and two fsyncs.

*Leases bound to their holder's life.* A lease holder also keeps an exclusive ``flock`` on
``<name>.held``, on a descriptor it holds open for as long as it holds the lease, and the lease
record says ``"bound": true``. The kernel drops that flock when the holder's process dies, so
``try_lock`` takes over an unexpired bound lease whose ``.held`` file it can flock: a process
restarted after a ``kill -9`` gets its names back at once instead of after the lease's expiry.
Expiry stays the safety net for a holder that hangs without dying (its flock stays held): the
taker then binds a fresh ``.held`` inode (unlink and create) so the hung holder's descriptor
no longer counts. Every open of a ``.held`` file happens under the guard, so the unlink and
create cannot interleave with another process's check. flock, not ``fcntl``/``lockf`` record
locks: those belong to the process, so two handles in one process would not exclude each
other, and closing *any* descriptor of the file would drop them.

In lock and challenge file names a ``/`` of the name is written ``%2F``: ``%`` can never occur in
a valid name, so the mapping is reversible and the folders stay flat.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import os
from pathlib import Path

from edgeproxy.storage.base import LockInfo, check_key
from edgeproxy.storage.file.atomic import PUBLIC_MODE, SECRET_MODE, FileTree, is_key, read_file
from edgeproxy.storage.file.atomic import unlink as _unlink
from edgeproxy.storage.file.records import Challenge, Lease

__all__ = ["LeaseFiles"]

log = logging.getLogger(__name__)

_LOCK_SUFFIX = ".lock"
_HELD_SUFFIX = ".held"
_CHALLENGE_SUFFIX = ".json"
_SLASH = "%2F"


def _encode_name(name: str) -> str:
    return check_key(name).replace("/", _SLASH)


def _decode_name(filename: str, suffix: str) -> str | None:
    if not filename.endswith(suffix):
        return None
    name = filename[: -len(suffix)].replace(_SLASH, "/")
    return name if is_key(name) else None


def _held_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name[: -len(_LOCK_SUFFIX)] + _HELD_SUFFIX)


def _holder_alive(held: Path, *, shared: bool = False) -> bool:
    """Whether some process holds the flock on ``held`` (a lease holder that still lives).

    Under the guard (``shared=False``): the flock taken to test is dropped at once. ``shared``
    tests without the guard: a shared flock never blocks a holder, and a racing taker that
    sees it only retries later.
    """
    try:
        fd = os.open(held, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops a flock we got
    return False


def _bind(held: Path) -> int:
    """A descriptor holding an exclusive flock on a fresh ``held`` inode (under the guard).

    Always a new inode: a hung holder past its expiry still has the old one flocked. The flock
    is non-blocking and cannot fail: nobody else can have opened the inode just created.
    """
    _unlink(held)
    fd = os.open(held, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SECRET_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _named_files(folder: Path, suffix: str) -> builtins.list[tuple[str, Path]]:
    """(name, path) of every record file in ``folder``, sorted; strays and temp files skipped."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = _decode_name(entry.name, suffix)
        if name is not None and entry.is_file(follow_symlinks=False):
            found.append((name, Path(entry.path)))
    return sorted(found)


def _read_lease(path: Path) -> tuple[bytes | None, Lease | None]:
    raw = read_file(path)
    return raw, Lease.parse(raw) if raw is not None else None


def _read_challenge(path: Path) -> tuple[bytes | None, Challenge | None]:
    raw = read_file(path)
    return raw, Challenge.parse(raw) if raw is not None else None


class LeaseFiles:
    """``locks/`` and ``challenges/``: the blocking half of the lease and challenge methods."""

    def __init__(self, tree: FileTree) -> None:
        self._tree = tree
        self._locks = tree.root / "locks"
        self._challenges = tree.root / "challenges"
        # (lease file name, owner) -> descriptor holding the flock on its ``.held`` file.
        self._bindings: dict[tuple[str, str], int] = {}

    def lock_path(self, name: str) -> Path:
        return self._locks / (_encode_name(name) + _LOCK_SUFFIX)

    def challenge_path(self, name: str) -> Path:
        return self._challenges / (_encode_name(name) + _CHALLENGE_SUFFIX)

    def release_all(self) -> None:
        """Let go of the leases' liveness flocks (as a dying process would)."""
        bindings, self._bindings = self._bindings, {}
        for fd in bindings.values():
            os.close(fd)

    # -- leases ---------------------------------------------------------------------------------

    def try_lock(self, path: Path, owner: str, ttl: float, now: float) -> bool:
        with self._tree.guard(self._locks):
            _, current = _read_lease(path)
            if current is not None and current.expires_at > now and current.owner != owner:
                if not current.bound or _holder_alive(_held_path(path)):
                    return False
                log.warning(
                    "lock %r: took over the lease of %r, whose process is gone",
                    _decode_name(path.name, _LOCK_SUFFIX),
                    current.owner,
                )
            # Free, expired, unparseable (a stale or foreign partial file), its holder dead, or
            # already ours: the guard makes this replace the only decision taken on it now.
            created_at = current.created_at if current and current.owner == owner else now
            key = (path.name, owner)
            fresh = current is None or current.owner != owner or key not in self._bindings
            if fresh:  # a descriptor left from an earlier tenure may hold a replaced inode
                self._unbind(path, owner, remove=False)
                self._bindings[key] = _bind(_held_path(path))
            lease = Lease(owner, now + ttl, created_at, True)
            try:
                self._tree.write_atomic(path, lease.to_json(), PUBLIC_MODE)
            except BaseException:
                if fresh:
                    os.close(self._bindings.pop(key))
                raise
            return True

    def refresh(self, path: Path, owner: str, ttl: float, now: float) -> bool:
        with self._tree.guard(self._locks):
            _, current = _read_lease(path)
            if current is None or current.owner != owner:
                self._unbind(path, owner, remove=False)  # lost: stop vouching for it
                return False
            # Still ours even if past expiry: nobody took it over, so extending it is safe.
            bound = (path.name, owner) in self._bindings
            lease = Lease(owner, now + ttl, current.created_at, bound)
            self._tree.write_atomic(path, lease.to_json(), PUBLIC_MODE)
            return True

    def unlock(self, path: Path, owner: str) -> None:
        with self._tree.guard(self._locks):
            _, current = _read_lease(path)
            ours = current is not None and current.owner == owner
            if ours:
                self._tree.delete(path)
            self._unbind(path, owner, remove=ours)

    def _unbind(self, path: Path, owner: str, *, remove: bool) -> None:
        """Close our ``.held`` descriptor for this lease; with ``remove``, delete the file if
        it is still the inode we hold (a taker after expiry may have made a new one)."""
        fd = self._bindings.pop((path.name, owner), None)
        if fd is None:
            return
        try:
            if remove:
                held = _held_path(path)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(held).st_ino == os.fstat(fd).st_ino:
                        _unlink(held)
        finally:
            os.close(fd)

    def lock_info(self, name: str) -> LockInfo | None:
        _, lease = _read_lease(self.lock_path(name))
        return None if lease is None else LockInfo(name, lease.owner, lease.expires_at)

    def list_locks(self) -> builtins.list[LockInfo]:
        infos = []
        for name, path in _named_files(self._locks, _LOCK_SUFFIX):
            _, lease = _read_lease(path)
            if lease is not None:
                infos.append(LockInfo(name, lease.owner, lease.expires_at))
        return infos

    # -- challenges -----------------------------------------------------------------------------

    def put_challenge(self, path: Path, record: bytes) -> None:
        # Under the guard so ``clean`` cannot judge the old record expired and then unlink ours.
        with self._tree.guard(self._locks):
            self._tree.write_atomic(path, record, PUBLIC_MODE)

    def get_challenge(self, path: Path) -> Challenge | None:
        return _read_challenge(path)[1]

    def delete_challenge(self, path: Path) -> None:
        with self._tree.guard(self._locks):
            self._tree.delete(path)

    def list_challenges(self) -> builtins.list[tuple[str, float]]:
        result = []
        for name, path in _named_files(self._challenges, _CHALLENGE_SUFFIX):
            _, challenge = _read_challenge(path)
            if challenge is not None:
                result.append((name, challenge.expires_at))
        return result

    # -- check / clean --------------------------------------------------------------------------

    def problems(self, now: float) -> builtins.list[str]:
        problems = []
        for name, path in _named_files(self._locks, _LOCK_SUFFIX):
            _, lease = _read_lease(path)
            if lease is None:
                problems.append(f"unparseable lock file {path} (stale; clean removes it)")
            elif lease.expires_at <= now:
                problems.append(
                    f"expired lock {name!r} held by {lease.owner!r}, "
                    f"expired {now - lease.expires_at:.0f}s ago"
                )
            elif lease.bound and not _holder_alive(_held_path(path), shared=True):
                problems.append(
                    f"lock {name!r} held by {lease.owner!r}, whose process is gone "
                    "(the next taker gets it at once)"
                )
        for name, path in _named_files(self._challenges, _CHALLENGE_SUFFIX):
            _, challenge = _read_challenge(path)
            if challenge is None:
                problems.append(f"unparseable challenge file {path} (clean removes it)")
            elif challenge.expires_at <= now:
                problems.append(f"expired challenge for {name!r}")
        return problems

    def clean(self, now: float) -> builtins.list[str]:
        """Remove expired or unparseable leases and challenges, and dead holders' ``.held``."""
        removed: builtins.list[str] = []
        locks = _named_files(self._locks, _LOCK_SUFFIX)
        if not locks and not _named_files(self._challenges, _CHALLENGE_SUFFIX):
            return removed  # nothing to judge; and do not create locks/ just for the guard
        with self._tree.guard(self._locks):
            # Re-read each record under the guard: a lease refreshed a moment ago must survive.
            for name, path in _named_files(self._locks, _LOCK_SUFFIX):
                raw, lease = _read_lease(path)
                if raw is not None and (lease is None or lease.expires_at <= now):
                    self._tree.delete(path)
                    removed.append(f"{'expired' if lease else 'unparseable'} lock {name!r}")
            # A holder's liveness file outlives its lease when the holder died: drop it once
            # no lease record names it and no process holds it.
            for entry in list(os.scandir(self._locks)):
                if entry.name.endswith(_HELD_SUFFIX):
                    held = Path(entry.path)
                    lock = held.with_name(entry.name[: -len(_HELD_SUFFIX)] + _LOCK_SUFFIX)
                    if not lock.exists() and not _holder_alive(held):
                        _unlink(held)
            for name, path in _named_files(self._challenges, _CHALLENGE_SUFFIX):
                raw, challenge = _read_challenge(path)
                if raw is not None and (challenge is None or challenge.expires_at <= now):
                    self._tree.delete(path)
                    what = "expired" if challenge else "unparseable"
                    removed.append(f"{what} challenge {name!r}")
        return removed
