"""loadtest/tracing_cost.py runs (tiny numbers) and its table says what it measured."""

from __future__ import annotations

from loadtest import tracing_cost
from server.telemetry.tracing import TRACING


def test_tracing_cost_measures_off_and_on_with_the_same_work() -> None:
    best = tracing_cost.measure(sessions=3, seconds=2, repeat=1)
    assert set(best) == set(tracing_cost.MODES)
    assert best["off"].spans == best["off (A/A)"].spans == 0
    assert best["on 100 %"].spans > 3  # sessions, utterances, engine calls
    assert best["off"].finals == best["on 100 %"].finals > 0  # the same work in each mode
    assert not TRACING.on  # left off for whatever runs next
    lines = tracing_cost.table(best, 3, 2, 1)
    assert lines[3].startswith("| off |") and lines[5].startswith("| on 100 % |")
