"""Synthetic TTS for load tests: a deterministic tone with a configurable latency model.

A text of n characters yields `ms_per_char * n` ms of a 440 Hz tone in chunks of `chunk_ms`.
Timing: the first chunk is released `first_audio_ms` after iteration starts, and chunk k at
``first_audio_ms + rtf * (audio before chunk k)``: producing 1 s of audio costs `rtf` seconds,
as a real model running at that real-time factor would. Deadlines are absolute, so a consumer
that pauses (no playback credit) gets the overdue chunks at once, never a drifted schedule.

Cheap by design: a load test measures the gateway, and audio generated in the gateway process
is engine cost. The tone (without its fades) is rendered once per engine, for the longest text
it accepts; a chunk is a slice of it, and only the chunks inside a fade are computed.

Failure injection: every synthesize() call makes two draws from one seeded RNG, in call
order, so a seed gives the same sequence whatever failure_rate is. With probability
`failure_rate` the call fails at a chunk index picked by the second draw: at index 0 nothing
was sent (retryable); later, audio already went out and the error is not retryable, as with
a real upstream that breaks mid-stream.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator

import numpy as np

from server.audio.text_chunker import count_tokens
from server.config import SyntheticTtsConfig
from server.models.base import EngineError, EngineUnavailable

TONE_HZ = 440.0
AMPLITUDE = 0.25 * 32767
FADE_MS = 5  # fade in/out so chunk-sized outputs do not click at their edges


class SyntheticSynthesizer:
    def __init__(self, name: str, cfg: SyntheticTtsConfig) -> None:
        if cfg.ms_per_char < 1 or cfg.chunk_ms < 1 or cfg.max_chars < 1:
            raise ValueError("ms_per_char, chunk_ms and max_chars must be >= 1")
        if cfg.first_audio_ms < 0 or cfg.rtf < 0:
            raise ValueError("first_audio_ms and rtf must be >= 0")
        if not 0.0 <= cfg.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within 0..1")
        if cfg.sample_rate < 1000:
            raise ValueError("sample_rate must be >= 1000")
        self.name = name
        self.cfg = cfg
        self.sample_rate = cfg.sample_rate
        self.max_chars = cfg.max_chars
        self.max_tokens = cfg.max_tokens
        self._rng = random.Random(cfg.seed)
        self._running = False
        self._wave: bytes | None = None  # the tone as PCM16, rendered at the first chunk

    async def start(self) -> None:
        self._running = True

    async def aclose(self) -> None:
        self._running = False

    def duration_ms(self, text: str) -> int:
        """Audio length a text yields (after stripping its edges, as synthesize does)."""
        return self.cfg.ms_per_char * len(text.strip())

    def synthesize(self, text: str, *, voice: str | None, language: str) -> AsyncIterator[bytes]:
        # A plain function, so the draws happen at call time, in call order, whatever order
        # the consumers later iterate in.
        draw_fail, draw_where = self._rng.random(), self._rng.random()
        text = text.strip()
        too_long = len(text) > self.max_chars or (
            self.max_tokens is not None and count_tokens(text) > self.max_tokens
        )
        if too_long:
            # Raised on iteration, like the other engines, not from this call.
            return self._refuse(
                EngineError(f"{self.name}: text exceeds the model limit", retryable=False)
            )
        total = self.duration_ms(text) * self.sample_rate // 1000
        step = max(1, self.cfg.chunk_ms * self.sample_rate // 1000)
        n_chunks = math.ceil(total / step)
        fail_at = None
        if n_chunks and draw_fail < self.cfg.failure_rate:
            fail_at = min(n_chunks - 1, int(draw_where * n_chunks))
        return self._generate(total, step, fail_at)

    @staticmethod
    async def _refuse(error: EngineError) -> AsyncIterator[bytes]:
        raise error
        yield b""  # pragma: no cover - makes this an async generator

    async def _generate(self, total: int, step: int, fail_at: int | None) -> AsyncIterator[bytes]:
        if not self._running:
            raise EngineUnavailable(f"{self.name}: engine is not running")
        loop = asyncio.get_running_loop()
        start = loop.time() + self.cfg.first_audio_ms / 1000.0
        for k, offset in enumerate(range(0, total, step)):
            # Always at least one loop turn per chunk, so a zero-latency config still lets
            # other sessions run and can be cancelled between chunks.
            deadline = start + self.cfg.rtf * offset / self.sample_rate
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            if not self._running:
                raise EngineUnavailable(f"{self.name}: engine closed during synthesis")
            if k == fail_at:
                raise EngineError(
                    f"{self.name}: synthetic failure (injected) at chunk {k}",
                    retryable=k == 0,
                )
            yield self._tone(offset, min(offset + step, total), total)

    def _tone(self, begin: int, end: int, total: int) -> bytes:
        # A pure function of the sample index: any chunking of the same text gives the same
        # samples, and phase is continuous across chunks.
        fade = max(1, FADE_MS * self.sample_rate // 1000)
        if begin + 1 >= fade and total - end + 1 >= fade:
            # No sample of the chunk is faded (its envelope is exactly 1.0): the pre-rendered
            # tone holds the same samples.
            wave = self._wave
            if wave is None:
                wave = self._wave = self._render(0, self.duration_ms("x" * self.max_chars)
                                                 * self.sample_rate // 1000)
            if end * 2 <= len(wave):
                return wave[begin * 2 : end * 2]
        n = np.arange(begin, end, dtype=np.float64)
        wave_f = np.sin(2.0 * np.pi * TONE_HZ * n / self.sample_rate) * AMPLITUDE
        envelope = np.minimum(1.0, np.minimum(n + 1, total - n) / fade)
        return (wave_f * envelope).astype("<i2").tobytes()

    def _render(self, begin: int, end: int) -> bytes:
        n = np.arange(begin, end, dtype=np.float64)
        return (np.sin(2.0 * np.pi * TONE_HZ * n / self.sample_rate) * AMPLITUDE).astype(
            "<i2").tobytes()
