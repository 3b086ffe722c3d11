"""AsrSessionRunner through a fake wire, a fake clock, a fake engine and a fake meter.

In the spirit of pipecat's `run_test(stage, inputs, expected)`: frames go in as the connection
delivers them (`on_binary`/`on_text` then `on_read_done`), what the wire was asked to send and
do comes out. No sockets and no real sleeps: the loop only runs what is ready
(`asyncio.sleep(0)`), and deadlines move with the fake clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from server.billing.auth import ANONYMOUS, StaticKeyAuthenticator
from server.billing.meter import UsageReport
from server.config import Config, load_config
from server.models.base import EngineError, Hypothesis
from server.sessions.asr import FINALS_TIMEOUT_S, AsrSession, IllegalTransition
from server.sessions.asr_params import AsrParams
from server.sessions.asr_runner import AsrEndpoint, AsrSessionRunner
from server.sessions.wire import Clock, Wire
from server.telemetry.metrics import Metrics
from server.ws.server import WsServer
from streamgate_protocol import messages as m
from tests.speech import espeak_pcm16, silence

FRAME = 640  # 20 ms of 16 kHz PCM16
SPEECH = silence(400) + espeak_pcm16("hello there, how are you") + silence(900)
TWO_UTTERANCES = SPEECH + espeak_pcm16("and a second phrase") + silence(900)


# --- fakes ------------------------------------------------------------------------------------


class FakeWire:
    """A Wire that records: what was sent (decoded for the asserts), the close, reading."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.reading_paused = False
        self.write_paused = False
        self.flushes = 0

    def send_text(self, data: bytes) -> None:
        assert self.closed is None, "sent after the close"
        self.sent.append(data)

    def send_binary(self, data: bytes) -> None:
        raise AssertionError("an ASR session sends no binary frames")

    def flush(self) -> None:
        self.flushes += 1

    def close(self, code: int, reason: str = "") -> None:
        assert self.closed is None, "closed twice"
        self.closed = (code, reason)

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def messages(self) -> list[m.AsrServerMessage]:
        return [m.asr_server_decoder.decode(d) for d in self.sent]


class FakeTimer:
    def __init__(self, clock: FakeClock, when: float, callback: Callable[[], object]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False
        clock.timers.append(self)

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object], /) -> FakeTimer:
        return FakeTimer(self, when, callback)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.timers if t.when <= self.now and not t.cancelled]
        self.timers = [t for t in self.timers if t not in due and not t.cancelled]
        for timer in due:
            timer.callback()


@dataclass
class FakeStream:
    engine: FakeEngine
    utterance_id: int
    heard: int = 0

    async def feed(self, pcm: bytes) -> Hypothesis | None:
        if self.engine.feed_gate is not None:
            await self.engine.feed_gate.acquire()
        if self.engine.fail:
            raise EngineError("boom")
        self.heard += len(pcm)
        self.engine.fed_bytes += len(pcm)
        return Hypothesis(f"heard {self.heard}")

    async def finish(self) -> Hypothesis:
        if self.engine.finish_gate is not None:
            await self.engine.finish_gate.wait()
        return Hypothesis(f"final {self.heard}")

    async def aclose(self) -> None:
        self.engine.closed_streams += 1


@dataclass
class FakeEngine:
    name: str = "fake"
    sample_rate: int = 16000
    supports_interim: bool = True
    fail: bool = False
    feed_gate: asyncio.Semaphore | None = None  # each feed takes one permit
    finish_gate: asyncio.Event | None = None  # finals wait for it
    fed_bytes: int = 0
    closed_streams: int = 0

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def open_stream(self, *, language: str, session_id: str, utterance_id: int) -> FakeStream:
        return FakeStream(self, utterance_id)


@dataclass
class FakeMeter:
    lease_ms: int | None = None  # exhausted once more than this was accepted
    top_up_answer: asyncio.Future[bool] | None = None
    accepted: int = 0
    dropped: int = 0
    top_ups: int = 0
    settled: bool = False

    def accept(self, audio_ms: int) -> None:
        self.accepted += audio_ms

    def drop(self, audio_ms: int) -> None:
        self.dropped += audio_ms

    @property
    def exhausted(self) -> bool:
        return self.lease_ms is not None and self.accepted > self.lease_ms

    async def top_up(self) -> bool:
        self.top_ups += 1
        assert self.top_up_answer is not None
        extended = await self.top_up_answer
        if extended:
            self.lease_ms = None
        return extended

    async def report(self) -> UsageReport:
        return UsageReport(self.accepted, self.accepted, self.dropped, 0, None)

    async def settle(self) -> UsageReport:
        self.settled = True
        return UsageReport(self.accepted, self.accepted, self.dropped, 7, None)


