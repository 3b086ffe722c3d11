"""The ASR session machine, sans-I/O in the style of websockets' protocol.py.

Inputs are plain calls (`receive_audio`, `receive_text`, `process`, `receive_result`, ...);
outputs accumulate and are collected with `events_to_send()` (wire messages) and
`engine_requests()` (work for the invoke stage). No sockets, no clock, no engine inside:
the asyncio runner (asr_runner.py) feeds it and does the I/O, and tests feed it bytes.

Time is audio time: every `*_ms` is derived from samples, so transcripts line up with the
audio whatever the network or the engine did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from server.audio.codecs import AudioFormatError, StreamDecoder
from server.audio.resample import Resampler, UtteranceResampler
from server.audio.vad import (
    SAMPLE_RATES,
    Endpointer,
    SpeechAudio,
    SpeechEnd,
    SpeechStart,
)
from server.billing.meter import (
    KEY_REVOKED_CLOSE,
    KEY_REVOKED_CODE,
    KEY_REVOKED_MESSAGE,
    UsageReport,
)
from server.config import AsrSessionConfig
from server.flow_control.credit import CreditWindow
from server.flow_control.ingest_queue import ControlLaneFull, IngestQueue
from server.models.base import EngineError, Hypothesis
from server.sessions import messages as m
from server.sessions.asr_params import AsrParams, BadParams, params_with_config

# --- work for the invoke stage ----------------------------------------------------------------


@dataclass(slots=True)
class EngineFeed:
    utterance_id: int
    pcm: bytes


@dataclass(slots=True)
class EngineFinish:
    utterance_id: int


EngineRequest = EngineFeed | EngineFinish


@dataclass(frozen=True, slots=True)
class CloseAction:
    """The machine wants the connection closed with this code once its events are sent."""

    code: int
    reason: str


_Control = m.Finalize | m.Close

# Speech goes to the engine in chunks of this much audio (the last one of an utterance may be
# shorter): one resampler call and one invoke-stage hop per chunk instead of per 20 ms frame.
ENGINE_CHUNK_MS = 100
State = Literal["open", "closing", "closed"]


@dataclass(slots=True)
class _Utterance:
    utterance_id: int
    start_ms: int
    audio: UtteranceResampler
    end_ms: int = -1  # set when the VAD (or finalize) ends it
    last_interim: str = ""


class AsrSession:
    def __init__(
        self,
        *,
        session_id: str,
        resume_token: str,
        params: AsrParams,
        settings: AsrSessionConfig,
        models: frozenset[str],
        engine_rate: int,
        engine_interim: bool,
        max_frame_bytes: int,
        idle_timeout_s: float,
    ) -> None:
        self.session_id = session_id
        self.resume_token = resume_token
        self.settings = settings
        self.models = models
        self.engine_rate = engine_rate
        self.engine_interim = engine_interim
        self._limits = m.Limits(
            max_frame_bytes=max_frame_bytes,
            idle_timeout_s=idle_timeout_s,
            usage_interval_s=settings.usage_interval_s,
            max_utterance_ms=settings.max_utterance_ms,
        )
        self.state: State = "open"
        self.close_action: CloseAction | None = None
        self._events: list[m.AsrServerMessage] = []
        self._requests: list[EngineRequest] = []
        self.audio_started = False
        self.utterance_count = 0
        self._open: _Utterance | None = None
        # Utterances ended by the VAD whose final transcript has not come back yet.
        self._awaiting_final: dict[int, _Utterance] = {}
        self.dropped_bytes = 0
        self._dropped_reported_ms = 0
        self._credit_warned = False
        self._balance_warned = False
        self.credit = CreditWindow(self._capacity(params))
        self._configure(params)

    # --- configuration ------------------------------------------------------------------------

    def _capacity(self, params: AsrParams) -> int:
        """The ingest bound and the credit window: ingest_queue_ms of the client's encoding."""
        return max(1, int(self.settings.ingest_queue_ms * params.bytes_per_ms))

    def _configure(self, params: AsrParams) -> None:
        self.params = params
        capacity = self._capacity(params)
        self.queue: IngestQueue[_Control] = IngestQueue(
            capacity, params.overflow, self.settings.max_control_messages
        )
        self.queue.protect_head = params.encoding == "wav"
        self.credit.resize(capacity)
        self.decoder = StreamDecoder(
            params.encoding,
            params.sample_rate,
            params.channels,
            max_header_bytes=self.settings.max_wav_header_bytes,
        )
        # Built once the input rate is certain (a WAV stream's header says it).
        self.endpointer: Endpointer | None = None
        # Only for input rates webrtcvad cannot take (e.g. 22.05 or 44.1 kHz): everything is
        # resampled to the engine's rate before the VAD. Otherwise the VAD runs at the input
        # rate and only speech is resampled, per utterance (UtteranceResampler).
        self.resampler: Resampler | None = None
        # Speech to the engine's rate: built at the first utterance, reused by the next ones.
        self._speech_audio: UtteranceResampler | None = None
        if self.decoder.header_complete:
            self._build_pipeline()

    def _build_pipeline(self) -> None:
        rate = self.decoder.sample_rate
        s = self.settings
        if rate in SAMPLE_RATES:
            vad_rate = rate
        else:
            vad_rate = self.engine_rate
            self.resampler = Resampler(rate, vad_rate, s.resample_quality)
        self.endpointer = Endpointer(
            vad_rate,
            self.params.vad,
            frame_ms=s.vad_frame_ms,
            endpointing_ms=self.params.endpointing_ms,
            preroll_ms=s.preroll_ms,
            max_utterance_ms=s.max_utterance_ms,
        )

    def start(self) -> None:
        """Announce the session; called once the meter granted it."""
        self._events.append(
            m.Ready(
                session_id=self.session_id,
                resume_token=self.resume_token,
                audio=m.AudioFormat(
                    encoding=self.params.encoding, sample_rate=self.params.sample_rate
                ),
                credit_bytes=self.credit.window,
                limits=self._limits,
                model=self.params.model,
            )
        )

    # --- frames from the client (called from the socket's data path: keep it cheap) ----------

    def receive_audio(self, data: bytes) -> bool:
        """Queue one binary frame. Return True when the socket should stop being read (block)."""
        if not data:
            self._error("empty_frame", "zero-length binary frame ignored (use close to end)")
            return False
        if self.state != "open":
            return False
        self.audio_started = True
        if self.credit.received(len(data)) and not self._credit_warned:
            self._credit_warned = True
            self._events.append(
                m.Warning(
                    code="credit_exceeded",
                    message=f"client sent more than the {self.credit.granted_total} bytes granted;"
                    f" overflow policy {self.params.overflow!r} applies",
                )
            )
        self.dropped_bytes += self.queue.put_audio(data)
        return self.queue.policy == "block" and self.queue.full

    def receive_text(self, data: bytes) -> None:
        try:
            msg = m.decode_client_message(data, m.asr_client_decoder)
        except m.BadMessage as exc:
            self._error("bad_message", str(exc))
            return
        if isinstance(msg, m.KeepAlive):
            return  # liveness is the runner's business; nothing to do here
        if isinstance(msg, m.Config):
            self._receive_config(msg)
            return
        if self.state != "open":
            return  # a second close, or finalize after close: already handled
        try:
            self.queue.put_control(msg)
        except ControlLaneFull as exc:
            self.fail(1008, "policy_violation", str(exc))
        if isinstance(msg, m.Close):
            self.state = "closing"

    def _receive_config(self, msg: m.Config) -> None:
        if self.audio_started or self.state != "open":
            self._error("bad_message", "config must come before the first audio frame")
            return
        try:
            params = params_with_config(self.params, msg, models=self.models)
        except BadParams as exc:
            self.fail(4400, "bad_config", str(exc))
            return
        self._configure(params)
        self.start()

    # --- the ingest + VAD stage -----------------------------------------------------------------

    def process(self) -> int:
        """Drain the ingest queue: decode, resample, VAD, in one go. Return bytes consumed."""
        queue = self.queue
        if queue.control_count:
            consumed = self._ingest_in_order(queue.drain())
        else:
            # Only audio waiting (the usual case): one decode over all of it.
            audio = queue.drain_audio()
            consumed = self._ingest(audio) if audio else 0
        if consumed:
            grant = self.credit.consumed(consumed)
            if grant:
                self._events.append(m.Credit(bytes=grant))
        if self.dropped_bytes:
            self._report_drops()
        return consumed

    def _ingest_in_order(self, items: list[bytes | _Control]) -> int:
        """Audio runs and control messages in arrival order (a finalize ends what came before)."""
        consumed = 0
        run: list[bytes] = []
        for item in items:
            if isinstance(item, bytes):
                run.append(item)
                continue
            if run:
                consumed += self._ingest(run)
                run = []
            self._control(item)
        if run:
            consumed += self._ingest(run)
        return consumed

    def _ingest(self, chunks: list[bytes]) -> int:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.state == "closed":
            return len(data)
        try:
            pcm = self.decoder.decode_pcm(data)
        except AudioFormatError as exc:
            self.fail(4400, "bad_audio", str(exc))
            return len(data)
        endpointer = self.endpointer
        if endpointer is None:
            if not self.decoder.header_complete:
                return len(data)
            self._build_pipeline()
            endpointer = self.endpointer
            assert endpointer is not None
        if pcm:
            resampler = self.resampler
            if resampler is not None:
                pcm = resampler.process(np.frombuffer(pcm, dtype=np.int16)).tobytes()
            self._vad_events(endpointer.process(pcm))
        return len(data)

    def _control(self, msg: _Control) -> None:
        self._force_end()
        if isinstance(msg, m.Close):
            self.state = "closing"

    def _force_end(self) -> None:
        if self.endpointer is not None:
            self._vad_events(self.endpointer.force_end())

    def _vad_events(self, events: list[SpeechStart | SpeechAudio | SpeechEnd]) -> None:
        for ev in events:
            if isinstance(ev, SpeechAudio):
                utt = self._open
                if utt is not None:
                    pcm = utt.audio.feed(ev.pcm)
                    if pcm:
                        self._requests.append(EngineFeed(utt.utterance_id, pcm))
            elif isinstance(ev, SpeechStart):
                self.utterance_count += 1
                audio = self._speech_audio
                if audio is None:
                    assert self.endpointer is not None
                    audio = self._speech_audio = UtteranceResampler(
                        self.endpointer.sample_rate, self.engine_rate,
                        self.settings.resample_quality, ENGINE_CHUNK_MS)
                audio.start()
                self._open = _Utterance(self.utterance_count, ev.at_ms, audio)
                self._events.append(m.SpeechStarted(at_ms=ev.at_ms))
            elif self._open is not None:
                utt, self._open = self._open, None
                utt.end_ms = ev.end_ms
                self._awaiting_final[utt.utterance_id] = utt
                pcm = utt.audio.finish()
                if pcm:
                    self._requests.append(EngineFeed(utt.utterance_id, pcm))
                self._requests.append(EngineFinish(utt.utterance_id))

    # --- results from the invoke stage ----------------------------------------------------------

    def receive_result(self, utterance_id: int, hyp: Hypothesis, *, final: bool) -> None:
        if final:
            utt = self._awaiting_final.pop(utterance_id, None)
            if utt is None:
                return
            self._events.append(self._transcript(utt, hyp, final=True, end_ms=utt.end_ms))
            self._events.append(m.UtteranceEnd(utterance_id=utterance_id, end_ms=utt.end_ms))
            return
        utt = self._open if self._open and self._open.utterance_id == utterance_id else None
        if utt is None or not self.params.interim_results or hyp.text == utt.last_interim:
            return
        utt.last_interim = hyp.text
        # The latest voiced frame, not the read position: a final ends at its last voiced
        # frame, and an interim must never claim to reach past the final that follows it.
        voiced = self.endpointer.last_voiced_ms if self.endpointer is not None else 0
        end_ms = max(utt.start_ms, voiced)
        self._events.append(self._transcript(utt, hyp, final=False, end_ms=end_ms))

    def receive_engine_error(self, utterance_id: int, exc: EngineError) -> None:
        utt = self._awaiting_final.pop(utterance_id, None)
        if self._open is not None and self._open.utterance_id == utterance_id:
            # The engine lost this utterance; its remaining audio has nowhere to go.
            utt, self._open = self._open, None
        self._events.append(
            m.Error(
                code="engine_error",
                message=f"utterance {utterance_id} not transcribed: {exc}"[:200],
                retryable=exc.retryable,
            )
        )
        if utt is not None and utt.end_ms >= 0:
            self._events.append(m.UtteranceEnd(utterance_id=utterance_id, end_ms=utt.end_ms))

    def _transcript(
        self, utt: _Utterance, hyp: Hypothesis, *, final: bool, end_ms: int
    ) -> m.Transcript:
        base = utt.start_ms
        return m.Transcript(
            utterance_id=utt.utterance_id,
            is_final=final,
            text=hyp.text,
            start_ms=base,
            end_ms=end_ms,
            words=[
                m.Word(
                    word=w.word,
                    start_ms=base + w.start_ms,
                    end_ms=base + w.end_ms,
                    confidence=round(w.confidence, 3),
                )
                for w in hyp.words
            ],
        )

    # --- usage, drops, closing ------------------------------------------------------------------

    @property
    def accepted_ms(self) -> int:
        return self.decoder.samples_decoded * 1000 // self.decoder.sample_rate

    @property
    def dropped_ms(self) -> int:
        # Read every ingest step: the common case (nothing dropped) must cost nothing.
        if not self.dropped_bytes:
            return 0
        return int(self.dropped_bytes / self.params.bytes_per_ms)

    def _report_drops(self) -> None:
        dropped = self.dropped_ms
        if dropped > self._dropped_reported_ms:
            self._events.append(
                m.Warning(
                    code="audio_dropped",
                    message="ingest queue full: oldest audio dropped (not billed)",
                    dropped_ms=dropped - self._dropped_reported_ms,
                )
            )
            self._dropped_reported_ms = dropped

    def usage(self, report: UsageReport) -> None:
        self._events.append(
            m.Usage(
                audio_ms=report.audio_ms,
                billed_ms=report.billed_ms,
                cost_micros=report.cost_micros,
                balance_micros=report.balance_micros,
                dropped_ms=report.dropped_ms,
            )
        )
        if report.balance_low and not self._balance_warned:
            self._balance_warned = True
            self._events.append(
                m.Warning(code="balance_low", message="wallet balance is running low; top up")
            )
        if report.revoked:
            self.key_revoked()
        elif report.exhausted:
            self.out_of_balance()
        elif report.rate_limited:
            self.fail(4029, "rate_limited", "audio seconds per minute limit reached",
                      retryable=True, retry_after_s=60.0)

    def out_of_balance(self) -> None:
        self.fail(4002, "insufficient_balance", "wallet balance exhausted; top up to continue")

    def key_revoked(self) -> None:
        self.fail(KEY_REVOKED_CLOSE, KEY_REVOKED_CODE, KEY_REVOKED_MESSAGE)

    @property
    def finals_pending(self) -> bool:
        """Work is still owed to the client before a normal close."""
        return bool(self._awaiting_final) or self._open is not None or len(self.queue) > 0

    def end_of_input(self) -> None:
        """The client closed or the server drains: end the open utterance so it gets a final."""
        self._force_end()
        if self.state == "open":
            self.state = "closing"

    def abandon_pending(self) -> None:
        """Finals that can no longer come (deadline passed): stop waiting for them."""
        self._open = None
        self._awaiting_final.clear()

    def finish(
        self, report: UsageReport, code: int = 1000, reason: str = "", message: str = ""
    ) -> None:
        """Summary, then close. `report` is the meter's settled usage."""
        if self.state == "closed":
            return
        self._events.append(
            m.Summary(
                audio_ms=report.audio_ms,
                billed_ms=report.billed_ms,
                cost_micros=report.cost_micros,
                utterances=self.utterance_count,
                dropped_ms=report.dropped_ms,
            )
        )
        if code != 1000:
            # Every close other than 1000 carries an `error` with the same reason first.
            self._events.append(m.Error(code=reason, message=message or reason, retryable=True))
        self.state = "closed"
        self.close_action = CloseAction(code, reason)

    def fail(self, code: int, error_code: str, message: str, *, retryable: bool = False,
             retry_after_s: float | None = None) -> None:
        """Close with a non-1000 code: an `error` frame with the same reason goes first."""
        if self.state == "closed":
            return
        self._events.append(
            m.Error(code=error_code, message=message[:200], retryable=retryable,
                    retry_after_s=retry_after_s)
        )
        self.state = "closed"
        self.close_action = CloseAction(code, error_code)
        self._requests.clear()

    def _error(self, code: str, message: str) -> None:
        self._events.append(m.Error(code=code, message=message[:200]))

    # --- outputs --------------------------------------------------------------------------------

    def events_to_send(self) -> list[m.AsrServerMessage]:
        events, self._events = self._events, []
        return events

    def engine_requests(self) -> list[EngineRequest]:
        reqs, self._requests = self._requests, []
        return reqs


def encode_event(event: m.AsrServerMessage) -> bytes:
    return m.encoder.encode(event)


__all__ = [
    "AsrSession",
    "CloseAction",
    "EngineFeed",
    "EngineFinish",
    "EngineRequest",
    "encode_event",
]
