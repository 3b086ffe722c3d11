"""The OpenAI audio API, spoken by the official `openai` SDK against a real server process:
transcription in every response_format and streamed, speech as wav, pcm, mp3 and opus (decoded
back with soundfile) and streamed, the model list, the SDK's own exceptions, and with billing on
a transcription charged its audio once and a refused one nothing."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.request
import warnings
import wave
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
import soundfile
from prometheus_client.parser import text_string_to_metric_families

from streamgate_protocol.audio import wav_header
from tests.e2e.conftest import TEST_KEY, ServerProcess, wait_for
from tests.e2e.test_billing_e2e import (
    Billing,
    assert_books_balance,
    billing_server,
    pg_state,
)
from tests.e2e.test_tts_billing import charged_units
from tests.speech import espeak_pcm16, silence

pytestmark = pytest.mark.e2e

REDIS_DB = 9  # a Redis logical database of this module alone (see test_billing_e2e.py)
PRICE_PER_MIN = 1000  # [asr.models.synthetic] price_micros_per_minute in config/default.toml
SPEECH_TEXT = "Streaming speech from the gateway. Every sentence is sent as it is made."


def client(server: ServerProcess, key: str = TEST_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def recording() -> tuple[bytes, int]:
    """A WAV of espeak-ng speech with silence around it, and its length in ms."""
    pcm = silence(300) + espeak_pcm16("one two three four five") + silence(800)
    return wav_header(16000, 1, len(pcm) // 2) + pcm, len(pcm) // 32


def duration_s(data: bytes) -> tuple[float, int]:
    audio, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    return len(audio) / rate, rate


def test_transcription_in_every_response_format(server: ServerProcess,
                                                recording: tuple[bytes, int]) -> None:
    wav, audio_ms = recording
    sdk = client(server)
    upload = ("speech.wav", wav, "audio/wav")
    as_json = sdk.audio.transcriptions.create(model="synthetic", file=upload)
    assert as_json.text
    assert as_json.usage is not None and as_json.usage.type == "duration"
    assert as_json.usage.seconds == audio_ms / 1000
    # OpenAI's model name is served by the default ASR model (server.toml: synthetic).
    aliased = sdk.audio.transcriptions.create(model="whisper-1", file=upload)
    assert aliased.text == as_json.text
    text = sdk.audio.transcriptions.create(model="synthetic", file=upload,
                                           response_format="text")
    assert isinstance(text, str) and text.strip() == as_json.text
    srt = sdk.audio.transcriptions.create(model="synthetic", file=upload, response_format="srt")
    assert isinstance(srt, str) and srt.startswith("1\n00:00:0") and " --> " in srt
    assert as_json.text in srt
    vtt = sdk.audio.transcriptions.create(model="synthetic", file=upload, response_format="vtt")
    assert isinstance(vtt, str) and vtt.startswith("WEBVTT\n\n00:00:0") and as_json.text in vtt
    verbose = sdk.audio.transcriptions.create(
        model="synthetic", file=upload, response_format="verbose_json",
        timestamp_granularities=["word", "segment"], language="en", prompt="numbers",
        temperature=0.2)
    assert verbose.text == as_json.text and verbose.duration == audio_ms / 1000
    assert verbose.language == "en"
    assert verbose.segments and verbose.segments[0].text == as_json.text
    assert 0 <= verbose.segments[0].start < verbose.segments[0].end <= verbose.duration
    assert verbose.segments[0].temperature == 0.2
    assert verbose.words and " ".join(w.word for w in verbose.words) == as_json.text
    assert all(w.start <= w.end for w in verbose.words)
    segments_only = sdk.audio.transcriptions.create(
        model="synthetic", file=upload, response_format="verbose_json")
    assert segments_only.segments and segments_only.words is None


def test_streamed_transcription(server: ServerProcess) -> None:
    # Two utterances: two deltas, then the whole text.
    pcm = silence(300) + espeak_pcm16("first part") + silence(900) + \
        espeak_pcm16("second part") + silence(900)
    two = wav_header(16000, 1, len(pcm) // 2) + pcm
    stream = client(server).audio.transcriptions.create(
        model="synthetic", file=("two.wav", two, "audio/wav"), stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["transcript.text.delta"] * (len(kinds) - 1) + ["transcript.text.done"]
    assert len(kinds) >= 3, kinds
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    done = events[-1]
    assert done.type == "transcript.text.done" and done.text == deltas


def test_speech_wav_pcm_and_compressed_formats(server: ServerProcess) -> None:
    sdk = client(server)
    pcm = sdk.audio.speech.create(model="espeak-en", voice="alloy", input=SPEECH_TEXT,
                                  response_format="pcm").read()
    assert len(pcm) % 2 == 0
    pcm_s = len(pcm) / 2 / 24000
    assert 2.0 < pcm_s < 12.0
    wav = sdk.audio.speech.create(model="tts-1", voice="alloy", input=SPEECH_TEXT,
                                  response_format="wav").read()
    fixed = bytearray(wav)  # a streamed header says "unknown length"
    fixed[4:8] = (len(wav) - 8).to_bytes(4, "little")
    fixed[40:44] = (len(wav) - 44).to_bytes(4, "little")
    with wave.open(io.BytesIO(bytes(fixed))) as reader:
        assert reader.getframerate() == 24000 and reader.getnchannels() == 1
        assert reader.getnframes() == len(pcm) // 2  # espeak-ng speaks it the same way twice
    for fmt in ("mp3", "opus"):
        encoded = sdk.audio.speech.create(model="espeak-en", voice="alloy", input=SPEECH_TEXT,
                                          response_format=fmt).read()
        assert len(encoded) < len(pcm) / 4, fmt  # compressed
        seconds, rate = duration_s(encoded)
        assert rate == 24000
        # MP3 adds LAME's encoder delay and padding (under 0.1 s at 24 kHz); Opus none.
        assert abs(seconds - pcm_s) < 0.12, (fmt, seconds, pcm_s)
        decoded, _ = soundfile.read(io.BytesIO(encoded), dtype="int16")
        assert np.abs(decoded).max() > 1000, fmt  # speech, not silence


def tts_sessions_active(server: ServerProcess) -> float:
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=10) as resp:
        page = resp.read().decode()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "streamgate_sessions_active" and sample.labels["kind"] == "tts":
                return sample.value
    return 0.0


def test_speech_streams_as_it_is_synthesized(server: ServerProcess) -> None:
    sdk = client(server)
    long_text = " ".join([SPEECH_TEXT] * 12)  # about a minute of speech, 2.9 MB of PCM
    with sdk.audio.speech.with_streaming_response.create(
            model="espeak-en", voice="alloy", input=long_text, response_format="pcm") as resp:
        assert resp.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in resp.headers
        chunks = resp.iter_bytes()
        first = next(chunks)
        # The first bytes are here while the session still runs: the answer streams as it is
        # synthesized (and, its credit granted as the response is written, at this reader's pace).
        assert first and tts_sessions_active(server) == 1
        pcm = first + b"".join(chunks)
    wait_for(lambda: tts_sessions_active(server) == 0, 10.0)
    assert len(pcm) / 2 / 24000 > 30
    with sdk.audio.speech.with_streaming_response.create(
            model="espeak-en", voice="alloy", input=long_text, response_format="mp3") as resp:
        assert resp.headers["content-type"] == "audio/mpeg"
        pieces = [p for p in resp.iter_bytes() if p]
    assert len(pieces) > 1
    seconds, _ = duration_s(b"".join(pieces))
    assert abs(seconds - len(pcm) / 2 / 24000) < 0.12
    # stream_format=sse: base64 audio deltas, then `speech.audio.done` with the characters.
    with sdk.audio.speech.with_streaming_response.create(
            model="espeak-en", voice="alloy", input=SPEECH_TEXT, response_format="pcm",
            stream_format="sse") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in resp.iter_lines()
                  if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] == len(SPEECH_TEXT)
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert 2.0 < len(audio) / 2 / 24000 < 12.0


def test_models_list_and_retrieve(server: ServerProcess) -> None:
    sdk = client(server)
    ids = {m.id for m in sdk.models.list()}
    assert {"synthetic", "synthetic-slow", "espeak-en"} <= ids
    assert sdk.models.retrieve("espeak-en").id == "espeak-en"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


def error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict)
    return body


def test_errors_are_the_sdks_own_exceptions(server: ServerProcess,
                                            recording: tuple[bytes, int]) -> None:
    wav, _ = recording
    sdk = client(server)
    upload = ("speech.wav", wav, "audio/wav")
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.audio.transcriptions.create(model="no-such-model", file=upload)
    # OpenAI's shape: the SDK hands the `error` object over as the body.
    assert error_body(not_found.value) == {
        "message": "The model `no-such-model` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError):
        sdk.audio.speech.create(model="no-such-voice-model", voice="alloy", input="hi")
    with pytest.raises(openai.AuthenticationError) as bad_key:
        client(server, key="sk-wrong").audio.transcriptions.create(model="synthetic",
                                                                   file=upload)
    assert error_body(bad_key.value)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").models.list()
    with pytest.raises(openai.BadRequestError) as bad_format:
        sdk.audio.transcriptions.create(model="synthetic", file=upload,
                                        response_format="diarized_json")
    assert error_body(bad_format.value)["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as not_audio:
        sdk.audio.transcriptions.create(model="synthetic",
                                        file=("a.mp4", b"\x00" * 64, "video/mp4"))
    assert error_body(not_audio.value)["code"] == "unsupported_file_format"
    with pytest.raises(openai.BadRequestError) as translation, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # newer SDKs mark the route so
        sdk.audio.translations.create(model="synthetic", file=upload)
    assert error_body(translation.value)["code"] == "translation_unsupported"
    with pytest.raises(openai.BadRequestError) as aac:
        sdk.audio.speech.create(model="espeak-en", voice="alloy", input="hi",
                                response_format="aac")
    assert error_body(aac.value)["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as too_long:  # its length, not its size (413)
        sdk.audio.speech.create(model="espeak-en", voice="alloy", input="\U0001f600" * 100_001)
    assert error_body(too_long.value)["param"] == "input"


# --- with billing on ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def billed(redis_url: str, database_url: str) -> Iterator[Billing]:
    with billing_server(redis_url, database_url, REDIS_DB) as env:
        yield env


def cost(ms: int) -> int:
    return -(-ms * PRICE_PER_MIN // 60_000)


async def test_a_transcription_is_charged_its_audio_once_and_a_refused_one_nothing(
        billed: Billing, recording: tuple[bytes, int]) -> None:
    wav, audio_ms = recording
    tenant = billed.admin.tenant(funded=1_000_000)
    sdk = client(billed.server, key=tenant.key)
    upload = ("speech.wav", wav, "audio/wav")
    result = sdk.audio.transcriptions.create(model="synthetic", file=upload)
    assert result.text and result.usage is not None
    assert result.usage.seconds == audio_ms / 1000
    pg = await assert_books_balance(billed.dsn, billed.redis_url, tenant.tenant_id,
                                    expected_usage=cost(audio_ms))
    assert pg.usage == cost(audio_ms) and pg.balance == 1_000_000 - cost(audio_ms)
    # Refused before admission: an unknown model, a file that is not audio, a translation.
    with pytest.raises(openai.NotFoundError):
        sdk.audio.transcriptions.create(model="no-such-model", file=upload)
    with pytest.raises(openai.BadRequestError):
        sdk.audio.transcriptions.create(model="synthetic", file=("a.wav", b"RIFX" + b"\0" * 200,
                                                                 "audio/wav"))
    with pytest.raises(openai.BadRequestError), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sdk.audio.translations.create(model="synthetic", file=upload)
    after = await assert_books_balance(billed.dsn, billed.redis_url, tenant.tenant_id,
                                       expected_usage=cost(audio_ms))
    assert after.events == pg.events and after.balance == pg.balance
    # An empty wallet: OpenAI's answer to it (429 insufficient_quota), and not retried.
    broke = billed.admin.tenant(funded=0)
    with pytest.raises(openai.RateLimitError) as no_quota:
        client(billed.server, key=broke.key).audio.transcriptions.create(
            model="synthetic", file=upload)
    assert error_body(no_quota.value)["code"] == "insufficient_quota"
    assert no_quota.value.response.headers["x-should-retry"] == "false"
    assert (await pg_state(billed.dsn, broke.tenant_id)).events == 0


async def test_speech_is_charged_its_characters(billed: Billing) -> None:
    tenant = billed.admin.tenant(funded=1_000_000)
    sdk = client(billed.server, key=tenant.key)
    audio = sdk.audio.speech.create(model="espeak-en", voice="alloy", input=SPEECH_TEXT,
                                    response_format="opus").read()
    assert duration_s(audio)[0] > 2.0
    with pytest.raises(openai.NotFoundError):
        sdk.audio.speech.create(model="tts-9", voice="alloy", input=SPEECH_TEXT)
    pg = await assert_books_balance(billed.dsn, billed.redis_url, tenant.tenant_id)
    units, charged = await charged_units(billed.dsn, tenant.tenant_id)
    # What the session synthesized (the text chunker drops the space between sentences), as its
    # one "session ended" line says; the refused request left none.
    def ended_lines() -> list[dict[str, object]]:
        return [e for e in billed.server.logs()
                if e.get("msg") == "session ended" and e.get("tenant_id") == tenant.tenant_id]

    await asyncio.to_thread(wait_for, ended_lines, 10.0)
    ended = ended_lines()
    assert len(ended) == 1, ended
    assert units == int(str(ended[0]["characters"])) >= len(SPEECH_TEXT) - 2
    assert charged == pg.usage > 0
