from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from server.config import SyntheticModelConfig
from server.models.base import EngineError, EngineUnavailable, Hypothesis
from server.models.synthetic import VOCABULARY, SyntheticTranscriber
from tests.fakes import leftover_tasks

RATE = 16000


def pcm_ms(ms: int) -> bytes:
    return b"\x00\x00" * (RATE * ms // 1000)


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    yield
    assert await leftover_tasks() == set()


def config(**overrides: object) -> SyntheticModelConfig:
    base: dict[str, object] = {
        "latency_base_ms": 1.0,
        "latency_per_item_ms": 0.1,
        "max_wait_ms": 2.0,
        "ms_per_word": 400,
    }
    base.update(overrides)
    return SyntheticModelConfig(**base)  # type: ignore[arg-type]


async def run_utterance(
    engine: SyntheticTranscriber, frames: int, frame_ms: int = 100
) -> tuple[list[Hypothesis], Hypothesis]:
    stream = engine.open_stream(language="en-US", session_id="s", utterance_id=1)
    interims = []
    for _ in range(frames):
        hyp = await stream.feed(pcm_ms(frame_ms))
        if hyp is not None:
            interims.append(hyp)
    return interims, await stream.finish()


async def test_text_and_word_timings_follow_the_audio_fed() -> None:
    engine = SyntheticTranscriber("syn", config())
    await engine.start()
    interims, final = await run_utterance(engine, frames=13)  # 1300 ms -> 3 words
    await engine.aclose()
    assert final.text == "alpha bravo charlie"
    assert [(w.word, w.start_ms, w.end_ms) for w in final.words] == [
        ("alpha", 0, 400),
        ("bravo", 400, 800),
        ("charlie", 800, 1200),
    ]
    # An interim exactly when the word count changes: at 400, 800 and 1200 ms.
    assert [h.text for h in interims] == ["alpha", "alpha bravo", "alpha bravo charlie"]
    assert engine.supports_interim


async def test_vocabulary_cycles_deterministically() -> None:
    engine = SyntheticTranscriber("syn", config(ms_per_word=10))
    await engine.start()
    _, first = await run_utterance(engine, frames=3)  # 300 ms -> 30 words
    _, second = await run_utterance(engine, frames=3)
    await engine.aclose()
    assert first == second
    words = first.text.split()
    assert len(words) == 30
    assert words[len(VOCABULARY)] == VOCABULARY[0] == "alpha"
    assert words == [VOCABULARY[i % len(VOCABULARY)] for i in range(30)]
    ends = [w.end_ms for w in first.words]
    assert ends == sorted(ends) and ends[-1] == 300


async def test_short_utterance_gives_empty_final() -> None:
    engine = SyntheticTranscriber("syn", config())
    await engine.start()
    interims, final = await run_utterance(engine, frames=3)
    await engine.aclose()
    assert interims == []
    assert final == Hypothesis(text="", words=[])


async def test_sessions_share_one_batcher() -> None:
    sizes: list[int] = []
    engine = SyntheticTranscriber(
        "syn", config(max_batch=8, max_wait_ms=20), on_batch=lambda n, s: sizes.append(n)
    )
    await engine.start()
    results = await asyncio.gather(*(run_utterance(engine, frames=4) for _ in range(16)))
    await engine.aclose()
    assert {final.text for _, final in results} == {"alpha"}
    assert sum(sizes) == 16 * 5  # 4 feeds + 1 finish per session
    assert max(sizes) == 8  # sessions were batched together


async def test_batch_latency_grows_with_batch_size() -> None:
    seconds: list[float] = []
    engine = SyntheticTranscriber(
        "syn",
        config(latency_base_ms=10, latency_per_item_ms=5, max_batch=8, max_wait_ms=50),
        on_batch=lambda n, s: seconds.append(s),
    )
    await engine.start()
    streams = [engine.open_stream(language="", session_id="s", utterance_id=i) for i in range(8)]
    await asyncio.gather(*(s.feed(pcm_ms(20)) for s in streams))
    await engine.aclose()
    assert seconds and seconds[0] >= (10 + 5 * 8) / 1000


async def test_failure_injection_is_seeded() -> None:
    async def outcomes(seed: int) -> list[bool]:
        engine = SyntheticTranscriber("syn", config(failure_rate=0.3, seed=seed))
        await engine.start()
        stream = engine.open_stream(language="", session_id="s", utterance_id=1)
        out = []
        for _ in range(40):
            try:
                await stream.feed(pcm_ms(20))
                out.append(True)
            except EngineError as exc:
                assert exc.retryable
                out.append(False)
        await engine.aclose()
        return out

    first, again, other = await outcomes(7), await outcomes(7), await outcomes(8)
    assert first == again
    assert first != other
    rng = random.Random(7)  # one draw per request, in order
    assert first == [rng.random() >= 0.3 for _ in range(40)]
    assert 0 < first.count(False) < 40


async def test_failure_rate_one_fails_finals_too() -> None:
    engine = SyntheticTranscriber("syn", config(failure_rate=1.0))
    await engine.start()
    stream = engine.open_stream(language="", session_id="s", utterance_id=1)
    with pytest.raises(EngineError, match="injected"):
        await stream.finish()
    await engine.aclose()


async def test_closed_streams_and_engine_refuse_work() -> None:
    engine = SyntheticTranscriber("syn", config())
    await engine.start()
    stream = engine.open_stream(language="", session_id="s", utterance_id=1)
    await stream.feed(pcm_ms(20))
    await stream.aclose()
    await stream.aclose()  # safe twice
    with pytest.raises(EngineError):
        await stream.feed(pcm_ms(20))
    with pytest.raises(EngineError):
        await stream.finish()
    await engine.aclose()
    fresh = engine.open_stream(language="", session_id="s", utterance_id=2)
    with pytest.raises(EngineUnavailable):
        await fresh.feed(pcm_ms(20))
