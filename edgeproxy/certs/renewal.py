"""When to renew, and how long to back off: pure functions of plain values and a clock.

Policy (ARCHITECTURE.md, "A certificate's story"):
* With an ARI window from the CA (RFC 9773), renew at a random time inside it.
* Backstop regardless of ARI: renew when a third of the lifetime is left, half when the
  lifetime is under 10 days (short-lived certificates leave little room for retries).
* In the last 5% of the lifetime ARI is ignored: the certificate is about to expire, so a
  window in the future must not delay renewal any further.
* Failures back off exponentially with full jitter, capped (at most daily for renewals).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

SHORT_LIFETIME = 10 * 86400.0


@dataclass(frozen=True, slots=True)
class RenewalPlan:
    at: float
    source: Literal["ari", "backstop", "expiring"]


def backstop_time(not_before: float, not_after: float) -> float:
    lifetime = not_after - not_before
    fraction_left = 0.5 if lifetime < SHORT_LIFETIME else 1.0 / 3.0
    return not_after - lifetime * fraction_left


def plan_renewal(
    not_before: float,
    not_after: float,
    now: float,
    *,
    ari_start: float | None = None,
    ari_end: float | None = None,
    rand: Callable[[], float] = random.random,
) -> RenewalPlan:
    lifetime = not_after - not_before
    backstop = backstop_time(not_before, not_after)
    last_stretch = not_after - 0.05 * lifetime
    if now >= last_stretch:
        return RenewalPlan(now, "expiring")
    if ari_start is not None and ari_end is not None and ari_end >= ari_start:
        # Uniform over the whole window (RFC 9773 s4.2), not over its remainder: with a
        # seeded ``rand`` the choice is then stable from one pass to the next.
        at = max(now, ari_start + (ari_end - ari_start) * rand())
        # The backstop holds regardless of ARI: a window past it cannot delay renewal.
        if at <= backstop:
            return RenewalPlan(at, "ari")
    return RenewalPlan(max(backstop, now), "backstop")


def backoff_delay(
    attempt: int,
    *,
    base: float = 30.0,
    cap: float = 86400.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with jitter: in [d/2, d] where d = min(cap, base * 2**attempt)."""
    d = min(cap, base * 2.0 ** max(0, attempt))
    return d / 2 + (d / 2) * rand()