class NoMeters:
    async def open(self, **kwargs: Any) -> FakeMeter:
        raise AssertionError("the runner is built by hand here")


# --- harness ------------------------------------------------------------------------------------


@dataclass
class Session:
    runner: AsrSessionRunner
    wire: FakeWire
    clock: FakeClock
    engine: FakeEngine
    meter: FakeMeter
    server: WsServer
    ran: list[Any] = field(default_factory=list)

    async def feed(self, frames: Iterable[bytes | str], *, respect_pause: bool = False) -> int:
        """Deliver frames one read each, letting the loop run between reads (the engine answers
        meanwhile); with respect_pause stop while reading is paused, as a socket would.
        Returns how many were delivered."""
        n = 0
        for frame in frames:
            if respect_pause and self.wire.reading_paused:
                break
            if isinstance(frame, str):
                self.runner.on_text(frame.encode())
            else:
                self.runner.on_binary(frame)
            self.runner.on_read_done()
            n += 1
            await settle_loop(3)
        return n

    async def ended(self) -> None:
        """Wait for the session task (and any top-up) to finish: no leaked task."""
        await settle_loop()
        tasks = list(self.server.tasks)
        assert all(t.done() for t in tasks), "session still running"

    def types(self) -> list[str]:
        """Message types sent, credit aside; transcripts as Interim / Final, and a run of
        interims as one (how many depends on how the engine's calls fell)."""
        names: list[str] = []
        for e in self.wire.messages():
            if isinstance(e, m.Credit):
                continue
            name = type(e).__name__
            if isinstance(e, m.Transcript):
                name = "Final" if e.is_final else "Interim"
            if not (name == "Interim" and names and names[-1] == "Interim"):
                names.append(name)
        return names


async def settle_loop(rounds: int = 200) -> None:
    """Let every ready callback and task run (no time passes: nothing real sleeps)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def config(**session: Any) -> Config:
    return load_config(environ={}, overrides={
        "auth": {"allow_anonymous": True},
        "billing": {"enabled": False},
        "asr": {"session": {"usage_interval_s": 3600.0, **session}},
    })


async def open_session(*, engine: FakeEngine | None = None, meter: FakeMeter | None = None,
                       params: dict[str, Any] | None = None, **session: Any) -> Session:
    """A started session whose stage task waits for input, as after the upgrade."""
    cfg = config(**session)
    engine = engine or FakeEngine()
    meter = meter or FakeMeter()
    metrics = Metrics()
    server = WsServer(cfg.server, metrics, StaticKeyAuthenticator(cfg.auth.key_sha256,
                                                                  allow_anonymous=True))
    server._loop = asyncio.get_running_loop()  # spawn() without listening
    endpoint = AsrEndpoint(config=cfg, engines={"fake": engine}, meters=NoMeters(),
                           server=server, metrics=metrics)
    machine = AsrSession(
        session_id="s1", resume_token="tok",
        params=AsrParams(model="fake", **(params or {})), settings=cfg.asr.session,
        models=frozenset({"fake"}), engine_rate=engine.sample_rate,
        engine_interim=True, max_frame_bytes=cfg.server.max_frame_bytes,
        idle_timeout_s=cfg.server.idle_timeout_s,
    )
    wire, clock = FakeWire(), FakeClock()
    runner = AsrSessionRunner(endpoint, wire, machine, engine, meter, ANONYMOUS, clock=clock)
    runner.start()
    await settle_loop()
    return Session(runner, wire, clock, engine, meter, server)


def frames(pcm: bytes) -> list[bytes]:
    return [pcm[i:i + FRAME] for i in range(0, len(pcm), FRAME)]


async def run_test(inputs: Iterable[bytes | str], expected: list[str],
                   close: tuple[int, str], **kwargs: Any) -> Session:
    """Frames in, then the session's messages (credit aside) and close must be `expected`."""
    s = await open_session(**kwargs)
    await s.feed(inputs)
    await s.ended()
    assert s.types() == expected
    assert s.wire.closed == close
    return s


# --- tests ------------------------------------------------------------------------------------


def test_fakes_satisfy_the_ports() -> None:
    wire: Wire = FakeWire()
    clock: Clock = FakeClock()
    assert wire and clock


