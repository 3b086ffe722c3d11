"""Sarvam's streaming text-to-speech messages <-> our TTS session's commands and events,
sans-I/O.

In, as the `sarvamai` SDK sends them on `/text-to-speech/ws`: `{"type": "config", "data":
{language_code, speaker, speech_sample_rate, output_audio_codec, ...}}`, `{"type": "text",
"data": {"text": ...}}`, `{"type": "flush"}`, `{"type": "ping"}`. Out: `{"type": "audio",
"data": {"content_type", "audio": <base64>, "request_id"}}`, `{"type": "event", "data":
{"event_type": "final"}}` once the audio of a flush is out (`send_completion_event`, on unless
the query says false), and `{"type": "error", "data": {"message", "code", "details"}}`.

Our session makes PCM16, mu-law or A-law; WAV, MP3 and Opus are made here from its PCM. An MP3
or Opus stream is one file per synthesized chunk (finished when the chunk's audio is done), so
every chunk decodes on its own and none of its tail waits for the next one.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from typing import Final, Literal, TypeGuard

import msgspec

from server.audio.encoders import OPUS_RATES, CompressedFormat, EncoderError, StreamEncoder
from server.flow_control.json_depth import MAX_JSON_DEPTH, nests_deeper_than
from server.flow_control.sarvam import MAX_TTS_TEXT_CHARS
from server.protocol.errors import http_status
from server.sessions.tts import Command, Flush, Reconfigure, SubmitText
from streamgate_protocol import messages as m
from streamgate_protocol.audio import wav_header

# Sarvam's defaults (its reference: 22050 Hz when omitted; the SDK's configure() asks for MP3).
DEFAULT_RATE: Final = 22050
DEFAULT_CODEC: Final = "mp3"
OutputCodec = Literal["linear16", "mulaw", "alaw", "wav", "mp3", "opus"]
# The session's encoding and the content type of each codec we make.
_SESSION_ENCODING: Final[dict[str, m.Encoding]] = {
    "linear16": "pcm_s16le", "mulaw": "mulaw", "alaw": "alaw", "wav": "pcm_s16le",
    "mp3": "pcm_s16le", "opus": "pcm_s16le"}
_CONTENT_TYPES: Final[dict[str, str]] = {
    "linear16": "audio/L16", "mulaw": "audio/basic", "alaw": "audio/x-alaw",
    "wav": "audio/wav", "mp3": "audio/mp3", "opus": "audio/ogg"}
_COMPRESSED: Final[dict[str, CompressedFormat]] = {"mp3": "mp3", "opus": "opus"}
# Sarvam lists these too; no encoder of ours streams them (libsndfile's FLAC needs a seekable
# file for its length, and it has no AAC).
REFUSED_CODECS: Final = ("flac", "aac")


def _served(codec: str) -> TypeGuard[OutputCodec]:
    return codec in _SESSION_ENCODING


class _ConfigData(msgspec.Struct):
    language_code: str | None = None
    target_language_code: str | None = None  # the spelling of Sarvam's guides
    speaker: str | None = None
    speech_sample_rate: int | None = None
    output_audio_codec: str | None = None
    model: str | None = None
    # Accepted and ignored (docs/compat.md): pitch, pace, loudness, temperature,
    # enable_preprocessing, output_audio_bitrate, min_buffer_size, max_chunk_length, dict_id.


class _TextData(msgspec.Struct):
    text: str


class _Config(msgspec.Struct, tag="config", tag_field="type"):
    data: _ConfigData


class _Text(msgspec.Struct, tag="text", tag_field="type"):
    data: _TextData


class _Flush(msgspec.Struct, tag="flush", tag_field="type"):
    pass


class _Ping(msgspec.Struct, tag="ping", tag_field="type"):
    pass


# Not strict: clients send numbers as strings too (Pipecat's SarvamTTSService sends
# `"speech_sample_rate": "22050"`), which Sarvam accepts.
_decoder: Final = msgspec.json.Decoder(_Config | _Text | _Flush | _Ping, strict=False)


class _AudioData(msgspec.Struct):
    content_type: str
    audio: str
    request_id: str


class _Audio(msgspec.Struct, tag="audio", tag_field="type"):
    data: _AudioData


class _EventData(msgspec.Struct):
    event_type: str
    message: str
    timestamp: str


class _Event(msgspec.Struct, tag="event", tag_field="type"):
    data: _EventData


class _ErrorDetails(msgspec.Struct):
    code: str
    retryable: bool


class _ErrorData(msgspec.Struct):
    message: str
    code: int
    details: _ErrorDetails
    request_id: str


class _Error(msgspec.Struct, tag="error", tag_field="type"):
    data: _ErrorData


_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Refused:
    """Answered with an `error` message; the session goes on."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BadConfig:
    """A config this server cannot serve: the session ends (4400 `bad_config`)."""

    message: str


ClientInput = Command | Refused | BadConfig | None


