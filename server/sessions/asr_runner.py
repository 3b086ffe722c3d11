"""The asyncio side of an ASR session: moves bytes between a `Wire`, the engine, the meter and
the sans-I/O machine (asr.py), which decides everything else.

Stages: wire -> ingest queue (in the machine, bounded in ms) -> ingest/VAD step (drains
everything waiting in one go) -> engine queue (in the machine, bounded in ms) -> invoke task
(engine) -> outbox (in the machine: interim results coalesced while the wire's write buffer is
above high water). A slow engine fills the engine queue, which stalls the ingest step, which
fills the ingest queue, which pauses reading (`block`) or drops the oldest audio (`drop`):
memory per session is bounded whatever the client or the engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Histogram

from server.billing.auth import Principal
from server.billing.meter import METER_ERRORS, MeterFactory, SessionMeter, UsageReport
from server.config import Config
from server.flow_control.wakeup import Wakeup
from server.models.base import EngineError, Transcriber, TranscriptionStream
from server.models.batcher import BATCH_STATS, CallStats
from server.protocol.decoding import BadMessage, decode_client_message
from server.protocol.errors import Rejected, refuse, rejection
from server.sessions.asr import (
    CONTINUE,
    FINALS_TIMEOUT_S,
    AsrSession,
    CloseAction,
    EngineFeed,
    Position,
    Step,
    encode_event,
)
from server.sessions.asr_params import BadParams, params_from_query
from server.sessions.asr_trace import AsrTrace
from server.sessions.host import SessionHost
from server.sessions.lifecycle import MeteredUsage, SessionLifecycle
from server.sessions.resume import (
    AnyResumePoint,
    ResumePoint,
    ResumeStart,
    ResumeStore,
    claim_for_resume,
)
from server.sessions.resume_writer import ResumeWriter, SaveOutcome
from server.sessions.upgrade import Admitted, UpgradeRequest
from server.sessions.wire import Clock, Wire
from server.telemetry import tracing
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import TRACING
from streamgate_protocol import messages as m

log = logging.getLogger("streamgate.asr")

KIND = "asr"
EventSink = Callable[[list[m.AsrServerMessage]], None]
__all__ = ["FINALS_TIMEOUT_S", "AsrAdmission", "AsrEndpoint", "AsrSessionRunner", "Wire"]


class CreditPayloads:
    """Encoded `credit` messages by grant. A session grants the same few sizes (one quarter
    window per drained quarter) up to 50 times a second; encoding each anew cost more than the
    VAD's bookkeeping. Bounded: cleared when full."""

    __slots__ = ("_max", "encoded")

    def __init__(self, max_entries: int = 256) -> None:
        # Read directly on the per-frame path (a dict lookup, no call); filled by payload().
        self.encoded: dict[int, bytes] = {}
        self._max = max_entries

    def payload(self, grant: int) -> bytes:
        payload = self.encoded.get(grant)
        if payload is None:
            if len(self.encoded) >= self._max:
                self.encoded.clear()
            payload = self.encoded[grant] = encode_event(m.Credit(bytes=grant))
        return payload


_credit_payloads = CreditPayloads()


