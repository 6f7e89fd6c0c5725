"""The ``Storage`` contract, checked against every backend.

A backend joins by adding a param to ``backend``: a way to open any number of handles on one
shared store (each with its own clock), and a ``spec`` string with which
``testkit/crash_writer.py`` opens the same store from a child process. ``postgres`` runs
against a throwaway server (``testkit/postgres.py``), a fresh database per test.

Time is explicit: lease and challenge expiry run on a ``ManualClock`` that a test advances, and
``hold_lock`` tests run trio on an autojump ``MockClock``, so no test waits on the wall clock.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from edgeproxy.errors import LockUnavailable
from edgeproxy.storage import (
    FileStorage,
    HostnameEntry,
    LockInfo,
    LockLost,
    OutboxEvent,
    Storage,
    StoredItem,
    hold_lock,
    make_owner_id,
)
from edgeproxy.storage.postgres import PostgresStorage
from testkit import postgres as pg
from testkit.crash_writer import Children
from testkit.waits import wait_to_be_cancelled

# PostgreSQL fixtures, set up only for the postgres param (one server, a database per test).
postgres_server = pg.postgres_server
postgres_database = pg.postgres_database
postgres_dsn = pg.postgres_dsn

# Bound for waits on child processes (real seconds); a safety net, not a timing assertion.
CHILD_DEADLINE = 60.0




class ManualClock:
    """Storage clock that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class StorageFactory:
    """Opens handles on one shared store; every handle is closed at teardown."""

    spec: str
    open: Callable[[Callable[[], float]], Storage]
    #: The file holding a key's value, for backends that keep values in files (else None).
    path_of: Callable[[str], Path] | None = None
    root: Path | None = None
    _opened: list[Storage] = field(default_factory=list)

    def __call__(self, *, clock: Callable[[], float] | None = None) -> Storage:
        storage = self.open(clock if clock is not None else time.time)
        self._opened.append(storage)
        return storage

    async def aclose(self) -> None:
        for storage in self._opened:
            await storage.aclose()


def _file_backend(tmp_path: Path) -> StorageFactory:
    root = tmp_path / "store"
    return StorageFactory(
        spec=f"file:{root}",
        open=lambda clock: FileStorage(root, clock=clock),
        path_of=FileStorage(root).path_of,
        root=root,
    )


def _postgres_backend(dsn: str) -> StorageFactory:
    # A fresh database per test; the child processes open it from the same DSN.
    return StorageFactory(
        spec=f"postgres:{dsn}",
        open=lambda clock: PostgresStorage(dsn, clock=clock),
    )


