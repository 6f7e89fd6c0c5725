"""``clean_storage`` (``edgeproxy storage clean``) never deletes a certificate that is still valid.

Issue 21, finding 11: ``storage clean --grace-days -60`` deleted three valid certificates. The
guard lives where the deletion happens (``clean_storage``), so it holds whatever a caller
passes; the CLI refusing the option is checked in ``tests/integration/test_cli.py``. Run on both
backends (PostgreSQL: a real throwaway server, ``testkit/postgres.py``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeproxy.certs import inventory
from edgeproxy.certs.inventory import clean_storage
from edgeproxy.certs.record import CertRecord, cert_key
from edgeproxy.certs.status_store import status_key
from edgeproxy.storage import FileStorage, Storage
from edgeproxy.storage.postgres import PostgresStorage
from testkit import postgres as pg
from testkit.certrecords import cert_record

postgres_server = pg.postgres_server
postgres_database = pg.postgres_database
postgres_dsn = pg.postgres_dsn

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
DAY = 86400.0


def record(name: str, not_after: dt.datetime) -> CertRecord:
    return cert_record(name, not_after, issued_at=NOW.timestamp())


@pytest.fixture(params=["file", "postgres"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    st: Storage
    if request.param == "postgres":
        st = PostgresStorage(request.getfixturevalue("postgres_dsn"))
    else:
        st = FileStorage(tmp_path / "store")
    try:
        yield st
    finally:
        await st.aclose()


async def stored(storage: Storage, *records: CertRecord) -> None:
    for rec in records:
        await storage.put(cert_key(rec.name), rec.to_json(), secret=True)
        await storage.put(status_key(rec.name), b'{"name": "%s"}' % rec.name.encode())


async def cert_names(storage: Storage) -> set[str]:
    return {item.key for item in await storage.list("certs/")}


@pytest.fixture
async def fleet(storage: Storage) -> dict[str, CertRecord]:
    recs = {
        "valid-long": record("valid-long.example", NOW + dt.timedelta(days=60)),
        "valid-soon": record("valid-soon.example", NOW + dt.timedelta(minutes=5)),
        "expired-recently": record("expired-recently.example", NOW - dt.timedelta(days=2)),
        "expired-long-ago": record("expired-long-ago.example", NOW - dt.timedelta(days=90)),
    }
    await stored(storage, *recs.values())
    return recs


async def test_clean_removes_only_certificates_expired_beyond_the_grace(
    storage: Storage, fleet: dict[str, CertRecord]
) -> None:
    removed = await clean_storage(storage, 30 * DAY, now=NOW.timestamp())
    assert await cert_names(storage) == {
        cert_key(fleet[k].name) for k in ("valid-long", "valid-soon", "expired-recently")
    }
    assert [r for r in removed if r.startswith("certs/")] == [
        f"{cert_key('expired-long-ago.example')} (expired {(NOW - dt.timedelta(days=90)):%Y-%m-%d})"
    ]
    assert await storage.get(status_key("expired-long-ago.example")) is None
    assert await storage.get(status_key("valid-long.example")) is not None


async def test_zero_grace_removes_expired_but_keeps_every_valid_certificate(
    storage: Storage, fleet: dict[str, CertRecord]
) -> None:
    await clean_storage(storage, 0.0, now=NOW.timestamp())
    assert await cert_names(storage) == {
        cert_key(fleet[k].name) for k in ("valid-long", "valid-soon")
    }


@pytest.mark.parametrize("grace", [-60 * DAY, -1.0, -math.inf, math.nan, 3651 * DAY, math.inf])
async def test_absurd_grace_is_refused_and_nothing_is_removed(
    storage: Storage, fleet: dict[str, CertRecord], grace: float
) -> None:
    before = await cert_names(storage)
    with pytest.raises(ValueError, match="grace"):
        await clean_storage(storage, grace, now=NOW.timestamp())
    assert await cert_names(storage) == before == {cert_key(r.name) for r in fleet.values()}


async def test_a_certificate_is_kept_until_its_not_after_has_passed(storage: Storage) -> None:
    almost = record("almost.example", NOW + dt.timedelta(seconds=1))
    await stored(storage, almost)
    await clean_storage(storage, 0.0, now=NOW.timestamp())
    assert await cert_names(storage) == {cert_key("almost.example")}
    await clean_storage(storage, 0.0, now=NOW.timestamp() + 2)
    assert await cert_names(storage) == set()


async def test_valid_certificates_stay_even_if_a_negative_grace_got_past_the_check(
    storage: Storage, fleet: dict[str, CertRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second line of defence: the deletion itself compares not_after with now, so a grace
    # check that is ever loosened or bypassed still cannot delete a valid certificate.
    monkeypatch.setattr(inventory, "check_grace", lambda grace: grace)
    await clean_storage(storage, -60 * DAY, now=NOW.timestamp())
    assert await cert_names(storage) == {
        cert_key(fleet[k].name) for k in ("valid-long", "valid-soon")
    }
