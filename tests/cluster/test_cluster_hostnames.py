"""The hostname registry across three replicas behind HAProxy on one PostgreSQL: added on one,
issued once and served by all; a PATCH on another reaches the third within 2 s; a DELETE on
the third is refused by all within 2 s; re-adding within the grace needs no new ACME order."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest

from edgeproxy.wire.proxy_protocol import build_v2
from testkit.cluster import REPLICA_IPS, Cluster, start_file_server, validations
from testkit.procs import stop_process

#: The issue's propagation bound (PostgreSQL NOTIFY does it in milliseconds; the poll in 1 s).
PROPAGATION = 2.0
A, B, C = REPLICA_IPS
NAME = "tenant.customer.test"


def api(c: Cluster, ip: str) -> httpx.Client:
    return httpx.Client(base_url=f"http://{ip}:{c.aport}", timeout=30,
                        headers={"Edgeproxy-Request": "1"})  # fmt: skip


def get_via(c: Cluster, ip: str, name: str) -> str:
    """GET / from one replica directly (with the PROXY v2 header it expects)."""
    ctx = ssl.create_default_context(cafile=str(c.roots))
    with socket.create_connection((ip, c.rport), timeout=30) as s:
        s.sendall(build_v2(("127.0.0.60", 40000), (ip, c.rport)))
        with ctx.wrap_socket(s, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.0\r\nHost: {name}\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data.decode(errors="replace")


def refused(c: Cluster, ip: str, name: str) -> bool:
    try:
        get_via(c, ip, name)
    except ssl.SSLError as exc:
        return "UNRECOGNIZED_NAME" in str(exc).upper()
    return False


def until(predicate: object, bound: float) -> float:
    """Seconds until ``predicate()`` held (polled every 20 ms); fails after ``bound``."""
    assert callable(predicate)
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > bound:
            pytest.fail(f"not within {bound}s")
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def other_upstream(cluster: Cluster) -> Iterator[int]:
    proc, port = start_file_server(cluster.tmp, "the tenant's own origin\n", folder="tenant-www")
    yield port
    stop_process(proc)


def test_add_patch_delete_readd_across_replicas(cluster: Cluster, other_upstream: int) -> None:
    with api(cluster, A) as a, api(cluster, B) as b, api(cluster, C) as c:
        created = a.post("/v1/hostnames", json={"hostname": NAME})
        assert created.status_code == 201, created.text
        until(lambda: a.get(f"/v1/hostnames/{NAME}").json()["state"] == "active", 60)
        for ip in REPLICA_IPS:
            assert "hello from the cluster upstream" in get_via(cluster, ip, NAME)
        assert validations(cluster, NAME) == 1

        upstream = f"127.0.0.1:{other_upstream}"
        assert b.patch(f"/v1/hostnames/{NAME}", json={"upstream": upstream}).status_code == 200
        took = until(lambda: "the tenant's own origin" in get_via(cluster, C, NAME), PROPAGATION)
        print(f"PATCH on B served by C after {took:.3f}s")

        assert c.delete(f"/v1/hostnames/{NAME}").status_code == 204
        took = until(lambda: all(refused(cluster, ip, NAME) for ip in REPLICA_IPS), PROPAGATION)
        print(f"DELETE on C refused by all three after {took:.3f}s")
        assert b.get(f"/v1/hostnames/{NAME}").json()["state"] == "removed"

        assert a.post("/v1/hostnames", json={"hostname": NAME}).status_code == 201
        until(lambda: all(not refused(cluster, ip, NAME) for ip in REPLICA_IPS), PROPAGATION)
        for ip in REPLICA_IPS:
            assert "hello from the cluster upstream" in get_via(cluster, ip, NAME)
    assert validations(cluster, NAME) == 1  # re-added within the grace: no new order
