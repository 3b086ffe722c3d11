"""streamgate_ingest_lag_seconds: a frame's read to its pass through the VAD, per ingest step.

Through the real runner with the fake wire and clock of test_asr_runner: the clock is read at
the first frame a step has not taken yet, and the step that takes the frames through the VAD
observes the oldest one's lag, once.
"""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from server.sessions.asr_runner import LagHistogram
from server.telemetry.metrics import INGEST_LAG_BUCKETS
from tests.speech import silence
from tests.unit.test_asr_runner import Session, frames, open_session, settle_loop


def lag(s: Session, le: float | str, kind: str = "asr") -> float:
    s.runner.metrics.before_scrape()  # as /metrics does: the runners' counts are published
    registry = s.runner.metrics.registry
    value = registry.get_sample_value("streamgate_ingest_lag_seconds_bucket",
                                      {"kind": kind, "le": str(le)})
    assert value is not None
    return value


async def test_a_frame_stepped_in_its_own_read_has_no_lag() -> None:
    s = await open_session()
    await s.feed(frames(silence(100)))  # five reads, each stepped inline
    assert lag(s, INGEST_LAG_BUCKETS[0]) == 5
    assert lag(s, "+Inf") == 5
    await s.feed(['{"type":"close"}'])
    await s.ended()


async def test_frames_held_behind_a_stalled_step_count_from_the_oldest_read() -> None:
    s = await open_session()
    s.wire.write_paused = True  # the client is not reading: the ingest stage waits for it
    audio = frames(silence(60))
    s.runner.on_binary(audio[0])
    s.runner.on_read_done()
    s.clock.advance(0.012)
    for frame in audio[1:]:  # later reads: the clock is not read again
        s.runner.on_binary(frame)
        s.runner.on_read_done()
    await settle_loop()
    assert lag(s, "+Inf") == 0  # nothing went through the VAD yet
    s.clock.advance(0.006)
    s.wire.write_paused = False
    s.runner.on_writable()
    await settle_loop()
    # One observation for the three frames: the oldest one's 18 ms.
    assert lag(s, 0.015) == 0
    assert lag(s, 0.02) == 1
    assert lag(s, "+Inf") == 1
    await s.feed(['{"type":"close"}'])
    await s.ended()
    assert lag(s, "+Inf") == 1  # a close message is no audio


def test_counted_lags_publish_exactly_what_observe_records() -> None:
    """The runners count lags into ints; published, they are what prometheus_client's own
    `observe` makes of the same values (bucket edges included), and publishing twice adds
    nothing."""
    registry = CollectorRegistry()
    counted = Histogram("counted", "", ["kind"], registry=registry, buckets=INGEST_LAG_BUCKETS)
    direct = Histogram("direct", "", ["kind"], registry=registry, buckets=INGEST_LAG_BUCKETS)
    rng = random.Random(15)
    values = [*INGEST_LAG_BUCKETS, 0.0, 2.5, *(rng.expovariate(100.0) for _ in range(500))]
    lags = LagHistogram(counted.labels("asr"))
    for v in values:
        lags.observe(v)
        direct.labels("asr").observe(v)
    assert registry.get_sample_value("counted_count", {"kind": "asr"}) == 0  # not yet
    lags.publish()
    lags.publish()
    for le in [*map(str, INGEST_LAG_BUCKETS), "+Inf"]:
        want = registry.get_sample_value("direct_bucket", {"kind": "asr", "le": le})
        got = registry.get_sample_value("counted_bucket", {"kind": "asr", "le": le})
        assert got == want, le
    assert registry.get_sample_value("counted_count", {"kind": "asr"}) == len(values)
    assert registry.get_sample_value("counted_sum", {"kind": "asr"}) == \
        registry.get_sample_value("direct_sum", {"kind": "asr"})
