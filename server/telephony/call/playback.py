"""The agent's voice on a call: reply text -> TTS session machine -> provider media + marks.

Every outbound audio chunk is followed by a mark; the provider echoes a mark once the audio
before it has played. Those echoes are both the playback acknowledgement and the credit: at
most `window` bytes of audio are ever unacknowledged at the provider (flow_control.mark_window),
and each echo returns its chunk's bytes to the machine's credit (a `GrantCredit` command).
So a barge-in `clear` throws away at most one window of audio, and how much of a reply the
caller actually heard is known from the echoes (not from what was sent).

Chunk attribution: the TTS machine synthesizes chunks one after another and emits each chunk's
frames, then its `audio_done`, in order; so the frames going out belong to the oldest chunk
whose `audio_done` has not gone out yet. That lets the played duration be turned back into
text: whole chunks, then a prefix of the chunk being played proportional to its played share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.billing.meter import SessionMeter
from server.flow_control.mark_window import MarkWindow
from server.flow_control.wakeup import Wakeup
from server.models.base import EngineError, Synthesizer
from server.sessions.tts import (
    EngineAudio,
    EngineDone,
    Flush,
    GrantCredit,
    Interrupt,
    SubmitText,
    SynthRequest,
    TtsSession,
)
from server.telemetry import tracing
from server.telemetry.tracing import TRACING
from server.telephony.providers.events import ClearAudio, Command, PlayAudio
from streamgate_protocol import messages as m

log = logging.getLogger("streamgate.telephony")

DEFAULT_MS_PER_CHAR = 70.0  # ~175 words per minute: the estimate before any chunk is measured


@dataclass(slots=True)
class _ChunkPlay:
    text: str
    duration_ms: int | None = None  # known once the chunk's audio_done went out
    sent_ms: float = 0.0
    played_ms: float = 0.0


@dataclass(slots=True)
class Reply:
    reply_id: int
    pieces: list[str] = field(default_factory=list)  # the agent's text as it came
    chunks: dict[int, _ChunkPlay] = field(default_factory=dict)  # by TTS chunk id, in order
    text_done: bool = False  # the agent finished; the TTS machine was flushed
    sent_ms: float = 0.0
    played_ms: float = 0.0
    # Called as its first audio goes to the provider (the turn's latency ends there).
    on_first_audio: Callable[[], None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()

    def played_text(self, ms_per_char: float) -> str:
        """The text the caller heard: whole chunks, then a word-aligned proportional prefix."""
        parts: list[str] = []
        for chunk in self.chunks.values():
            if chunk.played_ms <= 0:
                break
            if chunk.duration_ms is not None and chunk.played_ms + 1 >= chunk.duration_ms:
                parts.append(chunk.text)
                continue
            # Still being synthesized: its length is estimated from the text.
            total = chunk.duration_ms or max(chunk.sent_ms, len(chunk.text) * ms_per_char)
            parts.append(_prefix(chunk.text, chunk.played_ms / max(total, 1.0)))
            break
        return " ".join(p for p in parts if p)


def _prefix(text: str, fraction: float) -> str:
    """The first `fraction` of `text` by characters, cut back to a whole word."""
    cut = int(len(text) * min(1.0, fraction))
    if cut >= len(text):
        return text
    head = text[:cut]
    if cut < len(text) and not text[cut].isspace() and " " in head:
        head = head[: head.rindex(" ")]
    return head.strip()


@dataclass(frozen=True, slots=True)
class _Played:
    """What a mark's echo says was heard."""

    ms: float
    chunk_id: int | None


