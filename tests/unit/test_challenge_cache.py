"""The "no pending challenge" cache: few storage reads for a flood, never a hidden challenge.

Real FileStorage under a counting wrapper; trio's MockClock drives the TTL (autojump: a sleep
passes at once in virtual time), so no test waits on the wall clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from edgeproxy.certs import challenges
from edgeproxy.certs.challenges import NEGATIVE_TTL, ChallengeResponder
from edgeproxy.errors import StorageError
from edgeproxy.storage.file import FileStorage

NAME = "probe.example.test"
KEY_AUTH = "token.thumbprint"


class CountingStorage(FileStorage):
    """The real file storage, counting challenge reads (and failing them on request)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []
        self.broken = False

    async def get_challenge(self, name: str) -> str | None:
        self.reads.append(name)
        if self.broken:
            raise StorageError("database down")
        return await super().get_challenge(name)


@pytest.fixture
def storage(tmp_path: Path) -> CountingStorage:
    return CountingStorage(tmp_path / "state")


async def test_a_flood_of_misses_costs_one_read_per_ttl(
    autojump_clock: trio.testing.MockClock, storage: CountingStorage
) -> None:
    responder = ChallengeResponder(storage)
    for _ in range(50):
        assert await responder.context_for(NAME) is None
    assert storage.reads == [NAME]
    await trio.sleep(NEGATIVE_TTL)
    for _ in range(50):
        assert await responder.context_for(NAME) is None
    assert storage.reads == [NAME, NAME]


async def test_concurrent_misses_share_one_read(storage: CountingStorage) -> None:
    responder = ChallengeResponder(storage)
    results = []

    async def hello() -> None:
        results.append(await responder.context_for(NAME))

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(hello)
    assert results == [None] * 20
    assert storage.reads == [NAME]


async def test_a_challenge_another_replica_presents_after_a_miss_is_answered(
    autojump_clock: trio.testing.MockClock, storage: CountingStorage
) -> None:
    here = ChallengeResponder(storage)
    other = ChallengeResponder(storage)  # another replica sharing the storage
    assert await here.context_for(NAME) is None  # a miss, now remembered
    t0 = trio.current_time()
    await other.present(NAME, "token", KEY_AUTH)
    # present returns only once every earlier miss has expired: the CA is told now.
    assert trio.current_time() - t0 >= NEGATIVE_TTL
    assert await here.context_for(NAME) is not None


async def test_a_challenge_written_behind_the_cache_shows_within_the_ttl(
    autojump_clock: trio.testing.MockClock, storage: CountingStorage
) -> None:
    here = ChallengeResponder(storage)
    assert await here.context_for(NAME) is None
    await storage.put_challenge(NAME, KEY_AUTH, 600)  # no present(): no wait either
    assert await here.context_for(NAME) is None  # the bound: hidden for at most the TTL ...
    await trio.sleep(NEGATIVE_TTL)
    assert await here.context_for(NAME) is not None  # ... and no longer


async def test_this_process_presenting_clears_its_miss_at_once(
    autojump_clock: trio.testing.MockClock, storage: CountingStorage
) -> None:
    responder = ChallengeResponder(storage)
    assert await responder.context_for(NAME) is None
    async with trio.open_nursery() as n:
        n.start_soon(responder.present, NAME, "token", KEY_AUTH)
        await trio.testing.wait_all_tasks_blocked()  # stored; present is still in its wait
        assert await responder.context_for(NAME) is not None


async def test_storage_errors_are_not_remembered_as_misses(
    autojump_clock: trio.testing.MockClock, storage: CountingStorage
) -> None:
    responder = ChallengeResponder(storage)
    storage.broken = True
    assert await responder.context_for(NAME) is None
    storage.broken = False
    await storage.put_challenge(NAME, KEY_AUTH, 600)
    assert await responder.context_for(NAME) is not None
    assert storage.reads == [NAME, NAME]


async def test_the_miss_cache_is_bounded(
    autojump_clock: trio.testing.MockClock,
    storage: CountingStorage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(challenges, "_MAX_NEGATIVE", 3)
    responder = ChallengeResponder(storage)
    names = [f"n{i}.example.test" for i in range(4)]
    for name in names:
        await responder.context_for(name)
    for name in names[1:]:
        await responder.context_for(name)  # remembered: no read
    assert len(storage.reads) == 4
    await responder.context_for(names[0])  # the oldest was dropped: read again
    assert len(storage.reads) == 5
