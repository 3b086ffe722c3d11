"""Sarvam's streaming speech-to-text messages <-> our ASR session's, sans-I/O.

In (client -> server), as the `sarvamai` SDK sends them on `/speech-to-text/ws`:
`{"audio": {"data": <base64>, "sample_rate": 16000, "encoding": "audio/wav"}}` (the data is a
whole WAV file or raw 16-bit PCM), `{"type": "flush"}` and `{"type": "config", "prompt": ...}`.
Out: `{"type": "data", "data": {request_id, transcript, ...metrics}}` for each final,
`{"type": "events", "data": {signal_type: START_SPEECH | END_SPEECH, ...}}` when the client
asked for `vad_signals=true`, and `{"type": "error", "data": {"error", "code"}}`.

The session behind it is ours (server/sessions/asr.py): this module only translates, and
keeps no more state than the audio rate and a bounded list of arrival times.
"""

from __future__ import annotations

import base64
import binascii
import io
import wave
from collections import deque
from dataclasses import dataclass
from typing import Final

import msgspec

from server.flow_control.json_depth import MAX_JSON_DEPTH, nests_deeper_than
from server.flow_control.sarvam import MAX_LATENCY_MARKS
from streamgate_protocol import messages as m

# Sarvam's default (its reference: "If not specified, defaults to 16kHz").
DEFAULT_RATE: Final = 16000


class _Audio(msgspec.Struct):
    data: str
    sample_rate: int | None = None
    encoding: str | None = None


class _ClientMessage(msgspec.Struct):
    """Either shape: `audio` (no `type`), or a typed signal. Unknown fields are ignored, as
    Sarvam's own models allow extra fields."""

    audio: _Audio | None = None
    type: str | None = None
    prompt: str | None = None


_decoder: Final = msgspec.json.Decoder(_ClientMessage, strict=False)  # "16000" is a rate too


# --- what the codec makes of a client message ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class AudioIn:
    """PCM16 mono at `sample_rate` for the session."""

    pcm: bytes
    sample_rate: int


@dataclass(frozen=True, slots=True)
class FlushIn:
    """Finalize the utterance in progress now (our `finalize`)."""


@dataclass(frozen=True, slots=True)
class Ignored:
    """Accepted and without effect here (a `config` prompt: no engine of ours takes one)."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Answered with an `error` message; the session goes on."""

    code: str
    message: str


ClientInput = AudioIn | FlushIn | Ignored | Refused


# --- server -> client -----------------------------------------------------------------------------


class _Metrics(msgspec.Struct):
    audio_duration: float
    processing_latency: float


class _Transcription(msgspec.Struct):
    request_id: str
    transcript: str
    metrics: _Metrics
    language_code: str | None = None
    timestamps: None = None
    diarized_transcript: None = None
    language_probability: None = None


class _Data(msgspec.Struct, tag="data", tag_field="type"):
    data: _Transcription


class _EventData(msgspec.Struct):
    event_type: str
    signal_type: str
    occured_at: float  # Sarvam's spelling


class _Events(msgspec.Struct, tag="events", tag_field="type"):
    data: _EventData


class _ErrorData(msgspec.Struct):
    error: str
    code: str


class _Error(msgspec.Struct, tag="error", tag_field="type"):
    data: _ErrorData


_encoder: Final = msgspec.json.Encoder()


def error_message(code: str, message: str) -> bytes:
    return _encoder.encode(_Error(_ErrorData(error=message[:200], code=code)))


