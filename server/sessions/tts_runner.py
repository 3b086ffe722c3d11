"""The asyncio side of a TTS session: one synthesis task pulling audio from the engine (and
stopping when the outbound backlog is full), and sends paced by client credit and the socket's
write buffer. `clear` cancels the synthesis in flight.

Text is taken from the machine one chunk at a time, when the engine is about to speak it; what
waits is bounded (flow_control.text_backlog): the socket is not read while that backlog is full
and the session can go on without the client. Characters are charged per chunk as the engine
produces its audio, and the lease is topped up between chunks, so the length of one `text`
message has nothing to do with the lease (docs/billing.md, "Sessions")."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from server.billing.auth import Principal
from server.billing.meter import (
    KEY_REVOKED_CLOSE,
    KEY_REVOKED_CODE,
    KEY_REVOKED_MESSAGE,
    METER_ERRORS,
    MeterFactory,
    SessionMeter,
    UsageReport,
)
from server.config import Config
from server.models.base import EngineError, Synthesizer
from server.protocol.errors import Rejected, refuse, rejection
from server.sessions.asr_params import BadParams
from server.sessions.host import SessionHost
from server.sessions.lifecycle import MeteredUsage, SessionLifecycle
from server.sessions.resume import (
    AnyResumePoint,
    ResumeStore,
    TtsParamsPoint,
    TtsResumePoint,
    TtsResumeStart,
    claim_for_resume,
)
from server.sessions.resume_writer import ResumeWriter, SaveOutcome
from server.sessions.tts import (
    Close,
    Command,
    Drain,
    EngineAudio,
    EngineDone,
    EngineFailed,
    Finish,
    IdleTimeout,
    Start,
    SynthRequest,
    TtsParams,
    TtsSession,
    Usage,
    tts_params,
)
from server.sessions.upgrade import Admitted, SessionSocket, UpgradeRequest
from server.sessions.wire import Wire
from server.telemetry import tracing
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import TRACING
from streamgate_protocol import messages as m

log = logging.getLogger("streamgate.tts")
KIND = "tts"
CHARACTERS = "characters"


# The session's events, typed, for a caller that builds its own answer (the HTTP route); audio
# still goes to the wire.
EventSink = Callable[[list[m.TtsServerMessage]], None]


class StartTtsSession(Protocol):
    def __call__(self, wire: Wire, on_events: EventSink | None = None,
                 peer_alive: Callable[[], None] | None = None) -> TtsSessionRunner: ...


@dataclass(frozen=True, slots=True)
class TtsAdmission:
    start: StartTtsSession
    cancel: Callable[[], None]


class TtsEndpoint:
    kind = KIND

    def __init__(self, *, config: Config, engines: dict[str, Synthesizer], meters: MeterFactory,
                 server: SessionHost, metrics: Metrics,
                 resume_store: ResumeStore | None = None) -> None:
        self.config = config
        self.resume_store = resume_store if config.tts.session.resume_window_s > 0 else None
        self.engines = engines
        self.meters = meters
        self.server = server
        self.metrics = metrics
        self.runners: set[TtsSessionRunner] = set()
        metrics.scrape_hooks.append(self._publish_gauges)

    def _publish_gauges(self) -> None:
        pending = backlog_ms = credit = 0
        for runner in self.runners:
            machine = runner.machine
            pending += machine.pending_chars
            backlog_ms += int(machine.backlog_bytes / machine.params.bytes_per_ms)
            credit += max(0, machine.credit.outstanding)
        self.metrics.tts_pending_chars.set(pending)
        self.metrics.queue_depth_ms.labels("tts_out").set(backlog_ms)
        self.metrics.tts_playback_credit.set(credit)

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        decision = await self.open_session(upgrade, principal)
        if isinstance(decision, Rejected):
            return decision
        start_on_wire = decision.start

        def start(conn: SessionSocket) -> TtsSessionRunner:
            def peer_alive() -> None:
                # It takes our audio, though its pongs wait unread behind its text.
                conn.activity = True

            return start_on_wire(conn, peer_alive=peer_alive)

        return Admitted(start=start, cancel=decision.cancel)

    async def open_session(self, upgrade: UpgradeRequest,
                           principal: Principal) -> TtsAdmission | Rejected:
        """Admit a session on any `Wire` (the WebSocket upgrade, an HTTP request)."""
        settings = self.config.tts.session
        token = upgrade.query.get("resume_token")
        if token is not None:
            return await self._resume(upgrade, principal, token)
        try:
            params = tts_params(upgrade.query, default_model=settings.default_model,
                                models=self.engines.keys())
        except BadParams as exc:
            return Rejected(400, "bad_request", str(exc))
        session_id = uuid.uuid4().hex
        token = secrets.token_urlsafe(18) if self.resume_store is not None else ""
        return await self._admit(principal, session_id, params, token, None, 0,
                                 meter_id=session_id)

    async def _resume(self, upgrade: UpgradeRequest, principal: Principal,
                      token: str) -> TtsAdmission | Rejected:
        """A client carries on a TTS session it lost: the chunks after `last_chunk_id` (the
        newest `audio_done` it received) are spoken again, none charged twice."""
        claimed = await claim_for_resume(
            self.resume_store, upgrade.query, principal.tenant_id, kind=TtsResumePoint,
            last_param="last_chunk_id", window_s=self.config.tts.session.resume_window_s)
        if isinstance(claimed, Rejected):
            return claimed
        point, last = claimed
        if point.params.model not in self.engines:
            return refuse("resume_not_found", "the session's model is not served here")
        chunks = [c for c in point.chunks if c.chunk_id > last]
        if point.chunks and last < point.chunks[0].chunk_id - 1:
            return refuse("resume_not_found", "audio this client missed is no longer kept; "
                          "start a new session")
        p = point.params
        params = TtsParams(model=p.model, voice=p.voice, language=p.language,
                           encoding=p.encoding, sample_rate=p.sample_rate)
        start = TtsResumeStart(next_chunk_id=point.next_chunk_id, chunks=chunks,
                               buffered=point.buffered)
        return await self._admit(principal, point.session_id, params, token, start,
                                 point.epoch, meter_id=f"{point.session_id}-r{point.epoch}")

    async def _admit(self, principal: Principal, session_id: str, params: TtsParams,
                     token: str, resume: TtsResumeStart | None, epoch: int, *,
                     meter_id: str) -> TtsAdmission | Rejected:
        settings = self.config.tts.session
        try:
            with tracing.maybe_child("admission.lease"):
                meter = await self.meters.open(session_id=meter_id, principal=principal,
                                               model=params.model, unit=CHARACTERS)
        except METER_ERRORS as exc:
            return rejection(exc)
        engine = self.engines[params.model]
        srv = self.config.server
        machine = TtsSession(
            session_id=session_id, resume_token=token, params=params,
            settings=settings, models=self.engines.keys(), engine_rate=engine.sample_rate,
            max_chars=engine.max_chars, max_tokens=engine.max_tokens,
            limits=m.Limits(max_frame_bytes=srv.max_frame_bytes,
                            idle_timeout_s=srv.idle_timeout_s,
                            usage_interval_s=settings.usage_interval_s, max_utterance_ms=0),
            early_first_frame=True, resume=resume,
        )
        store = self.resume_store

        def start(wire: Wire, on_events: EventSink | None = None,
                  peer_alive: Callable[[], None] | None = None) -> TtsSessionRunner:
            writer = None
            if store is not None and token and on_events is None:
                writer = ResumeWriter(store, token, epoch=epoch,
                                      ttl_s=settings.resume_window_s, log=log,
                                      log_extra={"session_id": session_id})
            runner = TtsSessionRunner(self, wire, machine, engine, meter, principal,
                                      on_events=on_events, peer_alive=peer_alive,
                                      resume=writer)
            runner.start()
            return runner

        def cancel() -> None:
            self.server.spawn(meter.settle())

        return TtsAdmission(start=start, cancel=cancel)



class TtsSessionRunner:
    def __init__(self, endpoint: TtsEndpoint, conn: Wire, machine: TtsSession,
                 engine: Synthesizer, meter: SessionMeter, principal: Principal, *,
                 on_events: EventSink | None = None,
                 peer_alive: Callable[[], None] | None = None,
                 resume: ResumeWriter | None = None) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.machine = machine
        self.on_events = on_events
        # Reading paused and our audio taken: tell the connection its peer is alive (no ping
        # it could not answer in time).
        self._peer_alive = peer_alive
        self.engine = engine
        self.meter = meter
        self.metrics = endpoint.metrics
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._current: asyncio.Task[None] | None = None  # the chunk being synthesized
        self._looping = False  # _synth_loop runs: chunks may start
        # The session task's context (its span, when tracing): each chunk's task runs in a
        # copy of it, wherever it was started from.
        self._context: contextvars.Context | None = None
        self._gone = False
        self._close_code: int | None = None
        self._draining = False
        self._metered = 0
        # A chunk is charged when its audio starts, after the lease was checked: one top-up
        # may not cover a chunk longer than a lease, so try as many as that takes.
        self._top_ups_per_chunk = 1 + engine.max_chars // max(
            1, endpoint.config.billing.lease_chars)
        self._reading_paused_once = False
        self._log = {"session_id": machine.session_id, "tenant_id": principal.tenant_id}
        self.lifecycle = SessionLifecycle(kind=KIND, host=endpoint.server,
                                          metrics=endpoint.metrics, log=log, log_extra=self._log)
        self.usage = MeteredUsage(meter, log=log, log_extra=self._log,
                                  usage_interval_s=endpoint.config.tts.session.usage_interval_s)
        self._tenant_id = principal.tenant_id
        self._first_audio = endpoint.metrics.tts_first_audio.labels(machine.params.model)
        self._rtf = endpoint.metrics.tts_real_time_factor.labels(machine.params.model)
        # A resumable session writes what a resume needs whenever it changes (resume.py).
        self.resume = resume
        self._saved_version = -1
        self._charging_held = False  # a usage report's resume point is being saved
        if resume is not None:
            resume.on_saved = self._resume_saved
        self._span: tracing.Span | None = None  # the session's, when tracing is on

    # --- SessionHandler -------------------------------------------------------------------------

    def start(self) -> None:
        if TRACING.on:  # under the current span: the upgrade's or an HTTP request's
            span = self._span = tracing.start_span("tts.session", attributes={
                "streamgate.session_id": self.machine.session_id,
                "streamgate.model": self.machine.params.model,
                "streamgate.tenant_id": self._tenant_id})
            self.machine.trace_id = self._log["trace_id"] = tracing.trace_id_of(span)
        # Counted before `ready` leaves: whoever sees `ready` then sees the session counted.
        self.lifecycle.opened(model=self.machine.params.model)
        self.machine.handle(Start())
        self._pump()
        self.endpoint.runners.add(self)
        self.endpoint.server.spawn(self._run())

    def on_text(self, data: bytes) -> None:
        self.machine.receive_text(data)
        self._after_input()

    def on_binary(self, data: bytes) -> None:
        self.machine.receive_binary(data)
        self._after_input()

    def on_read_done(self) -> None:
        """Nothing batched here: each text message was handled as it arrived."""

    def on_writable(self) -> None:
        self._pump()

    def on_idle(self) -> None:
        self.handle(IdleTimeout(self.endpoint.config.server.idle_timeout_s))

    def on_drain(self) -> None:
        self._draining = True
        self.machine.handle(Drain())
        self._wake.set()

    def handle(self, command: Command) -> None:
        """A typed command from a caller that is not a WebSocket client (the HTTP route)."""
        self.machine.handle(command)
        self._after_input()

    def on_connection_closed(self, code: int) -> None:
        self._gone = True
        if self._close_code is None:
            self._close_code = code
        if self._current is not None:
            self._current.cancel()
        self._wake.set()
        self._room.set()

    # --- plumbing -------------------------------------------------------------------------------

    def _after_input(self) -> None:
        self._pump()
        self._start_chunk()
        self._wake.set()

    def _charge(self) -> None:
        if self._charging_held:
            return  # charged after the save: the report then pays exactly what the point says
        delta = self.machine.characters_synthesized - self._metered
        if delta > 0:
            self.meter.accept(delta)
            self._metered += delta

    async def _lease_covers_next_chunk(self) -> bool:
        """Before a chunk goes to the engine: top the lease up if what was charged so far used
        it up; False when the wallet cannot pay for more."""
        for _ in range(self._top_ups_per_chunk):
            if not self.meter.exhausted:
                return True
            verdict = await self.usage.top_up()
            if verdict == "revoked":
                self.machine.handle(Close(KEY_REVOKED_CLOSE, KEY_REVOKED_CODE,
                                          KEY_REVOKED_MESSAGE))
                return False
            if verdict == "refused":
                break
        return not self.meter.exhausted

    def _pump(self) -> None:
        """Carry out one step's output: send what credit and the socket allow, cancel a
        synthesis an interrupt dropped, pause or resume reading, close when told to."""
        conn = self.conn
        out = self.machine.poll(can_write=not conn.write_paused)
        if out.cancel_synthesis and self._current is not None:
            self._current.cancel()
        items = out.messages
        if items:
            on_events = self.on_events
            events: list[m.TtsServerMessage] = []
            for item in items:
                if isinstance(item, bytes):
                    if events and on_events is not None:
                        # In order with the audio: a chunk's `audio_done` before the next
                        # chunk's first frame (a dialect's own end-of-chunk event needs it).
                        on_events(events)
                        events = []
                    conn.send_binary(item)
                elif on_events is not None:
                    events.append(item)
                else:
                    conn.send_text(m.encoder.encode(item))
            if events and on_events is not None:
                on_events(events)
            conn.flush()
            if self._peer_alive is not None and self.machine.reading_paused:
                self._peer_alive()
        if out.reading == "pause":
            conn.pause_reading()
            if not self._reading_paused_once:
                self._reading_paused_once = True
                machine = self.machine
                log.info("text backlog full: reading paused",
                         extra={**self._log, "pending_chars": machine.pending_chars,
                                "max_pending_chars": machine.text_backlog.capacity})
        elif out.reading == "resume":
            conn.resume_reading()
        if out.wants_audio:
            self._room.set()
        if self.machine.state == "closing":
            self._wake.set()  # the close waits for the last audio to go out
        action = out.close
        if action is not None and self._close_code is None:
            self._close_code = action.code
            conn.close(action.code, action.reason)
            self._wake.set()
        if self.resume is not None and self.machine.resume_version != self._saved_version \
                and self.machine.state != "closed":
            self._saved_version = self.machine.resume_version
            self.resume.request(self._resume_point)

    async def _run(self) -> None:
        if self._span is not None:
            tracing.activate(self._span)  # this task's and the chunks' it starts
        self._context = contextvars.copy_context()
        usage = self.usage.start_reports(self._on_usage, before=self._before_report)
        try:
            await self._synth_loop()
        except Exception:
            log.exception("session failed", extra=self._log)
            self.machine.handle(Close(1011, "internal_error", "internal error", retryable=True))
            self._pump()
        finally:
            await SessionLifecycle.stop(usage, self._current)
            self._charge()
            if self.resume is not None and self._draining and not self._gone:
                # The client resumes on another node: what is left must be there first.
                await self.resume.save(self._resume_point())
            report = await self.usage.settle()
            if report is None:  # the wallet failed: what this session counted, unpriced
                chars = self.machine.characters_synthesized
                report = UsageReport(chars, chars, 0, 0, None, unit=CHARACTERS)
            if not self._gone and self.machine.state != "closed":
                code, reason = (1001, "draining") if self._draining else (1000, "")
                self.machine.handle(Finish(report, code, reason, "server is draining; reconnect"))
                self._pump()
            self.endpoint.runners.discard(self)
            await self._end_resume()
            code = self._close_code if self._close_code is not None else 1006
            if self._span is not None:
                self._span.set_attributes({
                    "streamgate.close_code": code,
                    "streamgate.characters": self.machine.characters_synthesized})
                if code == 1011:
                    tracing.error(self._span, "internal error")
                self._span.end()
            self.lifecycle.closed(code, characters=self.machine.characters_synthesized,
                                  text_backlog_peak=self.machine.pending_peak)

    async def _synth_loop(self) -> None:
        """Back pressure applies between chunks: a listener slow to grant credit must not hold
        an engine slot (a few of them would stall every session on the model), and one chunk's
        audio is bounded by the model's context limit.

        A chunk the session can start at once is started where it becomes possible (the
        `flush` or text that made it, the end of the chunk before: `_start_chunk`), not a loop
        turn later here: this loop waits for the chunk, and does what has to wait (text, room
        in the audio backlog, a lease top-up)."""
        machine = self.machine
        self._looping = True
        try:
            while not self._gone and machine.state != "closed":
                task = self._current
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    if self._current is task:  # else the next chunk started as it ended
                        self._current = None
                    continue
                if self._start_chunk():
                    continue
                if not machine.has_requests:
                    if machine.state == "closing" and machine.idle:
                        return
                    # Waits for text, or while closing for the last audio to go out.
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not machine.wants_audio:
                    self._room.clear()
                    await self._room.wait()
                    continue
                # The lease is used up: the next chunk waits for a top-up.
                if not await self._lease_covers_next_chunk():
                    machine.handle(Close(4002, "insufficient_balance",
                                         "wallet balance exhausted"))
                    self._pump()
                    return
        finally:
            self._looping = False

    def _start_chunk(self) -> bool:
        """Hand the next chunk to the engine now if nothing else is being synthesized, the
        audio backlog has room and the lease covers it without a top-up (the loop waits
        for those). Called where a chunk may become startable, so its synthesis task is
        queued behind nothing else this session does (time to first audio)."""
        machine = self.machine
        if (self._current is not None or not self._looping or self._gone
                or machine.state == "closed" or not machine.has_requests
                or not machine.wants_audio or self.meter.exhausted):
            return False
        req = machine.next_request()
        if req is None:
            return False
        if machine.reading_paused:
            self._pump()  # less text waits now: reading may resume
        context = self._context
        self._current = asyncio.get_running_loop().create_task(
            self._synthesize(req), context=None if context is None else context.copy())
        return True

    async def _synthesize(self, req: SynthRequest) -> None:
        """One chunk, read from the engine as fast as it comes."""
        machine = self.machine
        params = machine.params
        taken = time.perf_counter()
        first_audio_s = -1.0
        engine_bytes = 0
        span = None
        if TRACING.on:  # this task's own context: an upstream engine's call is its child
            span = tracing.start_span("tts.chunk", attributes={
                "streamgate.chunk_id": req.chunk_id, "streamgate.characters": len(req.text)})
            tracing.activate(span)
        try:
            stream = self.engine.synthesize(req.text, voice=params.voice, language=params.language)
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for pcm in stream:
                    engine_bytes += len(pcm)
                    machine.handle(EngineAudio(req, pcm))
                    self._charge()
                    if machine.has_output or machine.resume_version != self._saved_version:
                        self._pump()  # else nothing to send (a piece that made no frame)
                    if first_audio_s < 0 and pcm:
                        # Its first frame is on the wire (or waits for credit).
                        first_audio_s = time.perf_counter() - taken
                        self._first_audio.observe(first_audio_s)
            synthesis_s = time.perf_counter() - taken
            machine.handle(EngineDone(req, first_audio_s=first_audio_s, synthesis_s=synthesis_s))
            if engine_bytes:  # 16-bit mono at the engine's rate
                self._rtf.observe(synthesis_s * self.engine.sample_rate * 2 / engine_bytes)
            if span is not None:
                span.set_attribute("streamgate.synthesis_ms", round(synthesis_s * 1000))
                if first_audio_s >= 0:  # no audio at all: no time to it
                    span.set_attribute("streamgate.time_to_first_audio_ms",
                                       round(first_audio_s * 1000))
        except EngineError as exc:
            machine.handle(EngineFailed(req, str(exc), exc.retryable))
            if span is not None:
                tracing.error(span, str(exc))
        finally:
            if span is not None:
                span.end()  # also when cancelled (barge-in: the chunk was cleared)
        self._pump()
        if self._current is asyncio.current_task():
            self._current = None
            self._start_chunk()  # the next chunk, without waiting for the loop's turn

    async def _before_report(self) -> None:
        """What the report pays for is in the resume point first (charged chunks are never
        charged again after a resume); a failed save is logged and the report goes on."""
        self._charge()
        if self.resume is None:
            return
        point = self._resume_point()
        self._charging_held = True
        try:
            outcome = await self.resume.save(point)
        finally:
            self._charging_held = False
        self._resume_saved(point, outcome)

    def _resume_point(self) -> TtsResumePoint:
        assert self.resume is not None
        machine = self.machine
        p = machine.params
        return TtsResumePoint(
            session_id=machine.session_id, tenant_id=self._tenant_id,
            params=TtsParamsPoint(model=p.model, voice=p.voice, language=p.language,
                                  encoding=p.encoding, sample_rate=p.sample_rate),
            epoch=self.resume.epoch, next_chunk_id=machine.next_chunk_id,
            chunks=machine.resume_chunks(), buffered=machine.chunker.buffered)

    def _resume_saved(self, point: AnyResumePoint, outcome: SaveOutcome) -> None:
        if outcome == "superseded":
            self.machine.handle(Close(4409, "session_resumed",
                                      "this session was resumed on another connection"))
            self._pump()
            self._wake.set()

    async def _end_resume(self) -> None:
        """A session that ended for good cannot be resumed; one cut off (1001 draining, a lost
        connection) stays resumable until its point expires."""
        writer = self.resume
        if writer is None:
            return
        if self._close_code in (1001, 1006, None):
            await writer.aclose()
        else:
            await writer.forget()

    def _on_usage(self, report: UsageReport) -> None:
        if self.machine.state != "closed":
            self.machine.handle(Usage(report))
            self._pump()
