"""The pre-ClientHello timeout under pressure (``proxy.server.scaled_hello_timeout``)."""

from __future__ import annotations

import pytest

from edgeproxy.proxy.server import scaled_hello_timeout


@pytest.mark.parametrize("in_use", [0, 1, 500, 800])
def test_up_to_80_percent_the_full_handshake_timeout_applies(in_use: int) -> None:
    assert scaled_hello_timeout(10.0, in_use, 1000) == 10.0


def test_from_80_percent_it_falls_linearly_to_one_second_when_full() -> None:
    assert scaled_hello_timeout(10.0, 900, 1000) == pytest.approx(5.5)
    assert scaled_hello_timeout(10.0, 1000, 1000) == pytest.approx(1.0)
    assert scaled_hello_timeout(10.0, 1200, 1000) == pytest.approx(1.0)  # beyond: the floor
    steps = [scaled_hello_timeout(10.0, n, 1000) for n in range(800, 1001, 10)]
    assert steps == sorted(steps, reverse=True)


def test_a_handshake_timeout_below_the_floor_is_never_raised() -> None:
    assert scaled_hello_timeout(0.5, 1000, 1000) == 0.5
    assert scaled_hello_timeout(0.5, 100, 1000) == 0.5