class SttCodec:
    """One connection's translation. `rate` is the audio rate of the session once the first
    audio fixed it (a WAV header's, else the connection's `sample_rate`, else the message's)."""

    def __init__(self, *, connection_rate: int | None, language: str | None,
                 vad_signals: bool) -> None:
        self.connection_rate = connection_rate
        self.rate: int | None = None
        self.language = language
        self.vad_signals = vad_signals
        self.request_id = ""
        self._open_utterances = 0  # speech started, its final not out yet
        self._received_ms = 0.0
        # (audio ms received up to and including a message, when it arrived), oldest first.
        self._marks: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCY_MARKS)

    # --- in -------------------------------------------------------------------------------------

    def decode(self, raw: bytes, now: float) -> ClientInput:
        if nests_deeper_than(raw):
            return Refused("bad_message", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            msg = _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            return Refused("bad_message", f"not a Sarvam streaming message: {exc}")
        if msg.audio is not None:
            return self._audio(msg.audio, now)
        if msg.type == "flush":
            return FlushIn()
        if msg.type == "config":
            return Ignored()
        return Refused("bad_message", "expected {\"audio\": {...}}, {\"type\": \"flush\"} or "
                       "{\"type\": \"config\"}")

    def _audio(self, audio: _Audio, now: float) -> ClientInput:
        try:
            payload = base64.b64decode(audio.data, validate=True)
        except (binascii.Error, ValueError):
            return Refused("bad_audio", "audio.data is not valid base64")
        if not payload:
            return Refused("bad_audio", "audio.data is empty")
        if payload[:4] == b"RIFF":
            try:
                pcm, rate = _wav_pcm(payload)
            except _BadWav as exc:
                return Refused("bad_audio", str(exc))
        else:
            if len(payload) % 2:
                return Refused("bad_audio", "raw audio must be 16-bit PCM (an even byte count)")
            pcm = payload
            rate = self.rate or self.connection_rate or audio.sample_rate or DEFAULT_RATE
        if self.rate is None:
            self.rate = rate
        elif rate != self.rate:
            return Refused("bad_audio", f"audio at {rate} Hz after audio at {self.rate} Hz: "
                           "the rate is fixed by the first audio of a connection")
        if pcm:
            self._received_ms += len(pcm) * 500 / rate
            self._marks.append((self._received_ms, now))
        return AudioIn(pcm, rate)

    # --- out ------------------------------------------------------------------------------------

    def encode(self, event: m.AsrServerMessage, now: float, wall: float) -> list[bytes]:
        """The Sarvam messages for one of our session's events, in order. `now` is the
        monotonic clock of `decode`'s arrival times; `wall` the epoch time of VAD events.
        Sarvam sends END_SPEECH before the utterance's transcript; our session sends its
        `utterance_end` after the final, so END_SPEECH goes out with the final instead (every
        utterance has one, possibly empty) and `utterance_end` is not needed."""
        if isinstance(event, m.Transcript):
            if not event.is_final:
                return []  # Sarvam's streaming STT sends finals only, one per utterance
            out = self._end_of_speech(wall)
            if event.text:
                out.append(_encoder.encode(_Data(_Transcription(
                    request_id=self.request_id, transcript=event.text,
                    language_code=self.language,
                    metrics=_Metrics(
                        audio_duration=(event.end_ms - event.start_ms) / 1000,
                        processing_latency=round(self._latency(event.end_ms, now), 3)),
                ))))
            return out
        if isinstance(event, m.SpeechStarted):
            self._open_utterances += 1
            return [self._vad("START_SPEECH", wall)] if self.vad_signals else []
        if isinstance(event, m.Error):
            return [error_message(event.code, event.message)]
        if isinstance(event, m.Ready):
            self.request_id = event.session_id
        # credit, usage, checkpoint, warning, summary: our protocol's, none in Sarvam's.
        return []

    @property
    def speaking(self) -> bool:
        """Speech started and its final not out yet (with an engine slower than the VAD, a
        next utterance may start before the final of the one before)."""
        return self._open_utterances > 0

    def _end_of_speech(self, wall: float) -> list[bytes]:
        if not self._open_utterances:
            return []
        self._open_utterances -= 1
        return [self._vad("END_SPEECH", wall)] if self.vad_signals else []

    @staticmethod
    def _vad(signal: str, wall: float) -> bytes:
        return _encoder.encode(_Events(_EventData("vad", signal, round(wall, 3))))

    def _latency(self, end_ms: int, now: float) -> float:
        """Seconds since the audio up to `end_ms` had arrived."""
        marks = self._marks
        while len(marks) > 1 and marks[0][0] < end_ms:
            marks.popleft()
        return max(0.0, now - marks[0][1]) if marks else 0.0


class _BadWav(ValueError):
    pass


def _wav_pcm(payload: bytes) -> tuple[bytes, int]:
    """The PCM16 mono samples of a WAV file and their rate (the stdlib parser: PCM only)."""
    try:
        with wave.open(io.BytesIO(payload), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            if width != 2 or channels != 1:
                raise _BadWav(f"WAV must be 16-bit mono PCM, got {channels} channel(s) of "
                              f"{8 * width}-bit samples")
            pcm = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise _BadWav(f"not a WAV file this server reads: {exc}"[:200]) from None
    if len(pcm) % 2:
        pcm = pcm[:-1]
    return pcm, rate
