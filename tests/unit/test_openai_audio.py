"""The OpenAI dialect's codec parts: transcript documents (SRT, WebVTT, verbose_json), the error
mapping the SDK's exception classes depend on, and the streaming MP3/Opus encoders."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from server.audio.encoders import EncoderError, StreamEncoder
from server.http.errors import ApiError
from server.http.openai_audio import (
    OpenAiError,
    _field_of,
    _TranscriptionAsk,
    _voice,
    openai_error,
    srt,
    verbose_json,
    vtt,
)
from streamgate_protocol import messages as m

FINALS = [
    m.Transcript(utterance_id=0, is_final=True, text="hello there", start_ms=250, end_ms=1_500,
                 words=[m.Word(word="hello", start_ms=250, end_ms=700, confidence=0.9),
                        m.Word(word="there", start_ms=800, end_ms=1_500, confidence=0.5)]),
    m.Transcript(utterance_id=1, is_final=True, text="", start_ms=1_600, end_ms=1_700),
    m.Transcript(utterance_id=2, is_final=True, text="an hour later", start_ms=3_723_004,
                 end_ms=3_725_010),
]


def test_srt_numbers_cues_and_uses_commas() -> None:
    assert srt(FINALS) == ("1\n00:00:00,250 --> 00:00:01,500\nhello there\n\n"
                           "2\n01:02:03,004 --> 01:02:05,010\nan hour later\n")


def test_vtt_has_its_header_and_uses_dots() -> None:
    assert vtt(FINALS) == ("WEBVTT\n\n00:00:00.250 --> 00:00:01.500\nhello there\n\n"
                           "01:02:03.004 --> 01:02:05.010\nan hour later\n")


def test_verbose_json_granularities() -> None:
    ask = _TranscriptionAsk(model="synthetic", language=None, response_format="verbose_json",
                            temperature=0.0, words=True, segments=False, stream=False)
    body = verbose_json(FINALS[:1], ask, 2_000, "hello there")
    assert "segments" not in body
    assert body["words"] == [{"word": "hello", "start": 0.25, "end": 0.7},
                             {"word": "there", "start": 0.8, "end": 1.5}]
    assert body["duration"] == 2.0 and body["usage"] == {"type": "duration", "seconds": 2.0}
    both = verbose_json(FINALS[:1], _TranscriptionAsk("synthetic", "de", "verbose_json", 0.3,
                                                      True, True, False), 2_000, "hello there")
    segment = both["segments"][0]
    assert both["language"] == "de"
    assert (segment["start"], segment["end"], segment["temperature"]) == (0.25, 1.5, 0.3)
    assert segment["avg_logprob"] == pytest.approx((np.log(0.9) + np.log(0.5)) / 2)


@pytest.mark.parametrize(("error", "status", "kind", "code"), [
    (ApiError(401, "unauthorized", "no"), 401, "invalid_request_error", "invalid_api_key"),
    (ApiError(401, "key_revoked", "no"), 401, "invalid_request_error", "invalid_api_key"),
    (ApiError(402, "insufficient_balance", "no"), 429, "insufficient_quota",
     "insufficient_quota"),
    (ApiError(429, "rate_limited", "no", {"Retry-After": "1"}), 429, "requests",
     "rate_limit_exceeded"),
    (ApiError(415, "unsupported_media_type", "no"), 400, "invalid_request_error",
     "unsupported_file_format"),
    (ApiError(400, "bad_audio", "no"), 400, "invalid_request_error", "bad_audio"),
    (ApiError(503, "draining", "no"), 503, "server_error", "draining"),
    (OpenAiError(404, "model_not_found", "no", param="model"), 404, "invalid_request_error",
     "model_not_found"),
])
def test_errors_take_openais_shape_and_the_status_its_sdk_maps(
        error: ApiError, status: int, kind: str, code: str) -> None:
    got_status, body, headers = openai_error(error)
    assert got_status == status
    assert body == {"error": {"message": "no", "type": kind, "code": code,
                              "param": "model" if isinstance(error, OpenAiError) else None}}
    if error.code == "insufficient_balance":
        assert headers == {"x-should-retry": "false"}  # no retry tops a wallet up
    if error.code == "rate_limited":
        assert headers["Retry-After"] == "1"


def test_field_of_a_validation_error_and_voices() -> None:
    assert _field_of("Expected `float` <= 4.0 - at `$.speed`") == "speed"
    assert _field_of("Object missing required field `input`") is None
    assert _voice("alloy") is None and _voice({"id": "Nova"}) is None
    assert _voice("en-us") == "en-us" and _voice(None) is None


def tone(seconds: float, rate: int = 24000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * 330 * t) * 9000).astype("<i2").tobytes()


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
def test_stream_encoders_round_trip(fmt: str) -> None:
    pcm = tone(3.0)
    encoder = StreamEncoder(fmt, 24000)  # type: ignore[arg-type]
    pieces = [encoder.encode(pcm[i:i + 4801]) for i in range(0, len(pcm), 4801)]  # odd sizes
    tail = encoder.finish()
    assert any(pieces), "nothing came out before the end"
    audio, rate = soundfile.read(io.BytesIO(b"".join(pieces) + tail), dtype="int16")
    assert rate == 24000
    assert abs(len(audio) / rate - 3.0) < 0.12
    assert np.abs(audio).max() > 4000


def test_mp3_streams_within_a_frame() -> None:
    encoder = StreamEncoder("mp3", 24000)
    first = encoder.encode(tone(0.2))
    assert first[:2] == b"\xff\xf3"  # an MPEG-2 layer III frame sync, out after 200 ms
    encoder.close()


def test_opus_refuses_a_rate_it_cannot_code() -> None:
    with pytest.raises(EncoderError):
        StreamEncoder("opus", 22050)