@pytest.fixture(params=["file", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> StorageFactory:
    if request.param == "postgres":
        # Looked up only for this param, so file-only runs never start a server.
        return _postgres_backend(request.getfixturevalue("postgres_dsn"))
    return _file_backend(tmp_path)


@pytest.fixture
async def storage_factory(backend: StorageFactory) -> AsyncIterator[StorageFactory]:
    yield backend
    await backend.aclose()


@pytest.fixture
def storage(storage_factory: StorageFactory) -> Storage:
    return storage_factory()


@pytest.fixture
def children() -> Iterator[Children]:
    with Children() as running:
        yield running


# -- values ------------------------------------------------------------------------------------


async def test_put_then_get_returns_the_value(storage: Storage) -> None:
    assert await storage.get("certs/a.example/cert.pem") is None
    await storage.put("certs/a.example/cert.pem", b"chain")
    assert await storage.get("certs/a.example/cert.pem") == b"chain"


async def test_put_overwrites_and_empty_values_are_values(storage: Storage) -> None:
    await storage.put("k", b"one")
    await storage.put("k", b"two")
    assert await storage.get("k") == b"two"
    await storage.put("k", b"")
    assert await storage.get("k") == b""


async def test_delete_removes_and_is_idempotent(storage: Storage) -> None:
    await storage.put("acme/account.json", b"{}")
    await storage.delete("acme/account.json")
    assert await storage.get("acme/account.json") is None
    await storage.delete("acme/account.json")
    await storage.delete("never/there")


async def test_list_filters_by_prefix_and_reports_sizes(storage: Storage) -> None:
    values = {
        "certs/a.example/cert.pem": b"aa",
        "certs/a.example/key.pem": b"aaa",
        "certs/ab.example/cert.pem": b"b",
        "certs/b.example/cert.pem": b"bbbb",
        "acme/account.json": b"{}",
    }
    for key, value in values.items():
        await storage.put(key, value, secret=key.endswith("key.pem"))

    def keys(items: list[StoredItem]) -> list[str]:
        return [item.key for item in items]

    everything = await storage.list()
    assert keys(everything) == sorted(values)
    assert {item.key: item.size for item in everything} == {k: len(v) for k, v in values.items()}
    assert all(item.modified > 0 for item in everything)
    assert keys(await storage.list("certs/")) == sorted(k for k in values if k.startswith("certs/"))
    assert keys(await storage.list("certs/a")) == [
        "certs/a.example/cert.pem",
        "certs/a.example/key.pem",
        "certs/ab.example/cert.pem",
    ]
    assert keys(await storage.list("certs/a.example/")) == [
        "certs/a.example/cert.pem",
        "certs/a.example/key.pem",
    ]
    assert await storage.list("nothing/") == []
    assert await storage.list("Certs/") == []


async def test_key_pages_walk_every_key_once_in_bounded_pages(storage: Storage) -> None:
    values = {f"certs/n{i:03d}.example.json": b"x" for i in range(23)}
    values |= {"certs/deep/one.json": b"x", "certsx/no.json": b"x", "acme/account.json": b"x"}
    for key, value in values.items():
        await storage.put(key, value)
    pages = [page async for page in storage.key_pages("certs/", 5)]
    assert all(1 <= len(page) <= 5 for page in pages)
    seen = [key for page in pages for key in page]
    assert sorted(seen) == sorted(k for k in values if k.startswith("certs/"))  # each once
    assert len(pages) == 5  # 24 keys: four full pages and a last one of 4
    everything = [key async for page in storage.key_pages("", 7) for key in page]
    assert sorted(everything) == sorted(values)
    assert [page async for page in storage.key_pages("nothing/", 5)] == []
    with pytest.raises(ValueError):
        _ = [page async for page in storage.key_pages("certs/", 0)]


async def test_key_pages_left_early_can_be_closed(storage: Storage) -> None:
    for i in range(12):
        await storage.put(f"certs/n{i}.json", b"x")
    async with contextlib.aclosing(storage.key_pages("certs/", 5)) as pages:
        async for page in pages:
            assert len(page) == 5
            break  # the walk's open directory streams (file backend) close with it
    # and a new walk starts from the beginning
    assert sum([len(page) async for page in storage.key_pages("certs/", 5)]) == 12


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a/../b", "../up", "a//b", "trailing/", "Upper", ".", "status/a\n.x.json", "ok\n"],
)
async def test_invalid_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        await storage.put(key, b"x")
    with pytest.raises(ValueError):
        await storage.get(key)


# File modes exist only where the backend keeps files (PostgreSQL's rows have none).
@pytest.mark.parametrize("backend", ["file"], indirect=True)
async def test_secret_values_are_0600_public_0644_folders_0700(
    storage_factory: StorageFactory,
) -> None:
    assert storage_factory.path_of is not None and storage_factory.root is not None
    storage = storage_factory()
    # A strict umask must not decide the modes: they are set explicitly.
    old_umask = os.umask(0o077)
    try:
        await storage.put("certs/a.example/key.pem", b"secret", secret=True)
        await storage.put("certs/a.example/cert.pem", b"public")
    finally:
        os.umask(old_umask)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    key_file = storage_factory.path_of("certs/a.example/key.pem")
    assert mode(key_file) == 0o600
    assert mode(storage_factory.path_of("certs/a.example/cert.pem")) == 0o644
    folder = key_file.parent
    while folder != storage_factory.root.parent:
        assert mode(folder) == 0o700, folder
        folder = folder.parent
    # Overwriting a secret keeps it secret.
    await storage.put("certs/a.example/key.pem", b"secret 2", secret=True)
    assert mode(key_file) == 0o600


async def test_concurrent_puts_to_one_key_never_tear(storage: Storage) -> None:
    size = 256 * 1024
    values = [bytes([n]) * size for n in range(6)]
    reads = 0
    writers_done = trio.Event()

    async def writer(value: bytes) -> None:
        for _ in range(4):
            await storage.put("busy/key", value)

    async def writers() -> None:
        async with trio.open_nursery() as nursery:
            for value in values:
                nursery.start_soon(writer, value)
        writers_done.set()

    async def reader() -> None:
        nonlocal reads
        while not writers_done.is_set():
            seen = await storage.get("busy/key")
            if seen is not None:
                reads += 1
                assert seen in values, f"torn read: {len(seen)} bytes, starts {seen[:4]!r}"

    with trio.fail_after(CHILD_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writers)
            nursery.start_soon(reader)
    assert await storage.get("busy/key") in values
    assert reads > 0


async def test_quarantine_hides_the_value(storage: Storage) -> None:
    await storage.put("certs/bad.example/cert.pem", b"not a certificate")
    await storage.quarantine("certs/bad.example/cert.pem", "does not parse as PEM")
    assert await storage.get("certs/bad.example/cert.pem") is None
    assert await storage.list("certs/") == []
    # Re-issuance must be able to store a fresh value under the same key.
    await storage.put("certs/bad.example/cert.pem", b"fresh")
    assert await storage.get("certs/bad.example/cert.pem") == b"fresh"
    await storage.quarantine("certs/absent.example/cert.pem", "nothing there")  # not an error


# -- leases ------------------------------------------------------------------------------------


async def test_lock_excludes_other_owners_until_expiry(storage_factory: StorageFactory) -> None:
    clock = ManualClock()
    a, b = storage_factory(clock=clock), storage_factory(clock=clock)
    assert await a.try_lock("issue/x.example", "a", 10)
    assert not await b.try_lock("issue/x.example", "b", 10)
    assert await b.lock_info("issue/x.example") == LockInfo("issue/x.example", "a", clock.now + 10)
    clock.advance(9.9)
    assert not await b.try_lock("issue/x.example", "b", 10)
    clock.advance(0.2)
    assert await b.try_lock("issue/x.example", "b", 10)
    info = await a.lock_info("issue/x.example")
    assert info is not None and info.owner == "b"


async def test_locks_with_different_names_are_independent(storage: Storage) -> None:
    assert await storage.try_lock("x.example", "a", 10)
    assert await storage.try_lock("y.example", "b", 10)
    assert await storage.try_lock("x.example/sub", "c", 10)
    assert {(i.name, i.owner) for i in await storage.list_locks()} == {
        ("x.example", "a"),
        ("y.example", "b"),
        ("x.example/sub", "c"),
    }


async def test_same_owner_may_take_its_lock_again(storage_factory: StorageFactory) -> None:
    clock = ManualClock()
    storage = storage_factory(clock=clock)
    assert await storage.try_lock("n", "a", 10)
    clock.advance(5)
    assert await storage.try_lock("n", "a", 10)
    assert await storage.lock_info("n") == LockInfo("n", "a", clock.now + 10)


async def test_refresh_extends_the_lease(storage_factory: StorageFactory) -> None:
    clock = ManualClock()
    a, b = storage_factory(clock=clock), storage_factory(clock=clock)
    assert await a.try_lock("n", "a", 10)
    clock.advance(8)
    assert await a.refresh_lock("n", "a", 10)
    clock.advance(8)  # 16s after taking it: past the first lease, inside the refreshed one
    assert not await b.try_lock("n", "b", 10)


async def test_refresh_after_takeover_fails_and_unlock_spares_the_new_holder(
    storage_factory: StorageFactory,
) -> None:
    clock = ManualClock()
    a, b = storage_factory(clock=clock), storage_factory(clock=clock)
    assert await a.try_lock("n", "a", 10)
    clock.advance(11)
    assert await b.try_lock("n", "b", 10)
    assert not await a.refresh_lock("n", "a", 10)
    await a.unlock("n", "a")
    info = await b.lock_info("n")
    assert info is not None and info.owner == "b"
    await b.unlock("n", "b")
    assert await b.lock_info("n") is None
    assert await a.try_lock("n", "a", 10)


async def test_refresh_of_an_expired_lease_nobody_took_succeeds(
    storage_factory: StorageFactory,
) -> None:
    clock = ManualClock()
    storage = storage_factory(clock=clock)
    assert await storage.try_lock("n", "a", 10)
    clock.advance(30)
    assert await storage.refresh_lock("n", "a", 10)
    assert await storage.lock_info("n") == LockInfo("n", "a", clock.now + 10)


async def test_refresh_and_unlock_of_a_lock_never_held(storage: Storage) -> None:
    assert not await storage.refresh_lock("n", "a", 10)
    await storage.unlock("n", "a")
    assert await storage.lock_info("n") is None


async def test_expired_leases_stay_listed_until_taken_or_cleaned(
    storage_factory: StorageFactory,
) -> None:
    clock = ManualClock()
    storage = storage_factory(clock=clock)
    assert await storage.try_lock("old", "a", 1)
    clock.advance(100)
    assert await storage.list_locks() == [LockInfo("old", "a", clock.now - 99)]


async def test_lock_contention_across_processes_loses_no_update(
    storage_factory: StorageFactory, children: Children
) -> None:
    workers, iterations = 4, 20
    args = (storage_factory.spec, "counter", "test/counter", str(iterations))
    procs = [children.start("lock-counter", *args) for _ in range(workers)]
    with trio.fail_after(CHILD_DEADLINE):
        codes = [await trio.to_thread.run_sync(proc.wait) for proc in procs]
    assert codes == [0] * workers
    assert await storage_factory().get("test/counter") == str(workers * iterations).encode()


async def test_racing_takeovers_of_a_stale_lock_have_one_winner(
    storage_factory: StorageFactory, children: Children
) -> None:
    past = storage_factory(clock=ManualClock(1_000.0))  # leases it takes expired long ago
    storage = storage_factory()
    racers = [children.start("race", storage_factory.spec) for _ in range(4)]
    owners = [await _read_line(proc) for proc in racers]
    assert all(line.startswith("ready ") for line in owners)
    owners = [line.removeprefix("ready ") for line in owners]
    for round_ in range(15):
        name = f"race/{round_}"
        assert await past.try_lock(name, "crashed-holder", 1)
        for proc in racers:
            assert proc.stdin is not None
            proc.stdin.write(name + "\n")
            proc.stdin.flush()
        answers = [await _read_line(proc) for proc in racers]
        won = [line == f"{name} 1" for line in answers]
        winners = [owner for owner, w in zip(owners, won, strict=True) if w]
        assert len(winners) == 1, answers
        info = await storage.lock_info(name)
        assert info is not None and info.owner == winners[0]


async def test_lease_of_a_killed_holder_frees_at_once(
    storage_factory: StorageFactory, children: Children
) -> None:
    # The kernel (file: the holder's flock) or the server (postgres: the holder's session and
    # its advisory lock) knows the holder died; nobody waits for the 30 s lease to expire.
    holder = children.start("hold", storage_factory.spec, "issue/x.example", "30")
    line = await _read_line(holder)
    assert line.startswith("held ")
    dead_owner = line.removeprefix("held ")
    now = storage_factory()
    assert not await now.try_lock("issue/x.example", "next", 30)  # alive: its lease holds
    assert await now.check() == []
    holder.kill()
    await trio.to_thread.run_sync(holder.wait)
    # postgres: the server ends the session when it reads the closed socket (a moment).
    problems: list[str] = []
    with trio.fail_after(CHILD_DEADLINE):
        while not problems:
            problems = await now.check()
            await trio.sleep(0.02)
    assert problems == [
        f"lock 'issue/x.example' held by {dead_owner!r}, whose "
        + (
            "process is gone"
            if storage_factory.spec.startswith("file:")
            else "database session ended"
        )
        + " (the next taker gets it at once)"
    ]
    assert await now.try_lock("issue/x.example", "next", 30)
    info = await now.lock_info("issue/x.example")
    assert info is not None and info.owner == "next"
    # And the new holder's lease is bound in turn: another taker is refused.
    assert not await storage_factory().try_lock("issue/x.example", "third", 30)


async def test_lease_of_a_hung_holder_frees_only_at_expiry(
    storage_factory: StorageFactory, children: Children
) -> None:
    # A stopped process keeps its descriptors and its database session: only expiry (the
    # lock_ttl safety net) frees its lease, and the taker's lease is bound to the taker.
    holder = children.start("hold", storage_factory.spec, "issue/x.example", "30")
    assert (await _read_line(holder)).startswith("held ")
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        assert not await storage_factory().try_lock("issue/x.example", "next", 30)
        later = storage_factory(clock=lambda: time.time() + 31)
        assert await later.try_lock("issue/x.example", "next", 30)
        assert not await later.try_lock("issue/x.example", "third", 30)
    finally:
        holder.kill()
        os.kill(holder.pid, signal.SIGCONT)
    await trio.to_thread.run_sync(holder.wait)


async def _read_line(proc: subprocess.Popen[str]) -> str:
    stdout = proc.stdout
    assert stdout is not None
    with trio.fail_after(CHILD_DEADLINE):
        line: str = await trio.to_thread.run_sync(stdout.readline)
    assert line, "child exited early"
    return line.strip()


# -- challenges --------------------------------------------------------------------------------


async def test_challenge_is_visible_to_other_handles_until_expiry(
    storage_factory: StorageFactory,
) -> None:
    clock = ManualClock()
    a, b = storage_factory(clock=clock), storage_factory(clock=clock)
    assert await b.get_challenge("a.example") is None
    await a.put_challenge("a.example", "token.thumbprint", 60)
    assert await b.get_challenge("a.example") == "token.thumbprint"
    assert await b.list_challenges() == [("a.example", clock.now + 60)]
    await a.put_challenge("a.example", "token2.thumbprint", 60)
    assert await b.get_challenge("a.example") == "token2.thumbprint"
    clock.advance(61)
    assert await b.get_challenge("a.example") is None
    assert await b.list_challenges() == [("a.example", clock.now - 1)]  # expired still listed


async def test_challenge_delete(storage: Storage) -> None:
    await storage.put_challenge("*.wild.example", "ka", 60)
    await storage.put_challenge("b.example", "kb", 60)
    await storage.delete_challenge("*.wild.example")
    await storage.delete_challenge("never.example")
    assert await storage.get_challenge("*.wild.example") is None
    assert await storage.get_challenge("b.example") == "kb"
    assert [name for name, _ in await storage.list_challenges()] == ["b.example"]


# -- hold_lock ---------------------------------------------------------------------------------


async def _wait_until_expiry_reaches(storage: Storage, name: str, at_least: float) -> None:
    # trio time is frozen (mock_clock), so the bound is real time and the poll a checkpoint.
    give_up = time.monotonic() + 10.0
    while time.monotonic() < give_up:
        info = await storage.lock_info(name)
        if info is not None and info.expires_at >= at_least:
            return
        await trio.lowlevel.checkpoint()
    pytest.fail(f"lease {name!r} was never refreshed to expire at {at_least}")


async def test_hold_lock_heartbeat_keeps_the_lease_beyond_its_ttl(
    storage_factory: StorageFactory, mock_clock: trio.testing.MockClock
) -> None:
    # Storage runs on trio time, which moves only when the test jumps it: half a ttl per step,
    # eight steps. After each jump a refresh must be due (so the heartbeat beats at least
    # twice per ttl) and must land before the test goes on; the lease never lapses meanwhile.
    def now() -> float:
        return 1_000_000.0 + trio.current_time()

    ttl = 3.0
    mine, other = storage_factory(clock=now), storage_factory(clock=now)
    async with hold_lock(mine, "job", owner="me", ttl=ttl) as lease:
        assert lease == LockInfo("job", "me", now() + ttl)
        for _ in range(8):
            mock_clock.jump(ttl / 2)
            assert not await other.try_lock("job", "thief", ttl)
            await _wait_until_expiry_reaches(other, "job", now() + ttl)
            assert not await other.try_lock("job", "thief", ttl)
    assert await other.lock_info("job") is None  # released at exit


async def test_hold_lock_lost_to_takeover_cancels_the_body(
    storage_factory: StorageFactory, mock_clock: trio.testing.MockClock
) -> None:
    # trio time stands still until the test jumps it, so the takeover surely happens before
    # the heartbeat's next refresh.
    wall = ManualClock()
    mine, other = storage_factory(clock=wall), storage_factory(clock=wall)
    lost_calls: list[None] = []
    finished_body = False
    with pytest.raises(LockLost, match="taken over"):
        async with hold_lock(
            mine, "job", owner="me", ttl=3.0, on_lost=lambda: lost_calls.append(None)
        ):
            wall.advance(10)
            assert await other.try_lock("job", "thief", 3.0)
            mock_clock.jump(1.0)  # the heartbeat is due
            await wait_to_be_cancelled()
            finished_body = True
    assert not finished_body
    assert lost_calls == [None]
    info = await other.lock_info("job")
    assert info is not None and info.owner == "thief"  # our exit did not unlock the thief


async def test_hold_lock_gives_up_after_wait(
    storage_factory: StorageFactory, autojump_clock: trio.testing.MockClock
) -> None:
    storage = storage_factory()
    assert await storage.try_lock("job", "someone-else", 3600)
    started = trio.current_time()
    with pytest.raises(LockUnavailable, match="someone-else"):
        async with hold_lock(storage, "job", owner="me", wait=5.0, poll=0.25):
            pytest.fail("body ran without the lock")
    assert trio.current_time() - started >= 5.0  # virtual time: it did wait, and gave up


async def test_hold_lock_waits_for_the_holder_to_unlock(
    storage_factory: StorageFactory, autojump_clock: trio.testing.MockClock
) -> None:
    storage = storage_factory()
    assert await storage.try_lock("job", "first", 3600)

    async def release_later() -> None:
        await trio.sleep(2)
        await storage.unlock("job", "first")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_later)
        started = trio.current_time()
        async with hold_lock(storage, "job", owner="second", wait=600.0) as lease:
            assert lease.owner == "second"
            assert trio.current_time() - started >= 2
    assert await storage.lock_info("job") is None


