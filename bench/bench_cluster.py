"""Cluster timings (a benchmark, not a test): run with
``pytest bench/bench_cluster.py -s -p no:cacheprovider``.

Reuses the real topology of ``tests/cluster`` (3 replicas behind HAProxy, PostgreSQL, pebble)
and prints: time from the first request for a new name to its response through the cluster
(median and worst of 10 names), and how long a renewal by one replica takes to be served by
all three.
"""

from __future__ import annotations

import statistics
import time

from tests.cluster.conftest import REPLICA_IPS, Cluster, cluster, postgres_server  # noqa: F401
from tests.cluster.test_cluster import curl, replica_cert


def test_new_name_latency_through_the_cluster(cluster: Cluster) -> None:  # noqa: F811
    times = []
    for i in range(10):
        name = f"timing{i}.example.test"
        t0 = time.monotonic()
        r = curl(cluster, name)
        times.append(time.monotonic() - t0)
        assert r.returncode == 0, r.stderr
    print(
        f"\nnew name through the cluster (curl, 10 names): median "
        f"{statistics.median(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms"
    )


def test_renewal_propagation(cluster: Cluster) -> None:  # noqa: F811
    name = "propagation.example.test"
    assert curl(cluster, name).returncode == 0
    old = {replica_cert(cluster, ip, name).serial_number for ip in REPLICA_IPS}
    assert len(old) == 1
    serial = old.pop()
    first_seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(first_seen) < 3 and time.monotonic() < deadline:
        for ip in REPLICA_IPS:
            if ip not in first_seen and replica_cert(cluster, ip, name).serial_number != serial:
                first_seen[ip] = time.monotonic()
        time.sleep(0.02)
    spread = max(first_seen.values()) - min(first_seen.values())
    print(f"\nrenewal seen by all 3 replicas within {spread * 1000:.0f} ms of the first")
