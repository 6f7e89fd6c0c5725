"""CA budgets (``[acme.limits]``): sliding windows of order times and the pure decision
"order now" or "wait until T, because limit L". Sans-IO: no storage, no clock of its own.

A CA such as Let's Encrypt refuses orders beyond published rate limits, and a refusal costs
more than waiting (an account pause, hours of ``rateLimited``). So edgeproxy keeps its own
count, shared by every process through storage (``budget_store``), and does not send an order
that the CA would refuse. The limits mirror Let's Encrypt's (2025 figures are the defaults):

* ``new_orders_per_account``: orders per ACME account in 3 hours;
* ``certificates_per_registered_domain``: certificates per registered domain (the name's
  Public Suffix List "private suffix", e.g. ``a.b.example.co.uk`` -> ``example.co.uk``) in 7
  days; renewals (a name set that already had a certificate) are exempt, as at Let's Encrypt;
* ``failed_validations_per_hostname``: failed validations per name in 1 hour;
* ``duplicate_certificates``: certificates per exact name set in 7 days.

ARI-timed renewals (RFC 9773) are exempt from all of them, as Let's Encrypt exempts them: they
are counted apart (``ari``) so an operator sees them, and never consume nor wait for a budget.
A limit of 0 is switched off.

The registered domain comes from the ``publicsuffixlist`` package (a maintained PyPI package
that bundles a snapshot of the list and works offline). Private-section suffixes count, as at
Let's Encrypt (boulder takes the whole list): ``shop.example.github.io`` has its own budget
(``example.github.io``), so a platform on the list's private section gives each customer one.
A name that is itself a public suffix (``co.uk``) is its own registered domain.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from publicsuffixlist import PublicSuffixList

from ..reasons import Reason

HOUR = 3600.0
DAY = 86400.0

LimitName = Literal[
    "new_orders_per_account",
    "certificates_per_registered_domain",
    "failed_validations_per_hostname",
    "duplicate_certificates",
]
#: Every limit, in the order a decision reports them (the metric's label values).
LIMIT_NAMES: tuple[LimitName, ...] = (
    "new_orders_per_account",
    "certificates_per_registered_domain",
    "failed_validations_per_hostname",
    "duplicate_certificates",
)
#: The window of each limit (Let's Encrypt's; the counts are configurable, the windows not).
PERIODS: dict[LimitName, float] = {
    "new_orders_per_account": 3 * HOUR,
    "certificates_per_registered_domain": 7 * DAY,
    "failed_validations_per_hostname": HOUR,
    "duplicate_certificates": 7 * DAY,
}

#: "new": a name set that never had a certificate; "renewal": one that had (exempt from the
#: per-registered-domain limit); "ari": a renewal at the time the CA's ARI window asked for.
OrderKind = Literal["new", "renewal", "ari"]


@dataclass(frozen=True, slots=True)
class Limits:
    """How many of each per window; 0 switches a limit off."""

    new_orders_per_account: int = 300
    certificates_per_registered_domain: int = 50
    failed_validations_per_hostname: int = 5
    duplicate_certificates: int = 5

    def count(self, limit: LimitName) -> int:
        return int(getattr(self, limit))


@dataclass(frozen=True, slots=True)
class Usage:
    """The times in the window of each budget one order of a name set draws on."""

    orders: tuple[float, ...] = ()  # the account's orders
    certificates: tuple[float, ...] = ()  # the registered domain's certificates
    failures: tuple[float, ...] = ()  # the name's failed validations
    duplicates: tuple[float, ...] = ()  # the exact name set's certificates

    def times(self, limit: LimitName) -> tuple[float, ...]:
        return {
            "new_orders_per_account": self.orders,
            "certificates_per_registered_domain": self.certificates,
            "failed_validations_per_hostname": self.failures,
            "duplicate_certificates": self.duplicates,
        }[limit]


@dataclass(frozen=True, slots=True)
class Go:
    """Order now."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Not before ``until``: ``limit`` (``count`` per ``period`` seconds) is used up."""

    until: float
    limit: LimitName
    count: int
    period: float

    def explain(self) -> str:
        return f"acme.limits.{self.limit} ({self.count} per {_span(self.period)}) is used up"

    def status_changes(self, when: str, *, renewing: bool) -> dict[str, object]:
        """The status fields of a name (or managed entry) whose order this holds back;
        ``when`` is ``until`` as the caller prints times. A renewal keeps its state."""
        detail = f"{self.explain()}: the order waits until {when}"
        hint = (
            f"no order was sent: the name is ordered at {when}. To go sooner, "
            f"raise acme.limits.{self.limit} (only as far as your CA allows) or wait."
        )
        if renewing:
            hint = "the current certificate is still served meanwhile; " + hint
        return {
            "state": "renewing" if renewing else "rate_limited",
            "next_attempt": self.until,
            "last_error": detail,
            "last_error_type": Reason.BUDGET_EXHAUSTED.value,
            "reason": Reason.BUDGET_EXHAUSTED,
            "hint": hint,
            "extra": {"limit": f"acme.limits.{self.limit}"},
        }


