"""Optional storage features are declared on the protocol (``Storage.capabilities``), never
probed for with getattr: a backend that does not declare its upkeep or its change feed is
not asked for them, whatever methods it happens to have."""

from __future__ import annotations

import os
from pathlib import Path

from edgeproxy.certs.inventory import check_storage, clean_storage
from edgeproxy.storage import FileStorage, Storage
from edgeproxy.storage.base import Capabilities
from edgeproxy.storage.postgres import PostgresStorage
from testkit import postgres as pg
from testkit.postgres import PostgresDatabase

postgres_server = pg.postgres_server
postgres_database = pg.postgres_database


class Undeclared(FileStorage):
    """A FileStorage that declares no upkeep: its check/clean methods exist but are not its
    declared features, so nobody calls them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.capabilities = Capabilities()

    async def check(self) -> list[str]:
        raise AssertionError("check is not a declared feature: nobody may call it")

    async def clean(self, *, now: float | None = None) -> list[str]:
        raise AssertionError("clean is not a declared feature: nobody may call it")


async def declares(storage: Storage, *, change_feed: bool) -> None:
    """``storage`` keeps the protocol and declares its upkeep, and its change feed or none."""
    try:
        assert isinstance(storage, Storage)
        assert storage.capabilities.upkeep is storage
        assert storage.capabilities.change_feed is (storage if change_feed else None)
    finally:
        await storage.aclose()


async def test_file_storage_declares_its_upkeep_and_no_change_feed(tmp_path: Path) -> None:
    await declares(FileStorage(tmp_path), change_feed=False)


async def test_storage_check_and_clean_use_the_declared_upkeep_only(tmp_path: Path) -> None:
    declared, undeclared = FileStorage(tmp_path / "a"), Undeclared(tmp_path / "b")
    try:
        for storage in (declared, undeclared):
            await storage.put("misc/x.json", b"{}")
            os.chmod(storage.path_of("misc/x.json"), 0o666)
        loose = "is writable by group/others (mode 0666)"
        # The backend's own check (file modes) runs where it is declared, and only there.
        assert any(loose in p for p in await check_storage(declared))
        assert await check_storage(undeclared) == []
        # Clean: the generic part (leases, challenges, certificates) runs for both.
        assert await clean_storage(undeclared, 0.0) == []
        assert await clean_storage(declared, 0.0) == []
    finally:
        await declared.aclose()
        await undeclared.aclose()


async def test_postgres_storage_declares_upkeep_and_its_change_feed(
    postgres_database: PostgresDatabase,
) -> None:
    await declares(PostgresStorage(postgres_database.dsn), change_feed=True)
