"""The ASR session machine, sans-I/O in the style of h11 and websockets' protocol.py.

It owns the session's policy: the ingest queue and the credit window, the VAD and utterances,
the queue of work for the engine and its bound, the outbox (interim results coalesced while the
client is slow to read, never anything else) and the close sequence (finals owed, their
deadline, settle, summary, close code). The runner (asr_runner.py) only moves bytes.

Commands in (typed: JSON is decoded at the edge):
  `receive_audio` (the per-frame fast path: returns whether reading should pause),
  `receive_control`, `bad_message`, `receive_result`, `receive_engine_error`, `usage`,
  `lease_exhausted`, `lease_extended`, `out_of_balance`, `key_revoked`, `idle_timeout`,
  `drain`, `fail`, `hold_messages`, `settled`, `connection_lost`.
Outputs:
  `step(now)` runs the ingest stage over everything queued and returns one `Step`: pause or
  resume reading, ask for a lease top-up, close, settle, what the stage waits for next and the
  time it must run again by; `messages(hold=...)` the messages to send; `next_engine_request()`
  the engine's next piece of work (coalesced per utterance); `take_metered_ms()` audio to meter.

State is private and moves only through `_TRANSITIONS` (an illegal move raises
`IllegalTransition`): open -> closing (the client's `close`, end of input, drain) -> settling
(every final delivered or abandoned: the meter settles) -> closed (summary and close code);
`fail` goes to closed from anywhere but closed.

Time is audio time: every `*_ms` is derived from samples, so transcripts line up with the
audio whatever the network or the engine did. Wall time (`now`) only bounds the wait for finals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import msgspec
import numpy as np

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
from server.flow_control.byte_queue import ByteQueue
from server.flow_control.credit import CreditWindow
from server.flow_control.finals import FINALS_TIMEOUT_S
from server.flow_control.ingest_queue import ControlLaneFull, IngestQueue
from server.flow_control.outbox import Outbox
from server.flow_control.replay import FinalsReplay
from server.models.base import EngineError, Hypothesis
from server.sessions.asr_params import AsrParams, BadParams, params_with_config
from server.sessions.errors import IllegalTransition
from server.sessions.resume import FinalMessage, ResumeStart
from streamgate_protocol import messages as m
from streamgate_protocol.audio import AudioFormatError, StreamDecoder

# --- work for the invoke stage ----------------------------------------------------------------


@dataclass(slots=True)
class EngineFeed:
    utterance_id: int
    pcm: bytes


@dataclass(slots=True)
class EngineFinish:
    utterance_id: int


EngineRequest = EngineFeed | EngineFinish


def _same_utterance_feed(head: EngineRequest, item: EngineRequest) -> bool:
    return (type(head) is EngineFeed and type(item) is EngineFeed
            and item.utterance_id == head.utterance_id)


@dataclass(frozen=True, slots=True)
class CloseAction:
    """The machine wants the connection closed with this code once its events are sent."""

    code: int
    reason: str


# --- one step's output --------------------------------------------------------------------------

# What the ingest stage waits for before its next step: new input (frames, results, a lease
# answer, a timer), or room in the engine's queue (a slow engine holds the stage, which holds
# the ingest queue, which pauses reading or drops: memory per session stays bounded).
Wait = Literal["input", "engine_room"]


@dataclass(frozen=True, slots=True)
class Step:
    """Everything one command asks of the I/O side, beyond the messages to send."""

    pause_reading: bool = False
    resume_reading: bool = False
    top_up: bool = False  # ask the meter to extend the lease; answer with lease_extended() ...
    close: CloseAction | None = None  # send every message (held ones too), then close
    settle: bool = False  # settle the meter, then call settled(report)
    finals_abandoned: bool = False  # FINALS_TIMEOUT_S passed with finals owed (worth a log line)
    wait: Wait = "input"
    deadline: float | None = None  # step again by this time (`now` clock) even without input

    @property
    def finished(self) -> bool:
        """The stage has nothing more to do: close, or settle then close."""
        return self.close is not None or self.settle


CONTINUE: Final = Step()
_WAIT_ENGINE: Final = Step(wait="engine_room")
_RESUME: Final = Step(resume_reading=True)
_SETTLE: Final = Step(settle=True)
_TOP_UP: Final = Step(pause_reading=True, top_up=True)

# --- states -------------------------------------------------------------------------------------

State = Literal["open", "closing", "settling", "closed"]
_TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    "open": frozenset({"closing", "closed"}),
    "closing": frozenset({"settling", "closed"}),
    "settling": frozenset({"closed"}),
    "closed": frozenset(),
}


_Control = m.Finalize | m.Close

# Speech goes to the engine in chunks of this much audio (the last one of an utterance may be
# shorter): one resampler call and one invoke-stage hop per chunk instead of per 20 ms frame.
ENGINE_CHUNK_MS = 100


@dataclass(frozen=True, slots=True)
class Position:
    """A quiet point of the client's stream, where a resumed session can start afresh."""

    offset: int  # client stream byte
    at_ms: int  # audio time there
    next_utterance_id: int


