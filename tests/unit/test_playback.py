"""`Playback` (the agent's voice on a call) on a fake provider and a fake engine, fake clock:
audio paced by mark echoes within the window, barge-in, and the machine's events never lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.billing.meter import PricedMeter
from server.config import TtsSessionConfig
from server.flow_control.mark_window import MarkWindow
from server.sessions.tts import TtsParams, TtsSession
from server.telephony.call.playback import Playback, Reply
from server.telephony.providers.events import ClearAudio, Command, PlayAudio
from streamgate_protocol import messages as m
from tests.unit.virtual_time import run

PCM_10MS = b"\x01\x00" * 160  # the engine's 16 kHz


class FakeEngine:
    """20 ms of audio per character, in 100 ms pieces."""

    name = "fake"
    sample_rate = 16000
    max_chars = 200
    max_tokens: int | None = None

    async def synthesize(self, text: str, *, voice: str | None, language: str
                         ) -> AsyncIterator[bytes]:
        total = 2 * len(text)
        for _ in range(0, total, 10):
            yield PCM_10MS * 10
            await asyncio.sleep(0)


class Provider:
    """The provider's side: what was sent, and the marks it could echo."""

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def send(self, commands: list[Command]) -> None:
        self.commands.extend(commands)

    def marks(self) -> list[str]:
        return [c.mark for c in self.commands if isinstance(c, PlayAudio) and c.mark]

    def audio_bytes(self) -> int:
        return sum(len(c.payload) for c in self.commands if isinstance(c, PlayAudio))


def make(credit_ms: int = 400) -> tuple[Playback, Provider, list[Reply]]:
    tts = TtsSession(
        session_id="c1-tts", resume_token="", params=TtsParams(model="fake", encoding="mulaw",
                                                              sample_rate=8000),
        settings=TtsSessionConfig(chunk_ms=100, credit_ms=credit_ms), models=("fake",),
        engine_rate=16000, max_chars=200, max_tokens=None,
        limits=m.Limits(max_frame_bytes=65536, idle_timeout_s=10.0, usage_interval_s=5.0,
                        max_utterance_ms=0))
    provider = Provider()
    played: list[Reply] = []
    playback = Playback(machine=tts, engine=FakeEngine(),  # type: ignore[arg-type]
                        meter=PricedMeter(0), send=provider.send, can_write=lambda: True,
                        on_played=played.append, log_extra={})
    return playback, provider, played


def test_interrupt_never_drops_an_event_the_machine_had_pending(
        caplog: pytest.LogCaptureFixture) -> None:
    """Regression (issue 12): the interrupt threw away every pending machine event to drop its
    own `cleared`; an error waiting there was lost unlogged."""
    playback, _, _ = make()
    playback.start_reply(1)
    playback.machine.receive_text(b'{"type":"credit","bytes":0}')  # an error now pending
    with caplog.at_level(logging.WARNING, logger="streamgate.telephony"):
        assert playback.interrupt() is not None
    assert [r.getMessage() for r in caplog.records] == ["tts: credit.bytes must be positive"]


def test_a_reply_is_paced_by_mark_echoes_and_ends_once_all_played() -> None:
    async def scenario() -> None:
        playback, provider, played = make(credit_ms=400)
        task = asyncio.get_running_loop().create_task(playback.run())
        playback.start_reply(1)
        playback.say("Hello there, this is a reply long enough for several windows.")
        playback.end_reply()
        acked = 0
        for _ in range(200):
            await asyncio.sleep(0.01)
            sizes = {c.mark: len(c.payload) for c in provider.commands
                     if isinstance(c, PlayAudio)}
            # Never more than the window unacknowledged at the provider.
            assert provider.audio_bytes() - acked == playback._marks.in_flight_bytes \
                <= playback.window
            if played:
                break
            pending = [n for n in provider.marks() if n in playback._marks.names()]
            if pending:
                playback.on_mark(pending[0])
                acked += sizes[pending[0]]
        assert played and played[0].reply_id == 1
        assert playback.played_ms == pytest.approx(playback.sent_ms)
        assert played[0].played_text(playback.ms_per_char) == played[0].text
        await playback.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario())


def test_barge_in_clears_the_provider_refills_the_window_and_ignores_late_marks() -> None:
    async def scenario() -> None:
        playback, provider, played = make(credit_ms=400)
        task = asyncio.get_running_loop().create_task(playback.run())
        playback.start_reply(1)
        playback.say("Hello there, this is a reply long enough for several windows.")
        playback.end_reply()
        await asyncio.sleep(0.05)
        first = provider.marks()[0]
        playback.on_mark(first)  # the caller heard the first frame
        await asyncio.sleep(0.05)
        assert playback.machine.credit.outstanding < playback.window
        reply = playback.interrupt()
        assert reply is not None and 0 < reply.played_ms < reply.sent_ms
        assert isinstance(provider.commands[-1], ClearAudio)
        assert playback.machine.credit.outstanding == playback.window
        played_ms = playback.played_ms
        for name in provider.marks()[1:]:
            playback.on_mark(name)  # late echoes of discarded audio
        assert playback.played_ms == played_ms and not played and not playback.busy
        await playback.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(1, 2000)),
    st.tuples(st.just("ack"), st.integers(0, 40)),
    st.tuples(st.just("clear"), st.just(0)),
), max_size=60))
def test_mark_window_bound_and_order(ops: list[tuple[str, int]]) -> None:
    window: MarkWindow[int] = MarkWindow(4000)
    model: dict[str, int] = {}
    seq = 0
    for op, n in ops:
        if op == "send":
            seq += 1
            if sum(model.values()) + n > 4000:
                with pytest.raises(OverflowError):
                    window.sent(f"m{seq}", n, seq)
                continue
            window.sent(f"m{seq}", n, seq)
            model[f"m{seq}"] = n
        elif op == "ack":
            name = f"m{n}"
            mark = window.acknowledged(name)
            expected = model.pop(name, None)
            assert (mark[0] if mark else None) == expected
        else:
            assert window.clear() == sum(model.values())
            model.clear()
        assert window.in_flight_bytes == sum(model.values()) <= window.capacity
        assert window.names() == list(model)  # oldest first: the order sent
        assert len(window) == len(model)
