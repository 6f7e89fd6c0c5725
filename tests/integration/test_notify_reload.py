"""A renewal stored by one process reaches another process's cache through PostgreSQL
LISTEN/NOTIFY, not through its (here: hourly) maintenance pass."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from edgeproxy.certs.manager import CertificateManager
from edgeproxy.certs.policy import OnDemandPolicy
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.issuers.internal import InternalIssuer
from edgeproxy.storage.postgres import PostgresStorage
from testkit import postgres as pg

postgres_server = pg.postgres_server
postgres_database = pg.postgres_database
postgres_dsn = pg.postgres_dsn


@pytest.fixture
async def two_storages(postgres_dsn: str) -> AsyncIterator[tuple[PostgresStorage, PostgresStorage]]:
    a, b = PostgresStorage(postgres_dsn), PostgresStorage(postgres_dsn)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_renewal_elsewhere_swaps_the_cached_context_via_notify(
    two_storages: tuple[PostgresStorage, PostgresStorage], nursery: trio.Nursery
) -> None:
    sa, sb = two_storages
    issuer = InternalIssuer(sa)
    policy = OnDemandPolicy(allow=["*.example.test"])
    # Maintenance passes an hour apart: only the notification can explain a fast swap.
    serving = CertificateManager(storage=sb, issuer=InternalIssuer(sb), policy=policy, renew_interval=3600)
    renewing = CertificateManager(storage=sa, issuer=issuer, policy=policy, renew_interval=3600)
    await nursery.start(serving.run)
    await nursery.start(renewing.run)
    sb.on_change(serving.on_storage_change)
    await serving.maintenance_once()  # the hourly loop's first pass is behind us
    before = await serving.context_for("notify.example.test")
    old = CertRecord.from_json((await sa.get(cert_key("notify.example.test"))) or b"")
    new = await renewing.obtain("notify.example.test", old=old, force=True)
    assert new is not None and new.serial != old.serial
    with trio.fail_after(10):
        while serving.cached_context("notify.example.test") is before:
            await trio.sleep(0.05)
