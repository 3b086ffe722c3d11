"""Real speech for tests: espeak-ng (installed by scripts/setup.sh), resampled with soxr."""

from __future__ import annotations

import functools
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr


@functools.lru_cache(maxsize=32)
def espeak_pcm16(text: str, rate: int = 16000) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        try:
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=30)
        except FileNotFoundError:
            pytest.fail("espeak-ng is missing: run ./scripts/setup.sh (it installs it)")
        with wave.open(str(path), "rb") as wav:
            src_rate = wav.getframerate()
            audio = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    out = soxr.resample(audio, src_rate, rate) if src_rate != rate else audio
    return np.asarray(out, dtype=np.int16).tobytes()


def silence(ms: int, rate: int = 16000) -> bytes:
    return b"\x00\x00" * (rate * ms // 1000)
