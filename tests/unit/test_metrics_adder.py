"""``metrics.adder``, ``amount_adder`` and ``observer``: the bound per-connection increments and
observations count exactly as ``inc`` and ``observe`` do, in one process and across worker
processes (prometheus-client's multi-process files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from edgeproxy import metrics

REPO = Path(__file__).resolve().parents[2]


def sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_adders_count_like_inc() -> None:
    registry = CollectorRegistry()
    counter = Counter("t_adder_events", "test", registry=registry)
    gauge = Gauge("t_adder_open", "test", registry=registry)
    labelled = Counter("t_adder_results", "test", ["result"], registry=registry)
    add, up, down = metrics.adder(counter), metrics.adder(gauge), metrics.adder(gauge, -1)
    ok = metrics.adder(labelled.labels("ok"))
    for _ in range(3):
        add()
        up()
        ok()
    down()
    counter.inc(2)  # the two ways add up on the same value
    assert sample(registry, "t_adder_events_total") == 5
    assert sample(registry, "t_adder_open") == 2
    assert registry.get_sample_value("t_adder_results_total", {"result": "ok"}) == 3


def test_amount_adder_adds_like_inc() -> None:
    registry = CollectorRegistry()
    counter = Counter("t_adder_bytes", "test", ["direction"], registry=registry)
    add = metrics.amount_adder(counter.labels("up"))
    add(100)
    add(0)
    counter.labels("up").inc(5)
    assert registry.get_sample_value("t_adder_bytes_total", {"direction": "up"}) == 105


# On a bound, just past one, below the first, past the last finite one.
OBSERVED = [0.001, 0.0011, 0.0, 0.004999, 0.005, 0.3, 7.0, 25.0, 1e9]


def test_observer_fills_the_buckets_and_sum_observe_would() -> None:
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.1, 0.5, 5, 20)
    bound = Histogram("t_bound_seconds", "test", buckets=buckets, registry=CollectorRegistry())
    plain = Histogram("t_plain_seconds", "test", buckets=buckets, registry=CollectorRegistry())
    observe = metrics.observer(bound)
    for amount in OBSERVED:
        observe(amount)
        plain.observe(amount)

    def samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name.split("_seconds")[1], s.labels, s.value)
            for metric in h.collect()
            for s in metric.samples
            if not s.name.endswith("_created")
        ]

    assert samples(bound) == samples(plain)
    assert ("_count", {}, float(len(OBSERVED))) in samples(bound)


def test_adder_refuses_what_inc_refuses() -> None:
    registry = CollectorRegistry()
    labelled = Counter("t_adder_refused", "test", ["result"], registry=registry)
    with pytest.raises(ValueError):
        metrics.adder(labelled)  # a label left unset: inc would refuse every call
    with pytest.raises(ValueError):
        metrics.adder(Counter("t_adder_down", "test", registry=registry), -1)
    with pytest.raises(ValueError):
        metrics.observer(Histogram("t_adder_h", "test", ["route"], registry=registry))


def test_the_connection_adders_reach_the_exported_metrics() -> None:
    accepted = "edgeproxy_connections_accepted_total"
    before = metrics.CONNECTIONS_ACCEPTED._value.get()
    metrics.ACCEPTED_ADD()
    assert metrics.CONNECTIONS_ACCEPTED._value.get() == before + 1
    assert accepted.encode() in generate_latest()


def test_adders_count_across_worker_processes(tmp_path: Path) -> None:
    """A worker (its own process, values in the shared directory) counts through the adders."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    code = (
        "from edgeproxy import metrics\n"
        "for _ in range(4): metrics.ACCEPTED_ADD(); metrics.ACTIVE_UP(); metrics.CLOSED_OK_ADD()\n"
        "metrics.ACTIVE_DOWN()\n"
        "metrics.HANDSHAKE_SECONDS_OBSERVE(0.003); metrics.BYTES_TO_CLIENT_ADD(10)\n"
    )
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert sample(registry, "edgeproxy_connections_accepted_total") == 8
    assert registry.get_sample_value(
        "edgeproxy_connections_closed_total", {"reason": "ok"}
    ) == 8
    assert sample(registry, "edgeproxy_connections_active") == 6  # livesum of 3 + 3
    hist = "edgeproxy_tls_handshake_duration_seconds"
    assert sample(registry, f"{hist}_count") == 2
    assert registry.get_sample_value(f"{hist}_bucket", {"le": "0.0025"}) == 0
    assert registry.get_sample_value(f"{hist}_bucket", {"le": "0.005"}) == 2
    assert registry.get_sample_value("edgeproxy_bytes_total", {"direction": "to_client"}) == 20
