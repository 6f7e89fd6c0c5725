"""The status page's pure parts: keyset prefix search, sign-in sessions, per-name history.

The prefix cursor is checked as a property against a plain filter over random names (the
storage backends page in byte order, which ``sorted`` on ASCII matches); sessions against
forgery, expiry and another token; the history against its bound and against a corrupt record,
and the manager's writing of it against a real issuer that succeeds and one that fails.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.admin.ui import SESSION_TTL, session_valid, session_value
from edgeproxy.admin.ui_index import entry_state, prefix_start
from edgeproxy.certs import history
from edgeproxy.certs.status import DomainStatus
from edgeproxy.issuers.base import IssuanceError, IssuedCertificate, IssueRequest
from edgeproxy.reasons import Failure
from edgeproxy.storage.base import HostnameEntry
from testkit.managers import CountingIssuer, make_manager

LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=6)
NAME = st.lists(LABEL, min_size=1, max_size=3).map(".".join)


@given(st.lists(NAME, max_size=40, unique=True), st.text("abcxyz09.-_", min_size=1, max_size=4))
def test_prefix_cursor_finds_exactly_the_names_with_the_prefix(names: list[str], prefix: str) -> None:
    ordered = sorted(names)
    start = prefix_start(prefix)
    assert start is not None
    after = ordered[bisect.bisect_right(ordered, start) :]
    found = []
    for name in after:  # what the page does: read on until the first name without the prefix
        if not name.startswith(prefix):
            break
        found.append(name)
    assert found == [n for n in ordered if n.startswith(prefix)]


def test_no_prefix_means_from_the_start() -> None:
    assert prefix_start("") is None


def test_sessions_are_bound_to_the_token_and_expire() -> None:
    token, now = b"the-admin-token", 1_800_000_000.0
    value = session_value(token, int(now))
    assert session_valid(token, value, now)
    assert session_valid(token, value, now + SESSION_TTL - 1)
    assert not session_valid(token, value, now + SESSION_TTL + 1)  # expired
    assert not session_valid(b"a-rotated-token", value, now)  # token changed: signed out
    issued, _, mac = value.partition(".")
    assert not session_valid(token, f"{int(issued) + 100}.{mac}", now)  # time moved, same MAC
    assert not session_valid(token, session_value(token, int(now) + 3600), now)  # from the future
    assert not session_valid(token, f"{issued}.{'0' * len(mac)}", now)
    for junk in ("", ".", "abc.def", f"{issued}", "1e9.00", "-1.00"):
        assert not session_valid(token, junk, now)
    assert b"the-admin-token" not in value.encode()


def test_history_keeps_the_newest_attempts_only() -> None:
    raw = None
    for i in range(history.LIMIT + 5):
        raw = history.appended(raw, history.Attempt(float(i), "issue", "failed", "t", f"#{i}"))
    kept = history.parse(raw)
    assert len(kept) == history.LIMIT
    assert [a.detail for a in kept[:2]] == [f"#{history.LIMIT + 4}", f"#{history.LIMIT + 3}"]
    for corrupt in (b"{", b"{}", b"[1, 2]", b'[{"at": 1}]', b"null"):
        assert history.parse(corrupt) == []
    # A record from a newer version with more fields still reads.
    assert history.parse(b'[{"at": 1, "kind": "renew", "outcome": "renewed", "new": 1}]') == [
        history.Attempt(1, "renew", "renewed")
    ]


class FailingIssuer(CountingIssuer):
    async def issue(self, request: IssueRequest) -> IssuedCertificate:
        raise IssuanceError(Failure.problem("urn:ietf:params:acme:error:rejectedIdentifier", "not this one"))


async def test_the_manager_records_each_attempt(tmp_path: Path, nursery: trio.Nursery) -> None:
    mgr, storage, _ = make_manager(tmp_path)
    await nursery.start(mgr.run)
    assert await mgr.obtain("ok.example.test") is not None
    assert await mgr.obtain("ok.example.test", force=True) is not None
    got = await history.read_history(storage, "ok.example.test")
    assert [(a.kind, a.outcome) for a in got] == [("issue", "issued"), ("issue", "issued")]

    mgr.issuer = FailingIssuer(storage)
    assert await mgr.obtain("no.example.test") is None
    (failed,) = await history.read_history(storage, "no.example.test")
    assert (failed.outcome, failed.error_type, failed.detail) == (
        "failed",
        "urn:ietf:params:acme:error:rejectedIdentifier",
        "not this one",
    )
    assert failed.hint is not None and "will not issue" in failed.hint


def test_entry_state_follows_the_status() -> None:
    live = HostnameEntry("a.example.test", None, "{}", 1.0)
    gone = HostnameEntry("a.example.test", None, "{}", 1.0, removed_at=2.0)
    valid = DomainStatus("a.example.test", "valid", not_after=100.0)
    assert entry_state(gone, valid, 50.0) == "removed"
    assert entry_state(live, valid, 50.0) == "active"
    assert entry_state(live, valid, 150.0) == "pending"  # expired
    assert entry_state(live, None, 50.0) == "pending"
    for s in ("issuing", "failing", "denied"):
        assert entry_state(live, DomainStatus("a.example.test", s, not_after=100.0), 50.0) == s  # type: ignore[arg-type]


class GatedStorage:
    """Storage whose status listing waits for ``gate``: a recount in progress, held open."""

    def __init__(self) -> None:
        self.gate = trio.Event()

    async def list(self, prefix: str) -> list[object]:
        await self.gate.wait()
        return []

    async def get(self, key: str) -> bytes | None:
        return None


class Mirror:
    loaded = True

    def __init__(self) -> None:
        self.items: list[HostnameEntry] = []

    def entries(self) -> list[HostnameEntry]:
        return list(self.items)


class NoStatuses:
    def status(self, name: str) -> None:
        return None


async def test_the_index_never_makes_a_page_wait_for_a_recount() -> None:
    from edgeproxy.admin.ui_index import REFRESH, StateIndex

    storage, mirror, now = GatedStorage(), Mirror(), [1000.0]
    mirror.items.append(HostnameEntry("a.example.test", None, "{}", 1.0))
    index = StateIndex(storage, mirror, NoStatuses(), clock=lambda: now[0])
    assert await index.ensure(0.05) is False  # the first count is still running
    storage.gate.set()
    with trio.fail_after(10):
        while not await index.ensure(0):
            await trio.sleep(0.01)
    assert index.counts()["pending"] == 1

    mirror.items.append(HostnameEntry("b.example.test", None, "{}", 1.0))
    storage.gate = trio.Event()  # the next recount hangs until we open it
    now[0] += REFRESH + 1
    with trio.fail_after(5):  # answered from the old count at once, recount in the background
        assert await index.ensure(10) is True
    assert index.counts()["pending"] == 1
    storage.gate.set()
    with trio.fail_after(10):
        while index.counts()["pending"] != 2:
            await trio.sleep(0.01)
