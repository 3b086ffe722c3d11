"""Deepgram's live speech-to-text (`/v1/listen`) and streaming text-to-speech (`/v1/speak`)
WebSocket dialects, sans-I/O: Deepgram's query parameters -> our session parameters, Deepgram's
JSON -> our typed commands, our typed events -> Deepgram's JSON. No socket, no session, no
clock: the endpoints in listen.py and speak.py run the same ASR/TTS sessions as our own
protocol and use this module only to translate.

Message shapes follow Deepgram's API reference and what the official `deepgram-sdk` (7.x)
sends and parses (docs/compat.md, "Deepgram"; docs/decisions/14E1-deepgram-dialect.md).
Client text is bounded like our own protocol's: the frame size by the connection
(`server.max_frame_bytes`), the nesting before any parse (flow_control.json_depth).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TypeVar

import msgspec

from server.flow_control.json_depth import MAX_JSON_DEPTH, nests_deeper_than
from server.sessions import tts
from streamgate_protocol import messages as m

T = TypeVar("T")
_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
CHANNEL: Final = [0, 1]  # `channel_index` of a mono stream: channel 0 of 1
MODEL_ARCH: Final = "streamgate"
# A stable id per model name, for the `model_uuid` fields clients log.
_MODEL_NS: Final = uuid.UUID("5c1c3f2e-6a55-4c8e-9d4e-2b8f7f0e9a14")


class DialectError(ValueError):
    """A Deepgram parameter we cannot honour: refused before the upgrade (HTTP 400)."""


class BadClientMessage(ValueError):
    """A client text frame that is not one of the dialect's messages."""


def model_uuid(name: str) -> str:
    return str(uuid.uuid5(_MODEL_NS, name))


