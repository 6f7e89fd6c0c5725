"""The stored status layout: one module knows the key and the format (certs/status_store.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeproxy.certs import status_store
from edgeproxy.certs.status import DomainStatus
from edgeproxy.reasons import Reason
from edgeproxy.storage.file import FileStorage


def test_key_and_name_are_inverse() -> None:
    key = status_store.status_key("shop.example.com")
    assert key == "status/shop.example.com.json"
    assert status_store.name_of(key) == "shop.example.com"
    for other in ("certs/shop.example.com.json", "status/x.example.com", "status/.json"):
        assert status_store.name_of(other) is None


def test_round_trip_keeps_every_field() -> None:
    st = DomainStatus("a.example", "failing", ari_window=(1.0, 2.0), failures=3,
                      last_error_type="urn:ietf:params:acme:error:dns", reason=Reason.DNS,
                      extra={"k": "v"})  # fmt: skip
    assert status_store.decode(status_store.encode(st)) == st


def test_fields_of_another_version_are_tolerated() -> None:
    raw = json.dumps({"name": "a.example", "state": "valid", "from_the_future": 1}).encode()
    assert status_store.decode(raw) == DomainStatus("a.example", "valid")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"valid"', b'{"state": "valid"}'])
def test_unreadable_records_raise(raw: bytes) -> None:
    with pytest.raises(status_store.UnreadableStatus):
        status_store.decode(raw)


async def test_read_write_list(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    try:
        await status_store.write(storage, DomainStatus("a.example", "valid", not_after=5.0))
        # A record stored under another name's key is not that name's status.
        await storage.put(status_store.status_key("b.example"),
                          status_store.encode(DomainStatus("c.example", "valid")))  # fmt: skip
        await storage.put(status_store.status_key("d.example"), b"{not json")
        assert [n for n, _ in await status_store.listed(storage)] == [
            "a.example", "b.example", "d.example"]  # fmt: skip
        st = await status_store.read(storage, "a.example")
        assert st is not None and st.not_after == 5.0
        assert await status_store.read(storage, "b.example") is None
        assert await status_store.read(storage, "missing.example") is None
        with pytest.raises(status_store.UnreadableStatus):
            await status_store.read(storage, "d.example")
    finally:
        await storage.aclose()
