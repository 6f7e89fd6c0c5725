"""The CA budget window math and decision (certs/budgets.py), and the registered domain from
the Public Suffix List. Pure: no storage, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.certs.budgets import (
    DAY,
    HOUR,
    PERIODS,
    Go,
    Limits,
    Usage,
    Wait,
    charge,
    decide,
    free_at,
    prune,
    refund,
    registered_domain,
    remaining,
)

T0 = 1_800_000_000.0


def test_window_has_room_below_the_count() -> None:
    assert free_at([T0 - 10, T0 - 5], T0, 3, HOUR) is None
    assert remaining([T0 - 10, T0 - 5], T0, 3, HOUR) == 1


def test_full_window_frees_when_its_oldest_entry_leaves() -> None:
    times = [T0 - 100, T0 - 50, T0 - 10]
    assert free_at(times, T0, 3, HOUR) == T0 - 100 + HOUR
    # Right at that moment the oldest has left: one more fits.
    assert free_at(times, T0 - 100 + HOUR, 3, HOUR) is None
    assert free_at(times, T0 - 100 + HOUR - 0.001, 3, HOUR) == T0 - 100 + HOUR


def test_overfull_window_waits_for_enough_entries_to_leave() -> None:
    # Five in the window for a limit of 2 (the limit was lowered): four must leave first.
    times = [T0 - 50, T0 - 40, T0 - 30, T0 - 20, T0 - 10]
    assert free_at(times, T0, 2, HOUR) == T0 - 20 + HOUR


def test_entries_older_than_the_window_do_not_count_and_are_pruned() -> None:
    times = [T0 - HOUR - 1, T0 - HOUR, T0 - 1]
    assert prune(times, T0, HOUR) == (T0 - 1,)
    assert remaining(times, T0, 2, HOUR) == 1


def test_future_entries_from_a_clock_ahead_still_count() -> None:
    assert prune([T0 + 30], T0, HOUR) == (T0 + 30,)
    assert free_at([T0 + 30], T0, 1, HOUR) == T0 + 30 + HOUR


def test_zero_switches_a_limit_off() -> None:
    assert free_at([T0] * 1000, T0, 0, HOUR) is None
    assert remaining([T0], T0, 0, HOUR) is None
    off = Limits(new_orders_per_account=0)
    assert decide(off, Usage(orders=(T0,) * 500), T0, "new") == Go()


@given(
    st.lists(st.floats(min_value=T0 - 2 * HOUR, max_value=T0), max_size=30),
    st.integers(min_value=1, max_value=10),
)
def test_free_at_is_the_first_time_one_more_fits(times: list[float], count: int) -> None:
    at = free_at(times, T0, count, HOUR)
    if at is None:
        assert len(prune(times, T0, HOUR)) < count
    else:
        assert at > T0
        assert len(prune(times, at, HOUR)) < count
        # A moment earlier it would not have fitted yet.
        assert len(prune(times, at - 0.001, HOUR)) >= count


def test_a_new_name_waits_for_the_latest_used_up_budget() -> None:
    limits = Limits(new_orders_per_account=2, certificates_per_registered_domain=1)
    usage = Usage(orders=(T0 - 3600, T0 - 60), certificates=(T0 - DAY,))
    d = decide(limits, usage, T0, "new")
    # Orders free at T0 - 3600 + 3h; the domain's certificate at T0 - 1 day + 7 days: later.
    assert isinstance(d, Wait)
    assert d.limit == "certificates_per_registered_domain"
    assert d.until == T0 - DAY + 7 * DAY
    assert "acme.limits.certificates_per_registered_domain (1 per 7 days)" in d.explain()


def test_failed_validations_per_hour() -> None:
    usage = Usage(failures=tuple(T0 - 60 * i for i in range(1, 6)))
    d = decide(Limits(), usage, T0, "new")
    assert isinstance(d, Wait) and d.limit == "failed_validations_per_hostname"
    assert d.until == T0 - 300 + HOUR
    assert decide(Limits(), Usage(failures=usage.failures[:4]), T0, "new") == Go()


def test_renewal_is_exempt_from_the_registered_domain_limit_but_not_duplicates() -> None:
    limits = Limits(certificates_per_registered_domain=1, duplicate_certificates=2)
    assert decide(limits, Usage(certificates=(T0 - 1,)), T0, "renewal") == Go()
    assert isinstance(decide(limits, Usage(certificates=(T0 - 1,)), T0, "new"), Wait)
    dup = decide(limits, Usage(duplicates=(T0 - 2, T0 - 1)), T0, "renewal")
    assert isinstance(dup, Wait) and dup.limit == "duplicate_certificates"
    orders = decide(Limits(new_orders_per_account=1), Usage(orders=(T0 - 1,)), T0, "renewal")
    assert isinstance(orders, Wait) and orders.limit == "new_orders_per_account"


def test_ari_renewal_is_never_blocked_and_charges_nothing() -> None:
    limits = Limits(1, 1, 1, 1)
    full = Usage(orders=(T0 - 1,), certificates=(T0 - 1,), failures=(T0 - 1,), duplicates=(T0 - 1,))
    assert decide(limits, full, T0, "ari") == Go()
    after = charge(full, T0, "ari")
    assert after == full


def test_charge_counts_per_kind_and_prunes_old_entries() -> None:
    old = T0 - 8 * DAY
    usage = Usage(orders=(old, T0 - 1), certificates=(old,), duplicates=(old, T0 - 2))
    new = charge(usage, T0, "new")
    assert new.orders == (T0 - 1, T0)
    assert new.certificates == (T0,)
    assert new.duplicates == (T0 - 2, T0)
    renewal = charge(usage, T0, "renewal")
    assert renewal.certificates == ()  # exempt: not counted for the domain
    assert renewal.duplicates == (T0 - 2, T0)


def test_records_stay_bounded_by_the_window() -> None:
    usage = Usage()
    t = T0
    for _ in range(2000):
        usage = charge(usage, t, "new")
        t += 60.0  # one a minute: 180 fit in 3 hours, 2000 in 7 days would not
    assert len(usage.orders) == int(PERIODS["new_orders_per_account"] // 60)


def test_refund_takes_back_exactly_one_entry() -> None:
    assert refund((T0, T0 + 1, T0), T0) == (T0 + 1, T0)
    assert refund((T0 + 1,), T0) == (T0 + 1,)


@pytest.mark.parametrize(
    ("name", "registered"),
    [
        ("a.b.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("shop.example.com", "example.com"),
        ("WWW.Example.COM.", "example.com"),
        ("*.api.example.net", "example.net"),
        ("foo.bar.kawasaki.jp", "foo.bar.kawasaki.jp"),  # *.kawasaki.jp is a suffix rule
        ("city.kawasaki.jp", "city.kawasaki.jp"),  # !city.kawasaki.jp: the exception
        ("x.city.kawasaki.jp", "city.kawasaki.jp"),
        # Private section counts (as at Let's Encrypt): each github.io user is a domain.
        ("shop.alice.github.io", "alice.github.io"),
        ("co.uk", "co.uk"),  # a public suffix itself: its own
        # IDNs arrive as A-labels; the list's rule for 公司.cn is in Unicode.
        ("a.b.xn--55qx5d.cn", "b.xn--55qx5d.cn"),
        ("host.test", "host.test"),  # not on the list: the last label is the suffix
    ],
)
def test_registered_domain_from_the_public_suffix_list(name: str, registered: str) -> None:
    assert registered_domain(name) == registered