async def test_speech_then_close_gives_finals_summary_and_1000() -> None:
    s = await run_test(
        [*frames(SPEECH), '{"type":"close"}'],
        ["Ready", "SpeechStarted", "Interim", "Final", "UtteranceEnd", "Summary"],
        (1000, ""), params={"interim_results": True},
    )
    msgs = s.wire.messages()
    final = next(e for e in msgs if isinstance(e, m.Transcript) and e.is_final)
    assert final.text == f"final {s.engine.fed_bytes}"
    summary = msgs[-1]
    assert isinstance(summary, m.Summary) and summary.cost_micros == 7
    assert s.meter.accepted == len(SPEECH) // 32 and s.meter.settled
    assert any(isinstance(e, m.Credit) for e in msgs)


async def test_bad_text_is_an_error_and_the_session_goes_on() -> None:
    await run_test(["{oops", '{"type":"keepalive"}', '{"type":"close"}'],
                   ["Ready", "Error", "Summary"], (1000, ""))


async def test_finals_are_awaited_until_the_deadline_on_the_clock(
        caplog: pytest.LogCaptureFixture) -> None:
    s = await open_session(engine=FakeEngine(finish_gate=asyncio.Event()))
    await s.feed([*frames(SPEECH), '{"type":"close"}'])
    await settle_loop()
    assert s.wire.closed is None  # the final is owed: the session waits for it
    s.clock.advance(FINALS_TIMEOUT_S - 0.5)
    await settle_loop()
    assert s.wire.closed is None
    with caplog.at_level(logging.WARNING, "streamgate.asr"):
        s.clock.advance(1.0)
        await s.ended()
    assert s.wire.closed == (1000, "")
    assert s.types() == ["Ready", "SpeechStarted", "Interim", "Summary"]
    assert "finals abandoned" in caplog.text
    assert s.engine.closed_streams == 1  # the hung utterance's stream was closed


async def test_slow_reader_gets_the_newest_interim_and_every_final() -> None:
    gate = asyncio.Semaphore(0)
    s = await open_session(engine=FakeEngine(feed_gate=gate), params={"interim_results": True})
    speech = frames(SPEECH)
    middle = len(speech) // 2  # the utterance is still open here
    await s.feed(speech[:middle])
    sent_before = len(s.wire.sent)
    s.wire.write_paused = True  # the client stops reading
    for _ in range(3):  # three engine calls, three interims of the same utterance
        gate.release()
        await settle_loop()
    assert len(s.wire.sent) == sent_before  # everything waits in the outbox
    s.wire.write_paused = False
    s.runner.on_writable()
    await settle_loop()
    after = [e for e in s.wire.messages()[sent_before:] if not isinstance(e, m.Credit)]
    assert len(after) == 1  # the newest interim alone
    assert isinstance(after[0], m.Transcript) and not after[0].is_final
    assert after[0].text == f"heard {s.engine.fed_bytes}"
    for _ in range(100):
        gate.release()
    await s.feed([*speech[middle:], '{"type":"close"}'])
    await s.ended()
    assert s.wire.closed == (1000, "")
    assert s.types()[-3:] == ["Final", "UtteranceEnd", "Summary"]


async def test_client_that_stops_reading_is_closed_1008_after_the_error() -> None:
    gate = asyncio.Semaphore(0)
    s = await open_session(engine=FakeEngine(feed_gate=gate), max_outbound_messages=3)
    await s.feed(frames(TWO_UTTERANCES))
    await settle_loop()
    s.wire.write_paused = True
    for _ in range(40):
        gate.release()
    await s.ended()
    assert s.wire.closed == (1008, "client_not_reading")
    last = s.wire.messages()[-1]
    assert isinstance(last, m.Error) and last.code == "client_not_reading"
    assert s.meter.settled


async def test_engine_backlog_pauses_reading_until_the_engine_catches_up() -> None:
    gate = asyncio.Semaphore(0)
    s = await open_session(engine=FakeEngine(feed_gate=gate), invoke_queue_ms=200,
                     ingest_queue_ms=200)
    audio = frames(silence(400) + espeak_pcm16("a long sentence for a slow engine to hear "
                                               "while the client keeps sending") * 2)
    delivered = await s.feed(audio, respect_pause=True)
    await settle_loop()
    assert s.wire.reading_paused and delivered < len(audio)
    accepted = s.meter.accepted
    for _ in range(200):
        gate.release()
    await settle_loop()
    assert not s.wire.reading_paused  # the engine drained its queue: reading goes on
    await s.feed(audio[delivered:])
    await s.feed(['{"type":"close"}'])
    for _ in range(200):
        gate.release()
    await s.ended()
    assert s.meter.accepted > accepted and s.wire.closed == (1000, "")


