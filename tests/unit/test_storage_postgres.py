"""``PostgresStorage`` beyond the generic contract, against a real PostgreSQL server.

The backend-generic behaviour lives in ``test_storage_conformance.py`` (run against PostgreSQL too);
these are the things only a shared database has: encryption at rest checked against the raw rows,
change notifications between instances, the database going away and coming back, and schema
migrations racing each other. Raw rows are read with ``psql``, never through the code under test.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio

from edgeproxy.errors import CorruptRecord, StorageError
from edgeproxy.storage import HostnameEntry, LockInfo, Storage
from edgeproxy.storage.postgres import MIGRATIONS, PostgresStorage, generate_encryption_key
from testkit import postgres as pg
from testkit.ports import free_port
from testkit.postgres import (
    PostgresDatabase,
    PostgresServer,
    postgres_available,
    running_postgres,
)

# The shared fixtures: one server for this module, a fresh database per test.
postgres_server = pg.postgres_server
postgres_database = pg.postgres_database

# Safety nets on waits (real seconds), never timing assertions.
DEADLINE = 30.0
PEM_KEY = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgVeryPrivateBytes\n"
    b"-----END PRIVATE KEY-----\n"
)
PASSWORD = "hunter2-do-not-log"

Opener = Callable[..., PostgresStorage]


@pytest.fixture
async def open_storage(postgres_database: PostgresDatabase) -> AsyncIterator[Opener]:
    """``open_storage(**kwargs)``: instances on the test's database, all closed at teardown."""
    opened: list[PostgresStorage] = []

    def open_(dsn: str | None = None, **kwargs: Any) -> PostgresStorage:
        storage = PostgresStorage(dsn or postgres_database.dsn, **kwargs)
        opened.append(storage)
        return storage

    yield open_
    for storage in opened:
        await storage.aclose()


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of the test's own, for tests that stop it; stopped at teardown, pass or fail."""
    if not postgres_available():
        pytest.skip("PostgreSQL server binaries are not installed")
    with running_postgres() as server:
        yield server


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (state changed by other threads and processes: no event to wait on)."""
    with trio.move_on_after(DEADLINE):
        while not predicate():
            await trio.sleep(0.02)
        return
    pytest.fail(f"gave up waiting: {what}")


def test_postgres_storage_implements_the_protocol() -> None:
    storage = PostgresStorage("host=127.0.0.1 dbname=x")  # connects only on first use
    assert isinstance(storage, Storage)


# -- encryption at rest ------------------------------------------------------------------------


async def test_secret_values_are_encrypted_in_the_table_and_read_back_plain(
    open_storage: Opener, postgres_database: PostgresDatabase
) -> None:
    key = generate_encryption_key()
    storage = open_storage(encryption_key=key)
    await storage.put("certs/a.example.json", PEM_KEY, secret=True)
    assert await storage.get("certs/a.example.json") == PEM_KEY

    raw_hex = postgres_database.sql(
        "SELECT encode(value, 'hex') FROM edgeproxy_values WHERE key = 'certs/a.example.json'"
    )
    raw = bytes.fromhex(raw_hex)
    assert b"PRIVATE KEY" not in raw
    assert b"VeryPrivateBytes" not in raw
    assert len(raw) == 1 + 8 + 12 + len(PEM_KEY) + 16  # version, key id, nonce, ct, tag
    flags = postgres_database.sql("SELECT secret, encrypted, size FROM edgeproxy_values")
    assert flags == f"t|t|{len(PEM_KEY)}"
    # list reports the size of the value, not of the ciphertext
    assert [(i.key, i.size) for i in await storage.list()] == [
        ("certs/a.example.json", len(PEM_KEY))
    ]
    # Two puts of the same value never give the same bytes (fresh nonce each time).
    await storage.put("certs/a.example.json", PEM_KEY, secret=True)
    again = postgres_database.sql(
        "SELECT encode(value, 'hex') FROM edgeproxy_values WHERE key = 'certs/a.example.json'"
    )
    assert again != raw_hex


async def test_non_secret_values_are_stored_plain_even_with_a_key(
    open_storage: Opener, postgres_database: PostgresDatabase
) -> None:
    storage = open_storage(encryption_key=generate_encryption_key())
    await storage.put("certs/a.example/chain.pem", b"-----BEGIN CERTIFICATE-----\n")
    raw_hex = postgres_database.sql("SELECT encode(value, 'hex') FROM edgeproxy_values")
    assert bytes.fromhex(raw_hex) == b"-----BEGIN CERTIFICATE-----\n"
    assert postgres_database.sql("SELECT secret, encrypted FROM edgeproxy_values") == "f|f"


async def test_a_wrong_key_gives_corrupt_record_naming_the_cause(open_storage: Opener) -> None:
    writer = open_storage(encryption_key=generate_encryption_key())
    await writer.put("certs/a.example.json", PEM_KEY, secret=True)

    wrong = open_storage(encryption_key=generate_encryption_key())
    with pytest.raises(CorruptRecord, match=r"another key .*wrong encryption key\?"):
        await wrong.get("certs/a.example.json")

    keyless = open_storage()
    with pytest.raises(CorruptRecord, match="no encryption key is configured"):
        await keyless.get("certs/a.example.json")
    assert await keyless.check() == [
        "1 values are encrypted at rest but no encryption key is configured: they cannot be read"
    ]


async def test_a_row_copied_under_another_key_or_altered_fails_to_decrypt(
    open_storage: Opener, postgres_database: PostgresDatabase
) -> None:
    storage = open_storage(encryption_key=generate_encryption_key())
    await storage.put("certs/victim.example.json", PEM_KEY, secret=True)
    await storage.put("certs/attacker.example.json", b"whatever", secret=True)
    # Someone with write access to the table swaps a ciphertext into another row.
    postgres_database.sql(
        "UPDATE edgeproxy_values SET value = (SELECT value FROM edgeproxy_values "
        "WHERE key = 'certs/victim.example.json') WHERE key = 'certs/attacker.example.json'"
    )
    with pytest.raises(CorruptRecord, match="failed to decrypt"):
        await storage.get("certs/attacker.example.json")
    # A flipped bit in the ciphertext is caught by the GCM tag.
    postgres_database.sql(
        "UPDATE edgeproxy_values SET value = set_byte(value, 30, get_byte(value, 30) # 1) "
        "WHERE key = 'certs/victim.example.json'"
    )
    with pytest.raises(CorruptRecord, match="failed to decrypt"):
        await storage.get("certs/victim.example.json")
    # A truncated row says so.
    postgres_database.sql(
        "UPDATE edgeproxy_values SET value = substring(value FROM 1 FOR 20) "
        "WHERE key = 'certs/victim.example.json'"
    )
    with pytest.raises(CorruptRecord, match="truncated or of unknown format"):
        await storage.get("certs/victim.example.json")


async def test_secrets_stored_before_a_key_existed_stay_readable_and_are_reported(
    open_storage: Opener,
) -> None:
    await open_storage().put("certs/old.example.json", PEM_KEY, secret=True)
    storage = open_storage(encryption_key=generate_encryption_key())
    assert await storage.get("certs/old.example.json") == PEM_KEY
    assert await storage.check() == [
        "secret value 'certs/old.example.json' is stored unencrypted (store it again to encrypt it)"
    ]
    await storage.put("certs/old.example.json", PEM_KEY, secret=True)
    assert await storage.check() == []

    other = open_storage(encryption_key=generate_encryption_key())
    problems = await other.check()
    assert len(problems) == 1
    assert problems[0].startswith("secret value 'certs/old.example.json' is encrypted with another")


async def test_quarantine_keeps_an_encrypted_value_encrypted(
    open_storage: Opener, postgres_database: PostgresDatabase
) -> None:
    storage = open_storage(encryption_key=generate_encryption_key())
    await storage.put("certs/bad.example.json", PEM_KEY, secret=True)
    await storage.quarantine("certs/bad.example.json", "does not parse")
    assert await storage.get("certs/bad.example.json") is None
    row = postgres_database.sql(
        "SELECT key, reason, encrypted, encode(value, 'hex') FROM edgeproxy_quarantine"
    )
    key, reason, encrypted, raw_hex = row.split("|")
    assert (key, reason, encrypted) == ("certs/bad.example.json", "does not parse", "t")
    assert b"PRIVATE KEY" not in bytes.fromhex(raw_hex)


@pytest.mark.parametrize("bad", ["", "c2hvcnQ", "not base64 at all!", "A" * 64])
def test_an_invalid_encryption_key_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(ValueError, match="32 random bytes, base64url") as caught:
        PostgresStorage("host=127.0.0.1 dbname=x", encryption_key=bad)
    assert not bad or bad not in str(caught.value)


def test_generated_keys_are_accepted_and_differ() -> None:
    first, second = generate_encryption_key(), generate_encryption_key()
    assert first != second
    PostgresStorage("host=127.0.0.1 dbname=x", encryption_key=first)
    PostgresStorage("host=127.0.0.1 dbname=x", encryption_key=first + "=")  # padding is fine


# -- change notifications ----------------------------------------------------------------------


async def test_changes_under_certs_reach_another_instance_but_not_the_writer(
    open_storage: Opener,
) -> None:
    writer, listener = open_storage(), open_storage()
    heard_by_listener: list[str] = []
    heard_by_writer: list[str] = []
    listener.on_change(heard_by_listener.append)
    writer.on_change(heard_by_writer.append)
    await wait_until(lambda: listener.listening and writer.listening, "listeners subscribed")

    await writer.put("certs/a.example.json", b"renewed", secret=True)
    await writer.put("acme/account.json", b"{}")  # not under certs/: nobody is told
    await listener.put("certs/own.example.json", b"mine")  # the listener's own write
    await writer.put("certs/b.example.json", b"b")
    await writer.delete("certs/b.example.json")
    await writer.delete("certs/never.example.json")  # nothing removed: nothing to tell
    await writer.quarantine("certs/a.example.json", "bad")
    await writer.put("certs/marker.json", b"last")
    # Notifications arrive in commit order, so once the marker is in, everything before it is.
    await wait_until(lambda: "certs/marker.json" in heard_by_listener, "marker notification")
    assert heard_by_listener == [
        "certs/a.example.json",
        "certs/b.example.json",
        "certs/b.example.json",
        "certs/a.example.json",
        "certs/marker.json",
    ]
    await wait_until(lambda: heard_by_writer == ["certs/own.example.json"], "writer hears listener")


async def test_callbacks_run_on_the_trio_thread_and_one_failing_spares_the_others(
    open_storage: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    writer, listener = open_storage(), open_storage()
    trio_thread = threading.get_ident()
    calls: list[tuple[str, bool]] = []

    def broken(key: str) -> None:
        raise RuntimeError("callback bug")

    def record(key: str) -> None:
        trio.lowlevel.current_task()  # raises outside trio
        calls.append((key, threading.get_ident() == trio_thread))

    listener.on_change(broken)
    listener.on_change(record)
    await wait_until(lambda: listener.listening, "listener subscribed")
    with caplog.at_level(logging.ERROR, logger="edgeproxy.storage.postgres"):
        await writer.put("certs/one.json", b"1")
        await writer.put("certs/two.json", b"2")
        await wait_until(lambda: len(calls) == 2, "both notifications")
    assert calls == [("certs/one.json", True), ("certs/two.json", True)]
    assert sum("on_change callback" in r.getMessage() for r in caplog.records) == 2


async def test_changes_missed_while_the_listener_was_cut_off_are_replayed(
    open_storage: Opener, postgres_database: PostgresDatabase, postgres_server: PostgresServer
) -> None:
    writer, listener = open_storage(), open_storage()
    heard: list[str] = []
    listener.on_change(heard.append)
    await wait_until(lambda: listener.listening, "listener subscribed")
    await writer.put("certs/before.json", b"1")
    await wait_until(lambda: heard == ["certs/before.json"], "first notification")

    # Refuse new connections to the database, then cut the listener's: it cannot come back
    # until we allow it, so what the writer (on its pooled connection) stores meanwhile can
    # only reach the listener through the replay.
    name = postgres_database.name
    postgres_server.psql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        postgres_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND application_name = 'edgeproxy-listener'"
        )
        await wait_until(lambda: not listener.listening, "listener cut off")
        await writer.put("certs/missed.json", b"2")
        await writer.put("acme/missed.json", b"not a cert")
    finally:
        postgres_server.psql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    await wait_until(lambda: "certs/missed.json" in heard, "replayed notification")
    await writer.put("certs/after.json", b"3")
    await wait_until(lambda: "certs/after.json" in heard, "live notification after reconnect")
    assert heard == ["certs/before.json", "certs/missed.json", "certs/after.json"]


async def test_aclose_stops_the_listener_thread(open_storage: Opener) -> None:
    storage = open_storage()
    storage.on_change(lambda key: None)
    await wait_until(lambda: storage.listening, "listener subscribed")
    await storage.aclose()
    names = [thread.name for thread in threading.enumerate()]
    assert "edgeproxy-storage-listener" not in names
    with pytest.raises(StorageError, match="closed"):
        await storage.get("certs/a.json")
    with pytest.raises(StorageError, match="after aclose"):
        storage.on_change(lambda key: None)


# -- the database goes away and comes back -----------------------------------------------------


async def test_an_outage_fails_fast_and_the_same_instance_recovers(
    own_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = own_server.create_database("edge") + f" password={PASSWORD}"
    storage = PostgresStorage(dsn, timeout=1.0)
    watcher = PostgresStorage(dsn, timeout=1.0)
    heard: list[str] = []
    try:
        caplog.set_level(logging.DEBUG)
        watcher.on_change(heard.append)
        await wait_until(lambda: watcher.listening, "listener subscribed")
        await storage.put("certs/a.json", b"before")
        await wait_until(lambda: heard == ["certs/a.json"], "notification before the outage")

        own_server.stop()
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: storage.get("certs/a.json"),
            lambda: storage.try_lock("n", "me", 30),  # an error, never a quiet "not won"
        ]
        for attempt in attempts:
            with trio.fail_after(DEADLINE), pytest.raises(StorageError) as caught:
                await attempt()
            message = str(caught.value)
            assert message.startswith("postgres storage: ")
            assert "Connection refused" in message  # the cause, not only "timed out"
            assert f"port={own_server.port} dbname=edge" in message
            assert PASSWORD not in message
        await wait_until(lambda: not watcher.listening, "listener noticed the outage")

        own_server.start()
        with trio.fail_after(DEADLINE):
            while True:
                try:
                    value = await storage.get("certs/a.json")
                    break
                except StorageError:
                    await trio.sleep(0.1)  # the pool reconnects in the background
        assert value == b"before"
        assert await storage.try_lock("n", "me", 30)
        await wait_until(lambda: watcher.listening, "listener reconnected")
        await storage.put("certs/a.json", b"after")
        await wait_until(lambda: heard == ["certs/a.json"] * 2, "notification after restart")
    finally:
        await storage.aclose()
        await watcher.aclose()
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)
    assert PASSWORD not in repr(storage)


async def test_an_unreachable_database_fails_with_storage_error_and_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x user=u password={PASSWORD}"
    storage = PostgresStorage(dsn, timeout=1.0)
    caplog.set_level(logging.DEBUG)
    try:
        with trio.fail_after(DEADLINE), pytest.raises(StorageError, match="put failed") as caught:
            await storage.put("a", b"x")
    finally:
        await storage.aclose()
    assert PASSWORD not in str(caught.value)
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)


def test_an_invalid_dsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="invalid PostgreSQL DSN") as caught:
        PostgresStorage(f"host=127.0.0.1 password={PASSWORD} = broken")
    assert PASSWORD not in str(caught.value)


async def test_database_errors_become_storage_errors_naming_the_operation(
    open_storage: Opener, postgres_database: PostgresDatabase
) -> None:
    storage = open_storage()
    await storage.put("a", b"x")
    postgres_database.sql("DROP TABLE edgeproxy_values")
    with pytest.raises(StorageError, match=r"^postgres storage: get failed .*edgeproxy_values"):
        await storage.get("a")


# -- leases ------------------------------------------------------------------------------------


async def test_taking_over_an_expired_lease_is_logged(
    open_storage: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1_000.0]
    storage = open_storage(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="edgeproxy.storage.postgres"):
        assert await storage.try_lock("issue/x", "crashed", 10)
        assert await storage.try_lock("issue/x", "crashed", 10)  # its own again: no takeover
        now[0] += 25
        assert await storage.try_lock("issue/x", "next", 10)
    takeovers = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert takeovers == ["lock 'issue/x': took over the lease of 'crashed', which expired 15s ago"]
    assert await storage.lock_info("issue/x") == LockInfo("issue/x", "next", 1_035.0)


async def test_check_and_clean_handle_expired_leases_and_challenges(open_storage: Opener) -> None:
    now = [1_000.0]
    storage = open_storage(clock=lambda: now[0])
    assert await storage.try_lock("old", "a", 10)
    assert await storage.try_lock("live", "b", 100)
    await storage.put_challenge("old.example", "ka", 10)
    await storage.put_challenge("live.example", "kb", 100)
    assert await storage.check() == []
    now[0] += 50
    assert await storage.check() == [
        "expired lock 'old' held by 'a', expired 40s ago",
        "expired challenge for 'old.example'",
    ]
    assert await storage.clean() == ["expired lock 'old'", "expired challenge 'old.example'"]
    assert await storage.check() == []
    assert [i.name for i in await storage.list_locks()] == ["live"]
    assert [n for n, _ in await storage.list_challenges()] == ["live.example"]
    assert await storage.clean(now=now[0] + 100) == [
        "expired lock 'live'",
        "expired challenge 'live.example'",
    ]


# -- schema migrations -------------------------------------------------------------------------


async def test_instances_starting_together_on_an_empty_database_all_migrate(
    open_storage: Opener, postgres_database: PostgresDatabase
) -> None:
    instances = [open_storage() for _ in range(6)]
    versions: list[int] = []

    async def start(storage: PostgresStorage) -> None:
        versions.append(await storage.migrate())

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for storage in instances:
                nursery.start_soon(start, storage)
    assert versions == [len(MIGRATIONS)] * len(instances)
    assert postgres_database.sql("SELECT version FROM edgeproxy_schema_version") == str(
        len(MIGRATIONS)
    )
    # Idempotent: a later start changes nothing and keeps the data.
    await instances[0].put("k", b"v")
    assert await open_storage().migrate() == len(MIGRATIONS)
    assert await open_storage().get("k") == b"v"
    assert postgres_database.sql("SELECT count(*) FROM edgeproxy_schema_version") == "1"


class _UpgradedStorage(PostgresStorage):
    migrations = (*MIGRATIONS, "ALTER TABLE edgeproxy_values ADD COLUMN note text")


class _BrokenUpgradeStorage(PostgresStorage):
    # Two new scripts, the second failing: the first must not stay applied either.
    migrations = (
        *MIGRATIONS,
        "ALTER TABLE edgeproxy_values ADD COLUMN half_done text",
        "SELECT 1 / 0",
    )


async def test_upgrades_apply_only_new_migrations_and_old_code_keeps_working(
    open_storage: Opener, postgres_database: PostgresDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    old = open_storage()
    await old.put("k", b"v")
    upgraded = _UpgradedStorage(postgres_database.dsn)
    try:
        assert await upgraded.migrate() == len(MIGRATIONS) + 1
        assert await upgraded.get("k") == b"v"
    finally:
        await upgraded.aclose()
    assert (
        postgres_database.sql(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'note'"
        )
        == "1"
    )
    with caplog.at_level(logging.WARNING, logger="edgeproxy.storage.postgres"):
        older = open_storage()
        assert await older.get("k") == b"v"  # an older replica carries on during an upgrade
    assert any("newer than this edgeproxy" in r.getMessage() for r in caplog.records)
    assert await older.check() == [
        f"database schema version {len(MIGRATIONS) + 1} is newer than this edgeproxy knows "
        f"({len(MIGRATIONS)}): upgrade this replica"
    ]


async def test_a_failing_migration_leaves_nothing_half_done(
    open_storage: Opener, postgres_database: PostgresDatabase
) -> None:
    await open_storage().migrate()
    broken = _BrokenUpgradeStorage(postgres_database.dsn)
    try:
        with pytest.raises(StorageError, match="division by zero"):
            await broken.get("k")
    finally:
        await broken.aclose()
    assert postgres_database.sql("SELECT version FROM edgeproxy_schema_version") == str(
        len(MIGRATIONS)
    )
    assert (
        postgres_database.sql(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'half_done'"
        )
        == "0"
    )


async def test_hostname_paging_over_100000_entries_uses_the_index(
    open_storage: Opener, postgres_database: PostgresDatabase
) -> None:
    storage = open_storage()
    await storage.migrate()
    postgres_database.sql(
        "INSERT INTO edgeproxy_hostnames (hostname, upstream, metadata, created_at) "
        "SELECT 'h' || lpad(i::text, 6, '0') || '.example.com', NULL, '{}', 1 "
        "FROM generate_series(1, 100000) AS i; ANALYZE edgeproxy_hostnames"
    )
    plan = postgres_database.sql(
        "EXPLAIN SELECT hostname FROM edgeproxy_hostnames "
        "WHERE hostname > 'h050000.example.com' ORDER BY hostname LIMIT 1000"
    )
    assert "Index" in plan and "Sort" not in plan, plan
    count, after, previous = 0, None, ""
    while page := await storage.list_hostnames(after=after, limit=5000):
        assert page[0].hostname > previous
        count += len(page)
        after = previous = page[-1].hostname
    assert count == 100000


async def test_hostname_changes_are_announced_on_the_change_channel(
    open_storage: Opener,
) -> None:
    writer, listener = open_storage(), open_storage()
    heard: list[str] = []
    listener.on_change(heard.append)
    await wait_until(lambda: listener.listening, "listener subscribed")
    await writer.add_hostname(HostnameEntry("n.example.com", None, "{}", 1.0))
    await writer.remove_hostname("n.example.com", 2.0)
    await wait_until(lambda: len(heard) >= 2, "two notifications")
    assert heard == ["hostnames/n.example.com", "hostnames/n.example.com"]
