"""A restarted process loading a stored certificate keeps the stored status that speaks of it.

Installing a cold-loaded certificate once wrote a fresh "valid" status over the stored one:
after every restart each first visitor cost a status write, and the renewal time an ARI answer
had set (or a denial) was replaced by the default plan. Real FileStorage, the real internal CA.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from edgeproxy.certs import status_store
from edgeproxy.storage.file import FileStorage
from testkit.managers import CountingIssuer, manager_for

NAME = "cold.example.test"


class CountingStorage(FileStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.status_puts = 0

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        if key == status_store.status_key(NAME):
            self.status_puts += 1
        await super().put(key, value, secret=secret)


async def settle(mgr: object) -> None:
    with trio.fail_after(10):
        while getattr(mgr, "_status_writers", ()):
            await trio.sleep(0.02)


async def first_process(root: Path) -> None:
    storage = FileStorage(root)
    mgr = manager_for(storage, CountingIssuer(storage), "*.example.test")
    async with trio.open_nursery() as n:
        await n.start(mgr.run)
        await mgr.context_for(NAME)
        await settle(mgr)
        n.cancel_scope.cancel()


async def test_a_cold_load_keeps_the_stored_ari_renewal_time_and_writes_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "state"
    await first_process(root)
    key = status_store.status_key(NAME)
    stored = json.loads((await FileStorage(root).get(key)) or b"{}")
    assert stored["state"] == "valid"
    # What an ARI answer leaves behind: a renewal time the default plan would not pick.
    stored["renew_at"] = stored["not_after"] - 12345.0
    stored["renewal_source"] = "ari"
    await FileStorage(root).put(key, json.dumps(stored).encode())

    storage = CountingStorage(root)
    mgr = manager_for(storage, CountingIssuer(storage), "*.example.test")
    async with trio.open_nursery() as n:
        await n.start(mgr.run)
        await mgr.context_for(NAME)  # cold: loaded from storage, no order
        await settle(mgr)
        st = mgr.status(NAME)
        assert st is not None and st.renewal_source == "ari"
        assert st.renew_at == stored["renew_at"]
        n.cancel_scope.cancel()
    assert storage.status_puts == 0
    after = json.loads((await FileStorage(root).get(key)) or b"{}")
    assert (after["renew_at"], after["renewal_source"]) == (stored["renew_at"], "ari")
