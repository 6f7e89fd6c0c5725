"""A small fleet with names in several states, from a real pebble, for the operator's views.

``start_fleet`` runs edgeproxy in-process with the hostname registry and its admin listener,
pebble behind a ``FaultInjector`` and two upstreams, registers names and drives each into its
state with real traffic:

- ``shop.customer.test``: active, visited through curl;
- ``broken.customer.test``: active, its own upstream is a closed port (upstream errors);
- ``refused.customer.test``: failing, the CA answers its newOrder with rejectedIdentifier
  (as it does for every name starting with ``refused``);
- ``gone.customer.test``: removed from the registry after registration;
- ``early.customer.test``: denied, visited before it was registered (the customer pointed DNS
  here first; the allow-check refused it) and registered without issuing;
- a plain-HTTP request on the TLS port, and one on the plain-HTTP listener.

The Grafana dashboard test and the status page test share it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from testkit.ondemand import NO_NONCE_CHAOS, acme_config, curl, handshake_fails
from testkit.pebble import FaultInjector, InjectedRequest, Pebble, Reply
from testkit.ports import free_port
from testkit.proxy import RunningProxy, running_proxy
from testkit.upstreams import http_handler, start_upstream

ACTIVE, BROKEN, FAILING, REMOVED = (
    "shop.customer.test",
    "broken.customer.test",
    "refused.customer.test",
    "gone.customer.test",
)
DENIED = "early.customer.test"
#: The CA refuses every name starting with this (FAILING is one).
REJECTED_PREFIX = "refused"
REJECTED = "urn:ietf:params:acme:error:rejectedIdentifier"
BODY = b"served to the fleet\n"


@dataclass
class Fleet:
    proxy: RunningProxy
    admin_url: str
    roots: Path
    injector: FaultInjector
    http_port: int  # the plain-HTTP listener


def _rejects(prefix: str) -> Callable[[InjectedRequest], Reply | None]:
    def rule(r: InjectedRequest) -> Reply | None:
        names = [str(i.get("value")) for i in (r.jws_payload or {}).get("identifiers") or []]
        if r.path.endswith("/order-plz") and any(n.startswith(prefix) for n in names):
            return Reply.problem(400, REJECTED, f"{names[0]} is on the CA's blocklist (<em>policy</em>)")
        return None

    return rule


async def _wait_state(api: httpx.AsyncClient, name: str, state: str) -> None:
    with trio.fail_after(60):
        while (await api.get(f"/v1/hostnames/{name}")).json()["state"] != state:
            await trio.sleep(0.1)


@asynccontextmanager
async def start_fleet(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
    **config: Any,
) -> AsyncIterator[Fleet]:
    port = free_port()
    pebble = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
    roots = roots_file(pebble)
    inj = FaultInjector(pebble, rules=[_rejects(REJECTED_PREFIX)])
    await nursery.start(inj.serve)
    up = await start_upstream(nursery, http_handler(BODY))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = acme_config(tmp_path, port, inj.directory_url, pebble.ca_bundle_path, up.addr)
    cfg["on_demand"] = {**cfg["on_demand"], "allow": [], "registry": True}
    cfg["admin"] = {"listen": "127.0.0.1:0", **config.pop("admin", {})}
    cfg["hostnames"] = {"poll_interval": 0.2}
    http_port = free_port()
    cfg["http"] = {"listen": [f"127.0.0.1:{http_port}"]}
    for k, v in config.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    async with running_proxy(tmp_path, cfg) as p:
        assert p.rt.admin_bound is not None
        host, admin_port = p.rt.admin_bound
        admin_url = f"http://{host}:{admin_port}"
        headers = {"Edgeproxy-Request": "1"}
        token = cfg["admin"].get("token")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with httpx.AsyncClient(base_url=admin_url, headers=headers, timeout=30) as api:
            for name, upstream in ((ACTIVE, None), (BROKEN, dead), (FAILING, None), (REMOVED, None)):
                body = {"hostname": name, "upstream": upstream}
                assert (await api.post("/v1/hostnames", json=body)).status_code == 201
            for name in (ACTIVE, BROKEN, REMOVED):
                await _wait_state(api, name, "active")
            await _wait_state(api, FAILING, "failing")
            assert (await api.delete(f"/v1/hostnames/{REMOVED}")).status_code == 204
            res = await curl(p, ACTIVE, roots)
            assert res.returncode == 0 and res.stdout == BODY, res.stderr
            res = await curl(p, BROKEN, roots)
            assert res.returncode != 0  # the TLS side works, the upstream is closed
            assert await handshake_fails(port, DENIED)
            body = {"hostname": DENIED, "issue": False}
            assert (await api.post("/v1/hostnames", json=body)).status_code == 201
            await _wait_state(api, DENIED, "denied")
        await plain_http(port)  # on the TLS port: the "this port speaks TLS" answer
        await plain_http(http_port, ACTIVE)  # on the HTTP listener: a redirect to HTTPS
        yield Fleet(p, admin_url, roots, inj, http_port)


async def plain_http(port: int, host: str = "x") -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        with trio.fail_after(10):
            while await stream.receive_some(65536):
                pass
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)
