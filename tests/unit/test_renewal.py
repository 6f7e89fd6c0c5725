from edgeproxy.certs.renewal import backoff_delay, backstop_time, plan_renewal

DAY = 86400.0


def test_backstop_is_a_third_of_lifetime_left() -> None:
    assert backstop_time(0, 90 * DAY) == 60 * DAY


def test_short_lifetime_renews_at_half() -> None:
    assert backstop_time(0, 6 * DAY) == 3 * DAY


def test_no_ari_uses_backstop() -> None:
    plan = plan_renewal(0, 90 * DAY, 10 * DAY)
    assert (plan.at, plan.source) == (60 * DAY, "backstop")


def test_ari_window_picks_inside_it() -> None:
    plan = plan_renewal(
        0, 90 * DAY, 10 * DAY, ari_start=40 * DAY, ari_end=50 * DAY, rand=lambda: 0.5
    )
    assert (plan.at, plan.source) == (45 * DAY, "ari")


def test_ari_window_in_the_past_means_now() -> None:
    plan = plan_renewal(0, 90 * DAY, 30 * DAY, ari_start=1 * DAY, ari_end=2 * DAY, rand=lambda: 0.3)
    assert (plan.at, plan.source) == (30 * DAY, "ari")


def test_ari_cannot_push_past_backstop() -> None:
    plan = plan_renewal(
        0, 90 * DAY, 10 * DAY, ari_start=80 * DAY, ari_end=85 * DAY, rand=lambda: 0.5
    )
    assert (plan.at, plan.source) == (60 * DAY, "backstop")


def test_last_five_percent_ignores_ari() -> None:
    now = 90 * DAY - 0.04 * 90 * DAY
    plan = plan_renewal(0, 90 * DAY, now, ari_start=now + DAY, ari_end=now + 2 * DAY)
    assert (plan.at, plan.source) == (now, "expiring")


def test_backoff_grows_with_jitter_and_caps() -> None:
    assert backoff_delay(0, base=30, rand=lambda: 0.0) == 15
    assert backoff_delay(0, base=30, rand=lambda: 1.0) == 30
    assert backoff_delay(3, base=30, rand=lambda: 1.0) == 240
    assert backoff_delay(50, base=30, cap=DAY, rand=lambda: 1.0) == DAY
