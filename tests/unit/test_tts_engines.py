from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.config import (
    EspeakModelConfig,
    SyntheticTtsConfig,
    UpstreamTtsConfig,
    load_config,
)
from server.models.base import EngineError, EngineUnavailable, Synthesizer
from server.models.tts_espeak import EspeakSynthesizer
from server.models.tts_registry import aclose_all, build_synthesizers, start_all
from server.models.tts_synthetic import SyntheticSynthesizer
from server.models.tts_upstream import UpstreamSynthesizer
from server.models.upstream import MalformedResponse
from streamgate_protocol.audio import wav_header
from tests.fakes import leftover_tasks
from tests.fakes.upstream import FakeReply, FakeUpstream
from tests.system_tools import require_programs


@pytest.fixture
def espeak_ng() -> None:
    require_programs("espeak-ng")


needs_espeak = pytest.mark.usefixtures("espeak_ng")

LONG_TEXT = (
    "This sentence is long enough that espeak-ng needs far more than one pipe buffer "
    "to hold its audio, so the first chunk must arrive while it is still running. "
) * 3


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in it]


def alive(pid: int) -> bool:
    """True while the process exists, zombie included (kill(pid, 0) works until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.asynccontextmanager
async def running(engine: Any) -> AsyncIterator[Any]:
    # Closed inside the test body: the suite fails a test whose tasks outlive it.
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


def espeak(**overrides: Any) -> EspeakSynthesizer:
    values: dict[str, Any] = {"voice": "", "max_chars": 2000}
    values.update(overrides)
    return EspeakSynthesizer("espeak", EspeakModelConfig(**values))


# --- espeak-ng -----------------------------------------------------------------------------------


@needs_espeak
async def test_espeak_duration_grows_with_text() -> None:
    async with running(espeak()) as engine:
        assert engine.sample_rate == 22050
        short = await collect(engine.synthesize("Hello.", voice=None, language="en-US"))
        long = await collect(engine.synthesize(LONG_TEXT, voice=None, language="en-US"))
    assert all(len(c) % 2 == 0 for c in short + long)
    short_s = sum(map(len, short)) / 2 / 22050
    long_s = sum(map(len, long)) / 2 / 22050
    assert 0.2 < short_s < 3.0
    assert long_s > 10 * short_s


@needs_espeak
async def test_espeak_streams_before_the_process_ends() -> None:
    async with running(espeak()) as engine:
        gen = engine.synthesize(LONG_TEXT, voice=None, language="en-US")
        started = time.monotonic()
        first = await anext(gen)
        first_s = time.monotonic() - started
        # The audio does not fit in the pipes, so a still-running process proves streaming.
        (pid,) = engine.active_pids
        assert alive(pid)
        rest = await collect(gen)
        total_s = time.monotonic() - started
    assert first and rest
    assert first_s < total_s
    assert not alive(pid)
    assert engine.active_pids == frozenset()


@needs_espeak
async def test_espeak_closing_the_iterator_kills_and_reaps_the_process() -> None:
    async with running(espeak()) as engine:
        gen = engine.synthesize(LONG_TEXT, voice=None, language="en-US")
        assert await anext(gen)
        (pid,) = engine.active_pids
        await gen.aclose()
        assert not alive(pid)  # killed and reaped: not even a zombie is left
        assert engine.active_pids == frozenset()


@needs_espeak
@pytest.mark.parametrize("closing", [True, False])
async def test_espeak_cancelling_the_consumer_kills_the_process(closing: bool) -> None:
    async with running(espeak()) as engine:
        got_audio = asyncio.Event()

        async def consume() -> None:
            audio = engine.synthesize(LONG_TEXT, voice=None, language="en-US")
            async with contextlib.AsyncExitStack() as stack:
                if closing:  # the recommended pattern: closed as the task unwinds
                    await stack.enter_async_context(contextlib.aclosing(audio))
                async for _ in audio:
                    got_audio.set()
                    await asyncio.sleep(10)  # a consumer waiting for playback credit

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_audio.wait(), 5)
        (pid,) = engine.active_pids
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if not closing:
            # A bare `async for` leaves the generator to the loop's async-generator finalizer,
            # which closes it as soon as it is dropped (a few loop turns later).
            for _ in range(100):
                if not alive(pid):
                    break
                await asyncio.sleep(0.01)
        assert not alive(pid)
        assert engine.active_pids == frozenset()


@needs_espeak
async def test_espeak_concurrency_bound_is_back_pressure() -> None:
    async with running(espeak(max_concurrency=2)) as engine:
        gens = [engine.synthesize(LONG_TEXT, voice=None, language="en") for _ in range(3)]
        assert await anext(gens[0]) and await anext(gens[1])
        third = asyncio.ensure_future(anext(gens[2]))
        await asyncio.sleep(0.2)
        assert not third.done()  # waits for a slot, no third process
        assert len(engine.active_pids) == 2
        await gens[0].aclose()
        assert await asyncio.wait_for(third, 5)
        assert len(engine.active_pids) == 2
        for gen in gens[1:]:
            await gen.aclose()
        assert engine.active_pids == frozenset()


@needs_espeak
async def test_espeak_hindi_and_voice_resolution() -> None:
    async with running(espeak()) as engine:
        assert engine.resolve_voice(None, "hi-IN") == "hi"
        assert engine.resolve_voice(None, "en-US") == "en-us"
        assert engine.resolve_voice(None, "zh-CN") == "cmn"
        assert engine.resolve_voice("en-us+f3", "hi-IN") == "en-us+f3"
        audio = await collect(
            engine.synthesize("नमस्ते, आप कैसे हैं? मैं ठीक हूँ।", voice=None, language="hi-IN")
        )
        assert sum(map(len, audio)) / 2 / 22050 > 1.0
        for bad in ("nosuchvoice", "-v", "en us", "en-us+nosuchvariant"):
            with pytest.raises(EngineError, match="unknown espeak-ng voice") as err:
                await collect(engine.synthesize("Hi.", voice=bad, language="en"))
            assert not err.value.retryable
        with pytest.raises(EngineError, match="no espeak-ng voice for language") as err:
            await collect(engine.synthesize("Hi.", voice=None, language="xx-YY"))
        assert not err.value.retryable
        # Empty text: no audio and no process.
        assert await collect(engine.synthesize("  ", voice=None, language="en")) == []


@needs_espeak
async def test_espeak_configured_voice_and_rate_are_checked() -> None:
    async with running(espeak(voice="hi")) as engine:
        assert engine.resolve_voice(None, "en-US") == "hi"  # the model's voice wins
    with pytest.raises(EngineError, match="unknown espeak-ng voice"):
        await espeak(voice="nonexistent").start()
    async with running(espeak(sample_rate=16000)) as engine:
        with pytest.raises(EngineError, match="22050 Hz") as err:
            await collect(engine.synthesize("Hello.", voice=None, language="en"))
        assert not err.value.retryable
        assert engine.active_pids == frozenset()


async def test_espeak_missing_binary_names_the_debian_package() -> None:
    engine = EspeakSynthesizer("e", EspeakModelConfig(), binary="no-such-espeak-binary")
    with pytest.raises(EngineError, match="Debian package espeak-ng") as err:
        await engine.start()
    assert not err.value.retryable
    with pytest.raises(EngineUnavailable):
        await collect(engine.synthesize("Hello.", voice="en", language="en"))


@needs_espeak
async def test_espeak_text_over_the_limit_is_refused() -> None:
    async with running(espeak(max_chars=10)) as engine:
        with pytest.raises(EngineError, match="limit") as err:
            await collect(engine.synthesize("x" * 11, voice=None, language="en"))
        assert not err.value.retryable


# --- synthetic -----------------------------------------------------------------------------------


def synthetic(**overrides: Any) -> SyntheticSynthesizer:
    values: dict[str, Any] = {
        "ms_per_char": 10,
        "first_audio_ms": 50.0,
        "rtf": 0.5,
        "chunk_ms": 20,
        "sample_rate": 16000,
    }
    values.update(overrides)
    return SyntheticSynthesizer("syn", SyntheticTtsConfig(**values))


async def test_synthetic_timing_model() -> None:
    async with running(synthetic()) as engine:
        started = time.monotonic()
        times: list[float] = []
        chunks: list[bytes] = []
        async for chunk in engine.synthesize("x" * 20, voice=None, language="en"):
            times.append(time.monotonic() - started)
            chunks.append(chunk)
    # 20 chars * 10 ms = 200 ms of audio in 20 ms chunks of 640 bytes.
    assert [len(c) for c in chunks] == [640] * 10
    assert times[0] >= 0.045
    # The last chunk starts after 180 ms of audio: 50 ms + 0.5 * 180 ms = 140 ms.
    assert 0.13 <= times[-1] < 0.5


async def test_synthetic_is_deterministic_and_injects_failures() -> None:
    async with (
        running(synthetic(first_audio_ms=0, rtf=0)) as a,
        running(synthetic(first_audio_ms=0, rtf=0)) as b,
    ):
        assert b"".join(await collect(a.synthesize("hello", voice=None, language=""))) == b"".join(
            await collect(b.synthesize("hello", voice=None, language=""))
        )

    async def outcomes(engine: SyntheticSynthesizer) -> list[str]:
        out = []
        for _ in range(20):
            try:
                audio = await collect(engine.synthesize("x" * 10, voice=None, language=""))
                out.append(f"ok:{len(audio)}")
            except EngineError as exc:
                out.append(f"err:{exc.retryable}:{exc}")
        return out

    cfg = {"first_audio_ms": 0, "rtf": 0, "failure_rate": 0.5, "seed": 7}
    async with running(synthetic(**cfg)) as a, running(synthetic(**cfg)) as b:
        first, second = await outcomes(a), await outcomes(b)
    assert first == second
    assert any(o.startswith("ok") for o in first) and any(o.startswith("err") for o in first)
    async with running(synthetic(first_audio_ms=0, rtf=0, failure_rate=1.0)) as engine:
        with pytest.raises(EngineError):
            await collect(engine.synthesize("x" * 10, voice=None, language=""))


async def test_synthetic_limits_and_lifecycle() -> None:
    engine = synthetic(max_chars=5)
    await engine.start()
    with pytest.raises(EngineError, match="limit"):
        await collect(engine.synthesize("x" * 6, voice=None, language=""))
    await engine.aclose()
    with pytest.raises(EngineUnavailable):  # not started
        await collect(engine.synthesize("x", voice=None, language=""))


# --- upstream ------------------------------------------------------------------------------------

PCM = bytes(range(256)) * 375  # 96000 bytes = 2 s at 24 kHz


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    yield
    assert await leftover_tasks() == set()


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


def upstream(url: str, **overrides: Any) -> UpstreamSynthesizer:
    values: dict[str, Any] = {
        "url": url,
        "timeout_s": 2.0,
        "retries": 2,
        "breaker_failures": 3,
        "breaker_reset_s": 0.3,
    }
    values.update(overrides)
    return UpstreamSynthesizer("up", UpstreamTtsConfig(**values), backoff_s=0.01)


async def test_upstream_streams_pcm_as_it_arrives(
    fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TTS_KEY", "sk-test")
    fake.script(FakeReply.speech(PCM, chunk_bytes=9601, chunk_delay_s=0.05))
    async with running(upstream(fake.url, api_key_env="FAKE_TTS_KEY")) as engine:
        started = time.monotonic()
        times: list[float] = []
        chunks: list[bytes] = []
        async for chunk in engine.synthesize(" Hello there. ", voice=None, language="en"):
            times.append(time.monotonic() - started)
            chunks.append(chunk)
    assert b"".join(chunks) == PCM
    assert all(len(c) % 2 == 0 for c in chunks)  # odd-sized pieces are re-aligned
    assert times[0] < 0.3 < times[-1]  # ten pieces 50 ms apart; the first did not wait
    (req,) = fake.requests
    assert req.path == "/v1/audio/speech"
    assert req.json == {
        "model": "tts-1",
        "input": "Hello there.",
        "voice": "alloy",
        "response_format": "pcm",
    }
    assert req.headers["Authorization"] == "Bearer sk-test"


async def test_upstream_wav_format(fake: FakeUpstream) -> None:
    fake.script(FakeReply.speech(wav_header(24000) + PCM, content_type="audio/wav"))
    async with running(upstream(fake.url, response_format="wav")) as engine:
        audio = await collect(engine.synthesize("Hi.", voice="nova", language="en"))
        assert b"".join(audio) == PCM
        assert fake.requests[0].json is not None
        assert fake.requests[0].json["voice"] == "nova"
        fake.script(FakeReply.speech(wav_header(16000) + PCM, content_type="audio/wav"))
        with pytest.raises(MalformedResponse, match="unavailable: bad response"):
            await collect(engine.synthesize("Hi.", voice=None, language="en"))


async def test_upstream_retries_before_the_first_byte(fake: FakeUpstream) -> None:
    fake.script(FakeReply.error(500), FakeReply.error(503), FakeReply.speech(PCM))
    async with running(upstream(fake.url)) as engine:
        audio = await collect(engine.synthesize("Hi.", voice=None, language="en"))
        assert b"".join(audio) == PCM
        assert len(fake.requests) == 3
        assert engine.breaker_state == "closed"


async def test_upstream_client_error_is_not_retried(fake: FakeUpstream) -> None:
    fake.script(FakeReply.error(400, "bad voice"))
    async with running(upstream(fake.url)) as engine:
        with pytest.raises(EngineError, match="rejected the request: bad status 400") as err:
            await collect(engine.synthesize("Hi.", voice=None, language="en"))
        assert not err.value.retryable
        assert len(fake.requests) == 1
        assert engine.breaker_state == "closed"


async def test_upstream_breaker_opens(fake: FakeUpstream) -> None:
    fake.default = FakeReply.error(500)
    fake.speech_default = FakeReply.error(500)
    async with running(upstream(fake.url, retries=0, breaker_failures=2)) as engine:
        for _ in range(2):
            with pytest.raises(EngineError, match="after 1 attempts"):
                await collect(engine.synthesize("Hi.", voice=None, language="en"))
        assert engine.breaker_state == "open"
        with pytest.raises(EngineUnavailable, match="circuit open"):
            await collect(engine.synthesize("Hi.", voice=None, language="en"))
        assert len(fake.requests) == 2  # the open circuit cost the upstream nothing
        await asyncio.sleep(0.35)
        fake.script(FakeReply.speech(PCM))  # half-open trial succeeds and closes it
        assert b"".join(await collect(engine.synthesize("Hi.", voice=None, language="en"))) == PCM
        assert engine.breaker_state == "closed"


async def test_upstream_failure_after_first_byte_is_not_retried(fake: FakeUpstream) -> None:
    fake.script(FakeReply.speech(PCM, chunk_bytes=9600, abort_after=3))
    async with running(upstream(fake.url)) as engine:
        received: list[bytes] = []
        with pytest.raises(EngineError, match="after audio was sent") as err:
            async for chunk in engine.synthesize("Hi.", voice=None, language="en"):
                received.append(chunk)
        assert not err.value.retryable
        assert 0 < len(b"".join(received)) < len(PCM)
        assert len(fake.requests) == 1


async def test_upstream_timeout_before_first_byte_is_retried(fake: FakeUpstream) -> None:
    fake.script(FakeReply.speech(PCM, delay_s=1.0), FakeReply.speech(PCM))
    async with running(upstream(fake.url, timeout_s=0.2)) as engine:
        audio = await collect(engine.synthesize("Hi.", voice=None, language="en"))
        assert b"".join(audio) == PCM
        assert len(fake.requests) == 2


async def test_upstream_consumer_stopping_frees_the_slot(fake: FakeUpstream) -> None:
    fake.speech_default = FakeReply.speech(PCM, chunk_bytes=4800, chunk_delay_s=0.02)
    async with running(upstream(fake.url, max_concurrency=1)) as engine:
        gen = engine.synthesize("Hi.", voice=None, language="en")
        assert await anext(gen)
        await gen.aclose()
        # With one slot, this only runs if the abandoned request released it.
        audio = await asyncio.wait_for(
            collect(engine.synthesize("Hi.", voice=None, language="en")), 5
        )
        assert b"".join(audio) == PCM
        assert engine.breaker_state == "closed"


# --- registry ------------------------------------------------------------------------------------


@needs_espeak
async def test_registry_builds_and_runs_the_default_models() -> None:
    cfg = load_config(environ={})
    engines: dict[str, Synthesizer] = build_synthesizers(cfg.tts.models)
    assert {"espeak-en", "espeak-hi", "synthetic"} <= engines.keys()
    assert isinstance(engines["espeak-hi"], EspeakSynthesizer)
    assert isinstance(engines["synthetic"], SyntheticSynthesizer)
    await start_all(engines)
    try:
        for name in ("espeak-en", "synthetic"):
            audio = await collect(engines[name].synthesize("Hi.", voice=None, language="en"))
            assert audio
    finally:
        await aclose_all(engines)
