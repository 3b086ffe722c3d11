"""One phone call on a provider media stream: caller audio -> ASR -> agent -> TTS -> caller.

Composition, not new plumbing: the caller's audio goes through the ASR session machine and its
runner (`AsrSessionRunner`, with `on_events` so its events come here instead of to the socket:
provider sockets only speak the provider's JSON); the agent's text goes through the TTS session
machine in `Playback`, paced by the provider's mark echoes.

Life of a call: `waiting` (no valid `start` yet; `start_timeout_s` -> close 4001) ->
`authorizing` (the key from the upgrade or from the start event's custom parameters, admission
policy, meters) -> `live` -> `ending` (stop, socket closed, drain, or the ASR side closing):
agent and synthesis cancelled, TTS meter settled, ASR finals flushed and its meter settled by
the runner, which closes the socket (1000 for a normal end).

Nothing but provider messages is ever sent: no `error` frames before non-1000 closes (a
provider may reject unknown events); the reason is in the close frame and the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec

from server.billing.auth import Principal
from server.billing.meter import KEY_REVOKED_CLOSE, KEY_REVOKED_CODE, UsageReport
from server.flow_control.byte_queue import ByteQueue
from server.sessions.asr import AsrSession
from server.sessions.asr_params import AsrParams
from server.sessions.asr_runner import FINALS_TIMEOUT_S, AsrSessionRunner
from server.sessions.lifecycle import MeteredUsage, SessionLifecycle
from server.sessions.tts import TtsParams, TtsSession, default_frame_bytes
from server.sessions.wire import Wire
from server.telemetry import tracing
from server.telemetry.tracing import TRACING
from server.telephony.call.conversation import MAX_DIGITS, Conversation
from server.telephony.call.meters import CallMeters, MeterRefused
from server.telephony.call.playback import Playback, Reply
from server.telephony.providers import (
    CallStarted,
    CallStopped,
    Command,
    Dtmf,
    InboundAudio,
    MarkAcknowledged,
    ProviderCodec,
    ProviderError,
    codec_for,
    detect_provider,
)
from streamgate_protocol import messages as m

if TYPE_CHECKING:
    from server.telephony.call.endpoint import TelephonyEndpoint

log = logging.getLogger("streamgate.telephony")
KIND = "telephony"
State = Literal["waiting", "authorizing", "live", "ending"]


class CallWire(Wire, Protocol):
    """The provider's socket as a call sees it: a `Wire`, and who is on the other end (logs)."""

    @property
    def peer(self) -> str: ...


