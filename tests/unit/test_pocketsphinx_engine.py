from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import server.models.pocketsphinx_engine as engine_module
from server.config import PocketsphinxModelConfig
from server.flow_control.sphinx_cmn import SessionMeans
from server.models.base import EngineError, EngineUnavailable, Hypothesis, TranscriptionStream
from server.models.pocketsphinx_engine import PocketsphinxTranscriber
from server.models.sphinx_worker import (
    DecoderSession,
    Feed,
    Final,
    Finish,
    Hyp,
    Ok,
    Start,
    words_from_segments,
)
from tests.fakes import leftover_tasks
from tests.speech import espeak_pcm16

SENTENCE = "hello world this is a test"
# ~5.8 s of speech: end_utt on it held the GIL ~350 ms when the decoder ran in-process.
LONG_SENTENCE = (
    "the quick brown fox jumps over the lazy dog while the gateway keeps serving "
    "every other session on the loop"
)
CHUNK = 3200  # 100 ms at 16 kHz


@pytest.fixture(scope="module")
def speech() -> bytes:
    """The sentence spoken by espeak-ng (22050 Hz), resampled to 16 kHz PCM16."""
    return espeak_pcm16(SENTENCE)


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    yield
    assert await leftover_tasks() == set()


def child_pids() -> set[int]:
    """Children (running or zombie) of this process, whichever thread started them."""
    pids: set[int] = set()
    for children in Path("/proc/self/task").glob("*/children"):
        pids.update(int(pid) for pid in children.read_text().split())
    return pids


def gone(pids: set[int]) -> bool:
    """Exited and reaped: neither a child of ours (zombies included) nor in /proc at all."""
    return not pids & child_pids() and not any(Path(f"/proc/{pid}").exists() for pid in pids)


@asynccontextmanager
async def running_engine(
    max_concurrency: int = 1, **cfg: Any
) -> AsyncIterator[PocketsphinxTranscriber]:
    """Started engine, closed inside the test body (so the task-leak check covers it); on the
    way out, every worker it ever ran must be gone: exited and reaped, no zombie."""
    eng = PocketsphinxTranscriber(
        "sphinx", PocketsphinxModelConfig(max_concurrency=max_concurrency, **cfg)
    )
    await eng.start()
    seen = set(eng.pool.pids)
    assert len(seen) == max_concurrency
    try:
        yield eng
        if eng._pool is not None:
            seen.update(eng.pool.pids)
    finally:
        await eng.aclose()
    assert gone(seen)


def open_stream(engine: PocketsphinxTranscriber, n: int = 1) -> TranscriptionStream:
    return engine.open_stream(language="en-US", session_id="s", utterance_id=n)


async def feed_all(stream: TranscriptionStream, pcm: bytes) -> list[Hypothesis]:
    interims = []
    for i in range(0, len(pcm), CHUNK):
        hyp = await stream.feed(pcm[i : i + CHUNK])
        if hyp is not None:
            interims.append(hyp)
    return interims


def test_words_from_segments_drops_fillers_and_converts_frames() -> None:
    segs = [
        ("<s>", 0, 9, 1.0),
        ("hello", 10, 49, 0.9),
        ("<sil>", 50, 54, 1.0),
        ("[NOISE]", 55, 57, 1.0),
        ("++GARBAGE++", 58, 59, 1.0),
        ("world(2)", 60, 99, 1.2),
        ("</s>", 100, 110, 1.0),
    ]
    assert words_from_segments(segs, 100) == [
        ("hello", 100, 500, 0.9),
        ("world", 600, 1000, 1.0),  # end frame inclusive; confidence clamped
    ]


async def test_espeak_sentence_gives_text_with_increasing_word_timings(speech: bytes) -> None:
    async with running_engine() as engine:
        stream = open_stream(engine)
        interims = await feed_all(stream, speech)
        final = await stream.finish()
        assert engine.pool.in_use == 0
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


async def test_streams_beyond_max_concurrency_wait_rather_than_fail(speech: bytes) -> None:
    async with running_engine() as engine:
        first, second = open_stream(engine, 1), open_stream(engine, 2)
        await first.feed(speech[:CHUNK])
        blocked = asyncio.create_task(second.feed(speech[:CHUNK]))
        await asyncio.sleep(0.2)
        assert not blocked.done()  # waiting for the only worker, not failing
        assert engine.pool.waiting == 1
        await feed_all(first, speech[CHUNK:])
        assert (await first.finish()).text
        await blocked  # got the worker as soon as the first stream let go
        await feed_all(second, speech[CHUNK:])
        assert (await second.finish()).text
        assert engine.pool.created == 1 and engine.pool.in_use == 0
        assert engine.pool.replaced == 0


