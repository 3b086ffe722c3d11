"""The TTS session machine, sans-I/O: text in, synthesis requests out, engine audio in, audio
frames and events out, paced by the client's playback credit.

Outbound order is the contract: a chunk's audio frames, then its `audio_done`; `flushed` after
the audio of everything flushed; so both sit in one ordered queue with the audio. `error`,
`cleared`, `usage` and `warning` bypass it. Audio frames leave only while the client holds
credit for them; what the engine produces beyond that waits here, and the runner stops pulling
from the engine once `backlog_bytes` passes its bound, so a slow listener never makes the
server buffer unbounded audio.

Text waits here too, until the runner takes it chunk by chunk (`next_request`) as synthesis
makes progress, so what waits is known and bounded (`pending_chars`, flow_control.text_backlog).
`characters` counts text accepted for synthesis; `characters_synthesized` counts the chunks the
engine has produced audio for, which is what a `/v1/tts/stream` session is charged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import numpy as np

from server.audio.codecs import StreamEncoder
from server.audio.resample import Resampler
from server.audio.text_chunker import TextChunker
from server.billing.meter import (
    KEY_REVOKED_CLOSE,
    KEY_REVOKED_CODE,
    KEY_REVOKED_MESSAGE,
    UsageReport,
)
from server.config import TtsSessionConfig
from server.flow_control.text_backlog import TextBacklogBound
from server.sessions import messages as m
from server.sessions.asr import CloseAction

State = Literal["open", "closing", "closed"]
_OUT = bytes | m.AudioDone | m.Flushed


@dataclass(frozen=True, slots=True)
class TtsParams:
    model: str
    voice: str | None = None
    language: str = "en-US"
    encoding: m.Encoding = "pcm_s16le"
    sample_rate: int = 16000

    @property
    def bytes_per_ms(self) -> float:
        width = 1 if self.encoding in ("mulaw", "alaw") else 2
        return self.sample_rate * width / 1000


@dataclass(frozen=True, slots=True)
class SynthRequest:
    chunk_id: int
    text: str
    generation: int  # bumped by `clear`: audio of an older generation is dropped


@dataclass(slots=True)
class _Chunk:
    chunk_id: int
    text: str
    samples: int = 0
    done: bool = False
    started: bool = False  # its first audio frame is queued
    synthesized: bool = False  # the engine produced audio for it: it is charged


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
    ) -> None:
        """`early_first_frame`: a chunk's first frame leaves as soon as any of its audio exists
        (time to first audio); off where the peer needs whole frames (telephony providers
        with fixed media sizes)."""
        self.early_first_frame = early_first_frame
        self.session_id = session_id
        self.resume_token = resume_token
        self.params = params
        self.settings = settings
        self.models = models
        self._limits = limits
        self.state: State = "open"
        self.close_action: CloseAction | None = None
        self.chunker = TextChunker(max_chars, max_tokens)
        self.resampler = Resampler(engine_rate, params.sample_rate)
        self.encoder = StreamEncoder(params.encoding, params.sample_rate)
        self.frame_bytes = max(2, int(settings.chunk_ms * params.bytes_per_ms))
        self.credit = int(settings.credit_ms * params.bytes_per_ms)
        self.generation = 0
        self._next_chunk = 0
        self._chunks: dict[int, _Chunk] = {}
        self._out: deque[_OUT] = deque()
        self._flush_marks: deque[int] = deque()  # chunk ids whose completion answers a flush
        self._partial = bytearray()
        self._immediate: list[m.TtsServerMessage | bytes] = []
        self._requests: deque[SynthRequest] = deque()  # chunks not yet handed to the engine
        self._queued_chars = 0  # their characters
        self.text_backlog = TextBacklogBound(settings.max_pending_chars)
        self.pending_peak = 0  # the most text ever waiting at once
        self.characters = 0
        self.characters_synthesized = 0
        self.samples_sent = 0
        self.chunks_done = 0
        self.cancel_requested = False

    def start(self) -> None:
        self._immediate.append(
            m.Ready(
                session_id=self.session_id,
                resume_token=self.resume_token,
                audio=m.AudioFormat(encoding=self.params.encoding,
                                    sample_rate=self.params.sample_rate),
                credit_bytes=self.credit,
                limits=self._limits,
                model=self.params.model,
            )
        )

    # --- client messages ------------------------------------------------------------------------

    def receive_text(self, data: bytes) -> None:
        try:
            msg = m.decode_client_message(data, m.tts_client_decoder)
        except m.BadMessage as exc:
            self._error("bad_message", str(exc))
            return
        if isinstance(msg, m.KeepAlive):
            return
        if isinstance(msg, m.CreditGrant):
            if msg.bytes <= 0:
                self._error("bad_message", "credit.bytes must be positive")
            else:
                self.credit += msg.bytes
            return
        if isinstance(msg, m.TtsConfigMsg):
            self._reconfigure(msg)
            return
        if self.state != "open":
            return
        if isinstance(msg, m.Text):
            if not self.text_backlog.admits(self.pending_chars, len(msg.text)):
                self._error("text_backlog_full", f"more than {self.text_backlog.limit} characters "
                            "waiting for synthesis; send more as audio is played")
                return
            if len(self.chunker.buffered) + len(msg.text) > self.settings.max_text_chars:
                self._error("text_too_long", f"more than {self.settings.max_text_chars} "
                            "characters buffered without a sentence end; send flush")
                return
            self._chunks_ready(self.chunker.push(msg.text))
            self.pending_peak = max(self.pending_peak, self.pending_chars)
        elif isinstance(msg, m.Flush):
            self._chunks_ready(self.chunker.flush())
            pending = [c.chunk_id for c in self._chunks.values() if not c.done]
            if pending:
                # Answered once the last chunk flushed so far has all its audio queued.
                self._flush_marks.append(max(pending))
            else:
                self._out.append(m.Flushed())
        elif isinstance(msg, m.Clear):
            self.clear()
        elif isinstance(msg, m.Close):
            self._chunks_ready(self.chunker.flush())
            self.state = "closing"

    def _reconfigure(self, msg: m.TtsConfigMsg) -> None:
        if self._next_chunk or self.chunker.buffered or self.state != "open":
            self._error("bad_message", "config must come before the first text")
            return
        if msg.model is not None and msg.model != self.params.model:
            self.fail(4400, "bad_config", "the model is chosen in the query string")
            return
        rate = msg.sample_rate or self.params.sample_rate
        if not 8000 <= rate <= 48000:
            self.fail(4400, "bad_config", f"sample_rate must be 8000-48000, got {rate}")
            return
        self.params = TtsParams(
            model=self.params.model, voice=msg.voice or self.params.voice,
            language=msg.language or self.params.language,
            encoding=msg.encoding or self.params.encoding, sample_rate=rate,
        )
        self.resampler = Resampler(self.resampler.in_rate, rate)
        self.encoder = StreamEncoder(self.params.encoding, rate)
        self.frame_bytes = max(2, int(self.settings.chunk_ms * self.params.bytes_per_ms))
        self.credit = int(self.settings.credit_ms * self.params.bytes_per_ms)
        self.start()

    def receive_binary(self, data: bytes) -> None:
        self._error("bad_message", "a TTS session takes text messages, not audio")

    def _chunks_ready(self, texts: list[str]) -> None:
        for text in texts:
            self._next_chunk += 1
            chunk = _Chunk(self._next_chunk, text)
            self._chunks[chunk.chunk_id] = chunk
            self.characters += len(text)
            self._queued_chars += len(text)
            self._requests.append(SynthRequest(chunk.chunk_id, text, self.generation))

    def clear(self) -> None:
        """Barge-in: drop buffered text, unsent audio and pending synthesis at once."""
        self.chunker.clear()
        self.generation += 1
        self._requests.clear()
        self._queued_chars = 0
        self._chunks.clear()
        self._out.clear()
        self._partial.clear()
        self._flush_marks.clear()
        self.cancel_requested = True
        self._immediate.append(m.Cleared())

    # --- engine side ----------------------------------------------------------------------------

    def receive_audio(self, req: SynthRequest, pcm: bytes) -> None:
        chunk = self._chunks.get(req.chunk_id)
        if chunk is None or req.generation != self.generation or self.state == "closed":
            return
        if pcm and not chunk.synthesized:
            # Charged in full from its first audio on: that audio may be on its way out now.
            chunk.synthesized = True
            self.characters_synthesized += len(chunk.text)
        samples = self.resampler.process(np.frombuffer(pcm, dtype="<i2"))
        self._queue_samples(chunk, samples)

    def _queue_samples(self, chunk: _Chunk, samples: np.ndarray) -> None:
        if not len(samples):
            return
        chunk.samples += len(samples)
        self._partial += self.encoder.encode(samples)
        frame = self.frame_bytes
        if not chunk.started and self.early_first_frame:
            # Time to first audio: the chunk's first frame leaves with what the engine has
            # produced so far (up to chunk_ms) instead of waiting for a whole chunk_ms of it.
            chunk.started = True
            self._out.append(bytes(self._partial[:frame]))
            del self._partial[:frame]
        while len(self._partial) >= frame:
            self._out.append(bytes(self._partial[:frame]))
            del self._partial[:frame]

    def synthesis_done(self, req: SynthRequest) -> None:
        chunk = self._chunks.get(req.chunk_id)
        if chunk is None or req.generation != self.generation:
            return
        # The resampler's tail belongs to this chunk; a fresh one serves the next.
        self._queue_samples(chunk, self.resampler.flush())
        self.resampler = Resampler(self.resampler.in_rate, self.resampler.out_rate)
        if self._partial:
            self._out.append(bytes(self._partial))
            self._partial.clear()
        chunk.done = True
        self._out.append(m.AudioDone(
            chunk_id=chunk.chunk_id, text=chunk.text,
            duration_ms=chunk.samples * 1000 // self.params.sample_rate,
        ))
        self._release_flush_marks(chunk.chunk_id)

    def _release_flush_marks(self, chunk_id: int) -> None:
        while self._flush_marks and self._flush_marks[0] <= chunk_id:
            self._flush_marks.popleft()
            self._out.append(m.Flushed())

    def synthesis_failed(self, req: SynthRequest, message: str, retryable: bool) -> None:
        if self._chunks.pop(req.chunk_id, None) is None or req.generation != self.generation:
            return
        self._release_flush_marks(req.chunk_id)
        self._immediate.append(m.Error(code="engine_error", retryable=retryable,
                                       message=f"chunk {req.chunk_id} not synthesized: "
                                       f"{message}"[:200]))

    # --- output ---------------------------------------------------------------------------------

    def output(self, *, can_write: bool = True) -> list[m.TtsServerMessage | bytes]:
        """Everything that may go out now: immediate events, then queued audio and events in
        order while credit lasts (audio_done/flushed wait behind their audio)."""
        out, self._immediate = self._immediate, []
        while can_write and self._out:
            item = self._out[0]
            if isinstance(item, bytes):
                if len(item) > self.credit:
                    break
                self.credit -= len(item)
                self.samples_sent += len(item) // self.encoder.bytes_per_sample
            elif isinstance(item, m.AudioDone):
                self._chunks.pop(item.chunk_id, None)
                self.chunks_done += 1
            self._out.popleft()
            out.append(item)
        return out

    def requests(self) -> list[SynthRequest]:
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

    @property
    def has_requests(self) -> bool:
        return bool(self._requests)

    @property
    def pending_chars(self) -> int:
        """Text accepted but not yet handed to the engine: buffered, or chunked and queued."""
        return len(self.chunker.buffered) + self._queued_chars

    @property
    def awaiting_credit(self) -> bool:
        """Audio is ready but the client's credit does not cover it: only a message from the
        client (`credit`, `clear`) lets the session go on."""
        out = self._out
        return bool(out) and isinstance(out[0], bytes) and len(out[0]) > self.credit

    @property
    def backlog_bytes(self) -> int:
        return len(self._partial) + sum(len(i) for i in self._out if isinstance(i, bytes))

    @property
    def idle(self) -> bool:
        """Nothing left to synthesize or send (a close may complete)."""
        return not self._chunks and not self._out and not self._requests

    @property
    def audio_ms(self) -> int:
        return self.samples_sent * 1000 // self.params.sample_rate

    def usage(self, report: UsageReport) -> None:
        self._immediate.append(m.TtsUsage(characters=self.characters_synthesized,
                                          audio_ms=self.audio_ms,
                                          cost_micros=report.cost_micros,
                                          balance_micros=report.balance_micros))
        if report.revoked:
            self.fail(KEY_REVOKED_CLOSE, KEY_REVOKED_CODE, KEY_REVOKED_MESSAGE)
        elif report.exhausted:
            self.fail(4002, "insufficient_balance", "wallet balance exhausted; top up")

    def finish(self, report: UsageReport, code: int = 1000, reason: str = "",
               message: str = "") -> None:
        if self.state == "closed":
            return
        self._immediate.append(m.TtsSummary(characters=self.characters_synthesized,
                                            audio_ms=self.audio_ms,
                                            cost_micros=report.cost_micros,
                                            chunks=self.chunks_done))
        if code != 1000:
            self._immediate.append(m.Error(code=reason, message=message or reason,
                                           retryable=True))
        self.state = "closed"
        self.close_action = CloseAction(code, reason)

    def fail(self, code: int, error_code: str, message: str, *, retryable: bool = False) -> None:
        if self.state == "closed":
            return
        self._immediate.append(m.Error(code=error_code, message=message[:200],
                                       retryable=retryable))
        self.state = "closed"
        self.close_action = CloseAction(code, error_code)
        self._requests.clear()
        self._queued_chars = 0
        self._out.clear()

    def _error(self, code: str, message: str) -> None:
        self._immediate.append(m.Error(code=code, message=message[:200]))


def tts_params(query: dict[str, str], *, default_model: str, models: Collection[str]) -> TtsParams:
    """Query string -> TtsParams; ValueError with a client-facing message when invalid."""
    model = query.get("model", default_model)
    if model not in models:
        raise ValueError(f"unknown model {model[:40]!r}; available: {', '.join(sorted(models))}")
    encoding = query.get("encoding", "pcm_s16le")
    if encoding not in ("pcm_s16le", "mulaw", "alaw", "wav"):
        raise ValueError("encoding must be one of pcm_s16le, mulaw, alaw, wav")
    try:
        rate = int(query.get("sample_rate", "16000"))
    except ValueError:
        raise ValueError("sample_rate must be an integer") from None
    if not 8000 <= rate <= 48000:
        raise ValueError(f"sample_rate must be 8000-48000, got {rate}")
    return TtsParams(model=model, voice=query.get("voice") or None,
                     language=query.get("language", "en-US"),
                     encoding=encoding,  # type: ignore[arg-type]
                     sample_rate=rate)