async def test_a_stuck_engine_does_not_hold_the_close() -> None:
    s = await open_session(engine=FakeEngine(feed_gate=asyncio.Semaphore(0)),
                           invoke_queue_ms=200, ingest_queue_ms=200)
    await s.feed(frames(TWO_UTTERANCES), respect_pause=True)
    assert s.wire.reading_paused  # the stage waits for engine room that never comes
    s.runner.on_idle()
    await s.ended()
    assert s.wire.closed == (4008, "idle_timeout") and s.types()[-1] == "Error"


async def test_exhausted_lease_holds_the_audio_until_the_top_up_answers() -> None:
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    s = await open_session(meter=FakeMeter(lease_ms=200, top_up_answer=answer))
    await s.feed(frames(silence(400)), respect_pause=True)
    assert s.meter.top_ups == 1 and s.wire.reading_paused
    held = s.meter.accepted
    assert 200 < held < 400
    await s.feed(frames(silence(100)))  # read before the pause took effect: queued only
    assert s.meter.accepted == held
    answer.set_result(True)
    await settle_loop()
    assert not s.wire.reading_paused and s.meter.accepted == held + 100
    await s.feed(['{"type":"close"}'])
    await s.ended()
    assert s.wire.closed == (1000, "")


async def test_refused_top_up_closes_4002_after_the_error() -> None:
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    answer.set_result(False)
    s = await open_session(meter=FakeMeter(lease_ms=100, top_up_answer=answer))
    await s.feed(frames(silence(300)))
    await s.ended()
    assert s.wire.closed == (4002, "insufficient_balance")
    assert s.types()[-1] == "Error"


async def test_drain_delivers_finals_then_closes_1001() -> None:
    s = await open_session()
    await s.feed(frames(silence(400) + espeak_pcm16("still talking when the server drains")))
    s.runner.on_drain()
    await s.ended()
    assert s.wire.closed == (1001, "draining")
    assert s.types()[-4:] == ["Final", "UtteranceEnd", "Summary", "Error"]


async def test_idle_session_closes_4008() -> None:
    s = await open_session()
    s.runner.on_idle()
    await s.ended()
    assert s.wire.closed == (4008, "idle_timeout")
    assert s.types() == ["Ready", "Error"]


async def test_engine_error_is_reported_and_the_session_goes_on() -> None:
    # The engine lost the utterance while it was open: no utterance_end for it.
    s = await run_test([*frames(SPEECH), '{"type":"close"}'],
                       ["Ready", "SpeechStarted", "Error", "Summary"], (1000, ""),
                       engine=FakeEngine(fail=True))
    error = next(e for e in s.wire.messages() if isinstance(e, m.Error))
    assert error.code == "engine_error" and error.retryable
    assert s.engine.closed_streams == 1


async def test_vanished_client_settles_and_sends_nothing_more() -> None:
    s = await open_session(engine=FakeEngine(finish_gate=asyncio.Event()))
    await s.feed(frames(SPEECH))
    await settle_loop()
    sent = len(s.wire.sent)
    s.runner.on_connection_closed(1006)
    await s.ended()
    assert s.wire.closed is None and len(s.wire.sent) == sent and s.meter.settled


async def test_composite_session_ends_the_session_with_its_code() -> None:
    s = await open_session()
    await s.feed(frames(silence(200)))
    s.runner.end(4001, "key_revoked")
    await s.ended()
    assert s.wire.closed == (4001, "key_revoked")


def test_settled_without_a_settle_is_an_illegal_transition() -> None:
    cfg = config()
    machine = AsrSession(
        session_id="s", resume_token="", params=AsrParams(model="fake"),
        settings=cfg.asr.session, models=frozenset({"fake"}), engine_rate=16000,
        engine_interim=True, max_frame_bytes=65536, idle_timeout_s=10.0)
    with pytest.raises(IllegalTransition):
        machine.settled(UsageReport(0, 0, 0, 0, None))


async def test_a_composite_session_ends_a_client_that_does_not_read() -> None:
    """A call (or a dialect) ends the session while the peer takes nothing of what we write:
    the close goes out anyway (it used to wait for the socket to drain, for ever)."""
    s = await open_session()
    await s.feed(frames(silence(200)))
    s.wire.write_paused = True  # the peer stopped reading
    await s.feed(frames(silence(200)))
    s.runner.end(4002, "insufficient_balance")
    await s.ended()
    assert s.wire.closed == (4002, "insufficient_balance")
