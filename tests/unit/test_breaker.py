from __future__ import annotations

import pytest

from server.models.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def state(b: CircuitBreaker) -> str:
    # A call, not the property: mypy would narrow b.state and reject the later comparisons.
    return b.state


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    b = CircuitBreaker(3, 10.0, clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert state(b) == "closed"
    assert b.allow()
    b.record_failure()
    assert state(b) == "open"
    assert not b.allow()


def test_success_resets_the_failure_count(clock: FakeClock) -> None:
    b = CircuitBreaker(3, 10.0, clock)
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert state(b) == "closed"
    assert b.consecutive_failures == 2


def test_half_open_after_reset_timeout_lets_exactly_one_trial(clock: FakeClock) -> None:
    b = CircuitBreaker(1, 5.0, clock)
    b.record_failure()
    clock.advance(4.999)
    assert state(b) == "open"
    assert not b.allow()
    clock.advance(0.001)
    assert state(b) == "half_open"
    assert b.allow()
    assert not b.allow()
    assert not b.allow()


def test_trial_success_closes(clock: FakeClock) -> None:
    b = CircuitBreaker(1, 5.0, clock)
    b.record_failure()
    clock.advance(5)
    assert b.allow()
    b.record_success()
    assert state(b) == "closed"
    assert b.allow() and b.allow()


def test_trial_failure_reopens_for_a_full_period(clock: FakeClock) -> None:
    b = CircuitBreaker(2, 5.0, clock)
    b.record_failure()
    b.record_failure()
    clock.advance(5)
    assert b.allow()
    b.record_failure()  # one failure is enough in half_open
    assert state(b) == "open"
    clock.advance(4)
    assert not b.allow()
    clock.advance(1)
    assert state(b) == "half_open"
    assert b.allow()


def test_abandoned_trial_is_retried_after_another_period(clock: FakeClock) -> None:
    b = CircuitBreaker(1, 5.0, clock)
    b.record_failure()
    clock.advance(5)
    assert b.allow()  # the trial caller never reports back
    clock.advance(4)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, -1.0)
