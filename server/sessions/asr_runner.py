"""The asyncio side of an ASR session: feeds the sans-I/O machine and does its I/O.

Stages: socket -> ingest queue (in the machine, bounded in ms) -> ingest/VAD task (drains
everything waiting in one go) -> invoke queue (bounded in ms) -> invoke task (engine) ->
outbound (interim results coalesced while the socket's write buffer is above high water).
A slow engine fills the invoke queue, which stalls the ingest task, which fills the ingest
queue, which pauses the socket (`block`) or drops the oldest audio (`drop`): memory per session
is bounded whatever the client or the engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable

from server.billing.auth import Principal
from server.billing.meter import (
    METER_ERRORS,
    KeyRevoked,
    MeterFactory,
    SessionMeter,
    UsageReport,
    cancel_requested,
    meter_rejection,
    report_delays,
)
from server.config import Config
from server.models.base import EngineError, Transcriber, TranscriptionStream
from server.sessions import messages as m
from server.sessions.asr import AsrSession, EngineFeed, EngineRequest, encode_event
from server.sessions.asr_params import BadParams, params_from_query
from server.telemetry.metrics import Metrics
from server.ws.connection import WsConnection
from server.ws.handshake import Admitted, Rejected, UpgradeRequest
from server.ws.server import WsServer

log = logging.getLogger("streamgate.asr")

FINALS_TIMEOUT_S = 10.0
KIND = "asr"


class CreditPayloads:
    """Encoded `credit` messages by grant. A session grants the same few sizes (one quarter
    window per drained quarter) up to 50 times a second; encoding each anew cost more than the
    VAD's bookkeeping. Bounded: cleared when full."""

    __slots__ = ("_max", "_payloads")

    def __init__(self, max_entries: int = 256) -> None:
        self._payloads: dict[int, bytes] = {}
        self._max = max_entries

    def payload(self, grant: int) -> bytes:
        payload = self._payloads.get(grant)
        if payload is None:
            if len(self._payloads) >= self._max:
                self._payloads.clear()
            payload = self._payloads[grant] = encode_event(m.Credit(bytes=grant))
        return payload


_credit_payloads = CreditPayloads()


