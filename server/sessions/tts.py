"""The TTS session machine, sans-I/O: typed commands in (text, flush, interrupt, credit, end of
input, close, engine results), audio frames, events and instructions out, paced by the peer's
playback credit.

Outbound order is the contract: a chunk's audio frames, then its `audio_done`; `flushed` after
the audio of everything flushed; so both sit in one ordered queue with the audio. `error`,
`cleared`, `usage` and `warning` bypass it. Audio frames leave only while the peer holds
credit for them (flow_control.credit); what the engine produces beyond that waits here, and
the machine asks for no more engine audio once it passes its bound (flow_control.audio_backlog),
so a slow listener never makes the server buffer unbounded audio.

Text waits here too, until the runner takes it chunk by chunk (`next_request`) as synthesis
makes progress, so what waits is known and bounded (`pending_chars`, flow_control.text_backlog);
the machine says when the socket should stop being read (`TtsOutput.reading`).
`characters` counts text accepted for synthesis; `characters_synthesized` counts the chunks the
engine has produced audio for, which is what a `/v1/tts/stream` session is charged.

The session's state (open -> closing -> closed) is private: only commands move it, along
`TRANSITIONS`; any other move raises `IllegalTransition` (a bug, never a client's doing).
JSON is decoded at the edge only: `receive_text` turns a client frame into a command.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec
import numpy as np

from server.audio.resample import Resampler
from server.audio.text_chunker import TextChunker
from server.billing.meter import (
    KEY_REVOKED_CLOSE,
    KEY_REVOKED_CODE,
    KEY_REVOKED_MESSAGE,
    UsageReport,
)
from server.config import TtsSessionConfig
from server.flow_control.audio_backlog import AudioBacklogBound
from server.flow_control.credit import CreditWindow
from server.flow_control.replay import FinalsReplay
from server.flow_control.text_backlog import TextBacklogBound
from server.protocol.decoding import BadMessage, decode_client_message
from server.sessions.asr import CloseAction
from server.sessions.asr_params import BadParams
from server.sessions.errors import IllegalTransition as IllegalTransition
from server.sessions.resume import TtsChunkPoint, TtsResumeStart
from streamgate_protocol import messages as m
from streamgate_protocol.audio import StreamEncoder

State = Literal["open", "closing", "closed"]
_OUT = bytes | m.AudioDone | m.TtsMetrics | m.Flushed

# Every legal move of the session's state; anything else is a bug (IllegalTransition).
TRANSITIONS: Final[Mapping[State, frozenset[State]]] = {
    "open": frozenset({"closing", "closed"}),
    "closing": frozenset({"closed"}),
    "closed": frozenset(),
}


def transition(state: State, to: State) -> State:
    if to not in TRANSITIONS[state]:
        raise IllegalTransition(f"TTS session cannot go from {state!r} to {to!r}")
    return to


@dataclass(frozen=True, slots=True)
class TtsParams:
    model: str
    voice: str | None = None
    language: str = "en-US"
    encoding: m.Encoding = "pcm_s16le"
    sample_rate: int = 16000
    metrics: bool = False  # a `metrics` message after each chunk's `audio_done`

    @property
    def bytes_per_ms(self) -> float:
        width = 1 if self.encoding in ("mulaw", "alaw") else 2
        return self.sample_rate * width / 1000


@dataclass(frozen=True, slots=True)
class SynthRequest:
    chunk_id: int
    text: str
    generation: int  # bumped by an interrupt: audio of an older generation is dropped


# --- commands -----------------------------------------------------------------------------------
# msgspec Structs: built in C (a frozen dataclass costs a Python call per field), and a phone
# call builds one per engine piece and per mark echo.


class Start(msgspec.Struct, frozen=True):
    """The session is open: `ready` goes out."""


class SubmitText(msgspec.Struct, frozen=True):
    text: str


class Flush(msgspec.Struct, frozen=True):
    """Speak what is buffered without waiting for a sentence end; `flushed` once played out."""


class Interrupt(msgspec.Struct, frozen=True):
    """Barge-in: drop buffered text, unsent audio and pending synthesis at once.
    `peer_cleared`: the peer dropped the audio it held too (a telephony provider's `clear`),
    so the whole credit window is ours again; a WebSocket client returns its own credit."""

    peer_cleared: bool = False


class GrantCredit(msgspec.Struct, frozen=True):
    bytes: int


class Reconfigure(msgspec.Struct, frozen=True):
    config: m.TtsConfigMsg


class EndInput(msgspec.Struct, frozen=True):
    """The client's `close`: speak what is buffered, send the rest of the audio, then close."""


class Drain(msgspec.Struct, frozen=True):
    """The server is draining: finish what is chunked (buffered text without a sentence end is
    not spoken), then close 1001."""


class IdleTimeout(msgspec.Struct, frozen=True):
    """No client message for `timeout_s`: ends the session only if nothing is left to do (a
    TTS client may legitimately be silent while its audio plays out)."""

    timeout_s: float


class Close(msgspec.Struct, frozen=True):
    """End the session now with a non-1000 code: an `error` with `error_code` goes first."""

    code: int
    error_code: str
    message: str
    retryable: bool = False


class Finish(msgspec.Struct, frozen=True):
    """The meter settled: the `summary` (and for a non-1000 code an `error`), then the close."""

    report: UsageReport
    code: int = 1000
    reason: str = ""
    message: str = ""


class Usage(msgspec.Struct, frozen=True):
    """A periodic meter report: `usage` goes out; an exhausted or revoked wallet ends it."""

    report: UsageReport


class EngineAudio(msgspec.Struct, frozen=True):
    request: SynthRequest
    pcm: bytes


class EngineDone(msgspec.Struct, frozen=True):
    request: SynthRequest
    # The runner's clock, for the `metrics` message: the chunk taken for synthesis -> its
    # first audio, and -> its last (negative: not measured).
    first_audio_s: float = -1.0
    synthesis_s: float = -1.0


class EngineFailed(msgspec.Struct, frozen=True):
    request: SynthRequest
    message: str
    retryable: bool


Command = (Start | SubmitText | Flush | Interrupt | GrantCredit | Reconfigure | EndInput | Drain
           | IdleTimeout | Close | Finish | Usage | EngineAudio | EngineDone | EngineFailed)


# --- output -------------------------------------------------------------------------------------


class TtsOutput(msgspec.Struct):
    """What the machine wants done after a step, for the runner to carry out."""

    # In order: events (to encode) and audio frames (credit for them already spent).
    messages: list[m.TtsServerMessage | bytes]
    # An interrupt dropped the chunk being synthesized: cancel the engine call.
    cancel_synthesis: bool
    # Reading the socket: "pause" (text backlog full and the session can go on without the
    # client), "resume", or None (no change).
    reading: Literal["pause", "resume"] | None
    # Engine audio may be pulled (the audio backlog is under its bound).
    wants_audio: bool
    # Close the connection with this code once `messages` are sent.
    close: CloseAction | None


@dataclass(slots=True)
class _Chunk:
    chunk_id: int
    text: str
    samples: int = 0
    done: bool = False
    started: bool = False  # its first audio frame is queued
    synthesized: bool = False  # the engine produced audio for it: it is charged


def default_frame_bytes(params: TtsParams, chunk_ms: int) -> int:
    return max(2, int(chunk_ms * params.bytes_per_ms))


class TtsSession:
    def __init__(
        self,
        *,
        session_id: str,
        resume_token: str,
        params: TtsParams,
        settings: TtsSessionConfig,
        models: Collection[str],
        engine_rate: int,
        max_chars: int,
        max_tokens: int | None,
        limits: m.Limits,
        early_first_frame: bool = False,
        frame_bytes: int | None = None,
        resume: TtsResumeStart | None = None,
        resample_quality: str = "HQ",
    ) -> None:
        """`early_first_frame`: a chunk's first frame leaves as soon as any of its audio exists
        (time to first audio); off where the peer needs whole frames (telephony providers
        with fixed media sizes). `frame_bytes`: a peer's own frame size (Exotel's multiples
        of 320 bytes) instead of `chunk_ms`; the credit window then holds at least two.
        `resample_quality`: soxr's, from the engine's rate to the session's (a phone call's
        narrowband link takes MQ: docs/decisions/15M1-telephony-tts-resample-quality.md)."""
        self.early_first_frame = early_first_frame
        self.session_id = session_id
        self.resume_token = resume_token
        self.trace_id = ""  # set by a runner that traces the session: `ready` names it
        self.params = params
        self.settings = settings
        self.models = models
        self._limits = limits
        self._state: State = "open"
        self.close_action: CloseAction | None = None
        self.chunker = TextChunker(max_chars, max_tokens)
        self._resample_quality = resample_quality
        self.resampler = Resampler(engine_rate, params.sample_rate, resample_quality)
        self.encoder = StreamEncoder(params.encoding, params.sample_rate)
        self._raw_pcm = self._engine_pcm_is_output()
        self.frame_bytes = 0
        self.credit = CreditWindow(0)
        self.audio_backlog = AudioBacklogBound(0)
        self._size_frames(frame_bytes)
        self.generation = 0
        self._next_chunk = 0
        self._chunks: dict[int, _Chunk] = {}
        self._out: deque[_OUT] = deque()
        self._out_bytes = 0  # audio bytes in `_out`
        self._flush_marks: deque[int] = deque()  # chunk ids whose completion answers a flush
        self._partial = bytearray()
        self._immediate: list[m.TtsServerMessage | bytes] = []
        self._requests: deque[SynthRequest] = deque()  # chunks not yet handed to the engine
        self._queued_chars = 0  # their characters
        self.text_backlog = TextBacklogBound(settings.max_pending_chars)
        self._reading_paused = False
        self.pending_peak = 0  # the most text ever waiting at once
        self.characters = 0
        self.characters_synthesized = 0
        self.samples_sent = 0
        self.chunks_done = 0
        self._cancel_synthesis = False
        # Resume (server/sessions/resume.py): the newest chunks whose audio went out, kept so a
        # client that missed their end hears them again; bumped whenever what a resume would
        # need changes (text, a chunk charged, a clear). A chunk done is not such a change: it
        # moves from the pending chunks to `done_recent` with the same id, text and charge
        # (one save per request fewer; a point older by that still lists it).
        self.done_recent: FinalsReplay[TtsChunkPoint] = FinalsReplay()
        self.resume_version = 0
        self._resumed = resume is not None
        if resume is not None:
            self._resume_from(resume)
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            Start: self._start, SubmitText: self._submit_text, Flush: self._flush,
            Interrupt: self._interrupt, GrantCredit: self._grant_credit,
            Reconfigure: self._reconfigure, EndInput: self._end_input, Drain: self._drain,
            IdleTimeout: self._idle_timeout, Close: self._close, Finish: self._finish,
            Usage: self._usage, EngineAudio: self._engine_audio, EngineDone: self._engine_done,
            EngineFailed: self._engine_failed,
        }

    def _resume_from(self, resume: TtsResumeStart) -> None:
        """Speak again what the client may not have heard, charging none of it twice."""
        self._next_chunk = resume.next_chunk_id - 1
        for point in resume.chunks:
            chunk = _Chunk(point.chunk_id, point.text, synthesized=point.charged)
            self._chunks[chunk.chunk_id] = chunk
            self.characters += len(point.text)
            self._queued_chars += len(point.text)
            self._requests.append(SynthRequest(chunk.chunk_id, point.text, self.generation))
        if resume.buffered:
            self._chunks_ready(self.chunker.push(resume.buffered))

    @property
    def resumable(self) -> bool:
        return bool(self.resume_token)

    def resume_chunks(self) -> list[TtsChunkPoint]:
        """The chunks a resume would speak again: the newest done ones, then every one whose
        audio is not all out, in order."""
        kept = {p.chunk_id: p for _, p in self.done_recent.items()}
        for chunk in self._chunks.values():
            kept[chunk.chunk_id] = TtsChunkPoint(chunk.chunk_id, chunk.text, chunk.synthesized)
        return [kept[i] for i in sorted(kept)]

    @property
    def next_chunk_id(self) -> int:
        return self._next_chunk + 1

    def _size_frames(self, frame_bytes: int | None) -> None:
        window = int(self.settings.credit_ms * self.params.bytes_per_ms)
        if frame_bytes is None:
            self.frame_bytes = default_frame_bytes(self.params, self.settings.chunk_ms)
        else:
            self.frame_bytes = frame_bytes
            window = max(window, 2 * frame_bytes)
        self.credit = CreditWindow(window)
        self.audio_backlog = AudioBacklogBound.for_window(window, self.params.bytes_per_ms)

    # --- commands -------------------------------------------------------------------------------

    def handle(self, command: Command) -> None:
        self._handlers[type(command)](command)

    def receive_text(self, data: bytes) -> None:
        """The edge: a client text frame, decoded into a command (or answered bad_message)."""
        try:
            msg = decode_client_message(data, m.tts_client_decoder)
        except BadMessage as exc:
            self._error("bad_message", str(exc))
            return
        cmd = _client_command(msg)
        if cmd is not None:
            self.handle(cmd)

    def receive_binary(self, data: bytes) -> None:
        self._error("bad_message", "a TTS session takes text messages, not audio")

    def _start(self, _: Start) -> None:
        self._immediate.append(
            m.Ready(
                session_id=self.session_id,
                resume_token=self.resume_token,
                audio=m.AudioFormat(encoding=self.params.encoding,
                                    sample_rate=self.params.sample_rate),
                credit_bytes=self.credit.outstanding,
                limits=self._limits,
                model=self.params.model,
                resumed=self._resumed,
                trace_id=self.trace_id or msgspec.UNSET,
            )
        )

    def _grant_credit(self, cmd: GrantCredit) -> None:
        if cmd.bytes <= 0:
            self._error("bad_message", "credit.bytes must be positive")
        else:
            self.credit.grant(cmd.bytes)

    def _submit_text(self, cmd: SubmitText) -> None:
        if self._state != "open":
            return
        text = cmd.text
        if not self.text_backlog.admits(self.pending_chars, len(text)):
            self._error("text_backlog_full", f"more than {self.text_backlog.limit} characters "
                        "waiting for synthesis; send more as audio is played")
            return
        if len(self.chunker.buffered) + len(text) > self.settings.max_text_chars:
            self._error("text_too_long", f"more than {self.settings.max_text_chars} "
                        "characters buffered without a sentence end; send flush")
            return
        self._chunks_ready(self.chunker.push(text))
        self.pending_peak = max(self.pending_peak, self.pending_chars)
        self.resume_version += 1

    def _flush(self, _: Flush) -> None:
        if self._state != "open":
            return
        self._chunks_ready(self.chunker.flush())
        pending = [c.chunk_id for c in self._chunks.values() if not c.done]
        if pending:
            # Answered once the last chunk flushed so far has all its audio queued.
            self._flush_marks.append(max(pending))
        else:
            self._out.append(m.Flushed())

    def _end_input(self, _: EndInput) -> None:
        if self._state != "open":
            return
        self._chunks_ready(self.chunker.flush())
        self._move("closing")

    def _drain(self, _: Drain) -> None:
        if self._state == "open":
            self._move("closing")

    def _idle_timeout(self, cmd: IdleTimeout) -> None:
        if self._state == "open" and self.idle:
            self._close(Close(4008, "idle_timeout",
                              f"no text or keepalive for {cmd.timeout_s:g} s"))

    def _reconfigure(self, cmd: Reconfigure) -> None:
        msg = cmd.config
        if self._next_chunk or self.chunker.buffered or self._state != "open":
            self._error("bad_message", "config must come before the first text")
            return
        if msg.model is not None and msg.model != self.params.model:
            self._close(Close(4400, "bad_config", "the model is chosen in the query string"))
            return
        rate = msg.sample_rate or self.params.sample_rate
        if not 8000 <= rate <= 48000:
            self._close(Close(4400, "bad_config", f"sample_rate must be 8000-48000, got {rate}"))
            return
        self.params = TtsParams(
            model=self.params.model, voice=msg.voice or self.params.voice,
            language=msg.language or self.params.language,
            encoding=msg.encoding or self.params.encoding, sample_rate=rate,
        )
        self.resampler = Resampler(self.resampler.in_rate, rate, self._resample_quality)
        self.encoder = StreamEncoder(self.params.encoding, rate)
        self._raw_pcm = self._engine_pcm_is_output()
        self._size_frames(None)
        self._start(Start())

    def _chunks_ready(self, texts: list[str]) -> None:
        for text in texts:
            self._next_chunk += 1
            chunk = _Chunk(self._next_chunk, text)
            self._chunks[chunk.chunk_id] = chunk
            self.characters += len(text)
            self._queued_chars += len(text)
            self._requests.append(SynthRequest(chunk.chunk_id, text, self.generation))

    def _interrupt(self, cmd: Interrupt) -> None:
        if self._state != "open":
            return  # closing: what was asked for is still played out
        self.chunker.clear()
        self.generation += 1
        self._requests.clear()
        self._queued_chars = 0
        self._chunks.clear()
        self._out.clear()
        self._out_bytes = 0
        self._partial.clear()
        self._fresh_resampler()  # soxr holds back ~90 ms of the cleared audio
        self._flush_marks.clear()
        self.done_recent = FinalsReplay()  # what the client cleared is not spoken again
        self.resume_version += 1
        self._cancel_synthesis = True
        if cmd.peer_cleared:
            self.credit.refill()
        self._immediate.append(m.Cleared())

    def _fresh_resampler(self) -> None:
        """A new resampler for the next chunk (its soxr stream is built at its first audio)."""
        self.resampler = Resampler(self.resampler.in_rate, self.resampler.out_rate,
                                   self._resample_quality)

    # --- engine side ----------------------------------------------------------------------------

    def _engine_audio(self, cmd: EngineAudio) -> None:
        req = cmd.request
        chunk = self._chunks.get(req.chunk_id)
        if chunk is None or req.generation != self.generation or self._state == "closed":
            return
        pcm = cmd.pcm
        if pcm and not chunk.synthesized:
            # Charged in full from its first audio on: that audio may be on its way out now.
            chunk.synthesized = True
            self.characters_synthesized += len(chunk.text)
            self.resume_version += 1
        if self._raw_pcm:
            # The engine's PCM16 is already what the session sends: no resampling, encoding
            # or array (a few microseconds of numpy calls per engine chunk).
            self._queue_encoded(chunk, pcm, len(pcm) // 2)
        else:
            self._queue_samples(chunk, self.resampler.process(np.frombuffer(pcm, dtype="<i2")))

    def _engine_pcm_is_output(self) -> bool:
        return self.resampler.passthrough and self.params.encoding == "pcm_s16le"

    def _queue_frame(self, frame: bytes) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)

    def _queue_samples(self, chunk: _Chunk, samples: np.ndarray) -> None:
        if len(samples):
            self._queue_encoded(chunk, self.encoder.encode(samples), len(samples))

    def _queue_encoded(self, chunk: _Chunk, data: bytes, samples: int) -> None:
        """`samples` of the chunk's audio, encoded, into frames of `frame_bytes`."""
        if not data:
            return
        chunk.samples += samples
        frame = self.frame_bytes
        partial = self._partial
        if not chunk.started and self.early_first_frame:
            # Time to first audio: the chunk's first frame leaves with what the engine has
            # produced so far (up to chunk_ms) instead of waiting for a whole chunk_ms of it.
            chunk.started = True
            if partial:
                partial += data
                self._queue_frame(bytes(partial[:frame]))
                del partial[:frame]
                data = b""
            else:  # the engine's bytes themselves, when they fit in one frame
                first = data if len(data) <= frame else data[:frame]
                self._queue_frame(first)
                data = data[len(first):]
        partial += data
        while len(partial) >= frame:
            self._queue_frame(bytes(partial[:frame]))
            del partial[:frame]

    def _engine_done(self, cmd: EngineDone) -> None:
        req = cmd.request
        chunk = self._chunks.get(req.chunk_id)
        if chunk is None or req.generation != self.generation:
            return
        # The resampler's tail belongs to this chunk; a fresh one serves the next.
        self._queue_samples(chunk, self.resampler.flush())
        self._fresh_resampler()
        if self._partial:
            self._queue_frame(bytes(self._partial))
            self._partial.clear()
        chunk.done = True
        duration_ms = chunk.samples * 1000 // self.params.sample_rate
        self._out.append(m.AudioDone(
            chunk_id=chunk.chunk_id, text=chunk.text, duration_ms=duration_ms,
        ))
        if self.params.metrics and cmd.first_audio_s >= 0:
            self._out.append(m.TtsMetrics(
                chunk_id=chunk.chunk_id, characters=len(chunk.text),
                time_to_first_audio_ms=round(cmd.first_audio_s * 1000),
                synthesis_ms=round(cmd.synthesis_s * 1000), audio_ms=duration_ms,
                real_time_factor=round(cmd.synthesis_s * 1000 / max(1, duration_ms), 3)))
        self._release_flush_marks(chunk.chunk_id)

    def _release_flush_marks(self, chunk_id: int) -> None:
        while self._flush_marks and self._flush_marks[0] <= chunk_id:
            self._flush_marks.popleft()
            self._out.append(m.Flushed())

    def _engine_failed(self, cmd: EngineFailed) -> None:
        req = cmd.request
        if self._chunks.pop(req.chunk_id, None) is None or req.generation != self.generation:
            return
        self._release_flush_marks(req.chunk_id)
        # The failed chunk's held-back audio (soxr's tail, a part-made frame) must not lead
        # the next chunk's.
        self._fresh_resampler()
        self._partial.clear()
        self._immediate.append(m.Error(code="engine_error", retryable=cmd.retryable,
                                       message=f"chunk {req.chunk_id} not synthesized: "
                                       f"{cmd.message}"[:200]))

    # --- the end --------------------------------------------------------------------------------

    def _usage(self, cmd: Usage) -> None:
        report = cmd.report
        if self._state == "closed":
            return
        self._immediate.append(m.TtsUsage(characters=self.characters_synthesized,
                                          audio_ms=self.audio_ms,
                                          cost_micros=report.cost_micros,
                                          balance_micros=report.balance_micros))
        if report.revoked:
            self._close(Close(KEY_REVOKED_CLOSE, KEY_REVOKED_CODE, KEY_REVOKED_MESSAGE))
        elif report.exhausted:
            self._close(Close(4002, "insufficient_balance", "wallet balance exhausted; top up"))

    def _finish(self, cmd: Finish) -> None:
        if self._state == "closed":
            return
        self._immediate.append(m.TtsSummary(characters=self.characters_synthesized,
                                            audio_ms=self.audio_ms,
                                            cost_micros=cmd.report.cost_micros,
                                            chunks=self.chunks_done))
        if cmd.code != 1000:
            error = m.Error(code=cmd.reason, message=cmd.message or cmd.reason, retryable=True)
            if cmd.code == 1001 and self.resumable:
                error.resume_token = self.resume_token  # resume on another node
            self._immediate.append(error)
        self._move("closed")
        self.close_action = CloseAction(cmd.code, cmd.reason)

    def _close(self, cmd: Close) -> None:
        if self._state == "closed":
            return
        self._immediate.append(m.Error(code=cmd.error_code, message=cmd.message[:200],
                                       retryable=cmd.retryable))
        self._move("closed")
        self.close_action = CloseAction(cmd.code, cmd.error_code)
        self._requests.clear()
        self._queued_chars = 0
        self._out.clear()
        self._out_bytes = 0

    def _move(self, to: State) -> None:
        self._state = transition(self._state, to)

    def _error(self, code: str, message: str) -> None:
        self._immediate.append(m.Error(code=code, message=message[:200]))

    # --- output ---------------------------------------------------------------------------------

    def poll(self, *, can_write: bool = True) -> TtsOutput:
        """One step's output: immediate events, then queued audio and events in order while
        credit lasts (audio_done/flushed wait behind their audio), and the instructions."""
        out, self._immediate = self._immediate, []
        queue = self._out
        if can_write and queue:
            # Called per frame played on a phone call: the credit is read and charged once.
            available = self.credit.outstanding
            spent = 0
            while queue:
                item = queue[0]
                if isinstance(item, bytes):
                    n = len(item)
                    if n > available - spent:
                        break
                    spent += n
                elif isinstance(item, m.AudioDone):
                    done = self._chunks.pop(item.chunk_id, None)
                    self.chunks_done += 1
                    if done is not None and self.resume_token:
                        # Not a change a resume needs saved: the point lists the chunk, as
                        # it did while its audio was going out (resume_chunks).
                        self.done_recent.add(done.chunk_id, TtsChunkPoint(
                            done.chunk_id, done.text, done.synthesized))
                queue.popleft()
                out.append(item)
            if spent:
                self.credit.spend(spent)
                self._out_bytes -= spent
                self.samples_sent += spent // self.encoder.bytes_per_sample
        cancel, self._cancel_synthesis = self._cancel_synthesis, False
        reading = self._reading() if self._reading_paused or \
            self.pending_chars >= self.text_backlog.capacity else None
        return TtsOutput(messages=out, cancel_synthesis=cancel, reading=reading,
                         wants_audio=len(self._partial) + self._out_bytes
                         <= self.audio_backlog.limit,
                         close=self.close_action)

    def _reading(self) -> Literal["pause", "resume"] | None:
        """Back pressure on text: stop reading while the text backlog is full and the session
        can go on without the client; read while it needs the client's `credit` (text beyond
        the backlog's limit is then refused) or once the backlog is down to its low-water."""
        pending = self.pending_chars
        if self._reading_paused:
            if self.text_backlog.resumable(pending) or self.awaiting_credit \
                    or self._state == "closed":
                self._reading_paused = False
                return "resume"
        elif self.text_backlog.full(pending) and not self.awaiting_credit \
                and self._state != "closed":
            self._reading_paused = True
            return "pause"
        return None

    def take_requests(self) -> list[SynthRequest]:
        """Every chunk waiting, at once (telephony: a reply is bounded by the agent)."""
        reqs = list(self._requests)
        self._requests.clear()
        self._queued_chars = 0
        return reqs

    def next_request(self) -> SynthRequest | None:
        """The next chunk, taken when the engine is about to speak it: until then its text
        counts as waiting (`pending_chars`)."""
        if not self._requests:
            return None
        req = self._requests.popleft()
        self._queued_chars -= len(req.text)
        return req

    # --- read-only views ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def reading_paused(self) -> bool:
        """The machine asked for reading to pause and not yet to resume."""
        return self._reading_paused

    @property
    def has_output(self) -> bool:
        """`poll` has something to hand out: an event, audio or an event queued (sendable or
        not), a synthesis to cancel, a close. Without it a step changed nothing to carry out
        (an engine piece that completed no frame)."""
        return bool(self._immediate or self._out) or self._cancel_synthesis \
            or self.close_action is not None

    @property
    def has_requests(self) -> bool:
        return bool(self._requests)

    @property
    def pending_chars(self) -> int:
        """Text accepted but not yet handed to the engine: buffered, or chunked and queued."""
        return len(self.chunker.buffered) + self._queued_chars

    @property
    def awaiting_credit(self) -> bool:
        """Audio is ready but the peer's credit does not cover it: only a message from the
        peer (`credit`, `clear`, a mark echo) lets the session go on."""
        out = self._out
        return bool(out) and isinstance(out[0], bytes) and not self.credit.covers(len(out[0]))

    @property
    def backlog_bytes(self) -> int:
        """Encoded audio made and not sent yet."""
        return len(self._partial) + self._out_bytes

    @property
    def wants_audio(self) -> bool:
        """Engine audio may be pulled: what waits for credit is under its bound."""
        return not self.audio_backlog.full(self.backlog_bytes)

    @property
    def idle(self) -> bool:
        """Nothing left to synthesize or send (a close may complete)."""
        return not self._chunks and not self._out and not self._requests

    @property
    def text_buffered(self) -> bool:
        """Text without a sentence end waits for more (or a flush)."""
        return bool(self.chunker.buffered)

    @property
    def audio_ms(self) -> int:
        return self.samples_sent * 1000 // self.params.sample_rate


