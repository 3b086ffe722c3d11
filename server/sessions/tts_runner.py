"""The asyncio side of a TTS session: one synthesis task pulling audio from the engine (and
stopping when the outbound backlog is full), and sends paced by client credit and the socket's
write buffer. `clear` cancels the synthesis in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections import deque

from server.billing.auth import Principal
from server.billing.meter import (
    METER_ERRORS,
    MeterFactory,
    SessionMeter,
    UsageReport,
    cancel_requested,
    meter_rejection,
    report_delays,
)
from server.config import Config
from server.models.base import EngineError, Synthesizer
from server.sessions import messages as m
from server.sessions.tts import SynthRequest, TtsSession, tts_params
from server.telemetry.metrics import Metrics
from server.ws.connection import WsConnection
from server.ws.handshake import Admitted, Rejected, UpgradeRequest
from server.ws.server import WsServer

log = logging.getLogger("streamgate.tts")
KIND = "tts"
CHARACTERS = "characters"


class TtsEndpoint:
    kind = KIND

    def __init__(self, *, config: Config, engines: dict[str, Synthesizer], meters: MeterFactory,
                 server: WsServer, metrics: Metrics) -> None:
        self.config = config
        self.engines = engines
        self.meters = meters
        self.server = server
        self.metrics = metrics

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        settings = self.config.tts.session
        try:
            params = tts_params(upgrade.query, default_model=settings.default_model,
                                models=self.engines.keys())
        except ValueError as exc:
            return Rejected(400, "bad_request", str(exc))
        session_id = uuid.uuid4().hex
        try:
            meter = await self.meters.open(session_id=session_id, principal=principal,
                                           model=params.model, unit=CHARACTERS)
        except METER_ERRORS as exc:
            return meter_rejection(exc)
        engine = self.engines[params.model]
        srv = self.config.server
        machine = TtsSession(
            session_id=session_id, resume_token=secrets.token_urlsafe(18), params=params,
            settings=settings, models=self.engines.keys(), engine_rate=engine.sample_rate,
            max_chars=engine.max_chars, max_tokens=engine.max_tokens,
            limits=m.Limits(max_frame_bytes=srv.max_frame_bytes,
                            idle_timeout_s=srv.idle_timeout_s,
                            usage_interval_s=settings.usage_interval_s, max_utterance_ms=0),
            early_first_frame=True,
        )

        def start(conn: WsConnection) -> TtsSessionRunner:
            runner = TtsSessionRunner(self, conn, machine, engine, meter, principal)
            runner.start()
            return runner

        def cancel() -> None:
            self.server.spawn(meter.settle())

        return Admitted(start=start, cancel=cancel)


class TtsSessionRunner:
    def __init__(self, endpoint: TtsEndpoint, conn: WsConnection, machine: TtsSession,
                 engine: Synthesizer, meter: SessionMeter, principal: Principal) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.machine = machine
        self.engine = engine
        self.meter = meter
        self.metrics = endpoint.metrics
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._queue: deque[SynthRequest] = deque()
        self._current: asyncio.Task[None] | None = None
        self._gone = False
        self._close_code: int | None = None
        self._draining = False
        self._metered = 0
        self._top_up: asyncio.Task[None] | None = None
        # Synthesis pauses when this much encoded audio waits for credit or the socket.
        self._backlog_limit = int(
            (endpoint.config.tts.session.credit_ms + 1000) * machine.params.bytes_per_ms
        )
        self._log = {"session_id": machine.session_id, "tenant_id": principal.tenant_id}

    # --- SessionHandler -------------------------------------------------------------------------

    def start(self) -> None:
        self.machine.start()
        self._pump()
        self.metrics.sessions_active.labels(KIND).inc()
        self.endpoint.server.session_count += 1
        self.endpoint.server.spawn(self._run())
        log.info("session started", extra={**self._log, "model": self.machine.params.model})

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
        # A TTS client may legitimately be silent while its audio plays out.
        if self.machine.state == "open" and self.machine.idle:
            timeout = self.endpoint.config.server.idle_timeout_s
            self.machine.fail(4008, "idle_timeout", f"no text or keepalive for {timeout:g} s")
            self._after_input()

    def on_drain(self) -> None:
        self._draining = True
        if self.machine.state == "open":
            self.machine.state = "closing"
        self._wake.set()

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
        if self.machine.cancel_requested:
            self.machine.cancel_requested = False
            self._queue.clear()
            if self._current is not None:
                self._current.cancel()
        reqs = self.machine.requests()
        if reqs:
            self._queue.extend(reqs)
            self._meter_characters()
        self._pump()
        self._wake.set()

    def _meter_characters(self) -> None:
        delta = self.machine.characters - self._metered
        if delta > 0:
            self.meter.accept(delta)
            self._metered += delta
            if self.meter.exhausted and self._top_up is None:
                self._top_up = self.endpoint.server.spawn(self._extend_lease())

    async def _extend_lease(self) -> None:
        try:
            extended = await self.meter.top_up()
        except Exception:
            log.exception("lease top-up failed", extra=self._log)
            extended = False
        self._top_up = None
        if not extended:
            self.machine.fail(4002, "insufficient_balance", "wallet balance exhausted")
            self._pump()

    def _pump(self) -> None:
        """Send what credit and the socket allow; close when the machine says so."""
        conn = self.conn
        items = self.machine.output(can_write=not conn.write_paused)
        for item in items:
            if isinstance(item, bytes):
                conn.send_binary(item)
            else:
                conn.send_text(m.encoder.encode(item))
        if items:
            conn.flush()
        if self.machine.backlog_bytes <= self._backlog_limit:
            self._room.set()
        if self.machine.state == "closing":
            self._wake.set()  # the close waits for the last audio to go out
        action = self.machine.close_action
        if action is not None and self._close_code is None:
            self._close_code = action.code
            conn.close(action.code, action.reason)
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        usage = loop.create_task(self._usage_loop())
        try:
            await self._synth_loop()
        except Exception:
            log.exception("session failed", extra=self._log)
            self.machine.fail(1011, "internal_error", "internal error", retryable=True)
            self._pump()
        finally:
            usage.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await usage
            if self._current is not None:
                self._current.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._current
            report = await self.meter.settle()
            if not self._gone and self.machine.state != "closed":
                code, reason = (1001, "draining") if self._draining else (1000, "")
                self.machine.finish(report, code, reason, "server is draining; reconnect")
                self._pump()
            code = self._close_code if self._close_code is not None else 1006
            self.metrics.sessions_active.labels(KIND).dec()
            self.metrics.sessions_total.labels(KIND, str(code)).inc()
            self.endpoint.server.session_count -= 1
            log.info("session ended", extra={**self._log, "close_code": code,
                                              "characters": self.machine.characters})

    async def _synth_loop(self) -> None:
        machine = self.machine
        while not self._gone and machine.state != "closed":
            if machine.state == "closing" and not self._queue and machine.idle:
                return
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            req = self._queue.popleft()
            self._current = asyncio.get_running_loop().create_task(self._synthesize(req))
            with contextlib.suppress(asyncio.CancelledError):
                await self._current
            self._current = None
            # Wait until the audio went out before closing (credit, socket).
            while machine.state == "closing" and not self._queue and not machine.idle \
                    and not self._gone:
                self._wake.clear()
                await self._wake.wait()

    async def _synthesize(self, req: SynthRequest) -> None:
        """One chunk, read from the engine as fast as it comes. Back pressure applies between
        chunks: a listener slow to grant credit must not hold an engine slot (a few of them
        would stall every session on the model), and one chunk's audio is bounded by the
        model's context limit."""
        machine = self.machine
        params = machine.params
        while machine.backlog_bytes > self._backlog_limit and not self._gone:
            self._room.clear()
            await self._room.wait()
        if self._gone or req.generation != machine.generation:
            return
        try:
            stream = self.engine.synthesize(req.text, voice=params.voice, language=params.language)
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for pcm in stream:
                    machine.receive_audio(req, pcm)
                    self._pump()
            machine.synthesis_done(req)
        except EngineError as exc:
            machine.synthesis_failed(req, str(exc), exc.retryable)
        self._pump()

    async def _usage_loop(self) -> None:
        for delay in report_delays(self.endpoint.config.tts.session.usage_interval_s):
            await asyncio.sleep(delay)
            report: UsageReport = await self.meter.report()
            if cancel_requested():
                return
            if self.machine.state != "closed":
                self.machine.usage(report)
                self._pump()
