"""Sarvam's streaming WebSockets, spoken by the official `sarvamai` SDK against a real server
process: streaming STT of espeak-ng speech (WAV messages and raw PCM), streaming TTS (MP3 and
linear16, `flush` and its completion event), the SDK's own error for a bad key, a client that
floods audio held to the session's bounds, and with billing on both charged exactly."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import soundfile
from sarvamai import AsyncSarvamAI, AudioOutput, EventResponse, SarvamAIEnvironment
from sarvamai.core.api_error import ApiError
from websockets.asyncio.client import connect

from streamgate_protocol.audio import wav_header
from tests.e2e.conftest import TEST_KEY, ServerProcess
from tests.e2e.test_billing_e2e import Billing, assert_books_balance, billing_server
from tests.e2e.test_tts_billing import charged_units
from tests.speech import espeak_pcm16, silence

pytestmark = [
    pytest.mark.e2e,
    # The SDK (0.1.39) connects with websockets' legacy client.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

REDIS_DB = 7  # a Redis logical database of this module alone (see test_billing_e2e.py)
PRICE_PER_MIN = 1000  # [asr.models.synthetic] price_micros_per_minute in config/default.toml
CHUNK_MS = 100
TTS_TEXT = "Streaming speech from the gateway. Every sentence is sent as it is made."


def sdk(server: ServerProcess, key: str = TEST_KEY) -> AsyncSarvamAI:
    """The SDK pointed at streamgate: its environment's `production` URL is where it opens
    its WebSockets (`/speech-to-text/ws`, `/text-to-speech/ws`)."""
    env = SarvamAIEnvironment(base=server.http, creative=server.http, production=server.ws)
    return AsyncSarvamAI(api_subscription_key=key, environment=env)


@pytest.fixture(scope="module")
def speech() -> bytes:
    """espeak-ng speech at 16 kHz with silence around it (the VAD ends the utterance)."""
    return silence(300) + espeak_pcm16("one two three four five") + silence(900)


def pieces(pcm: bytes, rate: int = 16000, ms: int = CHUNK_MS) -> Iterator[bytes]:
    size = rate * 2 * ms // 1000
    for start in range(0, len(pcm), size):
        yield pcm[start:start + size]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def transcripts(ws: Any, wanted: int, timeout: float = 15.0) -> list[Any]:
    """Every response up to the `wanted`-th transcript."""
    seen: list[Any] = []
    async with asyncio.timeout(timeout):
        while sum(r.type == "data" for r in seen) < wanted:
            seen.append(await ws.recv())
    return seen


# --- speech to text -----------------------------------------------------------------------------


async def test_streaming_stt_of_wav_messages_gives_a_transcript_and_vad_events(
        server: ServerProcess, speech: bytes) -> None:
    client = sdk(server)
    async with client.speech_to_text_streaming.connect(
            language_code="en-IN", model="saaras:v3", vad_signals="true") as ws:
        for piece in pieces(speech):  # each message a whole WAV file, as the SDK's examples
            await ws.transcribe(audio=b64(wav_header(16000, 1, len(piece) // 2) + piece),
                                encoding="audio/wav", sample_rate=16000)
        seen = await transcripts(ws, 1)
    data = [r.data for r in seen if r.type == "data"]
    assert data[0].transcript.strip()
    assert data[0].language_code == "en-IN"
    assert data[0].request_id and data[0].metrics.audio_duration > 0.5
    signals = [r.data.signal_type for r in seen if r.type == "events"]
    assert signals[:2] == ["START_SPEECH", "END_SPEECH"]
    assert not [r for r in seen if r.type == "error"]


async def test_streaming_stt_of_raw_pcm_and_flush(server: ServerProcess, speech: bytes) -> None:
    """Raw PCM at 8 kHz (the rate is the connection's), no trailing silence: `flush` makes the
    final."""
    pcm8k = silence(300, 8000) + espeak_pcm16("one two three four five", 8000)
    client = sdk(server)
    async with client.speech_to_text_streaming.connect(
            language_code="unknown", sample_rate="8000", input_audio_codec="pcm_s16le",
            high_vad_sensitivity="true", flush_signal="true") as ws:
        for piece in pieces(pcm8k, rate=8000):
            await ws.transcribe(audio=b64(piece), encoding="audio/wav", sample_rate=8000)
        await ws.flush()
        seen = await transcripts(ws, 1)
    data = [r.data for r in seen if r.type == "data"]
    assert data[0].transcript.strip() and data[0].language_code is None
    assert not [r for r in seen if r.type in ("events", "error")]  # no vad_signals asked


async def test_bad_messages_are_answered_with_errors_and_the_session_goes_on(
        server: ServerProcess, speech: bytes) -> None:
    client = sdk(server)
    async with client.speech_to_text_streaming.connect(language_code="en-IN") as ws:
        await ws._send({"audio": {"data": "not base64!", "sample_rate": 16000}})
        await ws._send({"type": "dance"})
        errors = [await ws.recv(), await ws.recv()]
        assert [e.type for e in errors] == ["error", "error"]
        assert [e.data.code for e in errors] == ["bad_audio", "bad_message"]
        for piece in pieces(speech):
            await ws.transcribe(audio=b64(piece), sample_rate=16000)
        seen = await transcripts(ws, 1)
    assert next(r for r in seen if r.type == "data").data.transcript.strip()


async def test_a_bad_key_and_an_unknown_model_raise_the_sdks_error(server: ServerProcess) -> None:
    with pytest.raises(ApiError) as bad_key:
        async with sdk(server, key="wrong").speech_to_text_streaming.connect(
                language_code="en-IN"):
            pass
    assert bad_key.value.status_code == 401
    with pytest.raises(ApiError) as tts_bad_key:
        async with sdk(server, key="wrong").text_to_speech_streaming.connect():
            pass
    assert tts_bad_key.value.status_code == 401
    with pytest.raises(ApiError) as unknown:
        async with sdk(server).speech_to_text_streaming.connect(language_code="en-IN",
                                                               model="no-such-model"):
            pass
    assert unknown.value.status_code == 400


def queue_depth_ms(server: ServerProcess) -> float:
    """Audio waiting in the server's ASR sessions: ingest queue plus engine queue."""
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(r'streamgate_queue_depth_ms\{stage="(?:ingest|invoke)"\} ([0-9.e+]+)', text)
    assert len(found) == 2, "no queue gauges"
    return sum(float(v) for v in found)


async def test_a_flooding_client_is_held_to_the_sessions_bounds(server: ServerProcess,
                                                                speech: bytes) -> None:
    """Audio sent as fast as the socket takes it to a model far slower than real time: the
    session stops reading when its queues are full (the rest waits in the client's socket:
    TCP back pressure), so what waits in the server stays well short of what was sent,
    nothing is dropped, and every final comes."""
    stream = speech * 3
    messages = [json.dumps({"audio": {"data": b64(p), "sample_rate": 16000}})
                for p in pieces(stream)]
    peaks: list[float] = []

    async def sample() -> None:
        while True:
            peaks.append(await asyncio.to_thread(queue_depth_ms, server))
            await asyncio.sleep(0.1)

    async with connect(f"{server.ws}/speech-to-text/ws?language-code=en-IN&model=synthetic-stuck",
                       additional_headers={"api-subscription-key": TEST_KEY}) as ws:
        sampler = asyncio.create_task(sample())
        for message in messages:
            await ws.send(message)
        finals = 0
        async with asyncio.timeout(30):
            while finals < 3:
                finals += json.loads(await ws.recv())["type"] == "data"
        sampler.cancel()
    # Reading paused long before the whole stream was in (the engine queue of this kernel may
    # pass invoke_queue_ms by what one step took from the ingest queue: measured 4500 ms).
    assert 0 < max(peaks) < len(stream) // 32 - 2000, peaks
    ended = await ended_line(server, lambda e: e.get("audio_ms") == len(stream) // 32)
    assert ended["dropped_ms"] == 0 and ended["close_code"] == 1000


async def ended_line(server: ServerProcess, match: Any) -> dict[str, object]:
    async with asyncio.timeout(10):
        while True:
            found = [e for e in server.logs() if e.get("msg") == "session ended" and match(e)]
            if found:
                return found[-1]
            await asyncio.sleep(0.05)


# --- text to speech -----------------------------------------------------------------------------


async def speak(ws: Any, text: str) -> tuple[list[bytes], list[str]]:
    """Audio chunks and their content types up to the completion event of one flush."""
    await ws.convert(text)
    await ws.flush()
    audio: list[bytes] = []
    types: list[str] = []
    async with asyncio.timeout(20):
        async for msg in ws:
            if isinstance(msg, AudioOutput):
                audio.append(base64.b64decode(msg.data.audio))
                types.append(msg.data.content_type)
            elif isinstance(msg, EventResponse):
                assert msg.data.event_type == "final"
                return audio, types
            else:
                raise AssertionError(f"unexpected {msg!r}")
    raise AssertionError("the socket closed before the completion event")


async def test_streaming_tts_gives_mp3_chunks_and_a_completion_event(
        server: ServerProcess) -> None:
    client = sdk(server)
    async with client.text_to_speech_streaming.connect(model="bulbul:v2") as ws:
        await ws.configure(target_language_code="en-IN", speaker="anushka")  # MP3 by default
        audio, types = await speak(ws, TTS_TEXT)
        assert len(audio) > 2 and set(types) == {"audio/mp3"}
        decoded, rate = soundfile.read(io.BytesIO(b"".join(audio)), dtype="int16")
        assert rate == 22050 and len(decoded) / rate > 2.0
        # The same socket speaks again after a flush.
        again, _ = await speak(ws, "And once more.")
        assert again


async def test_streaming_tts_in_linear16(server: ServerProcess) -> None:
    client = sdk(server)
    async with client.text_to_speech_streaming.connect(send_completion_event="true") as ws:
        await ws.configure(target_language_code="en-IN", output_audio_codec="linear16",
                           speech_sample_rate=16000)
        await ws.ping()
        audio, types = await speak(ws, "Hello there")
    pcm = b"".join(audio)
    assert set(types) == {"audio/L16"} and len(pcm) % 2 == 0
    assert len(pcm) / 32000 > 0.4  # seconds of 16 kHz PCM16


async def test_an_unsupported_codec_is_refused_in_sarvams_error_shape(
        server: ServerProcess) -> None:
    client = sdk(server)
    async with client.text_to_speech_streaming.connect() as ws:
        await ws.configure(target_language_code="en-IN", output_audio_codec="aac")
        reply = await ws.recv()
    assert reply.type == "error" and reply.data.code == 400
    assert reply.data.details == {"code": "bad_config", "retryable": False}


async def test_pipecats_tts_messages(server: ServerProcess) -> None:
    """What Pipecat's SarvamTTSService sends on its own socket (it takes a `url`): numbers as
    strings in its config, the config again on a settings change, text, flush, ping."""
    cfg: dict[str, Any] = {"type": "config", "data": {
        "target_language_code": "en-IN", "speaker": "anushka", "speech_sample_rate": "16000",
        "enable_preprocessing": False, "min_buffer_size": 50, "max_chunk_length": 150,
        "output_audio_codec": "linear16", "output_audio_bitrate": "128k", "pace": 1.0,
        "model": "bulbul:v2"}}
    url = f"{server.ws}/text-to-speech/ws?model=bulbul:v2&send_completion_event=true"
    async with connect(url, additional_headers={"api-subscription-key": TEST_KEY}) as ws:
        await ws.send(json.dumps(cfg))
        await ws.send(json.dumps({"type": "text", "data": {"text": "Hello from Pipecat."}}))
        cfg["data"]["pace"] = 1.2  # a settings change: the config comes again
        await ws.send(json.dumps(cfg))
        await ws.send(json.dumps({"type": "flush"}))
        await ws.send(json.dumps({"type": "ping"}))
        kinds: list[str] = []
        pcm = b""
        async with asyncio.timeout(20):
            while not kinds or kinds[-1] != "event":
                msg = json.loads(await ws.recv())
                kinds.append(msg["type"])
                if msg["type"] == "audio":
                    pcm += base64.b64decode(msg["data"]["audio"])
    assert set(kinds[:-1]) == {"audio"} and len(pcm) / 32000 > 0.5


# --- billing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def billed(redis_url: str, database_url: str) -> Iterator[Billing]:
    with billing_server(redis_url, database_url, REDIS_DB) as env:
        yield env


def cost(ms: int) -> int:
    return -(-ms * PRICE_PER_MIN // 60_000)


async def test_stt_and_tts_are_charged_exactly(billed: Billing, speech: bytes) -> None:
    tenant = billed.admin.tenant(funded=1_000_000)
    client = sdk(billed.server, key=tenant.key)
    async with client.speech_to_text_streaming.connect(language_code="en-IN") as ws:
        for piece in pieces(speech):
            await ws.transcribe(audio=b64(piece), sample_rate=16000)
        await transcripts(ws, 1)
    audio_ms = len(speech) // 32
    pg = await assert_books_balance(billed.dsn, billed.redis_url, tenant.tenant_id,
                                    expected_usage=cost(audio_ms))
    assert pg.usage == cost(audio_ms)
    async with client.text_to_speech_streaming.connect() as ws:
        await ws.configure(target_language_code="en-IN")
        await speak(ws, TTS_TEXT)
    ended = await ended_line(billed.server, lambda e: e.get("tenant_id") == tenant.tenant_id
                             and "characters" in e)
    after = await assert_books_balance(billed.dsn, billed.redis_url, tenant.tenant_id)
    units, charged = await charged_units(billed.dsn, tenant.tenant_id)
    assert units == int(str(ended["characters"])) >= len(TTS_TEXT) - 2
    assert after.usage == pg.usage + charged and charged > 0
    # An empty wallet is refused before the upgrade: the SDK's error, and nothing charged.
    broke = billed.admin.tenant(funded=0)
    with pytest.raises(ApiError) as refused:
        async with sdk(billed.server, key=broke.key).speech_to_text_streaming.connect(
                language_code="en-IN"):
            pass
    assert refused.value.status_code == 402
