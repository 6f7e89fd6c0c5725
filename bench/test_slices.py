"""The benchmark's slice arithmetic: a terminator's interleaved wrk runs add up to one row.

Requests per CPU-second must be taken over the sums (a mean of per-slice ratios would weigh a
short slow slice like a long fast one), errors must add up by kind, and latency percentiles,
which do not add, come from the median slice.
"""

from __future__ import annotations

import pytest

from bench.loadgen import WrkResult
from bench.workloads import ThroughputResult, combine


def _slice(
    requests: int, cpu: float, p99: float, errors: dict[str, int] | None = None
) -> ThroughputResult:
    wrk = WrkResult(
        requests=requests,
        bytes=requests * 100,
        duration_s=2.0,
        p50_ms=p99 / 4,
        p99_ms=p99,
        max_ms=p99 * 2,
        errors=errors or {},
        client_cpu_s=1.0,
    )
    return ThroughputResult(wrk, cpu)


def test_slices_add_up_to_one_row() -> None:
    slices = [
        _slice(3000, 1.5, 9.0, {"timeout": 1}),
        _slice(1000, 1.0, 30.0, {"timeout": 2, "read": 1}),
        _slice(2000, 1.5, 12.0),
    ]
    row = combine(slices).as_dict()
    assert row["requests"] == 6000
    assert row["bytes"] == 600000
    assert row["duration_s"] == 6.0
    assert row["proxy_cpu_s"] == 4.0
    assert row["requests_per_cpu_s"] == 1500.0  # 6000 / 4.0, not the mean of 2000, 1000, 1333
    assert row["rps"] == 1000.0
    assert row["p99_ms"] == 12.0  # the median slice's
    assert row["max_ms"] == 60.0
    assert row["errors"] == {"timeout": 3, "read": 1}
    assert row["client_cpu_s"] == 3.0


def test_one_slice_is_itself() -> None:
    only = _slice(1234, 0.5, 7.0)
    assert combine([only]).as_dict() == only.as_dict()


def test_no_slices_is_an_error() -> None:
    with pytest.raises(ValueError):
        combine([])
