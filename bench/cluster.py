"""Cluster timings (a benchmark, not a test): ``python -m bench.cluster [--names 10]``.

The real topology of ``tests/cluster`` (``testkit.cluster``: 3 replicas behind HAProxy,
PostgreSQL, pebble) and prints: time from the first request for a new name to its response
through the cluster (median and worst of ``--names`` names), and how long a renewal by one
replica takes to be served by all three.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from testkit.cluster import REPLICA_IPS, Cluster, curl, replica_cert, start_cluster
from testkit.postgres import running_postgres


def new_name_latency(cluster: Cluster, names: int) -> None:
    times = []
    for i in range(names):
        name = f"timing{i}.example.test"
        t0 = time.monotonic()
        r = curl(cluster, name)
        times.append(time.monotonic() - t0)
        assert r.returncode == 0, r.stderr
    print(
        f"new name through the cluster (curl, {names} names): median "
        f"{statistics.median(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms"
    )


def renewal_propagation(cluster: Cluster) -> None:
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
    print(f"renewal seen by all 3 replicas within {spread * 1000:.0f} ms of the first")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--names", type=int, default=10, help="new names to time (default 10)")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
        running_postgres() as server,
        start_cluster(Path(tmp), server) as cluster,
    ):
        new_name_latency(cluster, args.names)
        renewal_propagation(cluster)


if __name__ == "__main__":
    main()