class TelephonySession:
    def __init__(self, endpoint: TelephonyEndpoint, conn: CallWire, *,
                 provider: str | None, principal: Principal | None,
                 meters: CallMeters | None) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.cfg = endpoint.config.telephony
        self._provider = provider
        self.codec: ProviderCodec | None = None
        self._principal = principal
        self._meters = meters
        self.state: State = "waiting"
        self.call: CallStarted | None = None
        self.runner: AsrSessionRunner | None = None
        # Built in the upgrade's admission task: its `ws.upgrade` span is current here.
        self._trace_parent = tracing.current_context() if TRACING.on else None
        self.playback: Playback | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.conversation: Conversation | None = None
        # Caller audio kept while the start's key is checked (sized by the start's format).
        self._pending: ByteQueue[bytes] | None = None
        self._early_digits = ""
        self._start_timer: asyncio.TimerHandle | None = None
        self._gone = False
        self._bad_messages = 0
        self._log: dict[str, str] = {"peer": conn.peer}
        # A call counts once, as a call, from the accepted socket to its `call ended` line.
        self.lifecycle = SessionLifecycle(kind=KIND, host=endpoint.server,
                                          metrics=endpoint.metrics, log=log, log_extra=self._log)
        self.agent_usage: MeteredUsage | None = None  # the agent-speech meter, once live

    # --- SessionHandler -------------------------------------------------------------------------

    def start(self) -> None:
        self.lifecycle.opened(None)  # `call started` is logged once it goes live
        loop = asyncio.get_running_loop()
        self._start_timer = loop.call_later(self.cfg.start_timeout_s, self._start_timeout)

    def on_text(self, data: bytes) -> None:
        if self.state == "ending":
            return
        if self.codec is None:
            # An explicit ?provider= wins; a Twilio-compatible clone is detected as Twilio.
            self.codec = codec_for(self._provider or detect_provider(data) or "twilio")
            self._log["provider"] = self.codec.name
        try:
            events = self.codec.decode(data)
        except ProviderError as exc:
            self._bad_message(str(exc))
            return
        for ev in events:
            if isinstance(ev, InboundAudio):
                self._audio(ev)
            elif isinstance(ev, MarkAcknowledged):
                if self.playback is not None:
                    self.playback.on_mark(ev.name)
            elif isinstance(ev, CallStarted):
                self._started(ev)
            elif isinstance(ev, Dtmf):
                self._dtmf(ev.digit)
            elif isinstance(ev, CallStopped):
                self._end("stop", 1000)

    def on_binary(self, data: bytes) -> None:
        self._bad_message("binary frame on a provider media stream (JSON text expected)")

    def on_read_done(self) -> None:
        if self.runner is not None and self.state == "live":
            self.runner.on_read_done()

    def on_writable(self) -> None:
        if self.runner is not None:
            self.runner.on_writable()
        if self.playback is not None and self.state == "live":
            self.playback.pump()

    def on_idle(self) -> None:
        # Providers stream audio all call long (silence included); before `start` the start
        # timer is in charge.
        if self.runner is not None and self.state == "live":
            self.runner.on_idle()

    def on_drain(self) -> None:
        self._end("draining", 1001)

    def on_connection_closed(self, code: int) -> None:
        self._gone = True
        if self.runner is not None:
            self.runner.on_connection_closed(code)
        self._end("socket closed", code)

    # --- admission ------------------------------------------------------------------------------

    def _start_timeout(self) -> None:
        self._start_timer = None
        if self.state in ("waiting", "authorizing"):
            log.warning("no valid start event with a valid key within %g s",
                        self.cfg.start_timeout_s, extra=self._log)
            self._end("unauthorized", 4001)

    def _started(self, call: CallStarted) -> None:
        if self.state != "waiting":
            return
        self.call = call
        self.state = "authorizing"
        self._log.update(call_id=call.call_id, stream_id=call.stream_id)
        width = 2 if call.encoding == "pcm_s16le" else 1
        self._pending = ByteQueue(
            max(1, call.sample_rate * width * self.cfg.pending_audio_ms // 1000))
        self._spawn(self._authorize(call))

    async def _authorize(self, call: CallStarted) -> None:
        ep = self.endpoint
        principal, meters = self._principal, self._meters
        try:
            if principal is None:
                params = call.custom_parameters
                key = params.get("api_key") or params.get("apikey")  # Plivo: `apikey`
                principal = await ep.authenticator.authenticate(key or None)
                if principal is None:
                    log.warning("start event without a valid api_key", extra=self._log)
                    self._end("unauthorized", 4001)
                    return
                policy = ep.policy
                refused = await policy.check_upgrade(principal) if policy is not None else None
                if refused is not None:
                    log.warning("call refused: %s", refused.code, extra=self._log)
                    self._end(refused.code, refused.close_code)
                    return
            if meters is None:
                meters = self._meters = await ep.open_meters(principal)
        except MeterRefused as exc:
            log.warning("call refused: %s", exc.code, extra=self._log)
            self._end(exc.code, exc.close_code)
            return
        except Exception:
            # The key store or the wallet failed (not the caller): the provider may retry.
            log.exception("call admission failed", extra=self._log)
            self._end("internal_error", 1011)
            return
        if self.state != "authorizing":
            if meters is not None:
                await meters.settle()  # timed out or hung up meanwhile
            return
        self._principal = principal
        self._log["tenant_id"] = principal.tenant_id
        try:
            self._go_live(call, principal, meters)
        except Exception:
            log.exception("call start failed", extra=self._log)
            if self.state == "authorizing":  # nothing is running yet: settle and close
                self._end("internal_error", 1011)

    def _go_live(self, call: CallStarted, principal: Principal, meters: CallMeters) -> None:
        ep, cfg, config = self.endpoint, self.cfg, self.endpoint.config
        self._log["session_id"] = meters.session_id
        engine = ep.asr.engines[ep.asr_model]
        params = AsrParams(model=ep.asr_model, language=cfg.language, encoding=call.encoding,
                           sample_rate=call.sample_rate, interim_results=False,
                           endpointing_ms=cfg.endpointing_ms, vad=cfg.vad, overflow="drop")
        asr = AsrSession(session_id=meters.session_id, resume_token="", params=params,
                         settings=msgspec.structs.replace(
                             config.asr.session, resample_quality=cfg.asr_resample_quality),
                         models=ep.asr.models,
                         engine_rate=engine.sample_rate, engine_interim=engine.supports_interim,
                         max_frame_bytes=config.server.max_frame_bytes,
                         idle_timeout_s=config.server.idle_timeout_s)
        self.runner = AsrSessionRunner(ep.asr, self.conn, asr, engine, meters.asr, principal,
                                       on_events=self._asr_events, counted=False,
                                       lag_kind=KIND)
        synth = ep.tts_engine
        tts_params = TtsParams(model=ep.tts_model, voice=cfg.voice or None,
                               language=cfg.language, encoding=call.encoding,
                               sample_rate=call.sample_rate)
        frame_bytes: int | None = None
        if self.codec is not None and self.codec.name == "exotel":
            # Exotel wants outbound media in multiples of 320 bytes, at least 3.2 KB each.
            frame_bytes = max(3200, -(-default_frame_bytes(tts_params, cfg.chunk_ms) // 320) * 320)
        tts = TtsSession(
            session_id=f"{meters.session_id}-tts", resume_token="", params=tts_params,
            settings=msgspec.structs.replace(config.tts.session, chunk_ms=cfg.chunk_ms,
                                             credit_ms=cfg.credit_ms),
            models=(ep.tts_model,), engine_rate=synth.sample_rate, max_chars=synth.max_chars,
            max_tokens=synth.max_tokens,
            limits=m.Limits(max_frame_bytes=config.server.max_frame_bytes,
                            idle_timeout_s=config.server.idle_timeout_s,
                            usage_interval_s=config.tts.session.usage_interval_s,
                            max_utterance_ms=0),
            frame_bytes=frame_bytes, resample_quality=cfg.tts_resample_quality,
        )
        self.playback = Playback(machine=tts, engine=synth, meter=meters.tts, send=self._send,
                                 can_write=lambda: not self.conn.write_paused,
                                 on_played=self._reply_played, log_extra=self._log)
        self.agent_usage = MeteredUsage(
            meters.tts, usage_interval_s=config.tts.session.usage_interval_s, log=log,
            log_extra=self._log)
        self.conversation = Conversation(
            agent=ep.agent, playback=self.playback, call=call, cfg=cfg, usage=self.agent_usage,
            spawn=self._spawn, end=self._end, log_extra=self._log, metrics=ep.metrics, asr=asr,
            trace_parent=self._trace_parent)
        self.state = "live"
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        self.runner.start()
        self._spawn(self.playback.run())
        self._track(self.agent_usage.start_reports(self._agent_speech_report))
        pending, self._pending = self._pending, None
        while pending and (payload := pending.take()) is not None:
            self.runner.on_binary(payload)
        self.runner.on_read_done()
        self.conversation.dtmf(self._early_digits)
        log.info("call started", extra={**self._log, "encoding": call.encoding,
                                         "sample_rate": call.sample_rate,
                                         "asr_model": ep.asr_model, "tts_model": ep.tts_model})

    # --- caller side ----------------------------------------------------------------------------

    def _audio(self, ev: InboundAudio) -> None:
        if ev.track == "outbound" or not ev.payload:
            return  # our own audio echoed back (Twilio both_tracks), or nothing
        if self.state == "live" and self.runner is not None:
            self.runner.on_binary(ev.payload)
        elif self.state == "authorizing" and self._pending is not None:
            # Kept while the key is checked, bounded: the oldest goes first (and is not billed).
            self._pending.put(ev.payload, len(ev.payload))
            self._pending.shed_oldest(keep_newest=False)

    def _asr_events(self, events: list[m.AsrServerMessage]) -> None:
        for ev in events:
            if isinstance(ev, m.SpeechStarted):
                if self.conversation is not None and self.state == "live":
                    self.conversation.speech_started()
            elif isinstance(ev, m.Transcript):
                if ev.is_final and self.conversation is not None and self.state == "live":
                    self.conversation.final(ev.text)
            elif isinstance(ev, m.Error):
                log.warning("asr: %s", ev.message, extra={**self._log, "code": ev.code})
        runner = self.runner
        action = runner.machine.close_action if runner is not None else None
        if action is not None and self.state == "live":
            # The ASR side ends the call: balance, rate limit, idle timeout, internal error.
            self._end(action.reason or "asr closed", action.code)

    def _dtmf(self, digit: str) -> None:
        if self.conversation is not None and self.state == "live":
            self.conversation.dtmf(digit)
        elif self.state == "authorizing" and len(self._early_digits) < MAX_DIGITS:
            self._early_digits += digit  # pressed while the key is checked: kept for the agent

    def _reply_played(self, reply: Reply) -> None:
        if self.conversation is not None:
            self.conversation.reply_played(reply)

    def _send(self, commands: list[Command]) -> None:
        codec, conn = self.codec, self.conn
        if codec is None or self._gone:
            return
        for command in commands:
            try:
                frames = codec.encode(command)
            except ProviderError as exc:
                log.error("cannot encode %s: %s", type(command).__name__, exc, extra=self._log)
                continue
            for frame in frames:
                conn.send_text(frame)
        conn.flush()

    def _agent_speech_report(self, report: UsageReport) -> None:
        # A report also tops the lease up: its verdict may end the call.
        if self.state != "live":
            return
        if report.revoked:
            self._end(KEY_REVOKED_CODE, KEY_REVOKED_CLOSE)
        elif report.exhausted:
            self._end("insufficient_balance", 4002)

    # --- the end --------------------------------------------------------------------------------

    def _end(self, reason: str, code: int) -> None:
        if self.state == "ending":
            return
        was, self.state = self.state, "ending"
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        if self.conversation is not None:
            self.conversation.close()
        if was == "live":
            self._spawn(self._finish(reason, code))
            return
        if not self._gone:
            self.conn.close(code, reason)
        self._spawn(self._finish_unstarted(reason, code))

    async def _finish_unstarted(self, reason: str, code: int) -> None:
        """A call that never went live (no `start`, no valid key, refused, hung up early) still
        gets its one `call ended` line, like every socket this endpoint accepted, once what it
        reserved is settled: an operator counts calls, and sees why these ones never started."""
        current = asyncio.current_task()
        admitting = [task for task in self._tasks if task is not current]
        if admitting:
            # An admission in flight settles the meters it opens once it sees the call ended.
            await asyncio.wait(admitting)
        if self._principal is not None:
            self._log["tenant_id"] = self._principal.tenant_id
        if self._meters is not None:
            await self._meters.settle()
            self._log["session_id"] = self._meters.session_id  # its usage events carry this id
        self.lifecycle.closed(code, "call ended", reason=reason, started=False)

    async def _finish(self, reason: str, code: int) -> None:
        runner, playback, meters = self.runner, self.playback, self._meters
        conversation = self.conversation
        assert runner is not None and playback is not None and meters is not None
        assert conversation is not None
        await playback.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        assert self.agent_usage is not None
        tts = await self.agent_usage.settle()
        if runner.machine.state == "open" and not self._gone:
            if code == 1001:
                runner.on_drain()
            elif code == 1000:
                runner.end_input()  # finals, then the runner settles and closes 1000
            else:
                runner.end(code, reason)
        try:
            async with asyncio.timeout(FINALS_TIMEOUT_S + 5):
                await meters.asr.settled.wait()
        except TimeoutError:
            log.error("caller-audio meter not settled", extra=self._log)
        asr = meters.asr.final
        self.lifecycle.closed(
            code, "call ended", reason=reason, started=True, turns=conversation.turns,
            barge_ins=conversation.barge_ins, played_ms=int(playback.played_ms),
            sent_ms=int(playback.sent_ms),
            asr_audio_ms=asr.audio_ms if asr else None,
            asr_dropped_ms=asr.dropped_ms if asr else None,
            asr_cost_micros=asr.cost_micros if asr else None,
            tts_characters=tts.units if tts else None,  # its meter counts characters
            tts_cost_micros=tts.cost_micros if tts else None)

    # --- helpers --------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.endpoint.server.spawn(coro)
        return self._track(task)

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """The call's own tasks: cancelled and awaited when it ends."""
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)
        return task

    def _bad_message(self, message: str) -> None:
        # Logged, never answered: a provider may drop a stream that gets unknown events.
        self._bad_messages += 1
        if self._bad_messages <= 3 or self._bad_messages % 100 == 0:
            log.warning("bad provider message (%d so far): %s", self._bad_messages,
                        message[:200], extra=self._log)

