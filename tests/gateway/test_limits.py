"""The token bucket and the circuit breaker, on a fake clock."""

from __future__ import annotations

import pytest

from app.gateway.breaker import BreakerState, CircuitBreaker
from app.gateway.budget import TokenBucket


def state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state now (a call, so mypy does not carry an earlier comparison over)."""
    return breaker.state


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_spaces_calls_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2.0, burst=3, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    # Each further caller waits its turn: 0.5 s apart at 2 per second.
    assert bucket.reserve() == pytest.approx(0.5)
    assert bucket.reserve() == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.reserve() == pytest.approx(0.5)


def test_bucket_refills_up_to_the_burst_only() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1.0, burst=2, clock=clock)
    clock.now += 3600
    assert [bucket.reserve() for _ in range(2)] == [0.0, 0.0]
    assert bucket.reserve() == pytest.approx(1.0)


def test_retry_after_pauses_every_caller() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=100.0, burst=10, clock=clock)
    bucket.pause_for(7.0)
    assert bucket.throttled
    assert bucket.reserve() == pytest.approx(7.0)
    clock.now += 7.0
    assert bucket.reserve() == 0.0
    assert not bucket.throttled


def test_rate_limit_remaining_caps_the_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1.0, burst=10, clock=clock)
    bucket.observe_remaining(1)
    assert bucket.reserve() == 0.0
    assert bucket.reserve() == pytest.approx(1.0), "Freelancer said only one call was left"


def test_breaker_opens_after_consecutive_failures_and_probes_after_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert state(breaker) == "closed"
    breaker.record_success()  # resets the count: failures must be consecutive
    for _ in range(3):
        assert breaker.allow_call()
        breaker.record_failure()
    assert state(breaker) == "open"
    assert breaker.rejecting
    assert not breaker.allow_call()
    clock.now += 30
    assert state(breaker) == "half_open"
    assert breaker.allow_call(), "one probe goes through"
    assert not breaker.allow_call(), "only one"
    breaker.record_failure()
    assert state(breaker) == "open", "a failed probe reopens at once"
    clock.now += 30
    assert breaker.allow_call()
    breaker.record_success()
    assert state(breaker) == "closed"
    assert breaker.allow_call() and breaker.allow_call()
