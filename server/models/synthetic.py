"""Synthetic transcriber for load tests: deterministic text, configurable latency and failures.

It exercises the same shape as a real batched model: every feed/finish of every session goes
through one shared MicroBatcher, and a batch of n costs latency_base_ms + latency_per_item_ms * n.
The text depends only on how much audio an utterance has received, so a load test can check
what comes back without a real model.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from server.config import SyntheticModelConfig
from server.models.base import EngineError, Hypothesis, TranscriptionStream, WordTiming
from server.models.batcher import MicroBatcher

VOCABULARY: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip

WORD_CONFIDENCE = 0.9
# WordTimings are immutable and depend only on (index, ms_per_word), so they are built once
# and shared; the cap keeps a pathological endless utterance from growing the cache forever.
_WORD_CACHE_LIMIT = 4096


@dataclass(slots=True)
class _Request:
    audio_ms: int
    final: bool
    # Word count the stream has already reported; a feed that would not change it needs no
    # Hypothesis built at all (the common case: most 20 ms frames add no word).
    known_words: int


_Outcome = Hypothesis | EngineError | None


class SyntheticTranscriber:
    def __init__(
        self,
        name: str,
        cfg: SyntheticModelConfig,
        sample_rate: int = 16000,
        *,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if cfg.ms_per_word < 1:
            raise ValueError("ms_per_word must be >= 1")
        if not 0.0 <= cfg.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within 0..1")
        self.name = name
        self.sample_rate = sample_rate
        self.supports_interim = True
        self.cfg = cfg
        self._rng = random.Random(cfg.seed)
        self._words: list[WordTiming] = []
        self._batcher: MicroBatcher[_Request, _Outcome] = MicroBatcher(
            self._run_batch,
            max_batch=cfg.max_batch,
            max_wait_ms=cfg.max_wait_ms,
            max_pending=cfg.max_pending,
            on_batch=on_batch,
            name=f"synthetic:{name}",
        )

    @property
    def batcher(self) -> MicroBatcher[_Request, _Outcome]:
        return self._batcher

    async def start(self) -> None:
        await self._batcher.start()

    async def aclose(self) -> None:
        await self._batcher.aclose()

    def open_stream(
        self, *, language: str, session_id: str, utterance_id: int
    ) -> TranscriptionStream:
        return _SyntheticStream(self)

    def _word(self, index: int) -> WordTiming:
        if index < len(self._words):
            return self._words[index]
        step = self.cfg.ms_per_word
        word = WordTiming(
            word=VOCABULARY[index % len(VOCABULARY)],
            start_ms=index * step,
            end_ms=(index + 1) * step,
            confidence=WORD_CONFIDENCE,
        )
        if index == len(self._words) and index < _WORD_CACHE_LIMIT:
            self._words.append(word)
        return word

    def hypothesis_for(self, audio_ms: int) -> Hypothesis:
        """The text an utterance of `audio_ms` yields; public so load tests can predict it."""
        words = [self._word(i) for i in range(audio_ms // self.cfg.ms_per_word)]
        return Hypothesis(text=" ".join(w.word for w in words), words=words)

    async def _run_batch(self, reqs: list[_Request]) -> list[_Outcome]:
        cfg = self.cfg
        await asyncio.sleep((cfg.latency_base_ms + cfg.latency_per_item_ms * len(reqs)) / 1000.0)
        out: list[_Outcome] = []
        for req in reqs:
            # One draw per request, always, so the failure sequence for a given seed does not
            # depend on failure_rate being zero or on which requests are finals.
            if self._rng.random() < cfg.failure_rate:
                out.append(EngineError("synthetic failure (injected)"))
            elif not req.final and req.audio_ms // cfg.ms_per_word == req.known_words:
                out.append(None)
            else:
                out.append(self.hypothesis_for(req.audio_ms))
        return out


class _SyntheticStream:
    __slots__ = ("_bytes", "_closed", "_engine", "_reported_words")

    def __init__(self, engine: SyntheticTranscriber) -> None:
        self._engine = engine
        self._bytes = 0
        self._reported_words = 0
        self._closed = False

    def _audio_ms(self) -> int:
        return (self._bytes // 2) * 1000 // self._engine.sample_rate

    async def feed(self, pcm: bytes) -> Hypothesis | None:
        if self._closed:
            raise EngineError("stream is closed", retryable=False)
        # Counted before the call: audio handed to a failing engine is still audio the
        # utterance has had, exactly as with a real model's decoder state.
        self._bytes += len(pcm)
        out = await self._engine.batcher.submit(
            _Request(self._audio_ms(), final=False, known_words=self._reported_words)
        )
        if isinstance(out, EngineError):
            raise out
        if out is not None:
            self._reported_words = len(out.words)
        return out

    async def finish(self) -> Hypothesis:
        if self._closed:
            raise EngineError("stream is closed", retryable=False)
        self._closed = True
        out = await self._engine.batcher.submit(
            _Request(self._audio_ms(), final=True, known_words=self._reported_words)
        )
        if isinstance(out, EngineError):
            raise out
        if out is None:  # pragma: no cover - finals always carry a hypothesis
            raise EngineError("synthetic engine returned no final", retryable=False)
        return out

    async def aclose(self) -> None:
        self._closed = True
