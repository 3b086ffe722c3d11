"""The synthetic TTS engine serves its tone from audio rendered once: every chunk, however the
text is chunked, must hold exactly the samples of the tone's formula (fades included)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from server.config import SyntheticTtsConfig
from server.models.tts_synthetic import AMPLITUDE, FADE_MS, TONE_HZ, SyntheticSynthesizer


def formula(rate: int, begin: int, end: int, total: int) -> bytes:
    n = np.arange(begin, end, dtype=np.float64)
    wave = np.sin(2.0 * np.pi * TONE_HZ * n / rate) * AMPLITUDE
    fade = max(1, FADE_MS * rate // 1000)
    envelope = np.minimum(1.0, np.minimum(n + 1, total - n) / fade)
    return (wave * envelope).astype("<i2").tobytes()


@pytest.mark.parametrize("rate", [8000, 16000, 22050])
def test_every_chunk_is_the_formulas(rate: int) -> None:
    engine = SyntheticSynthesizer("s", SyntheticTtsConfig(sample_rate=rate, max_chars=20))
    longest = engine.duration_ms("x" * 20) * rate // 1000
    rng = random.Random(rate)
    fade = FADE_MS * rate // 1000
    cases = [(0, 7, 7), (0, fade + 3, longest), (longest - fade - 2, longest, longest),
             (fade, 2 * fade, longest), (longest - 5, longest + 5, longest + 5)]
    for _ in range(500):
        total = rng.randint(1, longest + 100)  # beyond what was rendered too
        begin = rng.randrange(total)
        cases.append((begin, min(total, begin + rng.choice([1, 160, 640])), total))
    for begin, end, total in cases:
        assert engine._tone(begin, end, total) == formula(rate, begin, end, total)
    assert engine._wave is not None and len(engine._wave) == 2 * longest
