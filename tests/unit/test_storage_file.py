"""``FileStorage`` beyond the generic contract: layout, crash safety, repair, error mapping.

The backend-generic behaviour lives in ``test_storage_conformance.py``; here are the things only
a directory tree has: temp files, folder modes, SIGKILLed writers, garbage written by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from edgeproxy.errors import StorageError
from edgeproxy.storage import FileStorage, HostnameEntry, LockLost, Storage, hold_lock
from edgeproxy.storage.file.registry import RegistryFiles
from testkit.crash_writer import Children, is_complete_value
from testkit.waits import wait_to_be_cancelled

CHILD_DEADLINE = 60.0
AN_HOUR = 3600.0
TEMP_NAME = ".tmp-ABCDEFGHIJKLMNOP"  # the shape FileStorage gives its temp files


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def storage(root: Path) -> FileStorage:
    return FileStorage(root)


@pytest.fixture
def children() -> Iterator[Children]:
    with Children() as running:
        yield running


def later(seconds: float = AN_HOUR) -> float:
    return time.time() + seconds


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_folder(path: Path) -> Path:
    """Create ``path`` and its missing parents the way FileStorage would: 0700 each."""
    for folder in reversed([path, *path.parents]):
        if not folder.exists():
            folder.mkdir(mode=0o700)
    return path


def folders_under(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())]


async def _read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    with trio.fail_after(CHILD_DEADLINE):
        line: str = await trio.to_thread.run_sync(proc.stdout.readline)
    assert line, "child exited early"
    return line.strip()


def test_file_storage_implements_the_protocol(storage: FileStorage) -> None:
    assert isinstance(storage, Storage)


# -- layout ------------------------------------------------------------------------------------


async def test_reads_do_not_create_the_root(storage: FileStorage, root: Path) -> None:
    assert await storage.get("a") is None
    assert await storage.list() == []
    assert await storage.list_locks() == []
    assert await storage.list_challenges() == []
    assert await storage.clean() == []
    assert not await trio.Path(root).exists()


async def test_layout_is_created_on_demand_with_folders_0700(
    storage: FileStorage, root: Path
) -> None:
    await storage.put("certs/a.example/cert.pem", b"x")
    assert await storage.try_lock("issue/a.example", "me", 60)
    await storage.put_challenge("*.a.example", "ka", 60)
    await storage.put("bad", b"garbage")
    await storage.quarantine("bad", "test")

    assert (root / "data/certs/a.example/cert.pem").read_bytes() == b"x"
    assert (root / "locks/issue%2Fa.example.lock").is_file()
    assert (root / "challenges/*.a.example.json").is_file()
    assert len(list((root / "quarantine").iterdir())) == 2  # the value and its .reason
    for folder in folders_under(root):
        assert mode_of(folder) == 0o700, folder
    assert await storage.check() == []


async def test_a_key_cannot_be_both_a_value_and_a_folder(storage: FileStorage) -> None:
    await storage.put("a", b"value")
    with pytest.raises(StorageError, match=r"put failed at .*data/a"):
        await storage.put("a/b", b"nested")
    assert await storage.get("a/b") is None
    await storage.put("c/d", b"nested")
    with pytest.raises(StorageError, match="put failed"):
        await storage.put("c", b"value")
    assert await storage.get("c") is None
    await storage.delete("c")  # a folder is no value: nothing to delete
    assert await storage.get("c/d") == b"nested"


async def test_os_errors_become_storage_errors_naming_path_and_operation(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_bytes(b"")
    storage = FileStorage(not_a_folder / "store")
    with pytest.raises(StorageError, match=f"put failed at {not_a_folder}") as caught:
        await storage.put("k", b"v")
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(StorageError, match="try_lock failed"):
        await storage.try_lock("n", "me", 10)


# -- temp files and crashes --------------------------------------------------------------------


async def test_leftover_temp_files_are_invisible_reported_and_cleaned(
    storage: FileStorage, root: Path
) -> None:
    await storage.put("certs/a.example/cert.pem", b"complete")
    leftover = root / "data/certs/a.example" / TEMP_NAME
    leftover.write_bytes(b"half a val")
    stray_lock_tmp = make_folder(root / "locks") / TEMP_NAME
    stray_lock_tmp.write_bytes(b"{")

    assert [item.key for item in await storage.list()] == ["certs/a.example/cert.pem"]
    # Young temp files may belong to a writer still at work: neither reported nor removed.
    assert await storage.check() == []
    assert await storage.clean() == []
    assert leftover.exists()

    aged = FileStorage(root, clock=later)
    problems = await aged.check()
    assert len(problems) == 2
    assert all(p.startswith("leftover temp file") for p in problems)
    removed = await aged.clean()
    assert sorted(removed) == sorted([f"temp file {leftover}", f"temp file {stray_lock_tmp}"])
    assert not leftover.exists() and not stray_lock_tmp.exists()
    assert await aged.check() == []
    assert await storage.get("certs/a.example/cert.pem") == b"complete"


async def test_key_shaped_like_a_temp_file_is_a_value_not_a_leftover(root: Path) -> None:
    # Temp names are upper case and keys lower case, so clean cannot eat a real value.
    storage = FileStorage(root, clock=later)
    await storage.put("x/.tmp-abcdefghijklmnop", b"real value")
    assert await storage.clean() == []
    assert await storage.get("x/.tmp-abcdefghijklmnop") == b"real value"


@pytest.mark.slow
async def test_writer_killed_at_random_moments_never_leaves_a_torn_value(
    root: Path, children: Children
) -> None:
    size, kills = 512 * 1024, 20
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    storage = FileStorage(root)
    for attempt in range(kills):
        writer = children.start("put-loop", f"file:{root}", "certs/big.example/key.pem", str(size))
        assert await _read_line(writer) == "ready"
        if attempt == 0:
            # The key is absent until a first put lands; from then on it must always be whole.
            assert await storage.get("certs/big.example/key.pem") is None
            assert await _read_line(writer) == "wrote"
        await trio.sleep(rng.uniform(0, 0.05))
        writer.kill()
        await trio.to_thread.run_sync(writer.wait)
        value = await storage.get("certs/big.example/key.pem")
        assert value is not None, f"value vanished after kill {attempt} (seed {seed})"
        assert is_complete_value(value, size), f"torn value after kill {attempt} (seed {seed})"
        assert mode_of(storage.path_of("certs/big.example/key.pem")) == 0o600

    aged = FileStorage(root, clock=later)
    problems = await aged.check()
    assert all(p.startswith("leftover temp file") for p in problems), problems
    leftovers = sorted(p.name for p in (root / "data/certs/big.example").glob(".tmp-*"))
    assert len(problems) == len(leftovers)
    assert len(await aged.clean()) == len(leftovers)
    assert await aged.check() == []
    assert [p.name for p in (root / "data/certs/big.example").iterdir()] == ["key.pem"]


# -- quarantine --------------------------------------------------------------------------------


async def test_corrupt_record_is_quarantined_with_its_reason(root: Path) -> None:
    storage = FileStorage(root, clock=lambda: 1_700_000_000.25)
    await storage.put("certs/a.example/key.pem", b"-----BEGIN PRIVATE KEY-----\n", secret=True)
    storage.path_of("certs/a.example/key.pem").write_bytes(b"\x00garbage\xff")  # bit rot

    await storage.quarantine("certs/a.example/key.pem", "not a PEM private key")
    assert await storage.get("certs/a.example/key.pem") is None
    assert await storage.list() == []
    moved = root / "quarantine/20231114T221320.250000Z-certs__a.example__key.pem"
    assert moved.read_bytes() == b"\x00garbage\xff"
    assert mode_of(moved) == 0o600  # a quarantined secret stays secret
    reason = moved.with_name(moved.name + ".reason").read_text()
    assert "key: certs/a.example/key.pem" in reason
    assert "reason: not a PEM private key" in reason

    # Quarantining the same key again in the same instant keeps both copies.
    await storage.put("certs/a.example/key.pem", b"again")
    await storage.quarantine("certs/a.example/key.pem", "second time")
    assert moved.read_bytes() == b"\x00garbage\xff"
    second = moved.with_name(moved.name + "-1")
    assert second.read_bytes() == b"again"
    assert "second time" in second.with_name(second.name + ".reason").read_text()


# -- leases on disk ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"", b'{"owner": "crashed", "expi', b"[1, 2]", b'{"owner": 5, "expires_at": 1e12}', b"\xff"],
)
async def test_garbage_lock_file_is_stale_and_taken_over(
    storage: FileStorage, root: Path, garbage: bytes
) -> None:
    lock_file = make_folder(root / "locks") / "issue%2Fa.example.lock"
    lock_file.write_bytes(garbage)
    assert await storage.lock_info("issue/a.example") is None
    assert await storage.list_locks() == []
    assert await storage.check() == [f"unparseable lock file {lock_file} (stale; clean removes it)"]
    assert not await storage.refresh_lock("issue/a.example", "crashed", 60)
    assert await storage.try_lock("issue/a.example", "me", 60)
    info = await storage.lock_info("issue/a.example")
    assert info is not None and info.owner == "me"


async def test_racing_takeovers_of_a_garbage_lock_have_one_winner(
    root: Path, children: Children
) -> None:
    storage = FileStorage(root)
    racers = [children.start("race", f"file:{root}") for _ in range(4)]
    owners = [(await _read_line(proc)).removeprefix("ready ") for proc in racers]
    make_folder(root / "locks")
    for round_ in range(15):
        name = f"garbage-{round_}"
        (root / f"locks/{name}.lock").write_bytes(b'{"owner": "half-writ')
        for proc in racers:
            assert proc.stdin is not None
            proc.stdin.write(name + "\n")
            proc.stdin.flush()
        answers = [await _read_line(proc) for proc in racers]
        winners = [o for o, a in zip(owners, answers, strict=True) if a == f"{name} 1"]
        assert len(winners) == 1, answers
        info = await storage.lock_info(name)
        assert info is not None and info.owner == winners[0]


async def test_lock_file_records_owner_expiry_and_creation(root: Path) -> None:
    now = [1000.0]
    storage = FileStorage(root, clock=lambda: now[0])
    assert await storage.try_lock("n", "me", 30)
    now[0] = 1010.0
    assert await storage.refresh_lock("n", "me", 30)
    record = json.loads((root / "locks/n.lock").read_bytes())
    assert record == {"owner": "me", "expires_at": 1040.0, "created_at": 1000.0, "bound": True}
    # The liveness file is flocked while the lease is held, and goes with the lease.
    fd = os.open(root / "locks/n.held", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    await storage.unlock("n", "me")
    assert sorted(p.name for p in (root / "locks").iterdir()) == [".guard"]


async def test_a_lease_record_without_binding_waits_for_expiry(root: Path) -> None:
    # Written by a holder that never flocked (an older edgeproxy): no "bound", so an unheld
    # .held file proves nothing and only expiry frees it.
    make_folder(root / "locks")
    (root / "locks/n.lock").write_text(
        '{"owner": "old", "expires_at": 1030.0, "created_at": 1000.0}'
    )
    (root / "locks/n.held").write_bytes(b"")
    now = [1000.0]
    storage = FileStorage(root, clock=lambda: now[0])
    assert not await storage.try_lock("n", "me", 30)
    now[0] = 1031.0
    assert await storage.try_lock("n", "me", 30)


async def test_busy_guard_is_waited_for_off_the_event_loop_and_bounded(
    storage: FileStorage, root: Path
) -> None:
    await storage.put("warm", b"up")
    make_folder(root / "locks")
    storage._tree.GUARD_TIMEOUT = 5.0
    fd = os.open(root / "locks/.guard", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process in the middle of a lease update
        results: list[bool] = []

        async def take() -> None:
            results.append(await storage.try_lock("n", "me", 60))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            await trio.testing.wait_all_tasks_blocked()
            # The loop still serves other work while try_lock waits for the guard.
            assert await storage.get("warm") == b"up"
            assert results == []
            os.close(fd)  # releases the guard
            fd = -1
        assert results == [True]

        storage._tree.GUARD_TIMEOUT = 0.2
        fd = os.open(root / "locks/.guard", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(StorageError, match="guard stayed busy"):
            await storage.try_lock("m", "me", 60)
    finally:
        if fd >= 0:
            os.close(fd)


async def test_hold_lock_refresh_failure_cancels_the_body(
    storage: FileStorage, root: Path, mock_clock: trio.testing.MockClock
) -> None:
    lost_calls: list[None] = []
    finished_body = False
    with pytest.raises(LockLost, match="refresh failed"):
        async with hold_lock(
            storage, "job", owner="me", ttl=3.0, on_lost=lambda: lost_calls.append(None)
        ):
            # The lock folder is replaced by a file: every lease operation now fails, the
            # final unlock included (logged, not raised: the lease expires on its own).
            (root / "locks").rename(root / "locks.away")
            (root / "locks").write_bytes(b"")
            mock_clock.jump(1.0)
            await wait_to_be_cancelled()
            finished_body = True
    assert not finished_body
    assert lost_calls == [None]


# -- check and clean ---------------------------------------------------------------------------


async def test_check_and_clean_expired_leases_and_challenges(root: Path) -> None:
    now = [1000.0]
    storage = FileStorage(root, clock=lambda: now[0])
    assert await storage.try_lock("old", "a", 10)
    assert await storage.try_lock("fresh", "b", 1000)
    await storage.put_challenge("old.example", "ka", 10)
    await storage.put_challenge("fresh.example", "kb", 1000)
    now[0] = 1100.0

    assert sorted(await storage.check()) == [
        "expired challenge for 'old.example'",
        "expired lock 'old' held by 'a', expired 90s ago",
    ]
    assert sorted(await storage.clean()) == [
        "expired challenge 'old.example'",
        "expired lock 'old'",
    ]
    assert [i.name for i in await storage.list_locks()] == ["fresh"]
    assert [n for n, _ in await storage.list_challenges()] == ["fresh.example"]
    assert await storage.check() == []
    # ``now`` overrides the clock.
    assert sorted(await storage.clean(now=5000.0)) == [
        "expired challenge 'fresh.example'",
        "expired lock 'fresh'",
    ]


async def test_check_reports_loose_permissions(storage: FileStorage, root: Path) -> None:
    await storage.put("certs/a.example/key.pem", b"-----BEGIN EC PRIVATE KEY-----\n", secret=True)
    await storage.put("certs/a.example/cert.pem", b"-----BEGIN CERTIFICATE-----\n")
    assert await storage.check() == []
    os.chmod(root / "data/certs", 0o755)
    os.chmod(storage.path_of("certs/a.example/key.pem"), 0o644)
    os.chmod(storage.path_of("certs/a.example/cert.pem"), 0o666)
    assert sorted(await storage.check()) == sorted(
        [
            f"folder {root / 'data/certs'} has mode 0755; expected 0700 (chmod 700)",
            f"secret file {storage.path_of('certs/a.example/key.pem')} has mode 0644; "
            "expected 0600 (chmod 600)",
            f"file {storage.path_of('certs/a.example/cert.pem')} is writable by group/others "
            "(mode 0666)",
        ]
    )


async def test_check_reports_a_missing_root(storage: FileStorage, root: Path) -> None:
    assert await storage.check() == [f"storage root {root} does not exist or is not a folder"]


async def test_hostname_page_reads_only_its_own_files_among_many(
    storage: FileStorage, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.add_hostname(HostnameEntry("a.example.com", None, "{}", 1.0))
    folder = root / "hostnames"
    # Written directly (the page's cost is under test, not adding); a page must read its own
    # files only, whatever the count (5,000 keep the test quick; 100,000 behave the same).
    for i in range(5_000):
        name = f"h{i:06d}.example.com"
        record = {"hostname": name, "upstream": None, "metadata": "{}", "created_at": 1.0,
                  "removed_at": None}  # fmt: skip
        (folder / f"{name}.json").write_text(json.dumps(record))
    await storage.add_hostname(HostnameEntry("z.example.com", None, "{}", 1.0))  # moves journal

    import edgeproxy.storage.file.registry as registry_module

    real_read = registry_module.read_file
    reads: list[Path] = []

    def counting_read(path: Path) -> bytes | None:
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(registry_module, "read_file", counting_read)
    page = await storage.list_hostnames(after="h001999.example.com", limit=100)
    assert [e.hostname for e in page] == [f"h{i:06d}.example.com" for i in range(2_000, 2_100)]
    assert len(reads) == 100
    last = await storage.list_hostnames(after="h004999.example.com", limit=100)
    assert [e.hostname for e in last] == ["z.example.com"]


async def test_hostname_journal_rotation_tells_readers_to_reload(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, reader = FileStorage(root), FileStorage(root)
    monkeypatch.setattr(RegistryFiles, "JOURNAL_MAX", 200)
    marker, _ = await reader.hostname_changes(None)
    await writer.add_hostname(HostnameEntry("a.example.com", None, "{}", 1.0))
    marker, names = await reader.hostname_changes(marker)
    assert names == ["a.example.com"]
    for i in range(20):  # past 200 bytes: the journal is replaced by an empty one
        await writer.add_hostname(HostnameEntry(f"n{i:02d}.example.com", None, "{}", 1.0))
    assert (root / "hostnames" / ".journal").stat().st_size < 200
    marker, names = await reader.hostname_changes(marker)
    assert names is None  # what changed before the rotation is unknown: reload everything
    await writer.remove_hostname("a.example.com", 2.0)
    _, names = await reader.hostname_changes(marker)
    assert names == ["a.example.com"]
