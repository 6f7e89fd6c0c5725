"""``FileStorage``: the ``Storage`` protocol on a local directory tree.

Owns the on-disk layout under one root and nothing else; it knows nothing of ACME, TLS or what a
value means (a certificate is just bytes).

Theory of operation
-------------------
Layout (every folder 0700, created on demand, the root too)::

    data/<key>                            values; a key's slashes are folders
    locks/<name>.lock                     lease records, JSON {owner, expires_at, created_at,
                                          bound}
    locks/<name>.held                     flocked by the lease holder's process while it lives
    locks/.guard                          flock target serialising lease/challenge updates
    challenges/<name>.json                pending challenges, JSON {key_authorization, expires_at}
    quarantine/<timestamp>-<key, / -> __>  values moved aside, plus ``.reason`` next to each
    hostnames/<hostname>.json             registry entries, JSON (see ``HostnameEntry``)
    hostnames/.journal                    names of changed entries, one a line, appended
    hostnames/.guard                      flock target serialising registry updates
    events/<id>.json                      event outbox, JSON {body (base64), attempts, ...}
    due/names/<name>                      next-action time of a managed name (text float)
    due/t<hour>/<name>                    the same time, filed under its hour (``due_names``)

In lock and challenge file names a ``/`` of the name is written ``%2F``: ``%`` can never occur in
a valid name, so the mapping is reversible and the folders stay flat.

*Atomic writes.* Every file is written as a temp file in the target's own folder (``O_EXCL``),
written in full, fsynced, renamed over the target, and then the folder is fsynced. ``rename`` is
atomic within a filesystem, so a reader opens either the old inode or the new one, never a
half-written file, even when the writer is killed with SIGKILL or the machine loses power.

*Temp files* are named ``.tmp-`` plus 16 random upper-case letters. Valid keys are lower case
(``check_key``), so a temp name can never be mistaken for a key: ``get`` and ``list`` cannot see
one, and ``clean`` cannot delete a real value by accident. A writer killed between create and
rename leaves its temp file behind; ``check`` reports it and ``clean`` removes it once it is older
than ``TEMP_GRACE`` (younger ones may belong to a writer still at work in another process).

*Leases.* Deciding whether a lease is free and then replacing it is a read-modify-write, so two
processes must never interleave one. All lease and challenge updates run under an exclusive
``fcntl.flock`` on ``locks/.guard``. We chose flock over "rename the stale file aside first"
because the rename trick has an ABA hole: A and B both read the same expired record, B renames it
aside and creates a fresh lease, then A's rename moves B's *fresh* lease aside and A wins too.
Repairing that needs a re-check and a put-back that reopens the window. flock has no such hole,
and the kernel drops it when its holder dies, so the guard itself can never go stale. It also
lets lease files be written with the same temp+rename as values: a lease created with ``O_EXCL``
and filled afterwards is briefly empty, and a racer would read that as "unparseable, stale" and
take it over. The cost: flock is only trustworthy on a local filesystem, which is this backend's
scope anyway (replicas on several machines share ``PostgresStorage``). Critical sections last a
read, a write and two fsyncs; waiting for the guard is bounded by ``GUARD_TIMEOUT`` so a stopped
process cannot hang everyone else forever.

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

*Hostname registry.* One file per entry, so a change rewrites one small file. Paging sorts the
folder's names (a ``scandir``, no file is opened) and reads only the page's files; the sorted
list is cached until the journal changes. Every registry update appends the hostname to
``.journal`` under the registry guard, so the journal's (inode, size) is a change marker that
other processes poll with one ``stat``, and the bytes since their last marker say which entries
to re-read. Past ``JOURNAL_MAX`` bytes the journal is replaced by an empty one (a new inode):
readers holding the old marker are told to reload everything.

*Encryption at rest* (only with an ``encryption_key``). Values put with ``secret=True`` are
sealed (``sealing``: AES-256-GCM bound to the key) before they reach the disk, and opened on
``get``. A sealed file is ``_SEALED_MARK`` followed by the sealed value: values are arbitrary
bytes, so the mark is long and starts with NUL, which neither JSON nor PEM does (a clear value
that began with it would be misread; edgeproxy stores none). Clear values written before the key
was configured still read, and ``check`` lists them. A sealed value read without the key, or
with another, raises ``CorruptRecord``. ``list`` reports sizes on disk.

*The root must be ours alone.* Whoever can replace the root, or plant entries in it, can read
or swap private keys whatever the modes below it. ``root_problems`` names what makes a root
unsafe: a symbolic link, a folder others may write to or owned by someone else, or a parent
folder others may write to without the sticky bit (they could rename the root away and put
their own in its place). The process refuses such a root at start; ``check`` reports it.

*Threads.* Every public operation is one ``trio.to_thread.run_sync`` call, so the event loop never
waits on the disk. The clock is read on the event-loop thread and passed in, so a test may use
``trio.current_time`` as the storage clock. ``OSError`` becomes ``StorageError`` in ``_run`` only.
"""

from __future__ import annotations