async def test_aclose_mid_utterance_frees_a_clean_worker(speech: bytes) -> None:
    async with running_engine() as engine:
        [pid] = engine.pool.pids
        # Another session's utterance: what a fresh session reads (each session carries its
        # own cepstral mean; an abandoned utterance leaves none behind).
        reference = engine.open_stream(language="en-US", session_id="r", utterance_id=1)
        await feed_all(reference, speech)
        expected = await reference.finish()

        abandoned = open_stream(engine, 2)
        await feed_all(abandoned, speech[: len(speech) // 2])
        assert engine.pool.in_use == 1
        await abandoned.aclose()
        assert engine.pool.in_use == 0 and engine.pool.idle == 1
        with pytest.raises(EngineError):
            await abandoned.feed(speech[:CHUNK])

        # The same process, reused: its old utterance must not leak into the new one.
        again = open_stream(engine, 3)
        await feed_all(again, speech)
        assert await again.finish() == expected
        assert engine.pool.pids == [pid]


async def test_aclose_while_waiting_for_a_worker(speech: bytes) -> None:
    async with running_engine() as engine:
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


async def test_cancelled_feed_then_aclose_returns_the_worker(speech: bytes) -> None:
    async with running_engine() as engine:
        stream = open_stream(engine)
        task = asyncio.create_task(stream.feed(speech))  # one big feed, ~0.1 s of decoding
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()  # waits for the abandoned request, then aborts the utterance
        assert engine.pool.in_use == 0 and engine.pool.idle == 1
        again = open_stream(engine, 2)
        await feed_all(again, speech)
        assert (await again.finish()).text
        assert engine.pool.replaced == 0


async def test_finish_without_audio_needs_no_worker() -> None:
    async with running_engine() as engine:
        stream = open_stream(engine)
        assert await stream.feed(b"\x01") is None  # half a sample: carried, nothing decoded
        assert await stream.finish() == Hypothesis(text="")
        assert engine.pool.in_use == 0


async def test_killed_worker_fails_the_utterance_and_is_replaced(speech: bytes) -> None:
    async with running_engine() as engine:
        [pid] = engine.pool.pids
        doomed = open_stream(engine, 1)
        await feed_all(doomed, speech[: len(speech) // 2])
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineError) as failed:
            await feed_all(doomed, speech[len(speech) // 2 :])
        assert failed.value.retryable
        with pytest.raises(EngineError):
            await doomed.finish()
        await doomed.aclose()

        after = open_stream(engine, 2)  # waits for the replacement if it is still starting
        await feed_all(after, speech)
        assert (await after.finish()).text
        assert engine.pool.replaced == 1 and engine.pool.created == 1
        assert engine.pool.pids != [pid]
        assert pid not in child_pids()  # the dead one was reaped at once


async def test_worker_killed_while_idle_is_replaced_transparently(speech: bytes) -> None:
    async with running_engine() as engine:
        [pid] = engine.pool.pids
        os.kill(pid, signal.SIGKILL)  # no utterance, no audio lost: the stream never notices
        stream = open_stream(engine)
        await feed_all(stream, speech)
        assert (await stream.finish()).text
        assert engine.pool.replaced == 1 and engine.pool.pids != [pid]


async def test_unresponsive_worker_is_killed_after_the_call_timeout(speech: bytes) -> None:
    async with running_engine(call_timeout_s=1.0) as engine:
        [pid] = engine.pool.pids
        stuck = open_stream(engine, 1)
        await stuck.feed(speech[:CHUNK])
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="did not answer") as failed:
            await stuck.feed(speech[CHUNK : 2 * CHUNK])
        assert 0.9 < time.monotonic() - t0 < 3
        assert failed.value.retryable
        await stuck.aclose()

        # aclose() on a stuck worker mid-utterance: Abort times out, the worker is replaced.
        stream = open_stream(engine, 2)
        await stream.feed(speech[:CHUNK])  # on the replacement, once it has started
        [replacement] = engine.pool.pids
        assert replacement != pid
        os.kill(replacement, signal.SIGSTOP)
        await stream.aclose()
        assert engine.pool.in_use == 0 and engine.pool.replaced == 2

        last = open_stream(engine, 3)
        await feed_all(last, speech)
        assert (await last.finish()).text


async def test_event_loop_stays_responsive_while_decoding() -> None:
    long_speech = espeak_pcm16(LONG_SENTENCE)
    assert len(long_speech) > 5 * 32000
    async with running_engine() as engine:
        stream = open_stream(engine)
        worst = 0.0
        running = True

        async def ticker() -> None:
            nonlocal worst
            while running:
                t0 = time.perf_counter()
                await asyncio.sleep(0.005)
                worst = max(worst, time.perf_counter() - t0 - 0.005)

        tick = asyncio.create_task(ticker())
        try:
            await feed_all(stream, long_speech)
            feed_lag, worst = worst, 0.0
            t0 = time.perf_counter()
            final = await stream.finish()  # end_utt's second pass over ~5.8 s of speech
            finish_s = time.perf_counter() - t0
        finally:
            running = False
            await tick
    print(
        f"\nmax loop lag: {feed_lag * 1000:.1f} ms while feeding, {worst * 1000:.1f} ms during "
        f"a {finish_s * 1000:.0f} ms finish; heard {final.text!r}"
    )
    assert final.text
    assert finish_s > 0.05  # the decoder did work while the loop kept ticking
    assert worst < 0.1 and feed_lag < 0.1


async def test_two_workers_decode_at_the_same_time(speech: bytes) -> None:
    async with running_engine(max_concurrency=2) as engine:
        streams = [open_stream(engine, n) for n in (1, 2)]

        async def utterance(stream: TranscriptionStream) -> str:
            await feed_all(stream, speech)
            return (await stream.finish()).text

        texts = await asyncio.gather(*(utterance(s) for s in streams))
        assert texts[0] and texts[0] == texts[1]
        assert engine.pool.created == 2 and engine.pool.idle == 2


async def test_engine_close_fails_waiting_streams(speech: bytes) -> None:
    eng = PocketsphinxTranscriber("sphinx", PocketsphinxModelConfig(max_concurrency=1))
    await eng.start()
    [pid] = eng.pool.pids
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
    assert gone({pid})


async def test_broken_worker_install_fails_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "WORKER_MODULE", "server.models.no_such_worker")
    before = child_pids()
    eng = PocketsphinxTranscriber("sphinx", PocketsphinxModelConfig(max_concurrency=2))
    with pytest.raises(EngineError, match="failed to start") as failed:
        await eng.start()
    assert not failed.value.retryable
    assert child_pids() <= before
    with pytest.raises(EngineUnavailable):
        eng.pool  # noqa: B018


async def test_a_session_reads_the_same_audio_the_same_whatever_other_sessions_said() -> None:
    """Live cepstral mean normalisation carried over between the utterances a pooled worker
    decodes, another session's (another tenant's) too: the same audio came out as other words
    by worker and by history. Each session now carries its own mean from utterance to
    utterance; a new session starts from the model's. One worker serves both sessions here."""
    first = espeak_pcm16("as the water rose we had to read the signs")
    other = espeak_pcm16("please call me back tomorrow at nine")

    async def say(engine: PocketsphinxTranscriber, session: str, n: int, pcm: bytes) -> str:
        stream = engine.open_stream(language="en-US", session_id=session, utterance_id=n)
        try:
            await feed_all(stream, pcm)
            return (await stream.finish()).text
        finally:
            await stream.aclose()

    async with running_engine(max_concurrency=1) as engine:
        alone = [await say(engine, "a", 1, first), await say(engine, "a", 2, first)]
        # The same session, with another session's utterances on the same worker in between.
        assert await say(engine, "b", 1, other) == await say(engine, "c", 1, other)
        mixed = [await say(engine, "d", 1, first)]
        await say(engine, "e", 1, other)
        await say(engine, "e", 2, other)
        mixed.append(await say(engine, "d", 2, first))
        assert mixed == alone
        assert len(engine.session_means) == 5


def test_session_means_are_bounded_least_recent_first() -> None:
    means = SessionMeans(capacity=2)
    assert means.get("a") == ""  # a new session: the model's own mean
    means.put("a", "40,1")
    means.put("b", "41,2")
    assert means.get("a") == "40,1"  # now the most recent
    means.put("c", "42,3")
    assert len(means) == 2 and means.get("b") == "" and means.get("a") == "40,1"


def test_a_worker_starts_an_utterance_from_the_mean_it_is_given() -> None:
    import pocketsphinx

    session = DecoderSession(pocketsphinx.Decoder(loglevel="FATAL"))
    speech = espeak_pcm16("please call me back tomorrow at nine")

    def decode(start: Start) -> Final:
        assert isinstance(session.handle(start), Ok)
        assert isinstance(session.handle(Feed(pcm=speech)), Hyp)
        final = session.handle(Finish())
        assert isinstance(final, Final)
        return final

    fresh = decode(Start())
    assert fresh.cmn and decode(Start()) == fresh  # the model's own mean each time
    carried = decode(Start(cmn=fresh.cmn))
    assert decode(Start(cmn=fresh.cmn)) == carried