class Playback:
    def __init__(
        self,
        *,
        machine: TtsSession,
        engine: Synthesizer,
        meter: SessionMeter,
        send: Callable[[list[Command]], None],
        can_write: Callable[[], bool],
        on_played: Callable[[Reply], None],
        log_extra: dict[str, str],
    ) -> None:
        self.machine = machine
        self.engine = engine
        self.meter = meter
        self._send = send
        self._can_write = can_write
        self._on_played = on_played
        self._log = log_extra
        self.window = machine.credit.window
        self._bytes_per_ms = machine.params.bytes_per_ms
        self._queue: deque[SynthRequest] = deque()
        self._current: asyncio.Task[None] | None = None
        self._wake = Wakeup()
        self._room = asyncio.Event()  # the machine wants engine audio again
        self._marks: MarkWindow[_Played] = MarkWindow(self.window)
        self._mark_seq = 0
        self._out_chunks: deque[int] = deque()  # chunk ids whose frames are going out, in order
        self._metered = 0
        self._closed = False
        self._measured_ms = 0  # for the ms-per-character estimate of unfinished chunks
        self._measured_chars = 0
        self.reply: Reply | None = None
        self.played_ms = 0.0
        self.sent_ms = 0.0

    # --- replies --------------------------------------------------------------------------------

    def start_reply(self, reply_id: int) -> None:
        self.reply = Reply(reply_id)

    def say(self, text: str) -> None:
        reply = self.reply
        if reply is None or not text or self._closed:
            return
        reply.pieces.append(text)
        self.machine.handle(SubmitText(text))
        self._after_input()

    def end_reply(self) -> None:
        """The agent is done: speak what is buffered; the reply ends once all of it played."""
        reply = self.reply
        if reply is None or self._closed:
            return
        reply.text_done = True
        self.machine.handle(Flush())
        self._after_input()
        self._check_played()

    @property
    def busy(self) -> bool:
        """Agent audio unacknowledged at the provider, or still being made."""
        return self.reply is not None and (
            bool(self._marks) or bool(self._queue) or self._current is not None
            or not self.machine.idle or self.machine.text_buffered
        )

    @property
    def ms_per_char(self) -> float:
        if self._measured_chars < 20:
            return DEFAULT_MS_PER_CHAR
        return self._measured_ms / self._measured_chars

    def interrupt(self) -> Reply | None:
        """Barge-in: clear the provider's buffer, drop unsent audio and pending synthesis.
        Returns the interrupted reply (its played part is known from the marks echoed)."""
        reply, self.reply = self.reply, None
        if reply is None:
            return None
        if self._marks or self._queue or self._current is not None or not self.machine.idle:
            self._send([ClearAudio()])  # audio at the provider, or on its way there
        # The provider's buffer is empty now; Plivo does not echo checkpoints it discarded,
        # so the whole window is ours again and late echoes of these marks are ignored.
        self._marks.clear()
        self.machine.handle(Interrupt(peer_cleared=True))
        self._queue.clear()
        self._out_chunks.clear()
        if self._current is not None:
            self._current.cancel()
        # Whatever the machine had to say before the interrupt (an error) is still said; its
        # `cleared` is for a WebSocket client and is passed over.
        self.pump()
        self._room.set()
        return reply

    # --- provider side --------------------------------------------------------------------------

    def on_mark(self, name: str) -> None:
        mark = self._marks.acknowledged(name)
        if mark is None:
            return  # a mark of an interrupted reply, or not ours
        nbytes, played = mark
        self.machine.handle(GrantCredit(nbytes))
        self.played_ms += played.ms
        reply = self.reply
        if reply is not None:
            reply.played_ms += played.ms
            chunk = reply.chunks.get(played.chunk_id) if played.chunk_id is not None else None
            if chunk is not None:
                chunk.played_ms += played.ms
        self.pump()
        self._check_played()

    def _check_played(self) -> None:
        reply = self.reply
        if reply is not None and reply.text_done and not self.busy:
            self.reply = None
            self._on_played(reply)

    # --- TTS machine plumbing -------------------------------------------------------------------

    def _after_input(self) -> None:
        reqs = self.machine.take_requests()
        if reqs:
            reply = self.reply
            for req in reqs:
                if reply is not None:
                    reply.chunks[req.chunk_id] = _ChunkPlay(req.text)
                self._out_chunks.append(req.chunk_id)
            self._queue.extend(reqs)
            delta = self.machine.characters - self._metered
            if delta > 0:
                self.meter.accept(delta)
                self._metered += delta
            self._wake.set()
        self.pump()

    def pump(self) -> None:
        """Send the audio that credit and the socket allow, each chunk followed by its mark."""
        if self._closed:
            return
        out = self.machine.poll(can_write=self._can_write())
        if out.cancel_synthesis and self._current is not None:
            self._current.cancel()
        commands: list[Command] = []
        reply = self.reply
        for item in out.messages:
            if isinstance(item, bytes):
                ms = len(item) / self._bytes_per_ms
                cid = self._out_chunks[0] if self._out_chunks else None
                self._mark_seq += 1
                name = f"r{reply.reply_id if reply else 0}-{self._mark_seq}"
                self._marks.sent(name, len(item), _Played(ms, cid))
                commands.append(PlayAudio(item, mark=name))
                self.sent_ms += ms
                if reply is not None:
                    if not reply.sent_ms and reply.on_first_audio is not None:
                        reply.on_first_audio()
                    reply.sent_ms += ms
                    chunk = reply.chunks.get(cid) if cid is not None else None
                    if chunk is not None:
                        chunk.sent_ms += ms
            elif isinstance(item, m.AudioDone):
                while self._out_chunks and self._out_chunks.popleft() != item.chunk_id:
                    pass
                if reply is not None and item.chunk_id in reply.chunks:
                    reply.chunks[item.chunk_id].duration_ms = item.duration_ms
                self._measured_ms += item.duration_ms
                self._measured_chars += len(item.text)
            elif isinstance(item, m.Error):
                log.warning("tts: %s", item.message, extra={**self._log, "code": item.code})
        if commands:
            self._send(commands)
        if out.wants_audio:
            self._room.set()

    async def run(self) -> None:
        """Synthesize queued chunks one at a time, in order, until `close`."""
        while not self._closed:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            req = self._queue.popleft()
            self._current = asyncio.get_running_loop().create_task(self._synthesize(req))
            try:
                await self._current
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled, not just this synthesis (barge-in)
            finally:
                self._current = None
            self.pump()
            self._check_played()

    async def _synthesize(self, req: SynthRequest) -> None:
        machine = self.machine
        params = machine.params
        span = None
        if TRACING.on:  # under the call's span; an upstream engine's call is its child
            span = tracing.start_span("tts.chunk", attributes={
                "streamgate.chunk_id": req.chunk_id, "streamgate.characters": len(req.text)})
            tracing.activate(span)  # this task is the chunk's own
        taken = time.perf_counter()
        first_audio_s = -1.0
        stream = self.engine.synthesize(req.text, voice=params.voice, language=params.language)
        try:
            async for pcm in stream:
                if first_audio_s < 0 and pcm:
                    first_audio_s = time.perf_counter() - taken
                machine.handle(EngineAudio(req, pcm))
                if machine.has_output:
                    self.pump()  # else the piece completed no frame: nothing to send
                while not machine.wants_audio and not self._closed:
                    self._room.clear()  # the provider stopped echoing marks: stop pulling audio
                    await self._room.wait()
        except EngineError as exc:
            log.warning("tts chunk %d failed: %s", req.chunk_id, exc, extra=self._log)
            if span is not None:
                tracing.error(span, str(exc))
        finally:
            await _aclose(stream)
            if span is not None:  # also when cancelled (barge-in: the chunk was cleared)
                span.set_attribute("streamgate.synthesis_ms",
                                   round((time.perf_counter() - taken) * 1000))
                if first_audio_s >= 0:  # no audio at all: no time to it
                    span.set_attribute("streamgate.time_to_first_audio_ms",
                                       round(first_audio_s * 1000))
                span.end()
        # Also after a failure: what was made is played, and the chunk order stays intact.
        machine.handle(EngineDone(req))

    async def close(self) -> None:
        """Stop synthesis (the call ended); nothing more is sent."""
        self._closed = True
        self._wake.set()
        self._room.set()
        current = self._current
        if current is not None:
            current.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await current


async def _aclose(stream: AsyncIterator[bytes]) -> None:
    """Close an async generator now (its process / connection is released at once) instead of
    leaving it to the garbage collector's finalizer task."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
