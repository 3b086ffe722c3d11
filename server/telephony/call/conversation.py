"""The turn-taking of a call: caller turns (final transcripts, keypad digits) -> the agent ->
its reply spoken through `Playback`; barge-in; the conversation history the agent is given.

One reply at a time. Caller speech while the reply is still being made or played (audio not
yet acknowledged by a mark echo) interrupts it: the agent is cancelled, the provider's buffer
cleared, and the reply enters the history as what was actually played (`interrupted: true`).
A new turn arriving while a reply is unfinished (keypad digits mid-reply) interrupts it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from server.billing.meter import KEY_REVOKED_CLOSE, KEY_REVOKED_CODE
from server.config import TelephonyConfig
from server.sessions.lifecycle import MeteredUsage
from server.telephony.call.agents import Agent, AgentError, AgentTurn, HistoryEntry
from server.telephony.call.playback import Playback, Reply
from server.telephony.providers.events import CallStarted

log = logging.getLogger("streamgate.telephony")
MAX_REPLY_CHARS = 4000  # one agent reply; beyond it the rest is not spoken (runaway agents)
MAX_DIGITS = 32

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Conversation:
    def __init__(self, *, agent: Agent, playback: Playback, call: CallStarted,
                 cfg: TelephonyConfig, usage: MeteredUsage, spawn: Spawn,
                 end: Callable[[str, int], None], log_extra: dict[str, str]) -> None:
        self.agent = agent
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

    # --- from the caller ------------------------------------------------------------------------

    def speech_started(self) -> None:
        if not self._closed and (self._agent_task is not None or self.playback.busy):
            self._barge_in("speech")

    def final(self, text: str) -> None:
        if not self._closed and text.strip():
            self._turn(text=text.strip())

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

    def _turn(self, *, text: str | None = None, dtmf: str | None = None) -> None:
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
        log.info("caller turn", extra={**self._log, "turn": self.turns,
                                       "kind": "dtmf" if dtmf else "speech",
                                       "chars": len(said)})
        self._agent_task = self._spawn(self._respond(turn))

    async def _respond(self, turn: AgentTurn) -> None:
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


async def _aclose(pieces: AsyncIterator[str]) -> None:
    """Close the agent's reply stream now (its HTTP response is released at once) instead of
    leaving it to the garbage collector's finalizer."""
    aclose = getattr(pieces, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
