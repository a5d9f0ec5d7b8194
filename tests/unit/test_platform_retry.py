"""The retry policy and poll timing are values: bounds, caps, Retry-After, clamping, jitter."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from appliance.platform.retry import (
    Backoff,
    Timings,
    parse_retry_after,
    poll_wait_s,
)


def test_full_jitter_stays_within_the_exponential_ceiling() -> None:
    policy = Backoff(base_s=1.0, cap_s=180.0)
    rng = random.Random(7)
    for attempt in range(1, 15):
        ceiling = min(180.0, 2.0 ** (attempt - 1))
        assert policy.ceiling_s(attempt) == ceiling
        samples = [policy.delay_s(attempt, rng=rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # full jitter: spread over the whole range, not bunched at the top
        assert min(samples) < ceiling * 0.2 and max(samples) > ceiling * 0.8


def test_cap_is_the_poll_interval_and_worst_case_is_computable() -> None:
    policy = Timings().backoff(cap_s=60)
    assert policy.ceiling_s(100) == 60 and policy.ceiling_s(1000) == 60
    # 1+2+4+8+16+32 then 60 for each later attempt
    assert policy.worst_case_total_s(8) == 63 + 60 + 60


def test_retry_after_wins_and_is_bounded() -> None:
    policy = Backoff(base_s=1.0, cap_s=30.0)
    assert policy.delay_s(1, retry_after_s=45.0) == 45.0  # the platform knows best, even above the cap
    assert policy.delay_s(1, retry_after_s=10_000.0) == 3600.0
    assert policy.delay_s(3, retry_after_s=0.0) == 0.0


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = datetime(2026, 12, 4, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0


@pytest.mark.parametrize(
    ("asked", "used", "clamped"),
    [(180, 180, False), (30, 30, False), (3600, 3600, False), (5, 30, True), (0, 30, True), (7200, 3600, True)],
)
def test_poll_interval_clamp(asked: int, used: int, clamped: bool) -> None:
    result = Timings().clamp_poll_interval(asked)
    assert result.interval_s == used and result.clamped is clamped
    if clamped:
        assert result.message() == (
            f"the platform asked for a poll interval of {asked} s; using {used} s (allowed 30..3600 s)"
        )
    else:
        assert result.message() is None


def test_poll_jitter_is_ten_percent() -> None:
    rng = random.Random(1)
    waits = [poll_wait_s(180, rng) for _ in range(2000)]
    assert all(162 <= w <= 198 for w in waits)
    assert min(waits) < 165 and max(waits) > 195


def test_test_knobs_only_when_set() -> None:
    assert Timings.from_env({}) == Timings() and not Timings().shortened
    fast = Timings.from_env({"VSA_POLL_INTERVAL_FLOOR_S": "1", "VSA_WAIT_CAP_S": "2"})
    assert fast.shortened
    assert fast.clamp_poll_interval(2).interval_s == 2 and not fast.clamp_poll_interval(2).clamped
    assert fast.clamp_poll_interval(0).interval_s == 1
    assert fast.perscode_in_use_retry_s == 2 and fast.invalid_perscode_retry_s == 2 and fast.userdata_recheck_s == 2
    # a floor above the documented one is ignored: the knob only lowers it
    assert Timings.from_env({"VSA_POLL_INTERVAL_FLOOR_S": "90"}).poll_floor_s == 30
    assert Timings.from_env({"VSA_POLL_INTERVAL_FLOOR_S": "junk"}) == Timings()