import base64
import bisect
import builtins
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import math
import os
import re
import secrets
import stat
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeGuard, TypeVar

import trio

from edgeproxy.errors import CorruptRecord, StorageError
from edgeproxy.storage.base import (
    DueEntry,
    HostnameEntry,
    LockInfo,
    OutboxEvent,
    StoredItem,
    check_hostname_key,
    check_key,
)
from edgeproxy.storage.sealing import Sealer, key_id_of

__all__ = ["FileStorage", "root_problems"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_TMP_PREFIX = ".tmp-"
_TMP_ALPHABET = string.ascii_uppercase
_TMP_LEN = 16
_LOCK_SUFFIX = ".lock"
_HELD_SUFFIX = ".held"
_CHALLENGE_SUFFIX = ".json"
_REASON_SUFFIX = ".reason"
_GUARD_NAME = ".guard"
_JOURNAL_NAME = ".journal"
_ENTRY_SUFFIX = ".json"
_DUE_BUCKET = 3600.0  # seconds per folder of the next-action index
_DUE_BUCKET_RE = re.compile(r"t[0-9]{10}")
_SLASH = "%2F"

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
except OSError:  # pragma: no cover - no libc to load: fall back to sync()
    _LIBC = None

_SEALED_MARK = b"\x00edgeproxy-sealed\x00"

_DIR_MODE = 0o700
_SECRET_MODE = 0o600
_PUBLIC_MODE = 0o644

# A PEM private key anywhere in a file marks it as secret for ``check`` (storage records no
# per-file flag; the mode *is* the record, so a wrong mode can only be spotted by content).
_PEM_KEY_MARK = b"PRIVATE KEY-----"
_SECRET_SNIFF_LIMIT = 1 << 20


def _is_temp_name(name: str) -> bool:
    suffix = name[len(_TMP_PREFIX) :]
    return (
        name.startswith(_TMP_PREFIX)
        and len(suffix) == _TMP_LEN
        and all(c in _TMP_ALPHABET for c in suffix)
    )


def _is_key(rel: str) -> bool:
    try:
        check_key(rel)
    except ValueError:
        return False
    return True


def _encode_name(name: str) -> str:
    return check_key(name).replace("/", _SLASH)


def _decode_name(filename: str, suffix: str) -> str | None:
    if not filename.endswith(suffix):
        return None
    name = filename[: -len(suffix)].replace(_SLASH, "/")
    return name if _is_key(name) else None


def _parse_due(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        at = float(raw)
    except ValueError:
        return None
    return at if math.isfinite(at) else None


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class _Lease:
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
    def parse(cls, raw: bytes) -> _Lease | None:
        """None for anything but a complete record: such a file is stale by definition."""
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict):
            return None
        owner, expires_at, created_at = (
            record.get("owner"),
            record.get("expires_at"),
            record.get("created_at"),
        )
        if not isinstance(owner, str) or not _is_number(expires_at) or not _is_number(created_at):
            return None
        return cls(owner, float(expires_at), float(created_at), record.get("bound") is True)


@dataclass(frozen=True, slots=True)
class _Challenge:
    key_authorization: str
    expires_at: float

    def to_json(self) -> bytes:
        record = {"key_authorization": self.key_authorization, "expires_at": self.expires_at}
        return json.dumps(record, sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes) -> _Challenge | None:
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict):
            return None
        key_authorization, expires_at = record.get("key_authorization"), record.get("expires_at")
        if not isinstance(key_authorization, str) or not _is_number(expires_at):
            return None
        return cls(key_authorization, float(expires_at))


def _entry_json(entry: HostnameEntry) -> bytes:
    record = {
        "hostname": entry.hostname,
        "upstream": entry.upstream,
        "metadata": entry.metadata,
        "created_at": entry.created_at,
        "removed_at": entry.removed_at,
    }
    return json.dumps(record).encode()


def _parse_entry(raw: bytes | None) -> HostnameEntry | None:
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
        and _is_number(created_at)
        and (removed_at is None or _is_number(removed_at))
    ):
        return None
    return HostnameEntry(
        hostname,
        upstream,
        metadata,
        float(created_at),
        None if removed_at is None else float(removed_at),
    )


def _event_json(event: OutboxEvent) -> bytes:
    record = {
        "body": base64.b64encode(event.body).decode(),
        "created_at": event.created_at,
        "attempts": event.attempts,
        "next_attempt": event.next_attempt,
    }
    return json.dumps(record).encode()