class LagHistogram:
    """One child of streamgate_ingest_lag_seconds, counted into plain ints per ingest step
    and published when scraped (AsrEndpoint's scrape hook): prometheus_client's `observe`
    takes a lock twice and walks the buckets in Python, which per 20 ms frame cost more than
    the step's own bookkeeping (server/telemetry/metrics.py: hot paths count into ints).
    Exactly what `observe` would have recorded, bucket for bucket, once published."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: tuple[float, ...] = tuple(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        # The first bucket whose upper bound is >= seconds, as prometheus_client picks it.
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def publish(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        child = self._child
        for bucket, n in zip(child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)
        child._sum.inc(self._sum)
        self._counts = [0] * len(counts)
        self._sum = 0.0


class AsrEndpoint:
    kind = KIND

    def __init__(
        self,
        *,
        config: Config,
        engines: dict[str, Transcriber],
        meters: MeterFactory,
        server: SessionHost,
        metrics: Metrics,
        resume_store: ResumeStore | None = None,
    ) -> None:
        self.config = config
        self.engines = engines
        self.meters = meters
        self.server = server
        self.metrics = metrics
        # Resume points: None (or `resume_window_s = 0`) issues no resume tokens.
        self.resume_store = resume_store if config.asr.session.resume_window_s > 0 else None
        self.models = frozenset(engines)
        self.runners: set[AsrSessionRunner] = set()
        metrics.scrape_hooks.append(self._publish_gauges)
        # labels() takes a lock and a dict lookup: resolve each child once, not per report.
        self.audio_ms = metrics.audio_ms.labels(KIND)
        self.dropped_ms = metrics.dropped_ms.labels(KIND)
        self.frames_in = metrics.frames_in.labels(KIND)
        self.bytes_in = metrics.bytes_in.labels(KIND)
        self.frames_out = metrics.frames_out.labels(KIND)
        self.bytes_out = metrics.bytes_out.labels(KIND)
        self._lag: dict[str, LagHistogram] = {}  # by kind: asr, telephony

    def ingest_lag(self, kind: str) -> LagHistogram:
        """streamgate_ingest_lag_seconds{kind} as the runners count it (published when scraped)."""
        lag = self._lag.get(kind)
        if lag is None:
            lag = self._lag[kind] = LagHistogram(self.metrics.ingest_lag.labels(kind))
        return lag

    def _publish_gauges(self) -> None:
        for lag in self._lag.values():
            lag.publish()
        ingest_ms = invoke_ms = credit = 0
        for r in self.runners:
            machine = r.machine
            ingest_ms += int(machine.queue.audio_bytes / machine.params.bytes_per_ms)
            invoke_ms += r.invoke_queue_ms
            credit += max(0, machine.credit.outstanding)
        self.metrics.queue_depth_ms.labels("ingest").set(ingest_ms)
        self.metrics.queue_depth_ms.labels("invoke").set(invoke_ms)
        self.metrics.credit_outstanding.set(credit)

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        decision = await self.open_session(upgrade, principal)
        if isinstance(decision, Rejected):
            return decision
        return Admitted(start=decision.start, cancel=decision.cancel)

    async def open_session(self, upgrade: UpgradeRequest,
                           principal: Principal) -> AsrAdmission | Rejected:
        """Admit a session on any `Wire` (the WebSocket upgrade, an HTTP request)."""
        settings = self.config.asr.session
        token = upgrade.query.get("resume_token")
        if token is not None:
            return await self._resume(upgrade, principal, token)
        try:
            params = params_from_query(
                upgrade.query, default_model=settings.default_model, models=self.models
            )
        except BadParams as exc:
            return Rejected(400, "bad_request", str(exc))
        session_id = uuid.uuid4().hex
        token = secrets.token_urlsafe(18) if self.resume_store is not None else ""
        point = ResumePoint(session_id=session_id, tenant_id=principal.tenant_id, params=params)
        return await self._admit(principal, point, token, None, meter_id=session_id)

    async def _resume(self, upgrade: UpgradeRequest, principal: Principal,
                      token: str) -> AsrAdmission | Rejected:
        """A client carries on a session it lost (docs/protocol.md, "Resuming a session")."""
        claimed = await claim_for_resume(
            self.resume_store, upgrade.query, principal.tenant_id, kind=ResumePoint,
            last_param="last_utterance_id", window_s=self.config.asr.session.resume_window_s)
        if isinstance(claimed, Rejected):
            return claimed
        point, last = claimed
        if point.params.model not in self.models:
            return refuse("resume_not_found", "the session's model is not served here")
        kept = [u for u, _ in point.finals]
        if kept and last < kept[0] - 1:
            return refuse("resume_not_found", "finals this client missed are no longer kept; "
                          "start a new session")
        start = ResumeStart(offset=point.offset, at_ms=point.at_ms,
                            next_utterance_id=point.next_utterance_id,
                            billed_offset=point.billed_offset, last_utterance_id=last,
                            finals=point.finals)
        # Each connection of a session is its own usage session (usage events are keyed
        # `id:seq`); audio already paid for is not metered again (ResumeStart.billed_offset).
        return await self._admit(principal, point, token, start,
                                 meter_id=f"{point.session_id}-r{point.epoch}")

    async def _admit(self, principal: Principal, point: ResumePoint, token: str,
                     resume: ResumeStart | None, *, meter_id: str) -> AsrAdmission | Rejected:
        settings = self.config.asr.session
        params = point.params
        try:
            with tracing.maybe_child("admission.lease"):
                meter = await self.meters.open(
                    session_id=meter_id, principal=principal, model=params.model
                )
        except METER_ERRORS as exc:
            return rejection(exc)
        engine = self.engines[params.model]
        machine = AsrSession(
            session_id=point.session_id,
            resume_token=token,
            params=params,
            settings=settings,
            models=self.models,
            engine_rate=engine.sample_rate,
            engine_interim=engine.supports_interim,
            max_frame_bytes=self.config.server.max_frame_bytes,
            idle_timeout_s=self.config.server.idle_timeout_s,
            resume=resume,
        )
        store = self.resume_store

        def start(wire: Wire, on_events: EventSink | None = None) -> AsrSessionRunner:
            writer = None
            if store is not None and machine.resumable and on_events is None:
                writer = ResumeWriter(store, token, epoch=point.epoch,
                                      ttl_s=settings.resume_window_s, log=log,
                                      log_extra={"session_id": point.session_id})
            runner = AsrSessionRunner(self, wire, machine, engine, meter, principal,
                                      on_events=on_events, resume=writer)
            runner.start()
            return runner

        def cancel() -> None:
            self.server.spawn(meter.settle())

        return AsrAdmission(start=start, cancel=cancel)


class StartSession(Protocol):
    def __call__(self, wire: Wire, on_events: EventSink | None = None) -> AsrSessionRunner: ...


@dataclass(frozen=True, slots=True)
class AsrAdmission:
    """An admitted ASR session: `start` runs it on a wire (its events go to `on_events`
    instead of the wire when given: a composite session, or an HTTP request that answers with
    one document); `cancel` settles its meter if it never starts."""

    start: StartSession
    cancel: Callable[[], None]


class AsrSessionRunner:
    """Feeds the machine its commands and performs its outputs; owns no session policy.

    The ingest step runs inline from the wire's read callback when the stage task is parked
    waiting for input (no task hop per frame: that hop costs more than the audio work), else
    from the stage task, which also waits for what the last step said (input, engine room,
    a deadline)."""

    def __init__(
        self,
        endpoint: AsrEndpoint,
        conn: Wire,
        machine: AsrSession,
        engine: Transcriber,
        meter: SessionMeter,
        principal: Principal,
        *,
        on_events: EventSink | None = None,
        clock: Clock | None = None,
        counted: bool = True,
        resume: ResumeWriter | None = None,
        lag_kind: str = KIND,
    ) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.machine = machine
        # A composite session (telephony) or an HTTP request takes the machine's events itself;
        # then nothing is written to the wire by this runner, only the close (code and reason).
        self.on_events = on_events
        self.engine = engine
        self.meter = meter
        self.principal = principal
        self.metrics = endpoint.metrics
        # The loop (bound at start) or a fake clock in tests.
        self._clock: Clock | None = clock
        self._time: Callable[[], float] = time.monotonic
        self._ingest_seconds = self.metrics.stage_seconds.labels("ingest")
        # streamgate_ingest_lag_seconds: the clock is read at the first frame after a step (in
        # the read that brought it), observed once the step took it through the VAD.
        self._ingest_lag = endpoint.ingest_lag(lag_kind)
        self._lag_from = 0.0  # 0.0: no frame waits for the ingest step
        self._wake = Wakeup()  # asyncio.Event, minus a getpid() per wait on Python 3.11
        self._writable = Wakeup()
        self._wait: Step | None = None  # the last step's wait and deadline
        self._gone = False
        self._close_code: int | None = None
        self._published_ms = 0
        self._published_dropped_ms = 0
        self._frames_in = 0
        self._bytes_in = 0
        self._frames_out = 0
        self._bytes_out = 0
        self._settle_owed = False
        self._input = False  # frames arrived since the last step
        self._parked = False  # the stage task waits for input (so a step may run inline)
        self._finished = False
        self._steps = 0
        self._log_extra = {"session_id": machine.session_id, "tenant_id": principal.tenant_id}
        # `counted=False`: the caller-audio side of a call, which counts as the call.
        self.lifecycle = SessionLifecycle(kind=KIND, host=endpoint.server,
                                          metrics=endpoint.metrics, log=log,
                                          log_extra=self._log_extra, counted=counted)
        self.usage = MeteredUsage(meter, log=log, log_extra=self._log_extra,
                                  usage_interval_s=endpoint.config.asr.session.usage_interval_s)
        # A resumable session writes where it could be picked up again (server/sessions/resume.py).
        self.resume = resume
        self._position: Position | None = None  # the newest quiet point
        self._checkpoint_wanted = False  # a final went out since the last resume point
        # While the point a usage report pays up to is being saved, new audio stays counted in
        # the machine: the report then covers exactly the saved `billed_offset`, no more.
        self._metering_held = False
        if resume is not None:
            resume.on_saved = self._resume_saved
        self._trace: AsrTrace | None = None  # the session's spans, when tracing is on

    # --- SessionHandler (called from the connection, synchronously) ----------------------------

    def start(self) -> None:
        if self._clock is None:
            self._clock = asyncio.get_running_loop()
        self._time = self._clock.time
        if TRACING.on:  # under the current span: the upgrade's, an HTTP request's, a call's
            trace = self._trace = AsrTrace.start(
                session_id=self.machine.session_id, model=self.machine.params.model,
                tenant_id=self.principal.tenant_id, kind=KIND)
            self.machine.trace_id = self._log_extra["trace_id"] = trace.trace_id
        # Counted before `ready` leaves: whoever sees `ready` then sees the session counted.
        self.lifecycle.opened(model=self.machine.params.model,
                              encoding=self.machine.params.encoding)
        self.machine.start()
        self._send_events()
        if self.resume is not None:
            self._position = self.machine.position()
            self._save_resume_point()  # resumable from `ready` on
        self.endpoint.runners.add(self)
        self.endpoint.server.spawn(self._run())

    def on_binary(self, data: bytes) -> None:
        if not self._lag_from:
            self._lag_from = self._time()
        self._frames_in += 1
        self._bytes_in += len(data)
        if self.machine.receive_audio(data):
            self.conn.pause_reading()
        self._input = True

    def on_text(self, data: bytes) -> None:
        self._frames_in += 1
        self._bytes_in += len(data)
        try:
            msg = decode_client_message(data, m.asr_client_decoder)
        except BadMessage as exc:
            self.machine.bad_message(str(exc))
        else:
            self.machine.receive_control(msg)
        self._input = True

    def control(self, msg: m.AsrClientMessage) -> None:
        """A typed control message from a caller that speaks another dialect (Deepgram's
        `Finalize`, Sarvam's `flush`): no JSON of ours on the way in. Taken in with the audio
        of the same read, in order."""
        self.machine.receive_control(msg)
        self._input = True

    def on_writable(self) -> None:
        self._writable.set()
        self._wake.set()

    def on_idle(self) -> None:
        self.machine.idle_timeout(self.endpoint.config.server.idle_timeout_s)
        self._wake.set()
        self._writable.set()  # the idle close must not wait for the peer to read

    def on_drain(self) -> None:
        self.machine.drain()
        self._wake.set()

    def end_input(self) -> None:
        """A composite session ends its caller's audio: finals, then settle and close 1000."""
        self.machine.receive_control(m.Close())
        self._input = True
        self.on_read_done()

    def end(self, code: int, reason: str) -> None:
        """A composite session ends the session with this close code (no finals)."""
        self.machine.fail(code, reason, reason)
        self._input = True
        self._writable.set()  # a stage task waiting for the peer to read: close now
        self.on_read_done()

    def on_connection_closed(self, code: int) -> None:
        self._gone = True
        if self._close_code is None:
            self._close_code = code
        self.machine.connection_lost()  # also frees the engine queue: nothing waits on room
        self._wake.set()
        self._writable.set()

    def on_read_done(self) -> None:
        """The connection delivered every frame of one socket read."""
        if not self._input:
            return
        self._input = False
        if self._parked and not self.conn.write_paused:
            self._step()
        else:
            self._wake.set()

    # --- the session's life ---------------------------------------------------------------------

    async def _run(self) -> None:
        if self._trace is not None:
            tracing.activate(self._trace.session)  # this task's and the ones it starts
        invoke = asyncio.get_running_loop().create_task(self._invoke_loop())
        usage = self.usage.start_reports(self._on_usage, before=self._before_report)
        try:
            await self._ingest_loop()
        except Exception:
            log.exception("session failed", extra=self._log_extra)
            self.machine.fail(1011, "internal_error", "internal error; retry the session",
                              retryable=True)
            action = self.machine.close_action
            if action is not None:
                self._close(action)
        finally:
            await SessionLifecycle.stop(invoke, usage)
            report = await self._settle()
            await self._end_resume()
            self._publish_metrics()
            self.endpoint.runners.discard(self)
            if self._trace is not None:
                self._trace.close(self._close_code if self._close_code is not None else 1006,
                                  audio_ms=report.audio_ms, dropped_ms=report.dropped_ms)
            self.lifecycle.closed(self._close_code if self._close_code is not None else 1006,
                                  audio_ms=report.audio_ms, dropped_ms=report.dropped_ms)

    async def _ingest_loop(self) -> None:
        conn, wake, clock = self.conn, self._wake, self._clock
        assert clock is not None
        while not self._gone and not self._finished:
            wait = self._wait
            if wait is not None and wait.wait == "engine_room":
                await self.machine.engine_room.wait()
            elif wait is not None and wait.deadline is not None:
                timer = clock.call_at(wait.deadline, wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()
            else:
                self._parked = True
                try:
                    await wake.wait()
                finally:
                    self._parked = False
            wake.clear()
            if self._gone or self._finished:
                return
            while conn.write_paused and not self._gone and not self._finished \
                    and self.machine.close_action is None:
                # The client is not reading: stop producing until its socket drains. A close
                # decided meanwhile goes out at once: it must not wait for a peer that may
                # never read again.
                self._writable.clear()
                await self._writable.wait()
            if not self._finished:
                self._step()

    def _step(self) -> None:
        """One step of the machine and everything it asks for."""
        machine = self.machine
        clock = self._time
        self._steps += 1
        if self._steps & 15 == 0:  # a sample is enough for the latency histogram
            t0 = time.perf_counter()
            out = machine.step(clock())
            self._ingest_seconds.observe(time.perf_counter() - t0)
        else:
            out = machine.step(clock())
        if self._lag_from and not machine.queue.audio_bytes:
            # Every frame waiting went through the VAD (or was dropped by a close): the oldest
            # one's lag is this step's.
            self._ingest_lag.observe(clock() - self._lag_from)
            self._lag_from = 0.0
        if not self._metering_held:
            accepted, dropped = machine.take_metered_ms()
            if accepted:
                self.meter.accept(accepted)
            if dropped:
                self.meter.drop(dropped)
        if out is CONTINUE:
            self._wait = out
        else:
            self._perform(out)
        if self.meter.exhausted and machine.lease_exhausted().top_up:
            self.conn.pause_reading()
            self.endpoint.server.spawn(self._extend_lease())
        if self._checkpoint_wanted:
            self._checkpoint()
        self._send_events()

    def _perform(self, out: Step) -> None:
        if out.resume_reading:
            self.conn.resume_reading()
        if out.pause_reading:
            self.conn.pause_reading()
        if out.finals_abandoned:
            log.warning("finals abandoned after %.0f s", FINALS_TIMEOUT_S, extra=self._log_extra)
        self._wait = out
        if out.close is not None:
            self._close(out.close)
        elif out.settle:
            self._settle_owed = True
        else:
            if self._parked and (out.deadline is not None or out.wait != "input"):
                # Stepped inline while the stage task waits for plain input: it must wait for
                # this step's deadline or for engine room instead.
                self._wake.set()
            return
        self._finished = True
        self._wake.set()  # the stage task exits (it may be parked ...
        self._writable.set()  # ... or waiting for a client that does not read)

    async def _extend_lease(self) -> None:
        machine = self.machine
        verdict = await self.usage.top_up()
        if verdict == "extended":
            self._perform(machine.lease_extended())
        elif verdict == "revoked":
            machine.key_revoked()
        else:
            machine.out_of_balance()
        self._wake.set()

    def _close(self, action: CloseAction) -> None:
        self._close_code = action.code
        self._send_events(hold=False)
        self.conn.close(action.code, action.reason)

    async def _settle(self) -> UsageReport:
        self._meter_deltas()
        if self.resume is not None and self.machine.draining and not self._gone:
            # The client resumes on another node: what it finished here must be there first.
            self._position = self.machine.position() or self._position
            if self._position is not None:
                await self.resume.save(self._resume_point())
        report = await self.usage.settle()
        if report is None:  # the wallet failed: the machine's own counts for the summary
            report = UsageReport(self.machine.accepted_ms, self.machine.accepted_ms,
                                 self.machine.dropped_ms, 0, None)
        if self._settle_owed and not self._gone:
            # Settling is async (the wallet may be remote); the summary carries its result.
            out = self.machine.settled(report)
            if out.close is not None:
                self._close(out.close)
        return report

    # --- invoke stage ---------------------------------------------------------------------------

    async def _invoke_loop(self) -> None:
        machine = self.machine
        streams: dict[int, TranscriptionStream] = {}
        model = machine.params.model
        # Children resolved once: labels() takes a lock and a dict lookup, per engine call.
        feed_seconds = self.metrics.engine_seconds.labels(model, "feed")
        finish_seconds = self.metrics.engine_seconds.labels(model, "finish")
        final_latency = self.metrics.asr_final_latency.labels(model)
        queue_seconds = self.metrics.asr_queue.labels(model)
        engine_time: dict[int, float] = {}  # per utterance: its time in engine calls
        queue_time: dict[int, float] = {}  # per utterance: of that, waiting in a micro-batcher
        stats = CallStats()
        BATCH_STATS.set(stats)  # this task's: the micro-batcher adds each call's wait to it
        trace = self._trace
        work_available = machine.engine_work_available
        try:
            while not self._gone:
                req = machine.next_engine_request()
                if req is None:
                    await work_available.wait()
                    continue
                utt = req.utterance_id
                stream = streams.get(utt)
                if stream is None:
                    stream = streams[utt] = self.engine.open_stream(
                        language=machine.params.language,
                        session_id=machine.session_id,
                        utterance_id=utt,
                    )
                t0 = time.perf_counter()
                stats.queue_s = 0.0
                span = trace.engine_call(req) if trace is not None else None
                try:
                    if isinstance(req, EngineFeed):
                        hyp = await stream.feed(req.pcm)
                        if hyp is not None:
                            machine.receive_result(utt, hyp, final=False)
                        took = time.perf_counter() - t0
                        engine_time[utt] = engine_time.get(utt, 0.0) + took
                        if stats.queue_s:
                            queue_time[utt] = queue_time.get(utt, 0.0) + stats.queue_s
                        feed_seconds.observe(took)
                    else:
                        hyp = await stream.finish()
                        # Dropped once answered: a finish cancelled while it waits (finals
                        # abandoned, client gone) is closed below like every open stream.
                        del streams[utt]
                        took = time.perf_counter() - t0
                        finish_seconds.observe(took)
                        engine_s = engine_time.pop(utt, 0.0) + took
                        queue_s = queue_time.pop(utt, 0.0) + stats.queue_s
                        machine.receive_result(utt, hyp, final=True, now=self._time(),
                                               engine_s=engine_s, queue_s=queue_s)
                        queue_seconds.observe(queue_s)
                        for latency in machine.take_final_latencies():
                            final_latency.observe(latency)
                            if trace is not None:
                                trace.final(utt, latency_s=latency, engine_s=engine_s,
                                            queue_s=queue_s, text=hyp.text)
                        self._checkpoint_wanted = self.resume is not None
                except EngineError as exc:
                    self.metrics.engine_errors.labels(model).inc()
                    engine_time.pop(utt, None)
                    queue_time.pop(utt, None)
                    if span is not None and trace is not None:
                        tracing.error(span, str(exc))
                        trace.failed(utt, str(exc))
                    dead = streams.pop(utt, None)
                    if dead is not None:
                        await dead.aclose()
                    machine.receive_engine_error(utt, exc)
                finally:
                    if span is not None and trace is not None:
                        trace.call_done(span, stats)
                self._send_events()
                self._wake.set()
        finally:
            for stream in streams.values():
                with contextlib.suppress(Exception):
                    await stream.aclose()

    # --- usage ----------------------------------------------------------------------------------

    async def _before_report(self) -> None:
        """What the report pays for is in the resume point first: a client that resumes
        elsewhere is not charged for it again (a failed save is logged; the report goes on)."""
        self._meter_deltas()
        if self.resume is not None:
            self._position = self.machine.position() or self._position
            if self._position is not None:
                point = self._resume_point()
                self._metering_held = True
                try:
                    outcome = await self.resume.save(point)
                finally:
                    self._metering_held = False
                self._resume_saved(point, outcome)

    # --- resume ---------------------------------------------------------------------------------

    def _resume_point(self) -> ResumePoint:
        assert self.resume is not None and self._position is not None
        pos, machine = self._position, self.machine
        return ResumePoint(session_id=machine.session_id, tenant_id=self.principal.tenant_id,
                           params=machine.params, epoch=self.resume.epoch, offset=pos.offset,
                           at_ms=pos.at_ms, next_utterance_id=pos.next_utterance_id,
                           billed_offset=machine.billed_offset, finals=machine.replay.items())

    def _checkpoint(self) -> None:
        """A final went out: save the newest quiet point with it, once there is one."""
        position = self.machine.position()
        if position is None:
            return  # mid-utterance: the next step tries again
        self._checkpoint_wanted = False
        self._position = position
        self._save_resume_point()

    def _save_resume_point(self) -> None:
        if self.resume is not None and self._position is not None:
            self.resume.request(self._resume_point)

    def _resume_saved(self, point: AnyResumePoint, outcome: SaveOutcome) -> None:
        if outcome == "saved" and isinstance(point, ResumePoint):
            self.machine.checkpointed(Position(point.offset, point.at_ms,
                                               point.next_utterance_id))
        elif outcome == "superseded":
            self.machine.fail(4409, "session_resumed",
                              "this session was resumed on another connection")
        else:
            return
        self._send_events()
        self._wake.set()

    async def _end_resume(self) -> None:
        """A session that ended for good cannot be resumed; one cut off (1001 draining, a lost
        connection) stays resumable until its point expires."""
        writer = self.resume
        if writer is None:
            return
        code = self._close_code
        if code in (1001, 1006, None) or (code == 1011 and self._gone):
            await writer.aclose()
        else:
            await writer.forget()

    def _on_usage(self, report: UsageReport) -> None:
        self.machine.usage(report)
        self._send_events()
        self._wake.set()  # a usage verdict (exhausted, rate limited) may close it
        self._publish_metrics()

    def _meter_deltas(self) -> None:
        accepted, dropped = self.machine.take_metered_ms()
        if accepted:
            self.meter.accept(accepted)
        if dropped:
            self.meter.drop(dropped)

    @property
    def invoke_queue_ms(self) -> int:
        return self.machine.engine_queue_bytes * 1000 // (self.engine.sample_rate * 2)

    def _publish_metrics(self) -> None:
        ep = self.endpoint
        accepted, dropped = self.machine.accepted_ms, self.machine.dropped_ms
        if accepted > self._published_ms:
            ep.audio_ms.inc(accepted - self._published_ms)
        if dropped > self._published_dropped_ms:
            ep.dropped_ms.inc(dropped - self._published_dropped_ms)
        self._published_ms, self._published_dropped_ms = accepted, dropped
        ep.frames_in.inc(self._frames_in)
        ep.bytes_in.inc(self._bytes_in)
        ep.frames_out.inc(self._frames_out)
        ep.bytes_out.inc(self._bytes_out)
        self._frames_in = self._bytes_in = self._frames_out = self._bytes_out = 0

    # --- outbound -------------------------------------------------------------------------------

    def _send_events(self, hold: bool | None = None) -> None:
        on_events = self.on_events
        if on_events is not None:
            events = self.machine.messages()
            if events:
                on_events(events)
            return
        if self.conn.write_paused if hold is None else hold:
            # They wait in the machine's outbox, interims coalesced, up to its bound.
            out = self.machine.hold_messages()
            if out is not CONTINUE:
                self._perform(out)
            return
        events = self.machine.messages()
        if not events:
            return
        conn = self.conn
        credits = _credit_payloads.encoded  # grant -> payload, filled by payload()
        for ev in events:
            if type(ev) is m.Credit:  # one a frame: most often the only message
                data = credits.get(ev.bytes) or _credit_payloads.payload(ev.bytes)
            else:
                data = encode_event(ev)
            conn.send_text(data)
            self._bytes_out += len(data)
        self._frames_out += len(events)
        conn.flush()
