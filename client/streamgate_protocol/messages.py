"""Wire messages of the streaming sessions: one msgspec Struct per message, tagged by `type`.

Names and fields follow docs/protocol.md, which is binding. This package is shared by the
server and the client SDK (client/streamgate_client), so it imports nothing of either.
Encoders and decoders are built once and reused: constructing them per message costs more
than the encoding itself.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Encoding = Literal["pcm_s16le", "mulaw", "alaw", "wav"]
VadMode = Literal["off", "low", "medium", "high"]
Overflow = Literal["block", "drop"]


class Msg(msgspec.Struct, tag_field="type", kw_only=True):
    pass


# --- client -> server (ASR) -------------------------------------------------------------------


class Config(Msg, tag="config", forbid_unknown_fields=True):
    model: str | None = None
    language: str | None = None
    encoding: Encoding | None = None
    sample_rate: int | None = None
    channels: int | None = None
    interim_results: bool | None = None
    endpointing_ms: int | None = None
    vad: VadMode | None = None
    overflow: Overflow | None = None


class Finalize(Msg, tag="finalize"):
    pass


class KeepAlive(Msg, tag="keepalive"):
    pass


class Close(Msg, tag="close"):
    pass


AsrClientMessage = Config | Finalize | KeepAlive | Close

# --- server -> client (ASR) -------------------------------------------------------------------


class AudioFormat(msgspec.Struct, kw_only=True):
    encoding: Encoding
    sample_rate: int


class Limits(msgspec.Struct, kw_only=True):
    max_frame_bytes: int
    idle_timeout_s: float
    usage_interval_s: float
    max_utterance_ms: int


class Ready(Msg, tag="ready"):
    session_id: str
    resume_token: str
    audio: AudioFormat
    credit_bytes: int
    limits: Limits
    model: str
    # A resumed session (docs/protocol.md, "Resuming a session"): the client re-sends its audio
    # from byte `resume_offset` of the stream. 0 and false for a new session.
    resumed: bool = False
    resume_offset: int = 0
    # The session's trace (W3C trace id, 32 hex digits) when the server traces it; absent
    # otherwise (docs/observability.md).
    trace_id: str | msgspec.UnsetType = msgspec.UNSET


class Credit(Msg, tag="credit"):
    bytes: int


class SpeechStarted(Msg, tag="speech_started"):
    at_ms: int


class Word(msgspec.Struct, kw_only=True):
    word: str
    start_ms: int
    end_ms: int
    confidence: float


class Transcript(Msg, tag="transcript"):
    utterance_id: int
    is_final: bool
    text: str
    start_ms: int
    end_ms: int
    words: list[Word] = msgspec.field(default_factory=list)


class UtteranceEnd(Msg, tag="utterance_end"):
    utterance_id: int
    end_ms: int


class UtteranceMetrics(Msg, tag="metrics"):
    """Sent after an utterance's final when the session asked for it (`metrics=true`)."""

    utterance_id: int
    end_of_speech_to_final_ms: int  # the VAD ended the utterance -> its final went out
    engine_ms: int  # the utterance's time in engine calls (its feeds during speech too)
    queue_ms: int = 0  # of that, time its requests waited in the engine's micro-batcher


class Checkpoint(Msg, tag="checkpoint"):
    """The server has taken in the client's audio up to byte `offset` of the stream for good: a
    resume continues from there (or later), so a client may forget the audio before it. Every
    final up to `utterance_id` is kept for replay."""

    offset: int
    utterance_id: int


class Usage(Msg, tag="usage"):
    audio_ms: int
    billed_ms: int
    cost_micros: int
    balance_micros: int | None = None
    dropped_ms: int = 0


class Warning(Msg, tag="warning", omit_defaults=True):
    code: str
    message: str
    dropped_ms: int | None = None


class Error(Msg, tag="error"):
    code: str
    message: str
    retryable: bool = False
    retry_after_s: float | None = None
    # Only on `draining` of a resumable session: resume with it on any node (omitted otherwise).
    resume_token: str | msgspec.UnsetType = msgspec.UNSET


class Summary(Msg, tag="summary"):
    audio_ms: int
    billed_ms: int
    cost_micros: int
    utterances: int
    dropped_ms: int


AsrServerMessage = (
    Ready
    | Credit
    | SpeechStarted
    | Transcript
    | UtteranceEnd
    | UtteranceMetrics
    | Checkpoint
    | Usage
    | Warning
    | Error
    | Summary
)

encoder = msgspec.json.Encoder()
asr_client_decoder = msgspec.json.Decoder(AsrClientMessage)
asr_server_decoder = msgspec.json.Decoder(AsrServerMessage)  # for clients and tests


# --- TTS ----------------------------------------------------------------------------------------


class TtsConfigMsg(Msg, tag="config", forbid_unknown_fields=True):
    model: str | None = None
    voice: str | None = None
    language: str | None = None
    encoding: Encoding | None = None
    sample_rate: int | None = None


class Text(Msg, tag="text"):
    text: str


class Flush(Msg, tag="flush"):
    pass


class Clear(Msg, tag="clear"):
    pass


class CreditGrant(Msg, tag="credit"):
    bytes: int


TtsClientMessage = TtsConfigMsg | Text | Flush | Clear | CreditGrant | KeepAlive | Close


class AudioDone(Msg, tag="audio_done"):
    chunk_id: int
    text: str
    duration_ms: int


class Flushed(Msg, tag="flushed"):
    pass


class Cleared(Msg, tag="cleared"):
    played_ms: int | None = None


class TtsUsage(Msg, tag="usage"):
    characters: int
    audio_ms: int
    cost_micros: int
    balance_micros: int | None = None


class TtsSummary(Msg, tag="summary"):
    characters: int
    audio_ms: int
    cost_micros: int
    chunks: int


class TtsMetrics(Msg, tag="metrics"):
    """Sent after a chunk's `audio_done` when the session asked for it (`metrics=true`)."""

    chunk_id: int
    characters: int
    time_to_first_audio_ms: int  # the chunk taken for synthesis -> its first audio frame out
    synthesis_ms: int  # the chunk taken for synthesis -> its last audio from the engine
    audio_ms: int  # audio the chunk came to
    real_time_factor: float  # synthesis_ms / audio_ms: below 1 is faster than real time


TtsServerMessage = (
    Ready | AudioDone | TtsMetrics | Flushed | Cleared | TtsUsage | Warning | Error | TtsSummary
)

tts_client_decoder = msgspec.json.Decoder(TtsClientMessage)
tts_server_decoder = msgspec.json.Decoder(TtsServerMessage)  # for clients and tests