def _flag(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise DialectError(f"{name} must be true or false, got {raw[:32]!r}")


def _whole(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise DialectError(f"{name} must be a whole number, got {raw[:32]!r}") from None
    if not low <= value <= high:
        raise DialectError(f"{name} must be {low}-{high}, got {value}")
    return value


def _model(query: Mapping[str, str], models: Collection[str], default: str) -> tuple[str, str]:
    """(our model, the name asked for): a Deepgram model name we do not serve (`nova-3`,
    `aura-2-thalia-en`) gets the default model; one of ours is used as asked."""
    asked = query.get("model", "")
    return (asked if asked in models else default), asked


# --- /v1/listen: parameters ---------------------------------------------------------------------

LISTEN_ENCODINGS: Final[Mapping[str, m.Encoding]] = {
    "linear16": "pcm_s16le", "mulaw": "mulaw", "alaw": "alaw"}
# Parameters we take and do nothing with: formatting and search features our engines do not
# have (a transcript comes as the engine makes it), tags and opt-outs with no meaning here.
LISTEN_IGNORED: Final = frozenset({
    "punctuate", "smart_format", "numerals", "profanity_filter", "diarize", "diarize_model",
    "filler_words", "dictation", "measurements", "tag", "mip_opt_out", "version", "keywords",
    "keyterm", "search", "replace", "extra", "detect_entities", "language_hint",
    "callback_method", "no_delay", "paragraphs", "utterances", "alternatives"})
# Parameters whose meaning we cannot honour and must not pretend to: refused (400).
LISTEN_REFUSED: Final[Mapping[str, str]] = {
    "callback": "callback is not supported: results come on this socket",
    "redact": "redact is not supported: transcripts would carry what was asked to be removed",
}
# `endpointing=false`: the longest silence our VAD waits for before it ends an utterance.
ENDPOINTING_OFF_MS: Final = 10000


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """A `/v1/listen` upgrade translated: our ASR query, and what the dialect itself does."""

    query: dict[str, str]  # for AsrEndpoint.open_session (server/sessions/asr_params.py)
    model_name: str  # the model the stream runs on (ours)
    vad_events: bool  # SpeechStarted messages
    utterance_end: bool  # UtteranceEnd messages (`utterance_end_ms` given)
    interim_results: bool
    sample_rate: int
    sample_width: int  # bytes per sample of the client's encoding
    endpointing_ms: int | None  # None: the server's default
    ignored: tuple[str, ...] = ()


def listen_options(query: Mapping[str, str], *, models: Collection[str],
                   default_model: str) -> ListenOptions:
    """Deepgram's query string -> our ASR parameters; DialectError for what we refuse."""
    for name, why in LISTEN_REFUSED.items():
        if query.get(name, "false").strip().lower() not in _FALSE:
            raise DialectError(why)
    model, _asked = _model(query, models, default_model)
    ours: dict[str, str] = {"model": model}
    if "language" in query and query["language"] not in ("", "multi"):
        ours["language"] = query["language"]
    raw_encoding = query.get("encoding")
    if raw_encoding is None:
        # No encoding: Deepgram reads a container's header; ours is WAV (it says the rate).
        ours["encoding"] = "wav"
        width = 2
    else:
        encoding = LISTEN_ENCODINGS.get(raw_encoding)
        if encoding is None:
            raise DialectError(f"encoding {raw_encoding[:32]!r} is not supported; use one of "
                               f"{', '.join(LISTEN_ENCODINGS)} (or a WAV stream, no encoding)")
        if "sample_rate" not in query:
            raise DialectError("sample_rate is required with encoding")
        ours["encoding"] = encoding
        width = 2 if encoding == "pcm_s16le" else 1
    rate = 16000
    if "sample_rate" in query:
        rate = _whole("sample_rate", query["sample_rate"], 8000, 48000)
        ours["sample_rate"] = str(rate)
    if "channels" in query and _whole("channels", query["channels"], 1, 8) != 1:
        raise DialectError("only mono audio is supported: channels must be 1")
    if "multichannel" in query and _flag("multichannel", query["multichannel"]):
        raise DialectError("multichannel is not supported: send one channel per stream")
    interim = "interim_results" in query and _flag("interim_results", query["interim_results"])
    ours["interim_results"] = "true" if interim else "false"  # Deepgram's default is false
    endpointing: int | None = None
    if "endpointing" in query:
        raw = query["endpointing"]
        if raw.strip().lower() in _FALSE:
            endpointing = ENDPOINTING_OFF_MS
        else:
            endpointing = _whole("endpointing", raw, 10, ENDPOINTING_OFF_MS)
        ours["endpointing_ms"] = str(endpointing)
    utterance_end = False
    if "utterance_end_ms" in query:
        _whole("utterance_end_ms", query["utterance_end_ms"], 0, 60000)
        utterance_end = True
    vad_events = "vad_events" in query and _flag("vad_events", query["vad_events"])
    ignored = tuple(sorted(k for k in query if k in LISTEN_IGNORED))
    return ListenOptions(query=ours, model_name=model, vad_events=vad_events,
                         utterance_end=utterance_end, interim_results=interim, sample_rate=rate,
                         sample_width=width, endpointing_ms=endpointing, ignored=ignored)


# --- /v1/listen: messages -----------------------------------------------------------------------


class _In(msgspec.Struct, tag_field="type"):
    pass


class KeepAlive(_In, tag="KeepAlive"):
    pass


class Finalize(_In, tag="Finalize"):
    channel: int | None = None


class CloseStream(_In, tag="CloseStream"):
    pass


class Configure(_In, tag="Configure"):
    keyterms: list[str] | None = None
    features: dict[str, bool] | None = None


ListenClientMessage = KeepAlive | Finalize | CloseStream | Configure
_listen_decoder: Final = msgspec.json.Decoder(ListenClientMessage)


class Word(msgspec.Struct):
    word: str
    start: float
    end: float
    confidence: float
    punctuated_word: str


class Alternative(msgspec.Struct):
    transcript: str
    confidence: float
    words: list[Word]


class Channel(msgspec.Struct):
    alternatives: list[Alternative]


class ModelInfo(msgspec.Struct):
    name: str
    version: str
    arch: str


class ResultsMetadata(msgspec.Struct):
    request_id: str
    model_info: ModelInfo
    model_uuid: str


class _Out(msgspec.Struct, tag_field="type"):
    pass


class Results(_Out, tag="Results"):
    channel_index: list[int]
    duration: float
    start: float
    is_final: bool
    speech_final: bool
    channel: Channel
    metadata: ResultsMetadata
    from_finalize: bool


class SpeechStarted(_Out, tag="SpeechStarted"):
    channel: list[int]
    timestamp: float


class UtteranceEnd(_Out, tag="UtteranceEnd"):
    channel: list[int]
    last_word_end: float


class ListenMetadata(_Out, tag="Metadata"):
    transaction_key: str
    request_id: str
    sha256: str
    created: str
    duration: float
    channels: int
    models: list[str]
    model_info: dict[str, ModelInfo]


class ListenError(_Out, tag="Error", omit_defaults=True):
    variant: str
    description: str
    message: str = ""


class ConfigureSuccess(_Out, tag="ConfigureSuccess"):
    request_id: str


class ConfigureFailure(_Out, tag="ConfigureFailure"):
    request_id: str
    code: str
    description: str


_encoder: Final = msgspec.json.Encoder()
_FINALIZE_POINT, _CLOSE_POINT = "finalize", "close"
# The slack when matching a final to the Finalize that ended it: a WAV header's bytes count in
# the client's stream, not in its audio time (44 bytes: under 3 ms at 8 kHz). An utterance the
# VAD ended before the Finalize ends at least `endpointing` (>= 10 ms) before it.
_POINT_SLACK_MS: Final = 5


@dataclass(slots=True)
class _Point:
    at_ms: int
    kind: str


def _seconds(ms: int) -> float:
    return round(ms / 1000, 3)


def _decode(data: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    if nests_deeper_than(data):
        raise BadClientMessage(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BadClientMessage(str(exc)) from None


@dataclass(slots=True)
class ListenCodec:
    """One `/v1/listen` stream's translation state.

    Our final transcripts do not say why their utterance ended; Deepgram's do (`speech_final`:
    the speaker paused; `from_finalize`: the client's Finalize). The client's audio time at each
    Finalize and CloseStream is kept, and a final whose utterance runs up to one of those points
    was ended by it (the machine ends the open utterance exactly there, asr.py `_force_end`);
    any other final was ended by the VAD's endpointing.

    Deepgram answers every Finalize (an empty final `from_finalize` when nothing was open: Pipecat
    waits for it). Ours answers only with the final of an utterance it ended, so a Finalize
    that found none open is answered here once the session has read past it
    (`answer_finalizes`) and every utterance begun before it has its final."""

    options: ListenOptions
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    audio_bytes: int = 0
    _sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    _points: list[_Point] = field(default_factory=list)
    _last_word_end_ms: int = 0
    _last_end_ms: int = 0  # where the last final ended (an empty answer starts there)
    _utterances: int = 0  # SpeechStarted seen (our utterance ids count from 1)
    _open: dict[int, int] = field(default_factory=dict)  # utterance id -> start, final owed
    _metadata: ResultsMetadata | None = None

    def __post_init__(self) -> None:
        name = self.options.model_name
        self._metadata = ResultsMetadata(
            request_id=self.request_id,
            model_info=ModelInfo(name=name, version="1", arch=MODEL_ARCH),
            model_uuid=model_uuid(name))

    # --- in ------------------------------------------------------------------------------------

    def audio(self, data: bytes) -> None:
        self.audio_bytes += len(data)
        self._sha.update(data)

    @property
    def audio_ms(self) -> int:
        """The client's stream so far, in ms of audio at its declared encoding and rate."""
        samples = self.audio_bytes // self.options.sample_width
        return samples * 1000 // self.options.sample_rate

    def decode(self, data: bytes) -> m.AsrClientMessage | ConfigureSuccess | ConfigureFailure:
        """A client text frame -> our control message, or the answer to a `Configure`.
        Raises BadClientMessage."""
        msg = _decode(data, _listen_decoder)
        if isinstance(msg, Finalize):
            self._points.append(_Point(self.audio_ms, _FINALIZE_POINT))
            return m.Finalize()
        if isinstance(msg, CloseStream):
            self._points.append(_Point(self.audio_ms, _CLOSE_POINT))
            return m.Close()
        if isinstance(msg, Configure):
            if msg.keyterms:
                return ConfigureFailure(request_id=self.request_id,
                                        code="CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                                        description="keyterms are not supported by this model")
            return ConfigureSuccess(request_id=self.request_id)  # features: accepted, ignored
        return m.KeepAlive()

    # --- out -----------------------------------------------------------------------------------

    def encode(self, event: m.AsrServerMessage) -> list[bytes]:
        """Our event -> Deepgram's messages (none: Deepgram has no such message)."""
        if type(event) is m.Transcript:
            out = self._answers(before_ms=event.start_ms) if event.is_final else []
            out.append(_encoder.encode(self.results(event)))
            return out
        if type(event) is m.SpeechStarted:
            self._utterances += 1
            self._open[self._utterances] = event.at_ms
            if not self.options.vad_events:
                return []
            return [_encoder.encode(SpeechStarted(CHANNEL, _seconds(event.at_ms)))]
        if type(event) is m.UtteranceEnd:  # after its final, or after the engine lost it
            self._open.pop(event.utterance_id, None)
            if not self.options.utterance_end:
                return []
            end = self._last_word_end_ms or event.end_ms
            return [_encoder.encode(UtteranceEnd(CHANNEL, _seconds(end)))]
        if type(event) is m.Summary:
            return [_encoder.encode(self.metadata(event.audio_ms))]
        if type(event) is m.Error:
            return [_encoder.encode(ListenError(variant=event.code, description=event.message))]
        # ready, credit, usage, warning, checkpoint: our protocol's, nothing in Deepgram's.
        return []

    def encode_reply(self, reply: ConfigureSuccess | ConfigureFailure) -> bytes:
        return _encoder.encode(reply)

    @property
    def finalize_pending(self) -> bool:
        return any(p.kind == _FINALIZE_POINT for p in self._points)

    def answer_finalizes(self, read_ms: int) -> list[bytes]:
        """Answers to the Finalize messages that ended no utterance, now that the session has
        read `read_ms` of the client's audio: one the session read past, with no final owed
        for an utterance begun before it."""
        return self._answers(before_ms=read_ms + _POINT_SLACK_MS)

    def _answers(self, *, before_ms: int) -> list[bytes]:
        out: list[bytes] = []
        points = self._points
        while points and points[0].at_ms <= before_ms:
            point = points[0]
            if any(start < point.at_ms for start in self._open.values()):
                break  # that utterance's final may still be this Finalize's answer
            points.pop(0)
            if point.kind == _FINALIZE_POINT:
                out.append(_encoder.encode(self._empty_final(point.at_ms)))
        return out

    def _empty_final(self, at_ms: int) -> Results:
        assert self._metadata is not None
        start = min(self._last_end_ms, at_ms)
        return Results(
            channel_index=CHANNEL, duration=_seconds(at_ms - start), start=_seconds(start),
            is_final=True, speech_final=False,
            channel=Channel([Alternative("", 0.0, [])]), metadata=self._metadata,
            from_finalize=True)

    def results(self, t: m.Transcript) -> Results:
        from_finalize = speech_final = False
        if t.is_final:
            ended_by = self._ended_by(t)
            from_finalize = ended_by == _FINALIZE_POINT
            speech_final = ended_by is None
            self._last_word_end_ms = t.words[-1].end_ms if t.words else t.end_ms
            self._last_end_ms = max(self._last_end_ms, t.end_ms)
        words = [Word(w.word, _seconds(w.start_ms), _seconds(w.end_ms), w.confidence, w.word)
                 for w in t.words]
        if words:
            confidence = round(sum(w.confidence for w in words) / len(words), 3)
        else:
            confidence = 1.0 if t.text else 0.0
        assert self._metadata is not None
        return Results(
            channel_index=CHANNEL, duration=_seconds(t.end_ms - t.start_ms),
            start=_seconds(t.start_ms), is_final=t.is_final, speech_final=speech_final,
            channel=Channel([Alternative(t.text, confidence, words)]),
            metadata=self._metadata, from_finalize=from_finalize)

    def _ended_by(self, t: m.Transcript) -> str | None:
        """The Finalize or CloseStream that ended this final's utterance, if one did (points
        before the utterance began were answered by `_answers` already)."""
        points = self._points
        if points and t.start_ms < points[0].at_ms <= t.end_ms + _POINT_SLACK_MS:
            return points.pop(0).kind
        return None

    def metadata(self, audio_ms: int) -> ListenMetadata:
        name = self.options.model_name
        return ListenMetadata(
            transaction_key="deprecated", request_id=self.request_id,
            sha256=self._sha.hexdigest(),
            created=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            duration=_seconds(audio_ms), channels=1, models=[model_uuid(name)],
            model_info={model_uuid(name): ModelInfo(name=name, version="1", arch=MODEL_ARCH)})


# --- /v1/speak: parameters ----------------------------------------------------------------------

SPEAK_ENCODINGS: Final[Mapping[str, m.Encoding]] = {
    "linear16": "pcm_s16le", "mulaw": "mulaw", "alaw": "alaw"}
SPEAK_IGNORED: Final = frozenset({"bit_rate", "mip_opt_out", "speed", "tag", "callback_method"})
SPEAK_DEFAULT_RATE: Final[Mapping[str, int]] = {"linear16": 24000, "mulaw": 8000, "alaw": 8000}


@dataclass(frozen=True, slots=True)
class SpeakOptions:
    query: dict[str, str]  # for TtsEndpoint.open_session (server/sessions/tts.py tts_params)
    model_name: str
    asked_model: str  # the name the client asked for ("" if none)
    ignored: tuple[str, ...] = ()


def speak_options(query: Mapping[str, str], *, models: Collection[str],
                  default_model: str) -> SpeakOptions:
    model, asked = _model(query, models, default_model)
    raw = query.get("encoding", "linear16")
    encoding = SPEAK_ENCODINGS.get(raw)
    if encoding is None:
        raise DialectError(f"encoding {raw[:32]!r} is not supported on the streaming socket; "
                           f"use one of {', '.join(SPEAK_ENCODINGS)}")
    container = query.get("container", "none")
    if container not in ("none", ""):
        raise DialectError("container must be none on the streaming socket (raw audio)")
    rate = SPEAK_DEFAULT_RATE[raw]
    if "sample_rate" in query:
        rate = _whole("sample_rate", query["sample_rate"], 8000, 48000)
    ours = {"model": model, "encoding": encoding, "sample_rate": str(rate)}
    if "language" in query:
        ours["language"] = query["language"]
    ignored = tuple(sorted(k for k in query if k in SPEAK_IGNORED))
    return SpeakOptions(query=ours, model_name=model, asked_model=asked, ignored=ignored)


# --- /v1/speak: messages ------------------------------------------------------------------------


class Speak(_In, tag="Speak"):
    text: str


class Flush(_In, tag="Flush"):
    pass


class Clear(_In, tag="Clear"):
    pass


class Close(_In, tag="Close"):
    pass


SpeakClientMessage = Speak | Flush | Clear | Close | KeepAlive
_speak_decoder: Final = msgspec.json.Decoder(SpeakClientMessage)


class SpeakMetadata(_Out, tag="Metadata"):
    request_id: str
    model_name: str
    model_version: str
    model_uuid: str


class Flushed(_Out, tag="Flushed"):
    sequence_id: int


class Cleared(_Out, tag="Cleared"):
    sequence_id: int


class SpeakWarning(_Out, tag="Warning"):
    description: str
    code: str


@dataclass(slots=True)
class SpeakCodec:
    """One `/v1/speak` stream's translation state: Deepgram numbers the answers to Flush and
    Clear (`sequence_id`, from 0); a Clear drops the flushes not yet answered."""

    options: SpeakOptions
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _flushes: int = 0  # Flush messages taken
    _flushed: int = 0  # Flush messages answered (or dropped by a Clear)
    _clears: int = 0

    def decode(self, data: bytes) -> tts.Command | None:
        """A client text frame -> our TTS command (None: a KeepAlive). Raises BadClientMessage."""
        msg = _decode(data, _speak_decoder)
        if isinstance(msg, Speak):
            return tts.SubmitText(msg.text)
        if isinstance(msg, Flush):
            self._flushes += 1
            return tts.Flush()
        if isinstance(msg, Clear):
            return tts.Interrupt()
        if isinstance(msg, Close):
            return tts.EndInput()
        return None

    def encode(self, event: m.TtsServerMessage) -> bytes | None:
        if type(event) is m.Ready:
            name = self.options.model_name
            return _encoder.encode(SpeakMetadata(request_id=self.request_id, model_name=name,
                                                 model_version="1",
                                                 model_uuid=model_uuid(name)))
        if type(event) is m.Flushed:
            seq = self._flushed
            self._flushed += 1
            return _encoder.encode(Flushed(seq))
        if type(event) is m.Cleared:
            seq = self._clears
            self._clears += 1
            self._flushed = self._flushes  # the flushes it dropped are never answered
            return _encoder.encode(Cleared(seq))
        if type(event) is m.Error or type(event) is m.Warning:
            return self.warning(event.code, event.message)
        # audio_done, usage, summary: our protocol's, nothing in Deepgram's.
        return None

    def warning(self, code: str, description: str) -> bytes:
        return _encoder.encode(SpeakWarning(description=description[:200], code=code))