Decision = Go | Wait


def prune(times: Iterable[float], now: float, period: float) -> tuple[float, ...]:
    """The times still inside the window ending at ``now``, sorted. Times after ``now`` (another
    replica's clock running ahead) are kept: they count until they leave the window too."""
    return tuple(sorted(t for t in times if t > now - period))


def free_at(times: Sequence[float], now: float, count: int, period: float) -> float | None:
    """None when one more fits in the window now; else the first time it does."""
    if count <= 0:
        return None
    live = prune(times, now, period)
    if len(live) < count:
        return None
    # One more fits once the window holds at most count - 1: once the oldest
    # len - count + 1 entries have left it, the last of them at live[len - count] + period.
    return live[len(live) - count] + period


def remaining(times: Sequence[float], now: float, count: int, period: float) -> int | None:
    """How many more fit in the window now (None: the limit is off)."""
    if count <= 0:
        return None
    return max(0, count - len(prune(times, now, period)))


def draws_on(kind: OrderKind) -> tuple[LimitName, ...]:
    """The limits an order of this kind is subject to."""
    if kind == "ari":
        return ()
    if kind == "renewal":
        return (
            "new_orders_per_account",
            "failed_validations_per_hostname",
            "duplicate_certificates",
        )
    return LIMIT_NAMES


def decide(limits: Limits, usage: Usage, now: float, kind: OrderKind) -> Decision:
    """Order now, or wait until every used-up budget has room again (the latest of them)."""
    worst: Wait | None = None
    for limit in draws_on(kind):
        count, period = limits.count(limit), PERIODS[limit]
        at = free_at(usage.times(limit), now, count, period)
        if at is not None and (worst is None or at > worst.until):
            worst = Wait(at, limit, count, period)
    return Go() if worst is None else worst


def charge(usage: Usage, now: float, kind: OrderKind) -> Usage:
    """The usage after one order at ``now`` (failures are charged by the failed validation,
    not the order). ARI renewals charge nothing; pruned to each window, so records stay
    bounded by the limit's count (plus the orders of one window when the limit is off)."""

    def add(limit: LimitName, times: tuple[float, ...]) -> tuple[float, ...]:
        kept = prune(times, now, PERIODS[limit])
        return (*kept, now) if limit in draws_on(kind) else kept

    return Usage(
        orders=add("new_orders_per_account", usage.orders),
        certificates=add("certificates_per_registered_domain", usage.certificates),
        failures=prune(usage.failures, now, PERIODS["failed_validations_per_hostname"]),
        duplicates=add("duplicate_certificates", usage.duplicates),
    )


def refund(times: Sequence[float], at: float) -> tuple[float, ...]:
    """``times`` without one entry made at ``at`` (an order that brought no certificate)."""
    out = list(times)
    if at in out:
        out.remove(at)
    return tuple(out)


@functools.cache
def _psl() -> PublicSuffixList:
    # Parsing the bundled list takes ~50 ms: once per process, on first use.
    return PublicSuffixList()


def registered_domain(name: str) -> str:
    """The name's registered domain by the Public Suffix List (private section included, as
    Let's Encrypt counts): ``a.b.example.co.uk`` -> ``example.co.uk``. A wildcard counts
    under its base name; a name that is a public suffix itself is its own."""
    base = name.lower().rstrip(".").removeprefix("*.")
    return _psl().privatesuffix(base) or base


def _span(seconds: float) -> str:
    if seconds % DAY == 0:
        days = int(seconds // DAY)
        return f"{days} day" + ("s" if days != 1 else "")
    hours = seconds / HOUR
    return f"{hours:g} hour" + ("s" if hours != 1 else "")
