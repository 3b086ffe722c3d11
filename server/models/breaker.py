"""Circuit breaker for engines that call out (upstream HTTP models).

Sans-I/O: it never sleeps or schedules anything; the caller asks `allow()` before a call and
reports the outcome. Time comes from an injected clock so tests can step it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """closed -> (failure_threshold consecutive failures) -> open -> (reset_timeout_s) -> half_open.

    In half_open exactly one trial call is let through; its success closes the circuit, its
    failure re-opens it for another reset_timeout_s.
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_state",
        "_trial_started_at",
        "failure_threshold",
        "reset_timeout_s",
    )

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout_s < 0:
            raise ValueError("reset_timeout_s must be >= 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_started_at: float | None = None

    @property
    def state(self) -> BreakerState:
        # The open -> half_open edge is taken lazily on read: there is no timer to fire it.
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_timeout_s:
            self._state = "half_open"
            self._trial_started_at = None
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        # A trial whose caller vanished without reporting (cancelled task) would otherwise pin
        # the breaker in half_open forever; after another reset period a new trial may go.
        if self._trial_started_at is None or now - self._trial_started_at >= self.reset_timeout_s:
            self._trial_started_at = now
            return True
        return False

    def record_success(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._trial_started_at = None

    def record_failure(self) -> None:
        state = self.state
        if state == "half_open":
            self._trip()
            return
        self._failures += 1
        if state == "closed" and self._failures >= self.failure_threshold:
            self._trip()

    def _trip(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self._trial_started_at = None

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self.state!r}, failures={self._failures})"