@dataclass(slots=True)
class _Utterance:
    utterance_id: int
    start_ms: int
    audio: UtteranceResampler
    end_ms: int = -1  # set when the VAD (or finalize) ends it
    last_interim: str = ""
    ended_at: float = 0.0  # the step's `now` when it ended (end of speech -> final latency)


class AsrSession:
    # The messages to send, oldest first (the outbox drained). A runner whose wire is not taking
    # more (write-paused) leaves them: newer interims replace older ones meanwhile, and a step
    # that closes means everything, then the close.
    messages: Callable[[], list[m.AsrServerMessage]]

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
        resume: ResumeStart | None = None,
    ) -> None:
        self.session_id = session_id
        self.resume_token = resume_token
        self.trace_id = ""  # set by a runner that traces the session: `ready` names it
        # End of speech -> final of the newest final (a call's turn starts at its end of speech).
        self.last_final_latency_s = 0.0
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
        self._state: State = "open"
        self._close_action: CloseAction | None = None
        self._outbox: Outbox[m.AsrServerMessage] = Outbox(settings.max_outbound_messages)
        # Bound methods, not wrappers: a `credit` goes in and out once per frame.
        self._emit = self._outbox.push
        self._held = self._outbox.held
        self.messages = self._outbox.drain
        # Engine work this step produced (with its cost in bytes), not yet queued.
        self._requests: list[tuple[EngineRequest, int]] = []
        # Engine work waiting for the invoke stage, bounded in bytes of engine-rate PCM16.
        self._engine_work: ByteQueue[EngineRequest] = ByteQueue(
            max(1, settings.invoke_queue_ms * engine_rate * 2 // 1000))
        self._failed_utterances: set[int] = set()  # the engine lost them: their work is dropped
        self.audio_started = False
        self.utterance_count = 0
        self._open: _Utterance | None = None
        # Utterances ended by the VAD whose final transcript has not come back yet.
        self._awaiting_final: dict[int, _Utterance] = {}
        self.dropped_bytes = 0
        self._dropped_reported_ms = 0
        self._metered_ms = 0
        self._metered_dropped_ms = 0
        self._credit_warned = False
        self._balance_warned = False
        self._reading_paused = False
        self._lease_pending = False
        self._draining = False
        self._closing_since: float | None = None
        # Resuming: the stream and audio time go on from the point, utterance ids too; finals
        # the client has are never sent again, audio already paid for is not metered again.
        self._resume = resume
        self._base_offset = resume.offset if resume else 0
        self._base_ms = resume.at_ms if resume else 0
        self._seen_through = resume.last_utterance_id if resume else 0
        self.replay: FinalsReplay[FinalMessage] = FinalsReplay(resume.finals if resume else ())
        self._last_end_ms = 0  # where the last utterance ended (this connection's audio time)
        self._now = 0.0  # the current step's clock: when an utterance ends
        self._final_latencies: list[float] = []
        if resume is not None:
            self.utterance_count = resume.next_utterance_id - 1
        self.credit = CreditWindow(self._capacity(params))
        self._configure(params)
        if resume is not None and resume.billed_offset > resume.offset:
            self._metered_ms = int((resume.billed_offset - resume.offset) / params.bytes_per_ms)

    # --- state --------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def close_action(self) -> CloseAction | None:
        """Set once the session decided to close (read by composite sessions: telephony)."""
        return self._close_action

    def _to(self, new: State) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise IllegalTransition(f"ASR session {self._state} -> {new}")
        self._state = new

    # --- configuration ------------------------------------------------------------------------

    def _capacity(self, params: AsrParams) -> int:
        """The ingest bound and the credit window: ingest_queue_ms of the client's encoding."""
        return max(1, int(self.settings.ingest_queue_ms * params.bytes_per_ms))

    def _configure(self, params: AsrParams) -> None:
        self.params = params
        capacity = self._capacity(params)
        self.queue: IngestQueue[_Control] = IngestQueue(
            capacity, params.overflow, self.settings.max_control_messages,
            max_header_bytes=self.settings.max_wav_header_bytes,
        )
        self.queue.protect_head = params.encoding == "wav"
        self.credit.resize(capacity)
        self._sniff_first_audio = params.encoding != "wav"
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
        """Announce the session; called once the meter granted it. A resumed session replays
        the finals the client missed right after `ready`."""
        resume = self._resume
        self._emit(
            m.Ready(
                session_id=self.session_id,
                resume_token=self.resume_token if self.resumable else "",
                audio=m.AudioFormat(
                    encoding=self.params.encoding, sample_rate=self.params.sample_rate
                ),
                credit_bytes=self.credit.window,
                limits=self._limits,
                model=self.params.model,
                resumed=resume is not None,
                resume_offset=self._base_offset,
                trace_id=self.trace_id or msgspec.UNSET,
            )
        )
        if resume is not None:
            self._resume = None  # announced once (a `config` answers with `ready` again)
            for msg in self.replay.after(self._seen_through):
                self._emit(msg)
            self._seen_through = max(self._seen_through, resume.next_utterance_id - 1)

    # --- resume ---------------------------------------------------------------------------------

    @property
    def resumable(self) -> bool:
        """Raw audio only: a WAV stream's header cannot be picked up mid-stream."""
        return bool(self.resume_token) and self.params.encoding != "wav"

    def position(self) -> Position | None:
        """Where a resume could start now: only at a quiet point (no utterance open or owed,
        nothing queued), backed off by the VAD's pre-roll so the next utterance's onset is
        found again; None elsewhere."""
        if self._open is not None or self._awaiting_final or len(self.queue) or self._requests:
            return None
        decoder = self.decoder
        width = 1 if self.params.encoding in ("mulaw", "alaw") else 2
        decoded_ms = decoder.samples_decoded * 1000 // decoder.sample_rate
        back_ms = max(0, min(self.settings.preroll_ms, decoded_ms - self._last_end_ms))
        samples = decoder.samples_decoded - back_ms * decoder.sample_rate // 1000
        return Position(
            offset=self._base_offset + samples * width + self.dropped_bytes,
            at_ms=self._base_ms + samples * 1000 // decoder.sample_rate,
            next_utterance_id=self.utterance_count + 1,
        )

    @property
    def billed_offset(self) -> int:
        """The client stream bytes the meter was told about (what a report pays for)."""
        return self._base_offset + int(self._metered_ms * self.params.bytes_per_ms)

    def checkpointed(self, position: Position) -> None:
        """`position` was stored: tell the client it may forget the audio before it."""
        if self._state in ("open", "closing"):
            self._emit(m.Checkpoint(offset=position.offset,
                                    utterance_id=position.next_utterance_id - 1))

    # --- frames from the client (called from the socket's data path: keep it cheap) ----------

    def receive_audio(self, data: bytes) -> bool:
        """Queue one binary frame. Return True when the socket should stop being read (block)."""
        if not data:
            self._error("empty_frame", "zero-length binary frame ignored (use close to end)")
            return False
        if self._state != "open":
            return False
        self.audio_started = True
        if self.credit.received(len(data)) and not self._credit_warned:
            self._credit_warned = True
            self._emit(
                m.Warning(
                    code="credit_exceeded",
                    message=f"client sent more than the {self.credit.granted_total} bytes granted;"
                    f" overflow policy {self.params.overflow!r} applies",
                )
            )
        queue = self.queue
        self.dropped_bytes += queue.put_audio(data)
        if queue.audio_bytes >= queue.capacity and queue.policy == "block":  # queue.full, cheap
            self._reading_paused = True
            return True
        return False

    def receive_control(self, msg: m.AsrClientMessage) -> None:
        """A client text message, decoded at the edge."""
        if isinstance(msg, m.KeepAlive):
            return  # liveness is the connection's business; nothing to do here
        if isinstance(msg, m.Config):
            self._receive_config(msg)
            return
        if self._state != "open":
            return  # a second close, or finalize after close: already handled
        try:
            self.queue.put_control(msg)
        except ControlLaneFull as exc:
            self.fail(1008, "policy_violation", str(exc))
            return
        if isinstance(msg, m.Close):
            self._to("closing")

    def bad_message(self, reason: str) -> None:
        """A client text message that did not decode: an error, and the session goes on."""
        self._error("bad_message", reason)

    def _receive_config(self, msg: m.Config) -> None:
        if self.audio_started or self._state != "open":
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

    def step(self, now: float) -> Step:
        """One ingest stage step over everything queued, then what the I/O side must do.

        `now` is any monotonic clock in seconds (the runner's loop time); it bounds how long
        finals are waited for after the input ended, and times end of speech -> final."""
        self._now = now
        state = self._state
        if state == "open":
            if self._lease_pending:
                return CONTINUE  # audio waits in the ingest queue until the wallet answers
            work = self._engine_work
            if work.total > work.capacity:
                return _WAIT_ENGINE
            # process(), inlined: this runs once per frame.
            queue = self.queue
            if queue.control_count:
                consumed = self._ingest_in_order(queue.drain())
            else:
                audio = queue.drain_audio()
                consumed = self._ingest(audio) if audio else 0
            if consumed:
                grant = self.credit.consumed(consumed)
                if grant:
                    self._emit(m.Credit(bytes=grant))
            if self.dropped_bytes:
                self._report_drops()
            if self._requests:
                requests, self._requests = self._requests, []
                work.put_many(requests)
            if self._state == "open":  # the usual case: nothing ends, nothing owed
                if work.total > work.capacity:
                    return _WAIT_ENGINE
                if self._reading_paused and self.queue.resumable:
                    self._reading_paused = False
                    return _RESUME
                return CONTINUE
        elif state == "closing":
            return self._step_closing(now)
        return self._step_ended()

    def _queue_requests(self) -> None:
        requests, self._requests = self._requests, []
        self._engine_work.put_many(requests)

    def _step_closing(self, now: float) -> Step:
        """The input ended: deliver the finals still owed, until FINALS_TIMEOUT_S."""
        if self._closing_since is None:
            self._closing_since = now
        deadline = self._closing_since + FINALS_TIMEOUT_S
        abandoned = False
        if now >= deadline and (self.finals_pending or self._engine_work):
            # Finals that can no longer come: stop waiting for them.
            self._open = None
            self._awaiting_final.clear()
            self._engine_work.clear()
            abandoned = True
        work = self._engine_work
        if self._lease_pending or work.total > work.capacity:
            # The top-up's answer or the engine (every result wakes the stage) comes first.
            return Step(deadline=deadline, finals_abandoned=abandoned)
        self.process()
        if self._requests:
            self._queue_requests()
        if self._state != "closing":
            return self._step_ended(abandoned)
        if not self.finals_pending and not work:
            self._to("settling")
            return Step(settle=True, finals_abandoned=abandoned)
        resume = self._reading_paused and self.queue.resumable
        if resume:
            self._reading_paused = False
        return Step(resume_reading=resume, deadline=deadline, finals_abandoned=abandoned)

    def _step_ended(self, abandoned: bool = False) -> Step:
        action = self._close_action
        if action is not None:
            return Step(close=action, finals_abandoned=abandoned)
        return CONTINUE  # settling: the settle is under way

    def hold_messages(self) -> Step:
        """The wire is not taking more (write-paused): the messages wait in the outbox. Past
        its bound the client is not reading: close 1008 now, the held messages and the error
        first (a client that never reads again would otherwise keep the session forever)."""
        if len(self._held) <= self._outbox.capacity or self._state == "closed":
            return CONTINUE
        self.fail(1008, "client_not_reading", "client stopped reading results")
        assert self._close_action is not None
        return Step(close=self._close_action)

    def process(self) -> int:
        """Drain the ingest queue: decode, resample, VAD, in one go. Return bytes consumed.
        (Inlined in `step` for an open session: keep the two alike.)"""
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
                self._emit(m.Credit(bytes=grant))
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
        if self._state == "closed":
            return len(data)
        if self._sniff_first_audio:
            # A WAV file streamed as raw samples would be decoded header and all at the declared
            # rate: a wrong transcript, billed at the wrong duration. Refuse it, charged nothing.
            self._sniff_first_audio = False
            if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
                self.fail(4400, "bad_audio", "the audio is a WAV file: stream it with "
                          "encoding=wav, or send raw samples")
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
        if isinstance(msg, m.Close) and self._state == "open":
            self._to("closing")

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
                        self._requests.append((EngineFeed(utt.utterance_id, pcm), len(pcm)))
            elif isinstance(ev, SpeechStart):
                self.utterance_count += 1
                audio = self._speech_audio
                if audio is None:
                    assert self.endpointer is not None
                    audio = self._speech_audio = UtteranceResampler(
                        self.endpointer.sample_rate, self.engine_rate,
                        self.settings.resample_quality, ENGINE_CHUNK_MS)
                audio.start()
                at_ms = self._base_ms + ev.at_ms
                self._open = _Utterance(self.utterance_count, at_ms, audio)
                if self.utterance_count > self._seen_through:
                    self._emit(m.SpeechStarted(at_ms=at_ms))
            elif self._open is not None:
                utt, self._open = self._open, None
                utt.end_ms = self._base_ms + ev.end_ms
                utt.ended_at = self._now
                self._last_end_ms = ev.end_ms
                self._awaiting_final[utt.utterance_id] = utt
                pcm = utt.audio.finish()
                if pcm:
                    self._requests.append((EngineFeed(utt.utterance_id, pcm), len(pcm)))
                self._requests.append((EngineFinish(utt.utterance_id), 0))

    def take_final_latencies(self) -> list[float]:
        """End of speech -> final, in seconds, of the finals since the last call (metrics)."""
        out, self._final_latencies = self._final_latencies, []
        return out

    # --- the invoke stage -----------------------------------------------------------------------

    def next_engine_request(self) -> EngineRequest | None:
        """The engine's next piece of work: every feed of one utterance waiting back to back
        becomes one feed (one engine call), and work of an utterance the engine lost is
        dropped. None when nothing waits (wait on `engine_work_available`)."""
        work = self._engine_work
        while run := work.take_run(_same_utterance_feed):
            head = run[0]
            if head.utterance_id in self._failed_utterances:
                continue
            if len(run) == 1:
                return head
            return EngineFeed(head.utterance_id,
                              b"".join(r.pcm for r in run if type(r) is EngineFeed))
        return None

    @property
    def engine_work_available(self) -> asyncio.Event:
        """Set while engine work waits (the invoke stage's wake-up)."""
        return self._engine_work.item_available

    @property
    def engine_room(self) -> asyncio.Event:
        """Set while the engine's queue is within its bound (the ingest stage's wake-up)."""
        return self._engine_work.space_available

    @property
    def engine_queue_bytes(self) -> int:
        return self._engine_work.total

    def receive_result(self, utterance_id: int, hyp: Hypothesis, *, final: bool,
                       now: float | None = None, engine_s: float = 0.0,
                       queue_s: float = 0.0) -> None:
        """An engine result. For a final, `now` (the step clock) times end of speech -> final
        and `engine_s` is the utterance's whole time in engine calls, `queue_s` the part of it
        its requests waited in the engine's micro-batcher (the `metrics` message)."""
        if self._state == "closed":
            return  # the close is decided: nothing more goes out
        if final:
            utt = self._awaiting_final.pop(utterance_id, None)
            if utt is None or utterance_id <= self._seen_through:
                return  # resumed: the client has this one already
            final_msg = self._transcript(utt, hyp, final=True, end_ms=utt.end_ms)
            end = m.UtteranceEnd(utterance_id=utterance_id, end_ms=utt.end_ms)
            self._emit(final_msg)
            self._emit(end)
            if now is not None:
                latency = max(0.0, now - utt.ended_at)
                self._final_latencies.append(latency)
                self.last_final_latency_s = latency
                if self.params.metrics:
                    self._emit(m.UtteranceMetrics(
                        utterance_id=utterance_id,
                        end_of_speech_to_final_ms=round(latency * 1000),
                        engine_ms=round(engine_s * 1000),
                        queue_ms=round(queue_s * 1000)))
            if self.resumable:
                self.replay.add(utterance_id, final_msg)
                self.replay.add(utterance_id, end)
            return
        utt = self._open if self._open and self._open.utterance_id == utterance_id else None
        if (utt is None or not self.params.interim_results or hyp.text == utt.last_interim
                or utterance_id <= self._seen_through):
            return
        utt.last_interim = hyp.text
        # The latest voiced frame, not the read position: a final ends at its last voiced
        # frame, and an interim must never claim to reach past the final that follows it.
        voiced = self.endpointer.last_voiced_ms if self.endpointer is not None else 0
        end_ms = max(utt.start_ms, self._base_ms + voiced)
        # Only the newest interim of an utterance matters to a client slow to read.
        self._outbox.push_latest(utterance_id, self._transcript(utt, hyp, final=False,
                                                                end_ms=end_ms))

    def receive_engine_error(self, utterance_id: int, exc: EngineError) -> None:
        self._failed_utterances.add(utterance_id)
        if self._state == "closed":
            return
        utt = self._awaiting_final.pop(utterance_id, None)
        if self._open is not None and self._open.utterance_id == utterance_id:
            # The engine lost this utterance; its remaining audio has nowhere to go.
            utt, self._open = self._open, None
        self._emit(
            m.Error(
                code="engine_error",
                message=f"utterance {utterance_id} not transcribed: {exc}"[:200],
                retryable=exc.retryable,
            )
        )
        if utt is not None and utt.end_ms >= 0:
            self._emit(m.UtteranceEnd(utterance_id=utterance_id, end_ms=utt.end_ms))

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

    # --- usage, lease, drops ----------------------------------------------------------------------

    @property
    def accepted_ms(self) -> int:
        return self.decoder.samples_decoded * 1000 // self.decoder.sample_rate

    @property
    def dropped_ms(self) -> int:
        # Read every ingest step: the common case (nothing dropped) must cost nothing.
        if not self.dropped_bytes:
            return 0
        return int(self.dropped_bytes / self.params.bytes_per_ms)

    def take_metered_ms(self) -> tuple[int, int]:
        """Audio accepted and dropped since the last call, in ms: what the meter is told."""
        decoder = self.decoder
        accepted = decoder.samples_decoded * 1000 // decoder.sample_rate
        new_accepted = accepted - self._metered_ms
        if new_accepted > 0:
            self._metered_ms = accepted
        else:
            new_accepted = 0
        if not self.dropped_bytes:
            return new_accepted, 0
        dropped = self.dropped_ms
        new_dropped = dropped - self._metered_dropped_ms
        if new_dropped > 0:
            self._metered_dropped_ms = dropped
            return new_accepted, new_dropped
        return new_accepted, 0

    def _report_drops(self) -> None:
        dropped = self.dropped_ms
        if dropped > self._dropped_reported_ms:
            self._emit(
                m.Warning(
                    code="audio_dropped",
                    message="ingest queue full: oldest audio dropped (not billed)",
                    dropped_ms=dropped - self._dropped_reported_ms,
                )
            )
            self._dropped_reported_ms = dropped

    def usage(self, report: UsageReport) -> None:
        if self._state == "closed":
            return
        self._emit(
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
            self._emit(
                m.Warning(code="balance_low", message="wallet balance is running low; top up")
            )
        if report.revoked:
            self.key_revoked()
        elif report.exhausted:
            self.out_of_balance()
        elif report.rate_limited:
            self.fail(4029, "rate_limited", "audio seconds per minute limit reached",
                      retryable=True, retry_after_s=60.0)

    def lease_exhausted(self) -> Step:
        """The meter used up its lease: hold the audio until a top-up answers."""
        if self._lease_pending or not (self._state == "open" or self._state == "closing"):
            return CONTINUE
        self._lease_pending = True
        self._reading_paused = True
        return _TOP_UP

    def lease_extended(self) -> Step:
        self._lease_pending = False
        if self._reading_paused and self._state != "closed" and self.queue.resumable:
            self._reading_paused = False
            return _RESUME
        return CONTINUE

    def out_of_balance(self) -> None:
        self._lease_pending = False
        self.fail(4002, "insufficient_balance", "wallet balance exhausted; top up to continue")

    def key_revoked(self) -> None:
        self._lease_pending = False
        self.fail(KEY_REVOKED_CLOSE, KEY_REVOKED_CODE, KEY_REVOKED_MESSAGE)

    # --- ending ---------------------------------------------------------------------------------

    @property
    def finals_pending(self) -> bool:
        """Work is still owed to the client before a normal close."""
        return bool(self._awaiting_final) or self._open is not None or len(self.queue) > 0

    def end_of_input(self) -> None:
        """The server drains (or a caller ends the input): what was already read is taken in
        first, then the open utterance ends so it gets a final."""
        if self._state == "open" and not self._lease_pending:
            # Audio still queued belongs before the end: ended first, it would open an
            # utterance nobody ends (and the close would wait FINALS_TIMEOUT_S for it).
            self.process()
        self._force_end()
        if self._state == "open":
            self._to("closing")

    def drain(self) -> None:
        """The server drains: finals, then close 1001 `draining` (the client reconnects)."""
        self._draining = True
        self.end_of_input()

    @property
    def draining(self) -> bool:
        return self._draining

    def idle_timeout(self, timeout_s: float) -> None:
        if self._state == "open":
            self.fail(4008, "idle_timeout", f"no audio or keepalive for {timeout_s:g} s")

    def connection_lost(self) -> None:
        """The wire is gone: nothing more can be sent, engine work is pointless."""
        self._engine_work.clear()
        self._requests.clear()
        self._outbox.drain()
        if self._state != "closed":
            self._to("closed")

    def settled(self, report: UsageReport) -> Step:
        """The meter settled (`report` is its final usage): summary, then close."""
        if self._state == "closed":
            return CONTINUE  # closed meanwhile (the wire went away): nothing to say
        if self._state != "settling":
            raise IllegalTransition(f"settled() while {self._state}: no settle was asked for")
        if self._draining:
            code, reason, message = 1001, "draining", "server is draining; reconnect"
        else:
            code, reason, message = 1000, "", ""
        self._emit(
            m.Summary(
                audio_ms=report.audio_ms,
                billed_ms=report.billed_ms,
                cost_micros=report.cost_micros,
                utterances=self.utterance_count,
                dropped_ms=report.dropped_ms,
            )
        )
        if code != 1000:
            # Every close other than 1000 carries an `error` with the same reason first; a
            # resumable session's carries the token to resume with, on any node.
            error = m.Error(code=reason, message=message, retryable=True)
            if self.resumable:
                error.resume_token = self.resume_token
            self._emit(error)
        self._to("closed")
        self._close_action = CloseAction(code, reason)
        return Step(close=self._close_action)

    def fail(self, code: int, error_code: str, message: str, *, retryable: bool = False,
             retry_after_s: float | None = None) -> None:
        """Close with a non-1000 code: an `error` frame with the same reason goes first."""
        if self._state == "closed":
            return
        self._emit(
            m.Error(code=error_code, message=message[:200], retryable=retryable,
                    retry_after_s=retry_after_s)
        )
        self._to("closed")
        self._close_action = CloseAction(code, error_code)
        # Engine work is pointless now; freeing its queue also wakes a stage waiting for room
        # (a stuck engine must not hold the close).
        self._requests.clear()
        self._engine_work.clear()

    def _error(self, code: str, message: str) -> None:
        if self._state != "closed":
            self._emit(m.Error(code=code, message=message[:200]))


def encode_event(event: m.AsrServerMessage) -> bytes:
    return m.encoder.encode(event)


__all__ = [
    "CONTINUE",
    "FINALS_TIMEOUT_S",
    "AsrSession",
    "CloseAction",
    "EngineFeed",
    "EngineFinish",
    "EngineRequest",
    "IllegalTransition",
    "Step",
    "encode_event",
]
