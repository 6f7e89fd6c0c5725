"""The hostname registry in a whole process (real FileStorage, the proxy, its admin API, Python
ssl): a replica whose registry loads slowly (100,000 entries take seconds on the file backend)
serves at once, with a registered name allowed and sent to its own upstream, a removed one
refused and no maintenance pass before the registry is known; and a removed name's
certificate record is deleted once ``[hostnames] removal_grace`` is over."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio

from edgeproxy.storage import FileStorage, HostnameEntry
from edgeproxy.storage.base import DueEntry
from testkit.ondemand import refused_with_unrecognized_name
from testkit.proxy import base_config, running_proxy
from testkit.upstreams import http_handler, start_upstream


class SlowListing(FileStorage):
    """FileStorage whose registry listing (the full load) waits until ``release`` is set, and
    which counts maintenance passes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = trio.Event()
        self.listings = 0
        self.passes = 0

    async def list_hostnames(self, *, after: str | None = None, limit: int = 100
                             ) -> list[HostnameEntry]:  # fmt: skip
        self.listings += 1
        await self.release.wait()
        return await super().list_hostnames(after=after, limit=limit)

    async def due_names(self, until: float, limit: int) -> list[DueEntry]:
        self.passes += 1  # every maintenance pass asks the next-action index what is due
        return await super().due_names(until, limit)


async def get(port: int, name: str, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname=name)
    with trio.fail_after(20):
        await tls.send_all(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await tls.receive_some(65536):
            data += chunk
    await trio.aclose_forcefully(tls)
    return data


async def test_serving_starts_before_a_slow_registry_load(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    route_up = await start_upstream(nursery, http_handler(b"the SNI route\n"))
    own_up = await start_upstream(nursery, http_handler(b"the customer's origin\n"))
    storage = SlowListing(tmp_path / "state")
    await storage.add_hostname(HostnameEntry("reg.customer.test", own_up.addr, "{}", 1.0))
    await storage.add_hostname(HostnameEntry("gone.customer.test", None, "{}", 1.0))
    await storage.remove_hostname("gone.customer.test", 2.0)
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": [route_up.addr]}],
                      on_demand={"allow": [], "registry": True},
                      hostnames={"poll_interval": 0.1})  # fmt: skip
    # Bounded: were serving to wait for the load, the proxy would never start (the listing
    # is released only below).
    with trio.fail_after(30):
        async with running_proxy(tmp_path, cfg, storage=storage) as p:
            assert p.ca_path is not None
            assert storage.listings >= 1 and not p.rt.hostnames.loaded
            assert b"the customer's origin" in await get(p.port, "reg.customer.test", p.ca_path)
            assert await refused_with_unrecognized_name(p.port, "gone.customer.test")
            assert await refused_with_unrecognized_name(p.port, "stranger.customer.test")
            assert storage.passes == 0  # no maintenance pass on an unknown registry
            storage.release.set()
            while not p.rt.hostnames.loaded or storage.passes == 0:
                await trio.sleep(0.02)
            assert b"the customer's origin" in await get(p.port, "reg.customer.test", p.ca_path)


async def test_a_short_removal_grace_ends_in_the_certificate_record_being_deleted(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # The whole process as configured ([hostnames] removal_grace, maintenance passes): within
    # the grace the record is kept, after it the record and the entry are gone, and adding the
    # name again then needs a new certificate.
    import httpx

    from edgeproxy.certs.record import CertRecord, cert_key

    up = await start_upstream(nursery, http_handler(b"origin\n"))
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": [up.addr]}],
                      on_demand={"allow": [], "registry": True}, admin={"listen": "127.0.0.1:0"},
                      hostnames={"poll_interval": 0.1, "removal_grace": 3.0},
                      tls={"maintenance_interval": 0.2})  # fmt: skip
    async with running_proxy(tmp_path, cfg) as p:
        assert p.ca_path is not None and p.rt.admin_bound is not None
        host, port = p.rt.admin_bound
        storage = p.rt.storage
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}",
                                     headers={"Edgeproxy-Request": "1"}) as api:  # fmt: skip
            assert (await api.post("/v1/hostnames", json={"hostname": "g.customer.test"})
                    ).status_code == 201  # fmt: skip
            assert b"origin" in await get(p.port, "g.customer.test", p.ca_path)
            first = CertRecord.from_json((await storage.get(cert_key("g.customer.test"))) or b"")
            assert (await api.delete("/v1/hostnames/g.customer.test")).status_code == 204
            assert await storage.get(cert_key("g.customer.test")) is not None  # in the grace
            with trio.fail_after(20):
                while await storage.get_hostname("g.customer.test") is not None:
                    await trio.sleep(0.1)
            assert await storage.get(cert_key("g.customer.test")) is None
            assert (await api.get("/v1/hostnames/g.customer.test")).status_code == 404
            assert (await api.post("/v1/hostnames", json={"hostname": "g.customer.test"})
                    ).status_code == 201  # fmt: skip
            assert b"origin" in await get(p.port, "g.customer.test", p.ca_path)
            again = CertRecord.from_json((await storage.get(cert_key("g.customer.test"))) or b"")
            assert again.serial != first.serial  # the old one was really gone


class HangingStorage(SlowListing):
    """Storage down at start in the worst way: registry reads hang instead of failing."""

    async def get_hostname(self, hostname: str) -> HostnameEntry | None:
        await self.release.wait()
        return await super().get_hostname(hostname)


async def test_registry_storage_hanging_at_start_does_not_hold_handshakes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    up = await start_upstream(nursery, http_handler(b"the SNI route\n"))
    storage = HangingStorage(tmp_path / "state")
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": [up.addr]}],
                      on_demand={"allow": ["*.customer.test"], "registry": True})  # fmt: skip
    with trio.fail_after(30):  # a handshake waiting on the hanging read would never end
        async with running_proxy(tmp_path, cfg, storage=storage) as p:
            assert p.ca_path is not None and not p.rt.hostnames.loaded
            # The registry cannot say; the allow pattern still lets the name through.
            assert b"the SNI route" in await get(p.port, "any.customer.test", p.ca_path)
            storage.release.set()