class AsrEndpoint:
    kind = KIND

    def __init__(
        self,
        *,
        config: Config,
        engines: dict[str, Transcriber],
        meters: MeterFactory,
        server: WsServer,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.engines = engines
        self.meters = meters
        self.server = server
        self.metrics = metrics
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

    def _publish_gauges(self) -> None:
        ingest_ms = invoke_ms = credit = 0
        for r in self.runners:
            ingest_ms += int(r.machine.queue.audio_bytes / r.machine.params.bytes_per_ms)
            invoke_ms += r.invoke_queue_ms
            credit += max(0, r.machine.credit.outstanding)
        self.metrics.queue_depth_ms.labels("ingest").set(ingest_ms)
        self.metrics.queue_depth_ms.labels("invoke").set(invoke_ms)
        self.metrics.credit_outstanding.set(credit)

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        settings = self.config.asr.session
        try:
            params = params_from_query(
                upgrade.query, default_model=settings.default_model, models=self.models
            )
        except BadParams as exc:
            return Rejected(400, "bad_request", str(exc))
        session_id = uuid.uuid4().hex
        try:
            meter = await self.meters.open(
                session_id=session_id, principal=principal, model=params.model
            )
        except METER_ERRORS as exc:
            return meter_rejection(exc)
        engine = self.engines[params.model]
        machine = AsrSession(
            session_id=session_id,
            resume_token=secrets.token_urlsafe(18),
            params=params,
            settings=settings,
            models=self.models,
            engine_rate=engine.sample_rate,
            engine_interim=engine.supports_interim,
            max_frame_bytes=self.config.server.max_frame_bytes,
            idle_timeout_s=self.config.server.idle_timeout_s,
        )

        def start(conn: WsConnection) -> AsrSessionRunner:
            runner = AsrSessionRunner(self, conn, machine, engine, meter, principal)
            runner.start()
            return runner

        def cancel() -> None:
            self.server.spawn(meter.settle())

        return Admitted(start=start, cancel=cancel)


class AsrSessionRunner:
    def __init__(
        self,
        endpoint: AsrEndpoint,
        conn: WsConnection,
        machine: AsrSession,
        engine: Transcriber,
        meter: SessionMeter,
        principal: Principal,
        *,
        on_events: Callable[[list[m.AsrServerMessage]], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.machine = machine
        # A composite session (telephony) takes the machine's events itself; then nothing is
        # written to the socket by this runner, only the close (code and reason).
        self.on_events = on_events
        self.engine = engine
        self.meter = meter
        self.principal = principal
        self.metrics = endpoint.metrics
        self._ingest_seconds = self.metrics.stage_seconds.labels("ingest")
        self._wake = asyncio.Event()
        self._invoke_wake = asyncio.Event()
        self._room = asyncio.Event()
        self._writable = asyncio.Event()
        self._invoke_q: deque[EngineRequest] = deque()
        self._invoke_bytes = 0
        self._invoke_capacity = (
            endpoint.config.asr.session.invoke_queue_ms * engine.sample_rate * 2 // 1000
        )
        self._outbox: list[m.AsrServerMessage] = []
        self._gone = False
        self._close_code: int | None = None
        self._draining = False
        self._metered_ms = 0
        self._metered_dropped_ms = 0
        self._published_ms = 0
        self._published_dropped_ms = 0
        self._frames_in = 0
        self._bytes_in = 0
        self._frames_out = 0
        self._bytes_out = 0
        self._closing_since: float | None = None
        self._pending_finish: tuple[int, str, str] | None = None
        self._input = False  # frames arrived since the last step
        self._parked = False  # the stage task waits for input (so a step may run inline)
        self._finished = False
        self._steps = 0
        self._top_up: asyncio.Task[None] | None = None  # an immediate report extending the lease
        self._log_extra = {"session_id": machine.session_id, "tenant_id": principal.tenant_id}
        self._max_outbox = endpoint.config.asr.session.max_outbound_messages

    # --- SessionHandler (called from the connection, synchronously) ----------------------------

    def start(self) -> None:
        self.machine.start()
        self._send_events()
        self.metrics.sessions_active.labels(KIND).inc()
        log.info("session started", extra={**self._log_extra, "model": self.machine.params.model,
                                            "encoding": self.machine.params.encoding})
        self.endpoint.server.session_count += 1
        self.endpoint.runners.add(self)
        self.endpoint.server.spawn(self._run())

    def on_binary(self, data: bytes) -> None:
        self._frames_in += 1
        self._bytes_in += len(data)
        if self.machine.receive_audio(data):
            self.conn.pause_reading()
        self._input = True

    def on_text(self, data: bytes) -> None:
        self._frames_in += 1
        self._bytes_in += len(data)
        self.machine.receive_text(data)
        self._input = True

    def on_writable(self) -> None:
        self._writable.set()
        self._wake.set()

    def on_idle(self) -> None:
        if self.machine.state == "open":
            timeout = self.endpoint.config.server.idle_timeout_s
            self.machine.fail(4008, "idle_timeout", f"no audio or keepalive for {timeout:g} s")
            self._wake.set()

    def on_drain(self) -> None:
        self._draining = True
        self.machine.end_of_input()
        self._wake.set()

    def on_connection_closed(self, code: int) -> None:
        self._gone = True
        if self._close_code is None:
            self._close_code = code
        self._wake.set()
        self._invoke_wake.set()
        self._room.set()
        self._writable.set()

    # --- the session's life ---------------------------------------------------------------------

    async def _run(self) -> None:
        invoke = asyncio.get_running_loop().create_task(self._invoke_loop())
        usage = asyncio.get_running_loop().create_task(self._usage_loop())
        try:
            await self._ingest_loop()
        except Exception:
            log.exception("session failed", extra=self._log_extra)
            self.machine.fail(1011, "internal_error", "internal error; retry the session",
                              retryable=True)
            self._send_events()
            self._close_if_done()
        finally:
            for task in (invoke, usage):
                task.cancel()
            for task in (invoke, usage):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            report = await self._settle()
            self._publish_metrics()
            code = self._close_code if self._close_code is not None else 1006
            self.metrics.sessions_active.labels(KIND).dec()
            self.metrics.sessions_total.labels(KIND, str(code)).inc()
            self.endpoint.server.session_count -= 1
            self.endpoint.runners.discard(self)
            log.info("session ended", extra={**self._log_extra, "close_code": code,
                                              "audio_ms": report.audio_ms,
                                              "dropped_ms": report.dropped_ms})

    async def _ingest_loop(self) -> None:
        machine, conn = self.machine, self.conn
        while not self._gone and not self._finished:
            if machine.state == "closing":
                await self._wait_closing()
            else:
                self._parked = True
                try:
                    await self._wake.wait()
                finally:
                    self._parked = False
            self._wake.clear()
            if self._gone or self._finished:
                return
            if self._top_up is not None:
                continue  # the lease top-up wakes us when it is answered
            while conn.write_paused and not self._gone:
                # The client is not reading: stop producing until its socket drains.
                self._writable.clear()
                await self._writable.wait()
            if self._step():
                return
            while self._invoke_bytes > self._invoke_capacity and not self._gone:
                self._room.clear()
                await self._room.wait()
            if conn.reading_paused and machine.queue.resumable:
                conn.resume_reading()

    def _step(self) -> bool:
        """One ingest stage step over everything queued; True once the session is finished.

        Runs inline from the socket's read callback when the stage is idle (no task hop per
        frame: that hop costs more than the audio work), else from the stage task."""
        machine = self.machine
        self._steps += 1
        if self._steps & 15 == 0:  # a sample is enough for the latency histogram
            t0 = time.perf_counter()
            machine.process()
            self._ingest_seconds.observe(time.perf_counter() - t0)
        else:
            machine.process()
        self._meter_deltas()
        if self.meter.exhausted and self._top_up is None and machine.state != "closed":
            # Hold the audio until the lease is extended (or the wallet says no).
            self.conn.pause_reading()
            self._top_up = self.endpoint.server.spawn(self._extend_lease())
        reqs = machine.engine_requests()
        if reqs:
            self._queue_requests(reqs)
        self._send_events()
        # An open session with no close pending is never done: skip _close_if_done's questions.
        done = not (machine.close_action is None and machine.state == "open") \
            and self._close_if_done()
        if not done:
            if len(self._outbox) <= self._max_outbox:
                return False
            machine.fail(1008, "client_not_reading", "client stopped reading results")
            self._send_events()
            self._close_if_done()
        self._finished = True
        self._wake.set()  # the stage task exits (it may be parked)
        return True

    async def _extend_lease(self) -> None:
        revoked = False
        try:
            extended = await self.meter.top_up()
        except KeyRevoked:
            extended, revoked = False, True
        except Exception:
            log.exception("lease top-up failed", extra=self._log_extra)
            extended = False
        self._top_up = None
        if revoked:
            self.machine.key_revoked()
        elif not extended and self.machine.state != "closed":
            self.machine.out_of_balance()
        elif self.conn.reading_paused and self.machine.queue.resumable:
            self.conn.resume_reading()
        self._wake.set()

    def on_read_done(self) -> None:
        """The connection delivered every frame of one socket read."""
        if not self._input:
            return
        self._input = False
        if (self._parked and not self.conn.write_paused and self.machine.state == "open"
                and self._invoke_bytes <= self._invoke_capacity and self._top_up is None):
            if not self._step() and self.conn.reading_paused and self.machine.queue.resumable:
                self.conn.resume_reading()
        else:
            self._wake.set()

    async def _wait_closing(self) -> None:
        """While closing, wake for results but give up on finals after FINALS_TIMEOUT_S."""
        loop = asyncio.get_running_loop()
        if self._closing_since is None:
            self._closing_since = loop.time()
        remaining = FINALS_TIMEOUT_S - (loop.time() - self._closing_since)
        if remaining <= 0:
            log.warning("finals abandoned after %.0f s", FINALS_TIMEOUT_S, extra=self._log_extra)
            self.machine.abandon_pending()
            self._invoke_q.clear()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await self._wake.wait()

    def _close_if_done(self) -> bool:
        machine = self.machine
        if machine.close_action is None:
            if machine.state != "closing" or machine.finals_pending or self._invoke_q:
                return False
            if self._draining:
                self._finish_later(1001, "draining", "server is draining; reconnect")
            else:
                self._finish_later(1000, "", "")
            return True
        action = machine.close_action
        self._close_code = action.code
        self._flush_outbox()
        self.conn.close(action.code, action.reason)
        return True

    def _finish_later(self, code: int, reason: str, message: str) -> None:
        # Settling is async (the wallet may be remote); the summary carries its result.
        self._pending_finish = (code, reason, message)

    async def _settle(self) -> UsageReport:
        self._meter_deltas()
        try:
            report = await self.meter.settle()
        except Exception:
            log.exception("meter settle failed", extra=self._log_extra)
            report = UsageReport(self.machine.accepted_ms, self.machine.accepted_ms,
                                 self.machine.dropped_ms, 0, None)
        finish = self._pending_finish
        if finish is not None and not self._gone:
            code, reason, message = finish
            self.machine.finish(report, code, reason, message)
            self._send_events()
            self._close_if_done()
        return report

    # --- invoke stage ---------------------------------------------------------------------------

    def _queue_requests(self, reqs: list[EngineRequest]) -> None:
        for req in reqs:
            if isinstance(req, EngineFeed):
                self._invoke_bytes += len(req.pcm)
            self._invoke_q.append(req)
        self._invoke_wake.set()

    async def _invoke_loop(self) -> None:
        streams: dict[int, TranscriptionStream] = {}
        failed: set[int] = set()
        model = self.machine.params.model
        engine_seconds = self.metrics.engine_seconds
        try:
            while not self._gone:
                if not self._invoke_q:
                    self._invoke_wake.clear()
                    await self._invoke_wake.wait()
                    continue
                req = self._invoke_q.popleft()
                utt = req.utterance_id
                pcm = b""
                if isinstance(req, EngineFeed):
                    parts = [req.pcm]
                    # Coalesce: one engine call for everything this utterance has waiting.
                    while (self._invoke_q and isinstance(self._invoke_q[0], EngineFeed)
                           and self._invoke_q[0].utterance_id == utt):
                        nxt = self._invoke_q.popleft()
                        assert isinstance(nxt, EngineFeed)
                        parts.append(nxt.pcm)
                    pcm = b"".join(parts)
                    self._invoke_bytes -= len(pcm)
                    self._room.set()
                if utt in failed:
                    continue
                stream = streams.get(utt)
                if stream is None:
                    stream = streams[utt] = self.engine.open_stream(
                        language=self.machine.params.language,
                        session_id=self.machine.session_id,
                        utterance_id=utt,
                    )
                t0 = time.perf_counter()
                try:
                    if isinstance(req, EngineFeed):
                        hyp = await stream.feed(pcm)
                        if hyp is not None:
                            self.machine.receive_result(utt, hyp, final=False)
                        engine_seconds.labels(model, "feed").observe(time.perf_counter() - t0)
                    else:
                        del streams[utt]
                        hyp = await stream.finish()
                        engine_seconds.labels(model, "finish").observe(time.perf_counter() - t0)
                        self.machine.receive_result(utt, hyp, final=True)
                except EngineError as exc:
                    self.metrics.engine_errors.labels(model).inc()
                    failed.add(utt)
                    dead = streams.pop(utt, None)
                    if dead is not None:
                        await dead.aclose()
                    self.machine.receive_engine_error(utt, exc)
                self._send_events()
                self._wake.set()
        finally:
            for stream in streams.values():
                with contextlib.suppress(Exception):
                    await stream.aclose()

    # --- usage ----------------------------------------------------------------------------------

    async def _usage_loop(self) -> None:
        for delay in report_delays(self.endpoint.config.asr.session.usage_interval_s):
            await asyncio.sleep(delay)
            self._meter_deltas()
            report = await self.meter.report()
            if cancel_requested():
                return
            if self.machine.state != "closed":
                self.machine.usage(report)
                self._send_events()
                self._wake.set()  # a usage verdict (exhausted, rate limited) may close it
            self._publish_metrics()

    def _meter_deltas(self) -> None:
        machine = self.machine
        accepted = machine.accepted_ms
        if accepted > self._metered_ms:
            self.meter.accept(accepted - self._metered_ms)
            self._metered_ms = accepted
        if machine.dropped_bytes:
            dropped = machine.dropped_ms
            if dropped > self._metered_dropped_ms:
                self.meter.drop(dropped - self._metered_dropped_ms)
                self._metered_dropped_ms = dropped

    @property
    def invoke_queue_ms(self) -> int:
        return self._invoke_bytes * 1000 // (self.engine.sample_rate * 2)

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

    def _send_events(self) -> None:
        events = self.machine.events_to_send()
        if not events:
            return
        if self.on_events is not None:
            self.on_events(events)
            return
        if self.conn.write_paused:
            self._coalesce(events)
            return
        if self._outbox:
            events, self._outbox = self._outbox + events, []
        self._write(events)

    def _coalesce(self, events: list[m.AsrServerMessage]) -> None:
        """Keep only the newest interim per utterance while the client is slow to read."""
        for ev in events:
            if isinstance(ev, m.Transcript) and not ev.is_final:
                self._outbox = [
                    o for o in self._outbox
                    if not (isinstance(o, m.Transcript) and not o.is_final
                            and o.utterance_id == ev.utterance_id)
                ]
            self._outbox.append(ev)

    def _flush_outbox(self) -> None:
        if self._outbox:
            events, self._outbox = self._outbox, []
            self._write(events)

    def _write(self, events: list[m.AsrServerMessage]) -> None:
        conn = self.conn
        for ev in events:
            data = _credit_payloads.payload(ev.bytes) if type(ev) is m.Credit else encode_event(ev)
            conn.send_text(data)
            self._bytes_out += len(data)
        self._frames_out += len(events)
        conn.flush()
