from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.config import PocketsphinxModelConfig
from server.models.base import EngineError, EngineUnavailable, Hypothesis, TranscriptionStream
from server.models.pocketsphinx_engine import PocketsphinxTranscriber
from tests.fakes import leftover_tasks
from tests.speech import espeak_pcm16

SENTENCE = "hello world this is a test"
CHUNK = 3200  # 100 ms at 16 kHz


@pytest.fixture(scope="module")
def speech() -> bytes:
    """The sentence spoken by espeak-ng (22050 Hz), resampled to 16 kHz PCM16."""
    return espeak_pcm16(SENTENCE)


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    yield
    assert await leftover_tasks() == set()


@pytest.fixture
async def engine() -> AsyncIterator[PocketsphinxTranscriber]:
    eng = PocketsphinxTranscriber("sphinx", PocketsphinxModelConfig(max_concurrency=1))
    await eng.start()
    yield eng
    await eng.aclose()


def open_stream(engine: PocketsphinxTranscriber, n: int = 1) -> TranscriptionStream:
    return engine.open_stream(language="en-US", session_id="s", utterance_id=n)


async def feed_all(stream: TranscriptionStream, pcm: bytes) -> list[Hypothesis]:
    interims = []
    for i in range(0, len(pcm), CHUNK):
        hyp = await stream.feed(pcm[i : i + CHUNK])
        if hyp is not None:
            interims.append(hyp)
    return interims


async def test_espeak_sentence_gives_text_with_increasing_word_timings(
    engine: PocketsphinxTranscriber, speech: bytes
) -> None:
    stream = open_stream(engine)
    interims = await feed_all(stream, speech)
    final = await stream.finish()
    heard = [h.text for h in interims]
    print(f"\npocketsphinx heard {SENTENCE!r} as {final.text!r}; interims {heard}")
    assert final.text.strip()
    assert final.text == " ".join(w.word for w in final.words)
    for w in final.words:
        assert not w.word.startswith(("<", "[")) and "(" not in w.word
        assert 0 <= w.start_ms < w.end_ms <= len(speech) // 32 + 10
        assert 0.0 <= w.confidence <= 1.0
    starts = [w.start_ms for w in final.words]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(a.end_ms <= b.start_ms for a, b in zip(final.words, final.words[1:], strict=False))
    # interim_every_ms=400 over ~1.7 s of audio: a few interims at most, each one new.
    assert 1 <= len(interims) <= len(speech) // (32 * 400) + 1
    assert all(h.text and not h.words for h in interims)
    assert engine.pool.in_use == 0


async def test_streams_beyond_max_concurrency_wait_rather_than_fail(
    engine: PocketsphinxTranscriber, speech: bytes
) -> None:
    first, second = open_stream(engine, 1), open_stream(engine, 2)
    await first.feed(speech[:CHUNK])
    blocked = asyncio.create_task(second.feed(speech[:CHUNK]))
    await asyncio.sleep(0.2)
    assert not blocked.done()  # waiting for the only decoder, not failing
    assert engine.pool.waiting == 1
    await feed_all(first, speech[CHUNK:])
    assert (await first.finish()).text
    await blocked  # got the decoder as soon as the first stream let go
    await feed_all(second, speech[CHUNK:])
    assert (await second.finish()).text
    assert engine.pool.created == 1 and engine.pool.in_use == 0


async def test_aclose_mid_utterance_frees_a_clean_decoder(
    engine: PocketsphinxTranscriber, speech: bytes
) -> None:
    reference = open_stream(engine, 1)
    await feed_all(reference, speech)
    expected = await reference.finish()

    abandoned = open_stream(engine, 2)
    await feed_all(abandoned, speech[: len(speech) // 2])
    assert engine.pool.in_use == 1
    await abandoned.aclose()
    assert engine.pool.in_use == 0 and engine.pool.idle == 1
    with pytest.raises(EngineError):
        await abandoned.feed(speech[:CHUNK])

    # The same decoder, reused: its old utterance must not leak into the new one. (Only the
    # text is compared: live CMN adapts across utterances, so confidences drift slightly.)
    again = open_stream(engine, 3)
    await feed_all(again, speech)
    assert (await again.finish()).text == expected.text


async def test_aclose_while_waiting_for_a_decoder(
    engine: PocketsphinxTranscriber, speech: bytes
) -> None:
    holder, waiter = open_stream(engine, 1), open_stream(engine, 2)
    await holder.feed(speech[:CHUNK])
    blocked = asyncio.create_task(waiter.feed(speech[:CHUNK]))
    await asyncio.sleep(0.05)
    await waiter.aclose()
    with pytest.raises(EngineError):
        await blocked
    assert engine.pool.waiting == 0
    await holder.aclose()
    assert engine.pool.in_use == 0


async def test_cancelled_feed_then_aclose_returns_the_decoder(
    engine: PocketsphinxTranscriber, speech: bytes
) -> None:
    stream = open_stream(engine)
    task = asyncio.create_task(stream.feed(speech))  # one big feed, ~0.3 s of decoding
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stream.aclose()  # waits for the abandoned decoder call, then ends the utterance
    assert engine.pool.in_use == 0 and engine.pool.idle == 1
    again = open_stream(engine, 2)
    await feed_all(again, speech)
    assert (await again.finish()).text


async def test_finish_without_audio_needs_no_decoder(engine: PocketsphinxTranscriber) -> None:
    stream = open_stream(engine)
    assert await stream.feed(b"\x01") is None  # half a sample: carried, nothing decoded
    assert await stream.finish() == Hypothesis(text="")
    assert engine.pool.in_use == 0


async def test_engine_close_fails_waiting_streams(speech: bytes) -> None:
    eng = PocketsphinxTranscriber("sphinx", PocketsphinxModelConfig(max_concurrency=1))
    await eng.start()
    holder, waiter = open_stream(eng, 1), open_stream(eng, 2)
    await holder.feed(speech[:CHUNK])
    blocked = asyncio.create_task(waiter.feed(speech[:CHUNK]))
    await asyncio.sleep(0.05)
    await eng.aclose()
    with pytest.raises(EngineUnavailable):
        await blocked
    with pytest.raises(EngineError):
        await holder.feed(speech[:CHUNK])
    await holder.aclose()
    await waiter.aclose()