def _parse_event(event_id: str, raw: bytes | None) -> OutboxEvent | None:
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        body = base64.b64decode(record["body"], validate=True)
        created_at, attempts = record["created_at"], record["attempts"]
        next_attempt = record["next_attempt"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
    if not (_is_number(created_at) and isinstance(attempts, int) and _is_number(next_attempt)):
        return None
    return OutboxEvent(event_id, body, float(created_at), attempts, float(next_attempt))


def _read_file(path: Path) -> bytes | None:
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


def _syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` (Linux syncfs; else sync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _LIBC is None or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    fd = os.open(held, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _SECRET_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlink(path: Path) -> bool:
    """Remove a file; False if there was none (absence is never an error here)."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    return True


def _utc_stamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S.%fZ")


class FileStorage:
    """``Storage`` on a local directory; see the module docstring for the layout and guarantees.

    One instance per process is enough, but any number of instances and processes may share a
    root: they coordinate through the filesystem only.
    """

    #: Temp files younger than this may belong to a live writer; ``clean`` leaves them alone.
    TEMP_GRACE = 300.0
    #: Longest wait for the lease guard before an operation fails with ``StorageError``.
    GUARD_TIMEOUT = 10.0
    #: Journal size beyond which it is replaced by an empty one (readers then reload all).
    JOURNAL_MAX = 1 << 20

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        encryption_key: str | None = None,
    ) -> None:
        self._root = Path(root)
        self._clock = clock
        self._sealer = Sealer(encryption_key) if encryption_key is not None else None
        self._data = self._root / "data"
        self._locks = self._root / "locks"
        self._challenges = self._root / "challenges"
        self._quarantine = self._root / "quarantine"
        self._hostnames = self._root / "hostnames"
        self._events = self._root / "events"
        self._due = self._root / "due"
        # (journal marker, sorted hostnames): the listing is reused until the journal moves.
        self._listing: tuple[str, builtins.list[str]] | None = None
        # (lease file name, owner) -> descriptor holding the flock on its ``.held`` file.
        self._bindings: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"FileStorage({str(self._root)!r})"

    @property
    def root(self) -> Path:
        return self._root

    def path_of(self, key: str) -> Path:
        """Where the value for ``key`` lives (for tools and tests; not part of ``Storage``)."""
        return self._data / check_key(key)

    # -- the one place where OSError becomes StorageError ---------------------------------------

    async def _run(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            where = exc.filename if exc.filename is not None else self._root
            detail = exc.strerror or str(exc)
            raise StorageError(f"file storage: {op} failed at {where}: {detail}") from exc

    # -- values ---------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        raw = await self._run("get", _read_file, self.path_of(key))
        if raw is None or not raw.startswith(_SEALED_MARK):
            return raw
        if self._sealer is None:
            raise CorruptRecord(
                f"value {key!r} is encrypted at rest but no encryption key is configured "
                "(set storage.encryption_key_env)"
            )
        return self._sealer.open(key, raw[len(_SEALED_MARK) :])

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        path = self.path_of(key)
        mode = _SECRET_MODE if secret else _PUBLIC_MODE
        if secret and self._sealer is not None:
            value = _SEALED_MARK + self._sealer.seal(key, value)
        await self._run("put", self._write_atomic, path, bytes(value), mode)

    def root_problems(self) -> builtins.list[str]:
        """Why this root is unsafe to keep private keys in (empty: it is fine); see the docs."""
        return root_problems(self._root)

    async def delete(self, key: str) -> None:
        await self._run("delete", self._delete_sync, self.path_of(key))

    async def list(self, prefix: str = "") -> builtins.list[StoredItem]:
        return await self._run("list", self._list_sync, prefix)

    async def quarantine(self, key: str, reason: str) -> None:
        path = self.path_of(key)
        await self._run("quarantine", self._quarantine_sync, key, path, reason, self._clock())

    # -- leases ---------------------------------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        _check_ttl(ttl)
        path = self._lock_path(name)
        return await self._run("try_lock", self._try_lock_sync, path, owner, ttl, self._clock())

    async def refresh_lock(self, name: str, owner: str, ttl: float) -> bool:
        _check_ttl(ttl)
        path = self._lock_path(name)
        return await self._run("refresh_lock", self._refresh_sync, path, owner, ttl, self._clock())

    async def unlock(self, name: str, owner: str) -> None:
        await self._run("unlock", self._unlock_sync, self._lock_path(name), owner)

    async def lock_info(self, name: str) -> LockInfo | None:
        path = self._lock_path(name)
        raw = await self._run("lock_info", _read_file, path)
        lease = _Lease.parse(raw) if raw is not None else None
        return None if lease is None else LockInfo(name, lease.owner, lease.expires_at)

    async def list_locks(self) -> builtins.list[LockInfo]:
        return await self._run("list_locks", self._list_locks_sync)

    # -- challenges -----------------------------------------------------------------------------

    async def put_challenge(self, name: str, key_authorization: str, ttl: float) -> None:
        _check_ttl(ttl)
        record = _Challenge(key_authorization, self._clock() + ttl).to_json()
        path = self._challenge_path(name)
        await self._run("put_challenge", self._put_challenge_sync, path, record)

    async def get_challenge(self, name: str) -> str | None:
        raw = await self._run("get_challenge", _read_file, self._challenge_path(name))
        challenge = _Challenge.parse(raw) if raw is not None else None
        if challenge is None or challenge.expires_at <= self._clock():
            return None
        return challenge.key_authorization

    async def delete_challenge(self, name: str) -> None:
        await self._run("delete_challenge", self._delete_challenge_sync, self._challenge_path(name))

    async def list_challenges(self) -> builtins.list[tuple[str, float]]:
        return await self._run("list_challenges", self._list_challenges_sync)

    # -- hostname registry ----------------------------------------------------------------------

    async def add_hostname(self, entry: HostnameEntry) -> tuple[HostnameEntry, bool]:
        return await self._run("add_hostname", self._add_hostname_sync, entry)

    async def add_hostnames(
        self, entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        for entry in entries:
            self._entry_path(entry.hostname)  # refuse a bad name before writing any
        return await self._run("add_hostnames", self._add_hostnames_sync, entries)

    async def get_hostname(self, hostname: str) -> HostnameEntry | None:
        raw = await self._run("get_hostname", _read_file, self._entry_path(hostname))
        return _parse_entry(raw)

    async def update_hostname(self, entry: HostnameEntry) -> bool:
        return await self._run("update_hostname", self._update_hostname_sync, entry)

    async def remove_hostname(self, hostname: str, at: float) -> HostnameEntry | None:
        path = self._entry_path(hostname)
        return await self._run("remove_hostname", self._remove_hostname_sync, path, at)

    async def purge_hostname(self, hostname: str, removed_before: float) -> bool:
        path = self._entry_path(hostname)
        return await self._run("purge_hostname", self._purge_hostname_sync, path, removed_before)

    async def list_hostnames(
        self, *, after: str | None = None, limit: int = 100
    ) -> builtins.list[HostnameEntry]:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit!r}")
        return await self._run("list_hostnames", self._list_hostnames_sync, after, limit)

    async def hostname_changes(self, since: str | None) -> tuple[str, builtins.list[str] | None]:
        return await self._run("hostname_changes", self._hostname_changes_sync, since)

    # -- event outbox ---------------------------------------------------------------------------

    async def enqueue_event(self, event: OutboxEvent) -> None:
        await self._run("enqueue_event", self._enqueue_event_sync, event)

    async def due_events(self, now: float, limit: int) -> builtins.list[OutboxEvent]:
        return await self._run("due_events", self._due_events_sync, now, limit)

    async def update_event(self, event: OutboxEvent) -> None:
        path = self._event_path(event.id)
        await self._run("update_event", self._update_event_sync, path, event)

    async def delete_event(self, event_id: str) -> None:
        await self._run("delete_event", self._delete_sync, self._event_path(event_id))

    async def count_events(self) -> int:
        return len(await self._run("count_events", self._event_names))

    # -- next-action index ----------------------------------------------------------------------

    async def set_due(self, name: str, at: float) -> None:
        check_hostname_key(name)
        await self._run("set_due", self._set_due_sync, name, float(at))

    async def due_names(self, until: float, limit: int) -> builtins.list[DueEntry]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit!r}")
        return await self._run("due_names", self._due_names_sync, until, limit)

    async def clear_due(self, name: str) -> None:
        check_hostname_key(name)
        await self._run("clear_due", self._clear_due_sync, name)

    async def scheduled_names(self) -> builtins.list[str]:
        return await self._run("scheduled_names", self._scheduled_names_sync)

    # -- maintenance (``edgeproxy storage check/clean``; not part of ``Storage``) ---------------

    async def check(self) -> builtins.list[str]:
        """Problems found, one line each; an empty list means healthy. Changes nothing."""
        return await self._run("check", self._check_sync, self._clock())

    async def clean(self, *, now: float | None = None) -> builtins.list[str]:
        """Remove leftover temp files, expired leases and expired challenges; say what went.

        Certificates are not pruned here: which ones are obsolete is the certificate manager's
        call. ``now`` overrides the clock, e.g. to age out temp files in tests.
        """
        return await self._run("clean", self._clean_sync, self._clock() if now is None else now)

    async def aclose(self) -> None:
        """Let go of the leases' liveness flocks (as a dying process would); every other
        operation opens and closes its own files."""
        bindings, self._bindings = self._bindings, {}
        for fd in bindings.values():
            os.close(fd)

    # -- paths ----------------------------------------------------------------------------------

    def _lock_path(self, name: str) -> Path:
        return self._locks / (_encode_name(name) + _LOCK_SUFFIX)

    def _challenge_path(self, name: str) -> Path:
        return self._challenges / (_encode_name(name) + _CHALLENGE_SUFFIX)

    def _event_path(self, event_id: str) -> Path:
        return self._events / (check_hostname_key(event_id) + _ENTRY_SUFFIX)

    def _entry_path(self, hostname: str) -> Path:
        return self._hostnames / (check_hostname_key(hostname) + _ENTRY_SUFFIX)

    # -- blocking primitives (worker thread only) -----------------------------------------------

    def _ensure_dir(self, path: Path) -> None:
        """Create ``path`` and missing parents up to and including the root, 0700 each."""
        missing: builtins.list[Path] = []
        probe = path
        while not probe.is_dir():
            missing.append(probe)
            if probe == self._root or probe.parent == probe:
                break
            probe = probe.parent
        for folder in reversed(missing):
            try:
                os.mkdir(folder, _DIR_MODE)
            except FileExistsError:
                continue  # another writer created it first; it did the fsync
            os.chmod(folder, _DIR_MODE)  # umask may have taken bits; we want exactly 0700
            # The new entry must reach the disk too, or a crash can lose the whole subtree.
            _fsync_dir(folder.parent)

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

    def _write_atomic(self, path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
        """temp (O_EXCL) -> write all -> fsync -> rename over ``path`` -> fsync the folder.

        ``durable=False`` skips both fsyncs: for batches that sync the filesystem once at the
        end (``_syncfs``) before reporting success."""
        folder = path.parent
        try:
            fd, tmp = self._create_temp(folder, mode)
        except FileNotFoundError:
            self._ensure_dir(folder)
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
            _unlink(tmp)
            raise
        if durable:
            _fsync_dir(folder)

    @contextlib.contextmanager
    def _guard(self, folder: Path | None = None) -> Iterator[None]:
        """Exclusive flock serialising lease/challenge updates (or, with ``folder``, that
        folder's updates) across threads and processes."""
        folder = self._locks if folder is None else folder
        path = folder / _GUARD_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, _SECRET_MODE)
        except FileNotFoundError:
            self._ensure_dir(folder)
            fd = os.open(path, flags, _SECRET_MODE)
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

    # -- values (worker thread) -----------------------------------------------------------------

    def _delete_sync(self, path: Path) -> None:
        if _unlink(path):
            _fsync_dir(path.parent)

    def _list_sync(self, prefix: str) -> builtins.list[StoredItem]:
        # Walk only the deepest folder the prefix names: "certs/exa" needs data/certs alone.
        start, _, _ = prefix.rpartition("/")
        if start and not _is_key(start):
            return []  # no valid key can start with this prefix
        items: builtins.list[StoredItem] = []
        stack = [(self._data / start if start else self._data, start)]
        while stack:
            folder, rel = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue  # absent, or removed while we walked
            for entry in entries:
                key = f"{rel}/{entry.name}" if rel else entry.name
                if not _is_key(key):
                    continue  # temp files and strays are never keys
                if entry.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        stack.append((Path(entry.path), key))
                elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted since scandir
                    items.append(StoredItem(key, st.st_mtime, st.st_size))
        items.sort(key=lambda item: item.key)
        return items

    def _quarantine_sync(self, key: str, path: Path, reason: str, now: float) -> None:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there (perhaps another process quarantined it first)
        self._ensure_dir(self._quarantine)
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
        _fsync_dir(self._quarantine)
        if _unlink(path):
            _fsync_dir(path.parent)
        note = f"key: {key}\nquarantined_at: {_utc_stamp(now)}\nreason: {reason}\n"
        self._write_atomic(target.with_name(target.name + _REASON_SUFFIX), note.encode(), 0o600)

    # -- leases (worker thread) -----------------------------------------------------------------

    def _try_lock_sync(self, path: Path, owner: str, ttl: float, now: float) -> bool:
        with self._guard():
            raw = _read_file(path)
            current = _Lease.parse(raw) if raw is not None else None
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
            lease = _Lease(owner, now + ttl, created_at, True)
            try:
                self._write_atomic(path, lease.to_json(), _PUBLIC_MODE)
            except BaseException:
                if fresh:
                    os.close(self._bindings.pop(key))
                raise
            return True

    def _refresh_sync(self, path: Path, owner: str, ttl: float, now: float) -> bool:
        with self._guard():
            raw = _read_file(path)
            current = _Lease.parse(raw) if raw is not None else None
            if current is None or current.owner != owner:
                self._unbind(path, owner, remove=False)  # lost: stop vouching for it
                return False
            # Still ours even if past expiry: nobody took it over, so extending it is safe.
            bound = (path.name, owner) in self._bindings
            lease = _Lease(owner, now + ttl, current.created_at, bound)
            self._write_atomic(path, lease.to_json(), _PUBLIC_MODE)
            return True

    def _unlock_sync(self, path: Path, owner: str) -> None:
        with self._guard():
            raw = _read_file(path)
            current = _Lease.parse(raw) if raw is not None else None
            ours = current is not None and current.owner == owner
            if ours:
                self._delete_sync(path)
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

    def _lock_files(self) -> builtins.list[tuple[str, Path]]:
        try:
            entries = list(os.scandir(self._locks))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = _decode_name(entry.name, _LOCK_SUFFIX)
            if name is not None and entry.is_file(follow_symlinks=False):
                found.append((name, Path(entry.path)))
        return sorted(found)

    def _list_locks_sync(self) -> builtins.list[LockInfo]:
        infos = []
        for name, path in self._lock_files():
            raw = _read_file(path)
            lease = _Lease.parse(raw) if raw is not None else None
            if lease is not None:
                infos.append(LockInfo(name, lease.owner, lease.expires_at))
        return infos

    # -- challenges (worker thread) -------------------------------------------------------------

    def _put_challenge_sync(self, path: Path, record: bytes) -> None:
        # Under the guard so ``clean`` cannot judge the old record expired and then unlink ours.
        with self._guard():
            self._write_atomic(path, record, _PUBLIC_MODE)

    def _delete_challenge_sync(self, path: Path) -> None:
        with self._guard():
            self._delete_sync(path)

    def _challenge_files(self) -> builtins.list[tuple[str, Path]]:
        try:
            entries = list(os.scandir(self._challenges))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = _decode_name(entry.name, _CHALLENGE_SUFFIX)
            if name is not None and entry.is_file(follow_symlinks=False):
                found.append((name, Path(entry.path)))
        return sorted(found)

    def _list_challenges_sync(self) -> builtins.list[tuple[str, float]]:
        result = []
        for name, path in self._challenge_files():
            raw = _read_file(path)
            challenge = _Challenge.parse(raw) if raw is not None else None
            if challenge is not None:
                result.append((name, challenge.expires_at))
        return result

    # -- hostname registry (worker thread) ------------------------------------------------------

    def _add_hostname_sync(self, entry: HostnameEntry) -> tuple[HostnameEntry, bool]:
        path = self._entry_path(entry.hostname)
        with self._guard(self._hostnames):
            current = _parse_entry(_read_file(path))
            if current is not None and current.live:
                return current, False
            self._write_atomic(path, _entry_json(entry), _PUBLIC_MODE)
            self._journal(entry.hostname)
        return entry, True

    def _add_hostnames_sync(
        self, entries: Sequence[HostnameEntry]
    ) -> builtins.list[tuple[HostnameEntry, bool]]:
        # One guard, one journal write and one filesystem sync for the whole batch: an fsync
        # per entry made a 10,000-name import take a minute. Nothing is reported before the
        # sync, so a crash mid-batch loses only entries whose adding was never confirmed.
        results: builtins.list[tuple[HostnameEntry, bool]] = []
        added: builtins.list[str] = []
        with self._guard(self._hostnames):
            for entry in entries:
                path = self._entry_path(entry.hostname)
                current = _parse_entry(_read_file(path))
                if current is not None and current.live:
                    results.append((current, False))
                    continue
                self._write_atomic(path, _entry_json(entry), _PUBLIC_MODE, durable=False)
                added.append(entry.hostname)
                results.append((entry, True))
            if added:
                _syncfs(self._hostnames)
                self._journal(*added)
        return results

    def _update_hostname_sync(self, entry: HostnameEntry) -> bool:
        path = self._entry_path(entry.hostname)
        with self._guard(self._hostnames):
            current = _parse_entry(_read_file(path))
            if current is None or not current.live:
                return False
            updated = HostnameEntry(
                current.hostname, entry.upstream, entry.metadata, current.created_at
            )
            self._write_atomic(path, _entry_json(updated), _PUBLIC_MODE)
            self._journal(entry.hostname)
        return True

    def _remove_hostname_sync(self, path: Path, at: float) -> HostnameEntry | None:
        with self._guard(self._hostnames):
            current = _parse_entry(_read_file(path))
            if current is None or not current.live:
                return None
            removed = HostnameEntry(
                current.hostname, current.upstream, current.metadata, current.created_at, at
            )
            self._write_atomic(path, _entry_json(removed), _PUBLIC_MODE)
            self._journal(current.hostname)
        return current

    def _purge_hostname_sync(self, path: Path, removed_before: float) -> bool:
        with self._guard(self._hostnames):
            current = _parse_entry(_read_file(path))
            if current is None or current.removed_at is None or current.removed_at > removed_before:
                return False
            self._delete_sync(path)
            self._journal(current.hostname)
        return True

    def _journal(self, *hostnames: str) -> None:
        """Append ``hostnames`` to the change journal (caller holds the registry guard)."""
        path = self._hostnames / _JOURNAL_NAME
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _PUBLIC_MODE)
        try:
            # One write: readers only ever consume whole lines anyway.
            data = memoryview("".join(f"{h}\n" for h in hostnames).encode())
            while data:
                data = data[os.write(fd, data) :]
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.JOURNAL_MAX:
            self._write_atomic(path, b"", _PUBLIC_MODE)

    def _journal_marker(self) -> tuple[int, int]:
        try:
            st = os.stat(self._hostnames / _JOURNAL_NAME)
        except FileNotFoundError:
            return 0, 0
        return st.st_ino, st.st_size

    def _hostname_changes_sync(self, since: str | None) -> tuple[str, builtins.list[str] | None]:
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
        with open(self._hostnames / _JOURNAL_NAME, "rb") as f:
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
            entries = os.listdir(self._hostnames)
        except FileNotFoundError:
            entries = []
        names = sorted(
            e[: -len(_ENTRY_SUFFIX)]
            for e in entries
            if e.endswith(_ENTRY_SUFFIX) and not e.startswith(".")
        )
        self._listing = (marker, names)
        return names

    def _list_hostnames_sync(self, after: str | None, limit: int) -> builtins.list[HostnameEntry]:
        names = self._sorted_hostnames()
        start = bisect.bisect_right(names, after) if after is not None else 0
        found: builtins.list[HostnameEntry] = []
        for name in names[start:]:
            if len(found) >= limit:
                break
            entry = _parse_entry(_read_file(self._hostnames / (name + _ENTRY_SUFFIX)))
            if entry is not None:  # purged since the listing
                found.append(entry)
        return found

    # -- event outbox (worker thread) -----------------------------------------------------------

    def _enqueue_event_sync(self, event: OutboxEvent) -> None:
        path = self._event_path(event.id)
        if path.exists():
            return
        self._write_atomic(path, _event_json(event), _SECRET_MODE)

    def _update_event_sync(self, path: Path, event: OutboxEvent) -> None:
        if path.exists():  # delivered meanwhile by someone else: leave it gone
            self._write_atomic(path, _event_json(event), _SECRET_MODE)

    def _event_names(self) -> builtins.list[str]:
        try:
            names = os.listdir(self._events)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(_ENTRY_SUFFIX) and not n.startswith("."))

    def _due_events_sync(self, now: float, limit: int) -> builtins.list[OutboxEvent]:
        due: builtins.list[OutboxEvent] = []
        for name in self._event_names():
            event = _parse_event(name[: -len(_ENTRY_SUFFIX)], _read_file(self._events / name))
            if event is not None and event.next_attempt <= now:
                due.append(event)
                if len(due) >= limit:
                    break
        return due

    # -- next-action index (worker thread) ------------------------------------------------------
    # due/names/<name> holds the name's time; due/t<hour>/<name> holds it too, in the folder of
    # its hour. A pass lists the folder names (one per hour that has names: a few thousand at
    # most) and opens only the folders up to now. The per-name file says which hour folder
    # holds the current entry, so a new time moves the entry; an entry whose time disagrees
    # with the per-name file (a writer died between the two writes) is dropped when met.

    def _due_bucket(self, at: float) -> Path:
        return self._due / f"t{max(0, int(at // _DUE_BUCKET)):010d}"

    def _set_due_sync(self, name: str, at: float) -> None:
        pointer = self._due / "names" / name
        with self._guard(self._due):
            old = _parse_due(_read_file(pointer))
            if old == at:
                return
            value = repr(at).encode()
            self._write_atomic(self._due_bucket(at) / name, value, _PUBLIC_MODE, durable=False)
            self._write_atomic(pointer, value, _PUBLIC_MODE, durable=False)
            if old is not None and self._due_bucket(old) != self._due_bucket(at):
                _unlink(self._due_bucket(old) / name)

    def _clear_due_sync(self, name: str) -> None:
        pointer = self._due / "names" / name
        with self._guard(self._due):
            old = _parse_due(_read_file(pointer))
            _unlink(pointer)
            if old is not None:
                _unlink(self._due_bucket(old) / name)

    def _due_names_sync(self, until: float, limit: int) -> builtins.list[DueEntry]:
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
                if not _is_key(name) or "/" in name:
                    continue  # temp files
                at = _parse_due(_read_file(folder / name))
                if at is None or at > until:
                    continue
                if _parse_due(_read_file(self._due / "names" / name)) != at:
                    with self._guard(self._due):  # superseded: drop it unless rewritten
                        if _parse_due(_read_file(self._due / "names" / name)) != at:
                            _unlink(folder / name)
                    continue
                entries.append(DueEntry(name, at))
            entries.sort(key=lambda e: (e.at, e.name))
            found.extend(entries)
        found.sort(key=lambda e: (e.at, e.name))
        return found[:limit]

    def _scheduled_names_sync(self) -> builtins.list[str]:
        try:
            names = os.listdir(self._due / "names")
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _is_key(n))

    # -- check / clean (worker thread) ----------------------------------------------------------

    def _walk(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every folder and file under the root (root included), without following links."""
        stack = [self._root]
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

    def _old_temp_files(self, now: float) -> builtins.list[tuple[Path, float]]:
        return [
            (path, now - st.st_mtime)
            for path, st in self._walk()
            if stat.S_ISREG(st.st_mode)
            and _is_temp_name(path.name)
            and now - st.st_mtime > self.TEMP_GRACE
        ]

    def _check_sync(self, now: float) -> builtins.list[str]:
        unsafe = root_problems(self._root)
        if not self._root.is_dir() or os.path.islink(self._root):
            return unsafe or [f"storage root {self._root} does not exist or is not a folder"]
        problems = unsafe + [
            f"leftover temp file {path} ({age:.0f}s old, from an interrupted write)"
            for path, age in self._old_temp_files(now)
        ]
        for path, st in self._walk():
            problems.extend(_permission_problems(path, st))
        problems.extend(self._encryption_problems())
        for name, path in self._lock_files():
            raw = _read_file(path)
            lease = _Lease.parse(raw) if raw is not None else None
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
        for name, path in self._challenge_files():
            raw = _read_file(path)
            challenge = _Challenge.parse(raw) if raw is not None else None
            if challenge is None:
                problems.append(f"unparseable challenge file {path} (clean removes it)")
            elif challenge.expires_at <= now:
                problems.append(f"expired challenge for {name!r}")
        return problems

    def _encryption_problems(self) -> Iterator[str]:
        """Secret values in clear while a key is set; sealed ones the key cannot open."""
        for path, st in self._walk():
            if not stat.S_ISREG(st.st_mode) or not path.is_relative_to(self._data):
                continue
            key = path.relative_to(self._data).as_posix()
            if not _is_key(key):
                continue
            with contextlib.suppress(OSError):
                with open(path, "rb") as f:
                    head = f.read(len(_SEALED_MARK) + 9)
                if not head.startswith(_SEALED_MARK):
                    # The mode is the record of secrecy here (module doc): 0600 means secret.
                    if self._sealer is not None and stat.S_IMODE(st.st_mode) == _SECRET_MODE:
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

    def _clean_sync(self, now: float) -> builtins.list[str]:
        if not self._root.is_dir():
            return []
        removed = []
        for path, _age in self._old_temp_files(now):
            if _unlink(path):
                removed.append(f"temp file {path}")
        if not self._lock_files() and not self._challenge_files():
            return removed  # nothing to judge; and do not create locks/ just for the guard
        with self._guard():
            # Re-read each record under the guard: a lease refreshed a moment ago must survive.
            for name, path in self._lock_files():
                raw = _read_file(path)
                lease = _Lease.parse(raw) if raw is not None else None
                if raw is not None and (lease is None or lease.expires_at <= now):
                    self._delete_sync(path)
                    removed.append(f"{'expired' if lease else 'unparseable'} lock {name!r}")
            # A holder's liveness file outlives its lease when the holder died: drop it once
            # no lease record names it and no process holds it.
            for entry in list(os.scandir(self._locks)):
                if entry.name.endswith(_HELD_SUFFIX):
                    held = Path(entry.path)
                    lock = held.with_name(entry.name[: -len(_HELD_SUFFIX)] + _LOCK_SUFFIX)
                    if not lock.exists() and not _holder_alive(held):
                        _unlink(held)
            for name, path in self._challenge_files():
                raw = _read_file(path)
                challenge = _Challenge.parse(raw) if raw is not None else None
                if raw is not None and (challenge is None or challenge.expires_at <= now):
                    self._delete_sync(path)
                    what = "expired" if challenge else "unparseable"
                    removed.append(f"{what} challenge {name!r}")
        return removed


def root_problems(root: Path) -> list[str]:
    """What lets someone other than us (or root) replace ``root`` or write into it.

    A root that does not exist yet is judged by the folders it would be created in.
    """
    problems: list[str] = []
    trusted = {os.geteuid(), 0}
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        return [f"storage root {root}: a parent is not a folder (fix storage.path)"]
    if st is not None:
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            problems.append(
                f"storage root {root} is a symbolic link (to {os.readlink(root)}): whoever can "
                "change the link can swap the storage (point storage.path at the real folder)"
            )
        elif not stat.S_ISDIR(st.st_mode):
            problems.append(f"storage root {root} is not a folder (fix storage.path)")
        else:
            if mode & 0o002:
                problems.append(
                    f"storage root {root} is writable by everyone (mode {mode:04o}): anyone "
                    f"can plant or swap entries in it (chmod 700 {root})"
                )
            if st.st_uid not in trusted:
                problems.append(
                    f"storage root {root} belongs to uid {st.st_uid}, not to this process "
                    f"(uid {os.geteuid()}) or root: its owner can swap it (chown it)"
                )
    # Every existing folder above: others must not be able to rename the root away.
    parent = Path(os.path.realpath(root.parent if st is not None else root))
    for folder in (parent, *parent.parents):
        try:
            pst = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue  # created on demand, 0700, by us
        pmode = stat.S_IMODE(pst.st_mode)
        sticky = bool(pst.st_mode & stat.S_ISVTX)
        if (pmode & 0o002 and not sticky) or pst.st_uid not in trusted:
            problems.append(
                f"storage root {root}: parent folder {folder} (mode {pmode:04o}, uid "
                f"{pst.st_uid}) lets others rename the root and put their own in its place "
                "(keep the storage under folders only root or this user can write to)"
            )
    return problems


def _permission_problems(path: Path, st: os.stat_result) -> list[str]:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        if mode & 0o077:
            return [f"folder {path} has mode {mode:04o}; expected 0700 (chmod 700)"]
        return []
    if not stat.S_ISREG(st.st_mode):
        return []
    if mode & 0o022:
        return [f"file {path} is writable by group/others (mode {mode:04o})"]
    if mode & 0o044 and st.st_size <= _SECRET_SNIFF_LIMIT and _holds_private_key(path):
        return [f"secret file {path} has mode {mode:04o}; expected 0600 (chmod 600)"]
    return []


def _holds_private_key(path: Path) -> bool:
    raw = _read_file(path)
    return raw is not None and _PEM_KEY_MARK in raw


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
