"""loadtest/call_floor.py measures each library stage of a call frame, and the bench's floor
section turns it into calls per core beside raw-echo's cost per frame."""

from __future__ import annotations

import argparse
from array import array

from loadtest import call_floor
from loadtest.bench_report import ServerRun, floor_lines, result_sections
from loadtest.loadgen import Percentiles, RunResult


def test_floor_stages_are_cumulative_and_priced_per_call_second() -> None:
    stages = call_floor.measure(frames=2_000, repeat=1)
    assert [s.name for s in stages] == list(call_floor.STAGES)
    assert all(s.us_per_frame > 0 for s in stages)
    # webrtcvad and soxr are real work: the full chain costs more than the JSON decode alone.
    assert stages[-1].us_per_frame > stages[0].us_per_frame
    s = stages[-1]
    assert s.us_per_call_second == s.us_per_frame * 50
    assert s.calls_at(90) == 0.9e6 / s.us_per_call_second


def test_the_media_messages_carry_the_bench_audio_as_twilio_does() -> None:
    messages = call_floor.media_messages()
    assert len(messages) > 50  # the 2.4 s speech loop
    assert messages[0].startswith(b'{"event":"media"')


def test_floor_lines_add_raw_echo_from_the_same_run() -> None:
    floor = [call_floor.FloorStage("JSON", 1.0), call_floor.FloorStage("+ all", 9.0)]
    lines = floor_lines([], floor)
    assert lines[2] == "| JSON | 1.00 | 50 | 18,000 |"
    assert not any("raw-echo in this run" in line for line in lines)  # no run, no claim
    raw = ServerRun("raw-echo")
    raw.window = RunResult("closed-loop", 1000, 4, 1000, {}, 10.0, 100_000, 10_000.0,
                           Percentiles.of(array("d")), 50.0, server_cpu_pct=90.0, server_cpu_s=0.9)
    combined = floor_lines([raw], floor)[-1]
    # 0.9 s of CPU over 100,000 frames = 9 us; with the libraries' 9 us: 18 us -> 1,000 calls.
    assert "9.00 us of server CPU per frame" in combined
    assert "18.00 us per frame, **1,000 calls**" in combined
    args = argparse.Namespace(call_floor=floor, window=4)
    assert "### The floor under a call (issue 15, target 1)" in result_sections(args, [raw])