class TtsCodec:
    def __init__(self, *, completion_events: bool, language: str | None) -> None:
        self.completion_events = completion_events
        self.codec: OutputCodec = DEFAULT_CODEC
        self.sample_rate = DEFAULT_RATE
        self.language = language
        self.request_id = ""
        self._configured: tuple[str, int, str | None] | None = None
        self._texts = 0
        self._compressor: StreamEncoder | None = None

    # --- in -------------------------------------------------------------------------------------

    def decode(self, raw: bytes) -> ClientInput:
        """A command for the session, a refusal, or None (a ping: liveness only)."""
        if nests_deeper_than(raw):
            return Refused("bad_message", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            msg = _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            return Refused("bad_message", f"not a Sarvam TTS message: {exc}"[:200])
        if isinstance(msg, _Text):
            text = msg.data.text
            if not text.strip():
                return Refused("bad_message", "data.text is empty")
            if len(text) > MAX_TTS_TEXT_CHARS:
                return Refused("bad_message",
                               f"data.text is longer than {MAX_TTS_TEXT_CHARS} characters")
            self._texts += 1
            return SubmitText(text)
        if isinstance(msg, _Flush):
            return Flush()
        if isinstance(msg, _Config):
            return self._config(msg.data)
        return None

    def _config(self, data: _ConfigData) -> ClientInput:
        codec = data.output_audio_codec or DEFAULT_CODEC
        rate = data.speech_sample_rate or DEFAULT_RATE
        language = data.language_code or data.target_language_code or self.language
        if self._texts:
            # A client may send its config again (Pipecat does on every settings change):
            # what this server ignores may change; the audio format and language may not.
            if (codec, rate, language) == self._configured:
                return None
            return Refused("bad_message", "a config after the first text may not change the "
                           "codec, sample rate or language here; open a new connection")
        if not _served(codec):
            supported = ", ".join(_SESSION_ENCODING)
            return BadConfig(f"output_audio_codec {codec[:16]!r} is not served here; "
                             f"use one of {supported}")
        if codec == "opus" and rate not in OPUS_RATES:
            return BadConfig(f"Opus is made at {OPUS_RATES} Hz, not {rate}")
        self.codec = codec
        self.sample_rate = rate
        self.language = language
        self._configured = (codec, rate, language)
        # The speaker is not passed on: our engines' voices have other names (the model's
        # configured voice speaks; docs/compat.md).
        return Reconfigure(m.TtsConfigMsg(language=self.language,
                                          encoding=_SESSION_ENCODING[codec],
                                          sample_rate=rate))

    # --- out ------------------------------------------------------------------------------------

    @property
    def compressed(self) -> bool:
        """MP3 or Opus: `encode_frame` costs milliseconds (run it off the event loop)."""
        return self.codec in _COMPRESSED

    def encode_frame(self, frame: bytes) -> bytes:
        """One frame of the session's audio in the output codec (b"" while an MP3 or Opus
        encoder holds what it has not completed a frame of). Thread-safe against `close`."""
        compressed = _COMPRESSED.get(self.codec)
        if compressed is not None:
            compressor = self._compressor
            if compressor is None:
                try:
                    compressor = self._compressor = StreamEncoder(compressed, self.sample_rate)
                except EncoderError:  # checked at config; only a bug gets here
                    return b""
            return compressor.encode(frame)
        if self.codec == "wav":
            # Each message a whole WAV file: a client may play or save any one on its own.
            return wav_header(self.sample_rate, 1, len(frame) // 2) + frame
        return frame

    def audio_message(self, data: bytes) -> bytes | None:
        """The `audio` message carrying `data` (None for none)."""
        return self._audio_message(data) if data else None

    def audio(self, frame: bytes) -> bytes | None:
        """The `audio` message for one frame of the session's audio, made here and now."""
        return self.audio_message(self.encode_frame(frame))

    def _audio_message(self, data: bytes) -> bytes:
        return _encoder.encode(_Audio(_AudioData(
            content_type=_CONTENT_TYPES[self.codec],
            audio=base64.b64encode(data).decode("ascii"),
            request_id=self.request_id)))

    def event(self, event: m.TtsServerMessage) -> list[bytes]:
        """The Sarvam messages for one of our session's events, in order."""
        if isinstance(event, m.AudioDone):
            # The chunk's audio is all out: its compressed file is finished.
            compressor, self._compressor = self._compressor, None
            if compressor is not None:
                tail = compressor.finish()
                if tail:
                    return [self._audio_message(tail)]
            return []
        if isinstance(event, m.Flushed):
            if not self.completion_events:
                return []
            now = dt.datetime.now(dt.UTC).isoformat()
            return [_encoder.encode(_Event(_EventData("final", "synthesis complete", now)))]
        if isinstance(event, m.Error):
            return [error_message(event.code, event.message, event.retryable, self.request_id)]
        if isinstance(event, m.Ready):
            self.request_id = event.session_id
        # ready, usage, cleared, warning, summary: our protocol's, none in Sarvam's.
        return []

    def close(self) -> None:
        if self._compressor is not None:
            self._compressor.close()
            self._compressor = None


def error_message(code: str, message: str, retryable: bool = False,
                  request_id: str = "") -> bytes:
    return _encoder.encode(_Error(_ErrorData(
        message=message[:200], code=http_status(code),
        details=_ErrorDetails(code=code, retryable=retryable), request_id=request_id)))
