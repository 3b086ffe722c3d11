"""Endpointer.process's one-frame path (a read of exactly one whole frame) against its frame
loop: the same events, call for call, and the same state after every frame.

The reference Endpointer gets each frame in two pieces (one byte, then the rest), so every
frame of it goes through the general loop (pending bytes), while the one under test gets whole
frames. Signals: espeak-ng speech, clicks near the onset threshold, a tone longer than the
utterance limit; endpointing both a multiple of the frame and not (a last silence frame that
is not emitted), every mode, every frame size.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.audio.vad import Endpointer, VadEvent
from tests.unit.test_vad import SENTENCE_A, SENTENCE_B, _espeak, _silence, _tone

# Everything but the webrtcvad handle (a compiled build has no __slots__ to list).
STATE = ["_count", "_in_speech", "_last_voiced_end", "_pending", "_pos", "_ring", "_silence",
         "_utt_start", "_window"]


def _state(ep: Endpointer) -> list[object]:
    return [bytes(v) if isinstance(v, bytearray) else v for v in
            (getattr(ep, s) for s in STATE)]


def _signal(rate: int) -> bytes:
    rng = np.random.default_rng(15)
    clicks = np.concatenate([
        np.concatenate([_tone(rate, int(ms), 900.0), _silence(rate, int(gap))])
        for ms, gap in zip(rng.integers(10, 90, 12), rng.integers(10, 120, 12), strict=True)
    ])
    parts = [_silence(rate, 300), _espeak(SENTENCE_A, rate), _silence(rate, 530), clicks,
             _silence(rate, 400), _tone(rate, 2300, 300.0), _silence(rate, 250),
             _espeak(SENTENCE_B, rate), _silence(rate, 900)]
    return np.concatenate(parts).tobytes()


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
@pytest.mark.parametrize("mode", ["off", "low", "medium", "high"])
@pytest.mark.parametrize("endpointing_ms", [200, 500])
def test_whole_frames_match_the_frame_loop(rate: int, frame_ms: int, mode: str,
                                           endpointing_ms: int) -> None:
    pcm = _signal(rate)
    kwargs = {"frame_ms": frame_ms, "endpointing_ms": endpointing_ms, "max_utterance_ms": 2000}
    fast, ref = Endpointer(rate, mode, **kwargs), Endpointer(rate, mode, **kwargs)
    fb = rate * frame_ms // 1000 * 2
    events: list[VadEvent] = []
    for i in range(0, len(pcm) - fb + 1, fb):
        frame = pcm[i:i + fb]
        got = fast.process(memoryview(frame) if i % (7 * fb) == 0 else frame)
        assert ref.process(frame[:1]) == []
        want = ref.process(frame[1:])
        assert got == want, i // fb
        assert _state(fast) == _state(ref), i // fb
        events += got
    assert len([e for e in events if type(e).__name__ == "SpeechStart"]) >= 2
    assert fast.force_end() == ref.force_end()