def _client_command(msg: m.TtsClientMessage) -> Command | None:
    if isinstance(msg, m.Text):
        return SubmitText(msg.text)
    if isinstance(msg, m.CreditGrant):
        return GrantCredit(msg.bytes)
    if isinstance(msg, m.Flush):
        return Flush()
    if isinstance(msg, m.Clear):
        return Interrupt()
    if isinstance(msg, m.Close):
        return EndInput()
    if isinstance(msg, m.TtsConfigMsg):
        return Reconfigure(msg)
    return None  # keepalive: liveness is the connection's business


def tts_params(query: dict[str, str], *, default_model: str, models: Collection[str]) -> TtsParams:
    """Query string -> TtsParams; BadParams (as for ASR) with a client-facing message."""
    model = query.get("model", default_model)
    if model not in models:
        raise BadParams(f"unknown model {model[:40]!r}; available: {', '.join(sorted(models))}")
    encoding = query.get("encoding", "pcm_s16le")
    if encoding not in ("pcm_s16le", "mulaw", "alaw", "wav"):
        raise BadParams("encoding must be one of pcm_s16le, mulaw, alaw, wav")
    try:
        rate = int(query.get("sample_rate", "16000"))
    except ValueError:
        raise BadParams("sample_rate must be an integer") from None
    if not 8000 <= rate <= 48000:
        raise BadParams(f"sample_rate must be 8000-48000, got {rate}")
    metrics = query.get("metrics", "false").lower()
    if metrics not in ("true", "false", "1", "0"):
        raise BadParams("metrics must be true or false")
    return TtsParams(model=model, voice=query.get("voice") or None,
                     language=query.get("language", "en-US"),
                     encoding=encoding,  # type: ignore[arg-type]
                     sample_rate=rate, metrics=metrics in ("true", "1"))
