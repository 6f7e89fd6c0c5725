"""The account-wide pause record: how long a CA's Retry-After pauses an account, which answers
pause it, and the record in storage shared by every process (real FileStorage in tmp; two
``AccountPauses`` on one storage are two replicas)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from edgeproxy import metrics
from edgeproxy.acme.messages import parse_retry_after, problem_from_response
from edgeproxy.admin.app import make_admin_app
from edgeproxy.errors import StorageError
from edgeproxy.issuers.account_pause import (
    DEFAULT_PAUSE,
    MAX_PAUSE,
    MIN_PAUSE,
    RATE_LIMITED,
    AccountPause,
    AccountPauses,
    PauseRecordError,
    pause_key,
    pause_seconds,
    pauses_account,
)
from edgeproxy.storage.file import FileStorage

CA = "https://ca.example.test:14000/dir"
OTHER = "https://other-ca.example.test/directory"
NOW = datetime(2026, 12, 6, 21, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW.timestamp()

    def __call__(self) -> float:
        return self.now


def gauge(label: str) -> float:
    return metrics.ACME_ACCOUNT_PAUSED.labels(label)._value.get()


def pauses(storage: FileStorage, clock: Clock, *, cache: float = 3.0) -> AccountPauses:
    p = AccountPauses(storage, clock=clock, monotonic=clock, cache_seconds=cache)
    p.watch(CA, "ca1")
    return p


# ---------------------------------------------------------------- how long, and when


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),  # delta-seconds
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),  # IMF-fixdate
        ("Sunday, 06-Dec-26 21:01:30 GMT", 90.0),  # obsolete RFC 850 form (RFC 9110 s5.6.7)
        ("Sun Dec  6 21:01:30 2026", 90.0),  # asctime form
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), MIN_PAUSE),  # date passed
        ("0", MIN_PAUSE),
        ("31536000", MAX_PAUSE),  # a year: a confused CA, capped at a day
        ("9" * 15, MAX_PAUSE),
        ("9" * 16, DEFAULT_PAUSE),  # beyond any date: garbage
        ("-5", DEFAULT_PAUSE),  # not delta-seconds (RFC 9110: 1*DIGIT)
        ("soon", DEFAULT_PAUSE),
        ("", DEFAULT_PAUSE),
        (None, DEFAULT_PAUSE),  # no Retry-After at all
    ],
)
def test_pause_length_from_retry_after_in_both_forms(header: str | None, seconds: float) -> None:
    assert pause_seconds(parse_retry_after(header, NOW)) == seconds


def test_pause_length_refuses_nan() -> None:
    assert pause_seconds(math.nan) == DEFAULT_PAUSE


def test_rate_limited_at_any_status_and_503_with_retry_after_pause_the_account() -> None:
    assert pauses_account(RATE_LIMITED, 429, 60.0)
    assert pauses_account(RATE_LIMITED, 403, None)  # any status, Retry-After or not
    assert pauses_account("about:blank", 503, 30.0)  # a proxy's HTML 503 with Retry-After
    assert not pauses_account("about:blank", 503, None)  # 503 alone: a blip, per-name backoff
    assert not pauses_account("urn:ietf:params:acme:error:serverInternal", 500, 30.0)
    assert not pauses_account("urn:ietf:params:acme:error:unauthorized", 403, 60.0)


def test_problem_responses_reach_the_decision_with_status_and_retry_after() -> None:
    body = b'{"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many"}'
    p = problem_from_response(429, {"Retry-After": "7"}, body)
    assert pauses_account(p.type, p.status, p.retry_after) and p.retry_after == 7.0
    html = problem_from_response(503, {"retry-after": "30"}, b"<html>busy</html>")
    assert pauses_account(html.type, html.status, html.retry_after)


# ---------------------------------------------------------------- the record in storage


async def test_a_pause_recorded_by_one_replica_holds_the_others_and_a_restart(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    a, b = pauses(storage, clock), pauses(storage, clock)
    assert await b.current(CA) is None and gauge("ca1") == 0
    got = await a.record(CA, reason=RATE_LIMITED, detail="slow down", retry_after=7.0)
    assert got.until == clock.now + 7.0 and got.label == "ca1"
    assert await storage.get(pause_key(CA)) is not None
    # b read "not paused" a moment ago: its cache may say so for cache_seconds, the lease
    # path (fresh) never does.
    assert await b.current(CA) is None
    seen = await b.current(CA, fresh=True)
    assert seen == got and gauge("ca1") == 1
    restarted = pauses(storage, clock)
    assert await restarted.current(CA) == got
    assert await restarted.blocking() == got
    clock.now += 7.0
    assert await restarted.current(CA) is None and gauge("ca1") == 0
    assert await restarted.blocking() is None


async def test_the_cache_is_reread_after_cache_seconds(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    a, b = pauses(storage, clock), pauses(storage, clock)
    assert await b.current(CA) is None
    await a.record(CA, reason=RATE_LIMITED, detail="", retry_after=60.0)
    clock.now += 3.0
    assert await b.current(CA) is not None


async def test_a_shorter_retry_after_never_cuts_a_longer_pause_short(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    a, b = pauses(storage, clock), pauses(storage, clock)
    long = await a.record(CA, reason=RATE_LIMITED, detail="hour", retry_after=3600.0)
    short = await b.record(CA, reason=RATE_LIMITED, detail="minute", retry_after=60.0)
    assert short == long
    assert await pauses(storage, clock).current(CA) == long
    longer = await b.record(CA, reason=RATE_LIMITED, detail="two", retry_after=7200.0)
    assert await pauses(storage, clock).current(CA) == longer


async def test_blocking_only_when_every_account_is_paused(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    p = pauses(storage, clock)
    p.watch(OTHER, "ca2")
    first = await p.record(CA, reason=RATE_LIMITED, detail="", retry_after=600.0)
    assert await p.blocking() is None  # the second CA still takes orders
    await p.record(OTHER, reason="about:blank", detail="503", retry_after=900.0)
    assert await p.blocking() == first  # the one ending first
    assert {x.label for x in await p.active()} == {"ca1", "ca2"}


async def test_no_account_watched_never_blocks(tmp_path: Path) -> None:
    p = AccountPauses(FileStorage(tmp_path / "state"))
    assert await p.blocking(fresh=True) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"directory": "x", "label": "ca1", "since": 1, "until": "soon", "reason": "r"}',
        b'{"directory": "x", "label": "ca1", "since": 1, "until": NaN, "reason": "r"}',
        b"[" * 100_000,
    ],
)
async def test_a_corrupt_record_is_a_clear_error_not_a_crash(
    tmp_path: Path, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    key = pause_key(CA)
    with pytest.raises(PauseRecordError, match=f"{key}.*delete it"):
        AccountPause.from_json(raw, key)
    storage = FileStorage(tmp_path / "state")
    await storage.put(key, raw)
    clock = Clock()
    p = pauses(storage, clock)
    with caplog.at_level(logging.ERROR, logger="edgeproxy.acme"):
        assert await p.current(CA, fresh=True) is None
        assert await p.current(CA, fresh=True) is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and key in errors[0].getMessage()  # once, naming the record
    # The next rateLimited replaces it with a readable record.
    got = await p.record(CA, reason=RATE_LIMITED, detail="", retry_after=5.0)
    assert await pauses(storage, clock).current(CA) == got


class FlakyStorage(FileStorage):
    down = False

    async def get(self, key: str) -> bytes | None:
        if self.down:
            raise StorageError("database unavailable")
        return await super().get(key)


async def test_storage_trouble_keeps_the_last_known_answer(tmp_path: Path) -> None:
    storage = FlakyStorage(tmp_path / "state")
    clock = Clock()
    p = pauses(storage, clock)
    got = await p.record(CA, reason=RATE_LIMITED, detail="", retry_after=60.0)
    storage.down = True
    assert await p.current(CA, fresh=True) == got  # still paused: a blip is not the end
    other = pauses(storage, clock)
    assert await other.current(CA, fresh=True) is None  # and a blip invents no pause


# ---------------------------------------------------------------- the admin API's view


@dataclass
class AdminRuntime:
    """The admin app reads only storage for /v1/acme/accounts."""

    storage: FileStorage
    certs: object = None
    proxy: object = None


async def test_admin_api_lists_every_accounts_pause_from_storage(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "state")
    clock = Clock()
    clock.now = time.time()
    p = pauses(storage, clock)
    p.watch(OTHER, "ca2")
    await p.record(CA, reason=RATE_LIMITED, detail="slow down", retry_after=120.0)
    clock.now -= 3600  # a pause recorded an hour ago, long over
    await p.record(OTHER, reason="about:blank", detail="busy", retry_after=60.0)
    await storage.put("acme/pause/broken-0123456789ab.json", b"{not json")
    app = make_admin_app(AdminRuntime(storage), token=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9901") as c:
        r = await c.get("/v1/acme/accounts")
    assert r.status_code == 200, r.text
    by_label = {a.get("label", "broken"): a for a in r.json()["accounts"]}
    assert by_label["ca1"]["paused"] is True and by_label["ca1"]["directory"] == CA
    assert by_label["ca1"]["reason"] == RATE_LIMITED and by_label["ca1"]["until_iso"]
    assert by_label["ca2"]["paused"] is False  # over: listed, not in force
    assert "unreadable" in by_label["broken"]["error"]  # named, not a 500
