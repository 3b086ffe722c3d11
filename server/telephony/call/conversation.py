"""The turn-taking of a call: caller turns (final transcripts, keypad digits) -> the agent ->
its reply spoken through `Playback`; barge-in; the conversation history the agent is given.

One reply at a time. Caller speech while the reply is still being made or played (audio not
yet acknowledged by a mark echo) interrupts it: the agent is cancelled, the provider's buffer
cleared, and the reply enters the history as what was actually played (`interrupted: true`).
A new turn arriving while a reply is unfinished (keypad digits mid-reply) interrupts it too.

A turn's latency is what the caller waits through: from the end of their speech (their last
voiced audio: the VAD's `endpointing_ms` of silence and the ASR's end of speech -> final are in
it) or the moment their keypad digits were taken, to the agent's first audio sent to the
provider (`streamgate_telephony_turn_latency_seconds`; with tracing on, the span
`telephony.turn` under the call's `telephony.call`, docs/observability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from server.billing.meter import KEY_REVOKED_CLOSE, KEY_REVOKED_CODE
from server.config import TelephonyConfig
from server.sessions.lifecycle import MeteredUsage
from server.telemetry import tracing
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import TRACING, Context, Span
from server.telephony.call.agents import Agent, AgentError, AgentTurn, HistoryEntry
from server.telephony.call.playback import Playback, Reply
from server.telephony.providers.events import CallStarted

log = logging.getLogger("streamgate.telephony")
MAX_REPLY_CHARS = 4000  # one agent reply; beyond it the rest is not spoken (runaway agents)
MAX_DIGITS = 32

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class SpeechEnd(Protocol):
    """The caller-audio ASR session: how long ago, at its newest final, the speech ended."""

    @property
    def last_final_latency_s(self) -> float: ...


class Conversation:
    def __init__(self, *, agent: Agent, playback: Playback, call: CallStarted,
                 cfg: TelephonyConfig, usage: MeteredUsage, spawn: Spawn,
                 end: Callable[[str, int], None], log_extra: dict[str, str],
                 metrics: Metrics | None = None, asr: SpeechEnd | None = None,
                 trace_parent: Context | None = None) -> None:
        self.agent = agent
        # The provider socket's `ws.upgrade` (tracing on): the call's parent when its start
        # event names no trace of its own.
        self._trace_parent = trace_parent
        self.playback = playback
        self.call = call
        self.cfg = cfg
        self.usage = usage  # agent speech (characters)
        self._spawn = spawn
        self._end = end
        self._log = log_extra
        self.history: list[HistoryEntry] = []
        self.turns = 0
        self.barge_ins = 0
        self._digits = ""
        self._dtmf_timer: asyncio.TimerHandle | None = None
        self._agent_task: asyncio.Task[None] | None = None
        self._top_up: asyncio.Task[None] | None = None  # extending the agent-speech lease
        self._closed = False
        self._asr = asr
        self._turn_latency = metrics.telephony_turn_latency.labels(cfg.agent.kind) \
            if metrics is not None else None
        self._span: Span | None = None  # the call's, when tracing is on
        self._turn_span: Span | None = None  # the turn waiting for its first agent audio
        if TRACING.on:
            self._start_span()

    def _start_span(self) -> None:
        """`telephony.call`, current in the task that builds the call (its ASR session and the
        call's tasks start under it). Its parent: a `traceparent` in the start event's custom
        parameters (the provider cannot send headers), else the provider socket's upgrade."""
        carrier = {k: v for k, v in self.call.custom_parameters.items()
                   if k in ("traceparent", "tracestate") and isinstance(v, str)}
        span = self._span = tracing.start_span(
            "telephony.call", parent=tracing.parent_from_headers(carrier) or self._trace_parent,
            attributes={"streamgate.call_id": self.call.call_id,
                        "streamgate.stream_id": self.call.stream_id})
        tracing.activate(span)
        self._log["trace_id"] = tracing.trace_id_of(span)

    # --- from the caller ------------------------------------------------------------------------

    def speech_started(self) -> None:
        if not self._closed and (self._agent_task is not None or self.playback.busy):
            self._barge_in("speech")

    def final(self, text: str) -> None:
        if not self._closed and text.strip():
            # The VAD ends an utterance `endpointing_ms` of silence after the caller's last
            # voiced audio (audio that arrives in real time on a call): that wait is theirs too.
            ago = self.cfg.endpointing_ms / 1000
            if self._asr is not None:
                ago += self._asr.last_final_latency_s
            self._turn(text=text.strip(), speech_ended_s_ago=ago)

    def dtmf(self, digits: str) -> None:
        """Digits collect until `#` or `dtmf_timeout_s` of quiet, then go to the agent."""
        if self._closed:
            return
        self._digits = (self._digits + digits)[:MAX_DIGITS]
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
            self._dtmf_timer = None
        if self._digits.endswith("#") or len(self._digits) >= MAX_DIGITS:
            self._flush_digits()
        elif self._digits:
            self._dtmf_timer = asyncio.get_running_loop().call_later(
                self.cfg.dtmf_timeout_s, self._flush_digits)

    def _flush_digits(self) -> None:
        self._dtmf_timer = None
        digits, self._digits = self._digits, ""
        if digits and not self._closed:
            self._turn(dtmf=digits)

    # --- turns ----------------------------------------------------------------------------------

    def _turn(self, *, text: str | None = None, dtmf: str | None = None,
              speech_ended_s_ago: float = 0.0) -> None:
        if self._agent_task is not None or self.playback.busy:
            self._barge_in("new turn")
        limit = self.cfg.agent.max_history
        turn = AgentTurn(call_id=self.call.call_id, stream_id=self.call.stream_id, text=text,
                         dtmf=dtmf, history=tuple(self.history[-limit:]))
        said = text if text is not None else f"(pressed keys: {dtmf})"
        self.history.append(HistoryEntry("caller", said))
        del self.history[:-2 * limit]  # bounded, whatever the length of the call
        self.turns += 1
        self.playback.start_reply(self.turns)
        reply = self.playback.reply
        loop = asyncio.get_running_loop()
        started = loop.time() - speech_ended_s_ago
        span = None
        if self._span is not None:
            self._end_turn_span("superseded")
            span = self._turn_span = tracing.start_span(
                "telephony.turn", parent=self._span,
                start_ns=time.time_ns() - int(speech_ended_s_ago * 1e9),
                attributes={"streamgate.turn": self.turns,
                            "streamgate.turn_kind": "dtmf" if dtmf else "speech",
                            "streamgate.caller_stopped_to_turn_ms":
                                round(speech_ended_s_ago * 1000)})
        if reply is not None:
            reply.on_first_audio = lambda: self._first_audio(loop.time() - started, span)
        log.info("caller turn", extra={**self._log, "turn": self.turns,
                                       "kind": "dtmf" if dtmf else "speech",
                                       "chars": len(said)})
        self._agent_task = self._spawn(self._respond(turn, span))

    def _first_audio(self, latency_s: float, span: Span | None) -> None:
        """The agent's first audio of the turn went to the provider: the caller's wait ends."""
        if self._turn_latency is not None:
            self._turn_latency.observe(latency_s)
        if span is not None:
            span.set_attribute("streamgate.turn_latency_ms", round(latency_s * 1000))
            span.end()
            if self._turn_span is span:
                self._turn_span = None

    def _end_turn_span(self, outcome: str) -> None:
        """A turn that never reached its first audio (barged in, replaced, call over)."""
        span, self._turn_span = self._turn_span, None
        if span is not None:
            span.set_attribute("streamgate.turn_outcome", outcome)
            span.end()

    async def _respond(self, turn: AgentTurn, span: Span | None = None) -> None:
        if span is not None:
            tracing.activate(span)  # the agent's own calls and lines are the turn's
        pieces = self.agent.respond(turn)
        chars = 0
        try:
            async for piece in pieces:
                chars += len(piece)
                if chars > MAX_REPLY_CHARS:
                    log.warning("agent reply cut at %d characters", MAX_REPLY_CHARS,
                                extra=self._log)
                    break
                self.playback.say(piece)
                if self.usage.exhausted and self._top_up is None:
                    self._top_up = self._spawn(self._extend_lease())
        except AgentError as exc:
            log.warning("agent failed: %s", exc, extra=self._log)
        except Exception:
            log.exception("agent failed", extra=self._log)  # a bug in an agent: the call goes on
        finally:
            await _aclose(pieces)
            if self._agent_task is asyncio.current_task():
                self._agent_task = None
        self.playback.end_reply()

    async def _extend_lease(self) -> None:
        verdict = await self.usage.top_up()
        self._top_up = None
        if verdict == "revoked":
            self._end(KEY_REVOKED_CODE, KEY_REVOKED_CLOSE)
        elif verdict == "refused":
            self._end("insufficient_balance", 4002)

    def _barge_in(self, cause: str) -> None:
        self._cancel_agent()
        self._end_turn_span(f"barge-in: {cause}")
        reply = self.playback.interrupt()
        if reply is None:
            return
        self.barge_ins += 1
        played = reply.played_text(self.playback.ms_per_char)
        if reply.text:
            self.history.append(HistoryEntry("agent", played, interrupted=True))
        log.info("barge-in", extra={**self._log, "cause": cause, "reply": reply.reply_id,
                                    "played_ms": int(reply.played_ms),
                                    "sent_ms": int(reply.sent_ms),
                                    "played_chars": len(played), "reply_chars": len(reply.text)})

    def reply_played(self, reply: Reply) -> None:
        """Every mark of the reply came back: the caller heard all of it."""
        if reply.text:
            self.history.append(HistoryEntry("agent", reply.text))
        log.info("reply played", extra={**self._log, "reply": reply.reply_id,
                                        "played_ms": int(reply.played_ms),
                                        "reply_chars": len(reply.text)})

    def _cancel_agent(self) -> None:
        task, self._agent_task = self._agent_task, None
        if task is not None:
            task.cancel()

    def close(self) -> None:
        """The call is ending: no more turns; the agent's reply is abandoned."""
        self._closed = True
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
            self._dtmf_timer = None
        self._cancel_agent()
        self._end_turn_span("call ended")
        span, self._span = self._span, None
        if span is not None:
            span.set_attributes({"streamgate.turns": self.turns,
                                 "streamgate.barge_ins": self.barge_ins})
            span.end()


async def _aclose(pieces: AsyncIterator[str]) -> None:
    """Close the agent's reply stream now (its HTTP response is released at once) instead of
    leaving it to the garbage collector's finalizer."""
    aclose = getattr(pieces, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
