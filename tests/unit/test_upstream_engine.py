from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
import wave
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.config import UpstreamModelConfig
from server.models.base import EngineError, EngineUnavailable, Hypothesis, WordTiming
from server.models.upstream import MAX_UTTERANCE_BYTES, UpstreamTranscriber, wav_bytes
from tests.fakes import leftover_tasks
from tests.fakes.upstream import FakeReply, FakeUpstream

PCM = bytes(range(256)) * 125  # 32000 bytes = 1 s at 16 kHz


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    yield
    assert await leftover_tasks() == set()


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


def config(url: str, **overrides: Any) -> UpstreamModelConfig:
    values: dict[str, Any] = {
        "url": url,
        "timeout_s": 2.0,
        "retries": 2,
        "backoff_s": 0.01,
        "breaker_failures": 3,
        "breaker_reset_s": 0.3,
    }
    values.update(overrides)
    return UpstreamModelConfig(**values)


async def transcribe(engine: UpstreamTranscriber, pcm: bytes = PCM) -> Hypothesis:
    stream = engine.open_stream(language="en-US", session_id="s", utterance_id=1)
    for i in range(0, len(pcm), 640):
        assert await stream.feed(pcm[i : i + 640]) is None  # no interim from this engine
    return await stream.finish()


def state(engine: UpstreamTranscriber) -> str:
    # A call, not the property: mypy would narrow it and reject the later comparisons.
    return engine.breaker_state


@contextlib.asynccontextmanager
async def running(cfg: UpstreamModelConfig) -> AsyncIterator[UpstreamTranscriber]:
    # Closed inside the test body: its keep-alive connections are what keep the fake
    # server's handler tasks alive, and the suite checks for tasks when the body ends.
    engine = UpstreamTranscriber("up", cfg)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