async def test_hold_lock_passes_body_errors_through_and_unlocks(
    storage: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    class BodyError(Exception):
        pass

    with pytest.raises(BodyError):
        async with hold_lock(storage, "job", owner="me"):
            raise BodyError
    assert await storage.lock_info("job") is None


async def test_hold_lock_unlocks_when_cancelled_from_outside(
    storage: Storage, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.move_on_after(100) as scope:
        async with hold_lock(storage, "job", owner="me", ttl=30):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert await storage.lock_info("job") is None


def test_owner_ids_name_host_and_process_and_differ() -> None:
    first, second = make_owner_id(), make_owner_id()
    host, pid, nonce = first.split(":")
    assert host and nonce and pid == str(os.getpid())
    assert first != second


# -- hostname registry -------------------------------------------------------------------------


def _entry(name: str, *, upstream: str | None = None, at: float = 1000.0) -> HostnameEntry:
    return HostnameEntry(name, upstream, '{"customer": "' + name + '"}', at)


async def test_hostname_add_is_idempotent_and_readd_after_removal_replaces(
    storage: Storage,
) -> None:
    assert await storage.get_hostname("a.example.com") is None
    first, created = await storage.add_hostname(_entry("a.example.com", upstream="10.0.0.1:80"))
    assert created and first.live
    again, created = await storage.add_hostname(_entry("a.example.com", at=2000.0))
    assert not created
    assert again == first  # the live entry wins, its fields untouched
    assert await storage.get_hostname("a.example.com") == first

    previous = await storage.remove_hostname("a.example.com", 3000.0)
    assert previous == first
    gone = await storage.get_hostname("a.example.com")
    assert gone is not None and gone.removed_at == 3000.0 and not gone.live
    assert await storage.remove_hostname("a.example.com", 3500.0) is None  # already removed
    assert not await storage.update_hostname(_entry("a.example.com", upstream="10.0.0.9:80"))

    back, created = await storage.add_hostname(_entry("a.example.com", at=4000.0))
    assert created and back.live and back.created_at == 4000.0 and back.upstream is None
    assert await storage.get_hostname("a.example.com") == back


async def test_hostname_update_changes_only_upstream_and_metadata(storage: Storage) -> None:
    await storage.add_hostname(_entry("b.example.com"))
    changed = HostnameEntry("b.example.com", "10.1.1.1:8080", '{"plan": "pro"}', 99999.0)
    assert await storage.update_hostname(changed)
    stored = await storage.get_hostname("b.example.com")
    assert stored == HostnameEntry("b.example.com", "10.1.1.1:8080", '{"plan": "pro"}', 1000.0)
    assert not await storage.update_hostname(_entry("unknown.example.com"))
    assert await storage.get_hostname("unknown.example.com") is None


async def test_hostname_purge_only_after_removal_and_grace(storage: Storage) -> None:
    await storage.add_hostname(_entry("c.example.com"))
    assert not await storage.purge_hostname("c.example.com", removed_before=10**12)  # live
    await storage.remove_hostname("c.example.com", 5000.0)
    assert not await storage.purge_hostname("c.example.com", removed_before=4999.0)
    assert await storage.get_hostname("c.example.com") is not None
    assert await storage.purge_hostname("c.example.com", removed_before=5000.0)
    assert await storage.get_hostname("c.example.com") is None
    assert not await storage.purge_hostname("c.example.com", removed_before=5000.0)


async def test_hostname_paging_is_stable_while_entries_come_and_go(storage: Storage) -> None:
    names = [f"h{i:03d}.example.com" for i in range(0, 250, 2)]  # 125 names, gaps between
    for n in names:
        await storage.add_hostname(_entry(n))
    await storage.remove_hostname(names[3], 1.0)  # removed entries are listed too
    seen: list[str] = []
    after: str | None = None
    while True:
        page = await storage.list_hostnames(after=after, limit=40)
        if not page:
            break
        seen.extend(e.hostname for e in page)
        after = page[-1].hostname
        # Churn between pages: a name behind the cursor appears, one ahead disappears.
        await storage.add_hostname(_entry("a-before.example.com"))
        if len(seen) == 40:
            await storage.remove_hostname(names[100], 2.0)
            await storage.purge_hostname(names[100], removed_before=2.0)
    expected = [n for n in names if n != names[100]]
    assert seen == expected
    assert [e.hostname for e in await storage.list_hostnames(limit=1)] == ["a-before.example.com"]


async def test_invalid_limit_and_hostname_keys_are_refused(storage: Storage) -> None:
    with pytest.raises(ValueError):
        await storage.list_hostnames(limit=0)
    with pytest.raises(ValueError):
        await storage.get_hostname("../evil")
    with pytest.raises(ValueError):
        await storage.add_hostname(_entry("a/b.example.com"))


async def test_hostname_changes_name_what_another_handle_changed(
    storage_factory: StorageFactory,
) -> None:
    writer, reader = storage_factory(), storage_factory()
    marker, names = await reader.hostname_changes(None)
    assert names is None  # first call: load everything
    marker, names = await reader.hostname_changes(marker)
    assert names == []
    await writer.add_hostname(_entry("d.example.com"))
    await writer.add_hostname(_entry("e.example.com"))
    await writer.remove_hostname("d.example.com", 7.0)
    marker, names = await reader.hostname_changes(marker)
    assert names is not None and set(names) == {"d.example.com", "e.example.com"}
    marker, names = await reader.hostname_changes(marker)
    assert names == []
    await writer.update_hostname(_entry("e.example.com", upstream="10.0.0.2:1"))
    _, names = await reader.hostname_changes(marker)
    assert names == ["e.example.com"]


async def test_add_hostnames_batch_keeps_live_entries_and_reports_each(
    storage_factory: StorageFactory,
) -> None:
    storage, reader = storage_factory(), storage_factory()
    marker, _ = await reader.hostname_changes(None)
    await storage.add_hostname(_entry("live.example.com", upstream="10.0.0.1:1"))
    await storage.add_hostname(_entry("gone.example.com"))
    await storage.remove_hostname("gone.example.com", 5.0)
    marker, _ = await reader.hostname_changes(marker)
    batch = [_entry("new.example.com"), _entry("live.example.com"), _entry("gone.example.com")]
    results = await storage.add_hostnames(batch)
    assert [created for _, created in results] == [True, False, True]
    assert results[1][0].upstream == "10.0.0.1:1"  # the live entry, not the batch's
    assert (await storage.get_hostname("gone.example.com")) == batch[2]
    _, names = await reader.hostname_changes(marker)
    assert names is not None and set(names) == {"new.example.com", "gone.example.com"}
    with pytest.raises(ValueError):
        await storage.add_hostnames([_entry("ok.example.com"), _entry("../x")])
    assert await storage.get_hostname("ok.example.com") is None  # refused whole


# -- event outbox ------------------------------------------------------------------------------


async def test_outbox_keeps_events_until_deleted_oldest_due_first(
    storage_factory: StorageFactory,
) -> None:
    writer, deliverer = storage_factory(), storage_factory()
    events = [OutboxEvent(f"{i:017d}-{'ab' * 8}", b'{"n": %d}' % i, float(i), 0, float(i))
              for i in (3, 1, 2)]  # fmt: skip
    for event in events:
        await writer.enqueue_event(event)
    await writer.enqueue_event(OutboxEvent(events[0].id, b"other", 9.0, 5, 9.0))  # id exists
    assert await deliverer.count_events() == 3
    due = await deliverer.due_events(now=10.0, limit=10)
    assert [e.body for e in due] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    assert [e.body for e in await deliverer.due_events(now=1.5, limit=10)] == [b'{"n": 1}']
    assert len(await deliverer.due_events(now=10.0, limit=2)) == 2
    first = due[0]
    await deliverer.update_event(OutboxEvent(first.id, first.body, first.created_at, 1, 50.0))
    assert [e.body for e in await deliverer.due_events(now=10.0, limit=10)] == [
        b'{"n": 2}', b'{"n": 3}'
    ]
    later = await deliverer.due_events(now=50.0, limit=10)
    assert later[0].attempts == 1 and later[0].next_attempt == 50.0
    await deliverer.delete_event(first.id)
    await deliverer.delete_event(first.id)  # idempotent
    assert await writer.count_events() == 2
    with pytest.raises(ValueError):
        await writer.enqueue_event(OutboxEvent("../x", b"", 1.0))


# -- next-action index -------------------------------------------------------------------------


async def test_due_names_are_the_due_ones_earliest_first(storage: Storage) -> None:
    now = 1_800_000_000.0
    await storage.set_due("later.example.test", now + 86400 * 30)
    await storage.set_due("b.example.test", now - 10)
    await storage.set_due("a.example.test", now - 7200)  # an older hour
    await storage.set_due("c.example.test", now)
    due = await storage.due_names(now, 100)
    assert [(e.name, e.at) for e in due] == [
        ("a.example.test", now - 7200),
        ("b.example.test", now - 10),
        ("c.example.test", now),
    ]
    assert [e.name for e in await storage.due_names(now, 2)] == ["a.example.test", "b.example.test"]
    assert await storage.due_names(now - 86400, 100) == []


async def test_a_new_time_replaces_the_old_one(storage: Storage) -> None:
    now = 1_800_000_000.0
    await storage.set_due("x.example.test", now - 5)
    await storage.set_due("x.example.test", now + 3 * 86400)  # renewed: due in days
    assert await storage.due_names(now, 100) == []
    await storage.set_due("x.example.test", now - 1)  # and back to due, in another hour
    assert [(e.name, e.at) for e in await storage.due_names(now, 100)] == [
        ("x.example.test", now - 1)
    ]
    assert await storage.scheduled_names() == ["x.example.test"]


async def test_clear_due_forgets_the_name(storage: Storage) -> None:
    now = 1_800_000_000.0
    await storage.set_due("gone.example.test", now - 5)
    await storage.set_due("kept.example.test", now + 5)
    await storage.clear_due("gone.example.test")
    await storage.clear_due("never.example.test")  # absent: not an error
    assert [e.name for e in await storage.due_names(now + 10, 100)] == ["kept.example.test"]
    assert await storage.scheduled_names() == ["kept.example.test"]


async def test_unscheduled_names_the_ones_without_a_time(storage: Storage) -> None:
    assert await storage.unscheduled(["a.example.test"]) == ["a.example.test"]  # empty index
    await storage.set_due("a.example.test", 1.0)
    await storage.set_due("c.example.test", 2.0)
    page = ["a.example.test", "b.example.test", "c.example.test", "d.example.test"]
    assert sorted(await storage.unscheduled(page)) == ["b.example.test", "d.example.test"]
    await storage.clear_due("c.example.test")
    assert sorted(await storage.unscheduled(page)) == [
        "b.example.test",
        "c.example.test",
        "d.example.test",
    ]
    assert await storage.unscheduled([]) == []


async def test_due_index_refuses_bad_names_and_limits(storage: Storage) -> None:
    with pytest.raises(ValueError):
        await storage.set_due("../escape", 1.0)
    await storage.set_due("a.example.test", 1.0)
    for bad in ("../escape", "a/b", "due/names", ""):
        with pytest.raises(ValueError):
            await storage.unscheduled(["a.example.test", bad])
    with pytest.raises(ValueError):
        await storage.due_names(1.0, 0)


async def test_two_instances_share_the_due_index(storage_factory: StorageFactory) -> None:
    a, b = storage_factory(), storage_factory()
    now = 1_800_000_000.0
    await a.set_due("shared.example.test", now - 1)
    assert [e.name for e in await b.due_names(now, 10)] == ["shared.example.test"]
    await b.set_due("shared.example.test", now + 86400)
    assert await a.due_names(now, 10) == []
