"""Lifecycle events to a real HTTP receiver that verifies every signature: each event once in
the normal case, none lost while the receiver is down, none lost when the delivering process is
killed with SIGKILL (two ``edgeproxy run`` processes sharing storage)."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio

from edgeproxy.events import LEASE
from edgeproxy.storage import FileStorage
from testkit.events_receiver import Receiver
from testkit.ports import free_port
from testkit.proxy import base_config, edgeproxy_subprocess, running_proxy, wait_port
from testkit.tomlw import toml_dumps

SECRET = "events-test-secret"
SCRIPTED = {"Edgeproxy-Request": "1"}


def events_config(tmp_path: Path, url: str, **over: Any) -> dict[str, Any]:
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
                      admin={"listen": "127.0.0.1:0"}, hostnames={"poll_interval": 0.2},
                      events={"url": url, "secret_env": "EDGEPROXY_TEST_EVENTS_SECRET",
                              "retry_max": 1.0},
                      storage={"backend": "file", "path": str(tmp_path / "state"), "lock_ttl": 3})  # fmt: skip
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


async def wait_for(predicate: Any, bound: float, what: str) -> None:
    with trio.fail_after(bound):
        while not predicate():
            await trio.sleep(0.05)


async def test_events_arrive_signed_once_each_and_survive_a_receiver_outage(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: Any
) -> None:
    monkeypatch.setenv("EDGEPROXY_TEST_EVENTS_SECRET", SECRET)
    receiver = Receiver(SECRET.encode())
    await receiver.start(nursery)
    async with running_proxy(tmp_path, events_config(tmp_path, receiver.url)) as p:
        host, port = p.rt.admin_bound or ("", 0)
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", headers=SCRIPTED) as api:
            assert (await api.post("/v1/hostnames", json={"hostname": "one.example.test",
                                                          "metadata": {"c": 1}})
                    ).status_code == 201  # fmt: skip
            await wait_for(lambda: len(receiver.of_type("certificate.issued")) == 1, 30, "issued")
            created = receiver.of_type("hostname.created")
            assert len(created) == 1 and created[0]["subject"] == "one.example.test"
            assert created[0]["data"]["metadata"] == {"c": 1}
            issued = receiver.of_type("certificate.issued")[0]
            assert issued["data"]["serial"] and issued["specversion"] == "1.0"

            # The receiver goes down for 30 s while names are added, issued and removed.
            receiver.stop()
            for n in ("two", "three"):
                assert (await api.post("/v1/hostnames", json={"hostname": f"{n}.example.test"})
                        ).status_code == 201  # fmt: skip
            await wait_for(lambda: p.rt.certs.cached_context("three.example.test") is not None,
                           30, "issued while the receiver is down")  # fmt: skip
            assert (await api.delete("/v1/hostnames/one.example.test")).status_code == 204
            await trio.sleep(30)
            assert len(receiver.events) == 2
            await receiver.start(nursery)
            await wait_for(lambda: len(receiver.events) == 7, 30, "the queued events")
    assert receiver.bad_signatures == 0
    assert max(Counter(receiver.ids()).values()) == 1  # each id once
    kinds = Counter(e["type"].rsplit(".", 2)[-2] + "." + e["type"].rsplit(".", 1)[-1]
                    for e in receiver.events)  # fmt: skip
    assert kinds == {"hostname.created": 3, "certificate.issued": 3, "hostname.deleted": 1}
    assert await FileStorage(tmp_path / "state").count_events() == 0


async def test_sigkill_of_the_delivering_process_loses_no_event(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = Receiver(SECRET.encode())
    env = {"EDGEPROXY_TEST_EVENTS_SECRET": SECRET}
    procs = {}
    for i in (1, 2):
        cfg = events_config(tmp_path, receiver.url, server={"listen": [f"127.0.0.1:{free_port()}"]},
                            admin={"listen": f"127.0.0.1:{free_port()}"})  # fmt: skip
        path = tmp_path / f"p{i}.toml"
        path.write_text(toml_dumps(cfg))
        host, port = cfg["server"]["listen"][0].split(":")
        ctx = edgeproxy_subprocess(path, host=host, port=int(port), log_path=tmp_path / f"p{i}.log",
                                   env=env)  # fmt: skip
        procs[i] = (ctx.__enter__(), ctx, cfg["admin"]["listen"])
        # The proxy port listens from the start; the admin API is up once the process is.
        admin_host, admin_port = cfg["admin"]["listen"].split(":")
        await trio.to_thread.run_sync(wait_port, admin_host, int(admin_port))
    storage = FileStorage(tmp_path / "state")
    try:
        with trio.fail_after(20):
            while (holder := await storage.lock_info(LEASE)) is None:
                await trio.sleep(0.1)
        pid = int(holder.owner.split(":")[1])
        deliverer = next(i for i, (proc, _, _) in procs.items() if proc.pid == pid)
        survivor = 3 - deliverer
        # The receiver is down: events queue; then the deliverer dies mid-way.
        async with httpx.AsyncClient(base_url=f"http://{procs[survivor][2]}",
                                     headers=SCRIPTED) as api:  # fmt: skip
            for n in range(5):
                resp = await api.post("/v1/hostnames", json={"hostname": f"k{n}.example.test",
                                                             "issue": False})  # fmt: skip
                assert resp.status_code == 201
        await trio.sleep(1.5)  # the deliverer tried (and failed) at least once
        os.kill(pid, signal.SIGKILL)
        procs[deliverer][0].wait(timeout=10)
        await receiver.start(nursery)
        await wait_for(lambda: len(receiver.events) >= 5, 30, "events after the SIGKILL")
    finally:
        for _proc, ctx, _ in procs.values():
            ctx.__exit__(None, None, None)
    assert sorted(e["subject"] for e in receiver.events) == [f"k{n}.example.test" for n in range(5)]
    assert max(Counter(receiver.ids()).values()) == 1
    assert receiver.bad_signatures == 0