async def test_success_with_words(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    fake.script(
        FakeReply.transcription(" Hello world.", [(" Hello", 0.0, 0.42), (" world.", 0.42, 0.905)])
    )
    async with running(config(fake.url, api_key_env="FAKE_UPSTREAM_KEY")) as engine:
        hyp = await transcribe(engine)
        assert hyp == Hypothesis(
            text="Hello world.",
            words=[WordTiming("Hello", 0, 420, 1.0), WordTiming("world.", 420, 905, 1.0)],
        )
        [req] = fake.requests
        assert req.path == "/v1/audio/transcriptions"
        assert req.headers["Authorization"] == "Bearer sk-test"
        assert req.fields == {
            "model": "whisper-1",
            "response_format": "verbose_json",
            "timestamp_granularities[]": "word",
            "language": "en",
        }
        filename, ctype, data = req.files["file"]
        assert filename == "audio.wav" and ctype == "audio/wav"
        with wave.open(io.BytesIO(data)) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
            assert wav.readframes(wav.getnframes()) == PCM
        assert state(engine) == "closed"


async def test_missing_words_give_an_empty_list(fake: FakeUpstream) -> None:
    fake.script(FakeReply.transcription("hi"))
    async with running(config(fake.url)) as engine:
        assert await transcribe(engine) == Hypothesis(text="hi", words=[])
        assert "Authorization" not in fake.requests[0].headers


async def test_500_then_success_is_retried(fake: FakeUpstream) -> None:
    fake.script(FakeReply.error(500), FakeReply.error(503), FakeReply.transcription("ok"))
    async with running(config(fake.url, retries=2)) as engine:
        assert (await transcribe(engine)).text == "ok"
        assert len(fake.requests) == 3
        assert state(engine) == "closed"


async def test_429_is_retried_after_retry_after(fake: FakeUpstream) -> None:
    fake.script(FakeReply.error(429, headers={"Retry-After": "0.2"}), FakeReply.transcription("ok"))
    async with running(config(fake.url, retries=1)) as engine:
        t0 = time.perf_counter()
        assert (await transcribe(engine)).text == "ok"
        assert time.perf_counter() - t0 >= 0.2
        assert len(fake.requests) == 2


async def test_always_500_opens_the_breaker_then_fails_fast(fake: FakeUpstream) -> None:
    fake.default = FakeReply.error(500)
    async with running(config(fake.url, retries=1, breaker_failures=3)) as engine:
        with pytest.raises(EngineError) as first:
            await transcribe(engine)  # 2 attempts -> 2 failures, still closed
        assert not isinstance(first.value, EngineUnavailable)
        assert engine.breaker.consecutive_failures == 2
        with pytest.raises(EngineUnavailable):
            await transcribe(engine)  # 3rd failure trips it; no 4th attempt
        assert state(engine) == "open"
        assert len(fake.requests) == 3

        t0 = time.perf_counter()
        with pytest.raises(EngineUnavailable):
            await transcribe(engine)
        assert time.perf_counter() - t0 < 0.05
        assert len(fake.requests) == 3  # the upstream was not bothered

        await asyncio.sleep(0.35)  # > breaker_reset_s: one trial goes through and fails
        assert state(engine) == "half_open"
        with pytest.raises(EngineUnavailable):
            await transcribe(engine)
        assert len(fake.requests) == 4
        assert state(engine) == "open"

        fake.default = FakeReply.transcription("back")
        await asyncio.sleep(0.35)
        assert (await transcribe(engine)).text == "back"
        assert state(engine) == "closed"


async def test_slow_upstream_times_out_and_is_retried(fake: FakeUpstream) -> None:
    fake.default = FakeReply(body=b"{}", delay_s=5.0)
    async with running(config(fake.url, timeout_s=0.2, retries=1)) as engine:
        t0 = time.perf_counter()
        with pytest.raises(EngineError, match="unavailable: timeout after 2 attempts"):
            await transcribe(engine)
        elapsed = time.perf_counter() - t0
        assert 0.4 <= elapsed < 1.5
        assert len(fake.requests) == 2


async def test_malformed_json_is_an_engine_error_not_retried(fake: FakeUpstream) -> None:
    fake.default = FakeReply(body=b'{"text": "unterminated')
    async with running(config(fake.url)) as engine:
        with pytest.raises(EngineError, match="unavailable: bad response") as err:
            await transcribe(engine)
        assert not err.value.retryable
        assert len(fake.requests) == 1


async def test_wrong_shape_json_is_an_engine_error(fake: FakeUpstream) -> None:
    fake.default = FakeReply(body=b'{"text": 42, "words": "none"}')
    async with running(config(fake.url)) as engine:
        with pytest.raises(EngineError, match="unavailable: bad response"):
            await transcribe(engine)


async def test_400_is_not_retried(fake: FakeUpstream) -> None:
    fake.default = FakeReply.error(400, "bad audio")
    async with running(config(fake.url, retries=3, breaker_failures=1)) as engine:
        with pytest.raises(EngineError, match="400") as err:
            await transcribe(engine)
        assert not err.value.retryable
        assert len(fake.requests) == 1
        assert state(engine) == "closed"  # the upstream answered; it is healthy


async def test_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with running(config(f"http://127.0.0.1:{port}", retries=2)) as engine:
        with pytest.raises(EngineError, match="3 attempts"):
            await transcribe(engine)
        assert engine.breaker.consecutive_failures == 3


async def test_concurrency_is_bounded(fake: FakeUpstream) -> None:
    fake.default = FakeReply(body=b'{"text": "x"}', delay_s=0.1)
    async with running(config(fake.url, max_concurrency=2)) as engine:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(transcribe(engine) for _ in range(4)))
        assert [r.text for r in results] == ["x"] * 4
        assert time.perf_counter() - t0 >= 0.2  # 4 calls, 2 at a time, 0.1 s each


async def test_buffer_is_capped_at_30_seconds(fake: FakeUpstream) -> None:
    async with running(config(fake.url)) as engine:
        stream = engine.open_stream(language="", session_id="s", utterance_id=1)
        await stream.feed(b"\x00" * MAX_UTTERANCE_BYTES)
        with pytest.raises(EngineError, match="30 s"):
            await stream.feed(b"\x00\x00")
        await stream.aclose()
        assert fake.requests == []


async def test_empty_utterance_makes_no_call(fake: FakeUpstream) -> None:
    async with running(config(fake.url)) as engine:
        stream = engine.open_stream(language="", session_id="s", utterance_id=1)
        assert await stream.finish() == Hypothesis(text="")
        assert fake.requests == []


async def test_missing_api_key_env_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    engine = UpstreamTranscriber("up", config("http://127.0.0.1:9", api_key_env="NOT_SET_ANYWHERE"))
    with pytest.raises(EngineError, match="NOT_SET_ANYWHERE"):
        await engine.start()
    await engine.aclose()


async def test_not_started_or_closed_engine_is_unavailable(fake: FakeUpstream) -> None:
    engine = UpstreamTranscriber("up", config(fake.url))
    with pytest.raises(EngineUnavailable):
        await transcribe(engine)
    await engine.start()
    await engine.aclose()
    with pytest.raises(EngineUnavailable):
        await transcribe(engine)


def test_wav_header_is_canonical() -> None:
    data = wav_bytes(b"\x01\x02" * 10 + b"\x03")  # odd trailing byte dropped
    assert len(data) == 44 + 20
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getnframes() == 10
