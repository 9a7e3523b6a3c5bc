"""The circuit breaker, on a fake clock."""

from __future__ import annotations

from app.gateway.breaker import BreakerState, CircuitBreaker


def state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state now (a call, so mypy does not carry an earlier comparison over)."""
    return breaker.state


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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
