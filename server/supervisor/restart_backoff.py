"""When to restart a worker that died: at once the first time, then exponentially later while it
keeps dying young, so a worker that crashes on start cannot turn the node into a fork loop."""

from __future__ import annotations

from dataclasses import dataclass

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
# A worker that ran this long before dying counts as healthy: its next restart is immediate.
STABLE_AFTER_S = 30.0


@dataclass(slots=True)
class RestartBackoff:
    first_delay_s: float = FIRST_DELAY_S
    max_delay_s: float = MAX_DELAY_S
    stable_after_s: float = STABLE_AFTER_S
    failures: int = 0  # deaths in a row of workers that ran less than stable_after_s

    def delay_after(self, ran_for_s: float) -> float:
        """The wait before restarting a worker that died after running `ran_for_s`."""
        if ran_for_s >= self.stable_after_s:
            self.failures = 0
        self.failures += 1
        if self.failures == 1:
            return 0.0
        return min(self.first_delay_s * 2.0 ** (self.failures - 2), self.max_delay_s)
