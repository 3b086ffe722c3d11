"""The TTS session machine and its runner without sockets (issue 12): typed commands in, one
output per poll; state moves only along the transition table; the runner on a fake wire with a
fake clock (no real sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.datastructures import Headers

from server.billing.auth import ANONYMOUS
from server.billing.meter import PricedMeterFactory, UsageReport
from server.config import TtsSessionConfig, load_config
from server.flow_control.audio_backlog import SLACK_MS, AudioBacklogBound
from server.flow_control.credit import CreditWindow
from server.models.base import Synthesizer
from server.sessions.asr_params import BadParams
from server.sessions.tts import (
    TRANSITIONS,
    Command,
    Drain,
    EndInput,
    EngineAudio,
    EngineDone,
    EngineFailed,
    Flush,
    GrantCredit,
    IdleTimeout,
    IllegalTransition,
    Interrupt,
    Start,
    SubmitText,
    TtsParams,
    TtsSession,
    Usage,
    transition,
    tts_params,
)
from server.sessions.tts_runner import TtsEndpoint, TtsSessionRunner
from server.sessions.upgrade import Admitted, SessionSocket, UpgradeRequest
from server.telemetry.metrics import Metrics
from streamgate_protocol import messages as m
from tests.unit.session_fakes import FakeSessionHost, RecordingWire
from tests.unit.virtual_time import run

LIMITS = m.Limits(max_frame_bytes=65536, idle_timeout_s=10.0, usage_interval_s=5.0,
                  max_utterance_ms=0)
PCM_10MS = b"\x01\x00" * 160  # 10 ms at the engine's 16 kHz


def machine(**settings: Any) -> TtsSession:
    s = TtsSession(session_id="s1", resume_token="tok", params=TtsParams(model="fake"),
                   settings=TtsSessionConfig(**settings), models=("fake",), engine_rate=16000,
                   max_chars=100, max_tokens=None, limits=LIMITS)
    s.handle(Start())
    s.poll()
    return s


def run_test(s: TtsSession, inputs: Sequence[Command], *, can_write: bool = True
             ) -> list[m.TtsServerMessage | bytes]:
    """Feed commands, polling after each (as a runner does); everything that went out."""
    out: list[m.TtsServerMessage | bytes] = []
    for cmd in inputs:
        s.handle(cmd)
        out += s.poll(can_write=can_write).messages
    return out


def events(out: Sequence[m.TtsServerMessage | bytes]) -> list[str]:
    return [type(o).__name__ if not isinstance(o, bytes) else "audio" for o in out]


# --- the transition table -----------------------------------------------------------------------


def test_transition_table_allows_only_forward_moves() -> None:
    for state, allowed in TRANSITIONS.items():
        for to in ("open", "closing", "closed"):
            if to in allowed:
                assert transition(state, to) == to
            else:
                with pytest.raises(IllegalTransition):
                    transition(state, to)


def test_state_cannot_be_assigned_from_outside() -> None:
    s = machine()
    with pytest.raises(AttributeError):
        s.state = "closing"  # type: ignore[misc]


# --- commands -----------------------------------------------------------------------------------


def test_end_input_speaks_buffered_text_then_closes_after_the_audio() -> None:
    s = machine()
    run_test(s, [SubmitText("Hello there"), EndInput()])
    assert s.state == "closing"
    req = s.next_request()
    assert req is not None and req.text == "Hello there"
    out = run_test(s, [EngineAudio(req, PCM_10MS * 10), EngineDone(req)])
    assert events(out)[-1] == "AudioDone" and "audio" in events(out)
    assert s.idle
    # Text after the end of input is not spoken.
    run_test(s, [SubmitText("More.")])
    assert s.next_request() is None


def test_drain_closes_without_speaking_text_that_has_no_sentence_end() -> None:
    s = machine()
    run_test(s, [SubmitText("Done. Not finished"), Drain()])
    assert s.state == "closing"
    req = s.next_request()
    assert req is not None and req.text == "Done."
    assert s.next_request() is None


def test_idle_timeout_ends_only_a_session_with_nothing_left_to_do() -> None:
    s = machine()
    run_test(s, [SubmitText("Hello there."), Flush()])
    assert run_test(s, [IdleTimeout(10.0)]) == [] and s.state == "open"
    s2 = machine()
    out = run_test(s2, [IdleTimeout(10.0)])
    assert [(e.code, e.message) for e in out if isinstance(e, m.Error)] == [
        ("idle_timeout", "no text or keepalive for 10 s")]
    assert s2.state == "closed" and s2.poll().close is not None
    assert s2.poll().close.code == 4008  # type: ignore[union-attr]


def test_audio_leaves_only_within_the_credit_and_a_grant_releases_the_rest() -> None:
    s = machine(credit_ms=100, chunk_ms=20)  # 3200 bytes of credit, 640-byte frames
    run_test(s, [SubmitText("Hello there."), Flush()])
    req = s.next_request()
    assert req is not None
    out = run_test(s, [EngineAudio(req, PCM_10MS * 20), EngineDone(req)])  # 200 ms
    sent = sum(len(o) for o in out if isinstance(o, bytes))
    assert sent == 3200 and s.awaiting_credit and "AudioDone" not in events(out)
    out = run_test(s, [GrantCredit(3200)])
    assert sum(len(o) for o in out if isinstance(o, bytes)) == 3200
    assert events(out)[-2:] == ["AudioDone", "Flushed"] and not s.awaiting_credit


def test_a_bad_grant_is_an_error_and_the_credit_is_unchanged() -> None:
    s = machine()
    before = s.credit.outstanding
    out = run_test(s, [GrantCredit(0)])
    assert [e.code for e in out if isinstance(e, m.Error)] == ["bad_message"]
    assert s.credit.outstanding == before and s.state == "open"


def test_interrupt_asks_once_to_cancel_the_synthesis_and_drops_older_audio() -> None:
    s = machine()
    run_test(s, [SubmitText("Hello there. General Kenobi."), Flush()])
    req = s.next_request()
    assert req is not None
    s.handle(Interrupt())
    first = s.poll()
    assert first.cancel_synthesis and events(first.messages) == ["Cleared"]
    assert not s.poll().cancel_synthesis
    # Audio of the interrupted generation is not sent, nor charged.
    assert run_test(s, [EngineAudio(req, PCM_10MS), EngineDone(req)]) == []
    assert s.characters_synthesized == 0 and s.idle


def test_interrupt_of_a_cleared_peer_refills_the_credit_window() -> None:
    s = machine(credit_ms=100, chunk_ms=20)
    run_test(s, [SubmitText("Hello there."), Flush()])
    req = s.next_request()
    assert req is not None
    run_test(s, [EngineAudio(req, PCM_10MS * 20)])
    assert s.credit.outstanding < s.credit.window
    run_test(s, [Interrupt()])  # a WebSocket client keeps what it holds: no refill
    assert s.credit.outstanding < s.credit.window
    run_test(s, [Interrupt(peer_cleared=True)])
    assert s.credit.outstanding == s.credit.window


def test_an_engine_failure_is_reported_and_a_flush_still_answered() -> None:
    s = machine()
    run_test(s, [SubmitText("Hello there."), Flush()])
    req = s.next_request()
    assert req is not None
    out = run_test(s, [EngineFailed(req, "voice not found", False)])
    assert events(out) == ["Error", "Flushed"]
    assert isinstance(out[0], m.Error) and out[0].code == "engine_error"


def test_usage_of_an_exhausted_wallet_closes_4002() -> None:
    s = machine()
    report = UsageReport(audio_ms=0, billed_ms=0, dropped_ms=0, cost_micros=5,
                         balance_micros=0, exhausted=True)
    out = run_test(s, [Usage(report)])
    assert events(out) == ["TtsUsage", "Error"]
    close = s.poll().close
    assert close is not None and close.code == 4002 and s.state == "closed"


def test_reading_pauses_at_capacity_and_resumes_at_half() -> None:
    s = machine(max_pending_chars=100)
    s.handle(SubmitText("Word. " * 20))
    assert s.poll().reading == "pause"
    assert s.poll().reading is None  # said once
    while s.pending_chars > 50:
        s.next_request()
    assert s.poll().reading == "resume"


def test_query_errors_are_bad_params_as_for_asr() -> None:
    with pytest.raises(BadParams):
        tts_params({"sample_rate": "x"}, default_model="fake", models=("fake",))
    with pytest.raises(BadParams):
        tts_params({"model": "nope"}, default_model="fake", models=("fake",))


def test_client_frames_are_decoded_at_the_edge_into_the_same_commands() -> None:
    s = machine()
    s.receive_text(b'{"type":"text","text":"Hello there."}')
    s.receive_text(b'{"type":"credit","bytes":10}')
    s.receive_text(b'{"type":"close"}')
    assert s.pending_chars == len("Hello there.") and s.state == "closing"
    s.receive_text(b"{nope")
    assert [e.code for e in s.poll().messages if isinstance(e, m.Error)] == ["bad_message"]


# --- properties ---------------------------------------------------------------------------------

_ops = st.lists(st.one_of(
    st.tuples(st.just("text"), st.sampled_from(["Hi there.", "Go on", "Yes. No. ", "x"])),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("audio"), st.integers(1, 30)),
    st.tuples(st.just("done"), st.just(0)),
    st.tuples(st.just("credit"), st.integers(1, 5000)),
    st.tuples(st.just("interrupt"), st.booleans()),
    st.tuples(st.just("pull"), st.just(0)),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_credit_bounds_audio_and_every_chunk_keeps_its_order(ops: list[tuple[str, Any]]) -> None:
    """Audio sent never exceeds the credit granted; a chunk's frames come before its
    `audio_done`, chunks in order; `flushed`/`audio_done` are never dropped (only an interrupt
    drops what is queued); errors always come out."""
    s = machine(credit_ms=100, chunk_ms=20)
    granted = s.credit.window
    sent = 0
    current = None
    done_ids: list[int] = []
    finished: list[int] = []
    flushed_expected = 0
    out: list[m.TtsServerMessage | bytes] = []
    for op, arg in ops:
        if op == "text":
            s.handle(SubmitText(arg))
        elif op == "flush":
            s.handle(Flush())
        elif op == "pull" and current is None:
            current = s.next_request()
        elif op == "audio" and current is not None:
            s.handle(EngineAudio(current, PCM_10MS * arg))
        elif op == "done" and current is not None:
            s.handle(EngineDone(current))
            finished.append(current.chunk_id)
            current = None
        elif op == "credit":
            s.handle(GrantCredit(arg))
            granted += arg
        elif op == "interrupt":
            s.handle(Interrupt(peer_cleared=arg))
            current = None
            finished.clear()
            if arg:
                granted = sent + s.credit.window
        step = s.poll().messages
        for item in step:
            if isinstance(item, bytes):
                sent += len(item)
            elif isinstance(item, m.AudioDone):
                done_ids.append(item.chunk_id)
                assert item.chunk_id in finished
            elif isinstance(item, m.Cleared):
                flushed_expected = 0
            elif isinstance(item, m.Flushed):
                flushed_expected += 1
        out += step
        assert sent <= granted
        assert s.credit.outstanding == granted - sent >= 0
    assert done_ids == sorted(done_ids)
    # With enough credit everything still queued comes out, audio_done last.
    s.handle(GrantCredit(10**9))
    rest = s.poll().messages
    if finished and any(isinstance(o, m.AudioDone) for o in rest):
        assert isinstance([o for o in rest if not isinstance(o, m.Flushed)][-1], m.AudioDone)
    assert s.backlog_bytes == len(s._partial)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10_000), st.lists(st.one_of(
    st.tuples(st.just("grant"), st.integers(1, 10_000)),
    st.tuples(st.just("send"), st.integers(0, 10_000)),
    st.tuples(st.just("refill"), st.just(0)),
), max_size=50))
def test_credit_window_sending_side(window: int, ops: list[tuple[str, int]]) -> None:
    credit = CreditWindow(window)
    holds = window
    for op, n in ops:
        if op == "grant":
            credit.grant(n)
            holds += n
        elif op == "send":
            if credit.covers(n):
                credit.spend(n)
                holds -= n
            else:
                assert n > holds
        else:
            credit.refill()
            holds = window
        assert credit.outstanding == holds >= 0
    with pytest.raises(ValueError):
        credit.grant(0)


def test_audio_backlog_bound_is_the_window_plus_the_slack() -> None:
    bound = AudioBacklogBound.for_window(3200, 32.0)
    assert bound.limit == 3200 + 32 * SLACK_MS
    assert not bound.full(bound.limit) and bound.full(bound.limit + 1)


# --- the runner on a fake wire, fake clock ------------------------------------------------------


class StallingEngine:
    """Synthesizer fake: 100 ms of audio per chunk, then (if `stall`) waits for ever."""

    name = "fake"
    sample_rate = 16000
    max_chars = 200
    max_tokens: int | None = None

    def __init__(self, stall: bool = False) -> None:
        self.stall = stall
        self.cancelled = 0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def synthesize(self, text: str, *, voice: str | None, language: str
                         ) -> AsyncIterator[bytes]:
        yield PCM_10MS * 10
        if self.stall:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise


async def open_runner(
        engine: StallingEngine) -> tuple[TtsSessionRunner, RecordingWire, FakeSessionHost]:
    config = load_config(environ={}, overrides={"billing": {"enabled": False}})
    server = FakeSessionHost()
    endpoint = TtsEndpoint(config=config, engines={"fake": cast(Synthesizer, engine)},
                           meters=PricedMeterFactory({}), server=server,
                           metrics=Metrics())
    decision = await endpoint.admit(
        UpgradeRequest(path="/v1/tts/stream", query={"model": "fake"}, api_key=None,
                       headers=Headers()), ANONYMOUS)
    assert isinstance(decision, Admitted)
    wire = RecordingWire(m.tts_server_decoder.decode)
    runner = decision.start(cast(SessionSocket, wire))
    assert isinstance(runner, TtsSessionRunner)
    return runner, wire, server


def types(wire: RecordingWire) -> list[str]:
    return [type(e).__name__ for e in wire.events]


def test_runner_clear_cancels_the_synthesis_in_flight() -> None:
    async def scenario() -> None:
        engine = StallingEngine(stall=True)
        runner, wire, server = await open_runner(engine)
        runner.on_text(b'{"type":"text","text":"Hello there."}')
        runner.on_text(b'{"type":"flush"}')
        await asyncio.sleep(0.01)
        assert wire.audio_bytes > 0 and runner._current is not None
        runner.on_text(b'{"type":"clear"}')
        await asyncio.sleep(0.01)
        assert engine.cancelled == 1 and "Cleared" in types(wire)
        runner.on_text(b'{"type":"close"}')
        await asyncio.gather(*server.tasks)
        assert wire.close_code == 1000 and types(wire)[-1] == "TtsSummary"

    run(scenario())


def test_runner_drain_finishes_the_audio_then_closes_1001() -> None:
    async def scenario() -> None:
        runner, wire, server = await open_runner(StallingEngine())
        runner.on_text(b'{"type":"text","text":"Hello there. Unfinished"}')
        runner.on_drain()
        await asyncio.gather(*server.tasks)
        assert wire.close_code == 1001
        assert types(wire)[-2:] == ["TtsSummary", "Error"]
        assert [e.text for e in wire.events if isinstance(e, m.AudioDone)] == ["Hello there."]

    run(scenario())


def test_runner_idle_timeout_waits_for_the_audio_to_play_out() -> None:
    async def scenario() -> None:
        runner, wire, server = await open_runner(StallingEngine(stall=True))
        runner.on_text(b'{"type":"text","text":"Hello there."}')
        runner.on_text(b'{"type":"flush"}')
        await asyncio.sleep(0.01)
        runner.on_idle()  # synthesis in flight: not idle
        assert wire.close_code is None
        runner.on_text(b'{"type":"clear"}')
        await asyncio.sleep(0.01)
        runner.on_idle()
        await asyncio.gather(*server.tasks)
        assert wire.close_code == 4008
        assert [e.code for e in wire.events if isinstance(e, m.Error)] == ["idle_timeout"]

    run(scenario())


def test_runner_usage_reports_on_the_fake_clock() -> None:
    async def scenario() -> None:
        runner, wire, server = await open_runner(StallingEngine())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(30.0)  # virtual: several usage intervals, no wall time
        assert loop.time() - t0 == 30.0
        assert types(wire).count("TtsUsage") >= 5
        runner.on_text(b'{"type":"close"}')
        await asyncio.gather(*server.tasks)
        assert wire.close_code == 1000

    run(scenario())


# --- usage in its unit --------------------------------------------------------------------------


def test_a_meter_reports_usage_in_its_own_unit() -> None:
    async def scenario() -> tuple[UsageReport, UsageReport]:
        factory = PricedMeterFactory({("fake", "characters"): (1000, 1000)})
        tts = await factory.open(session_id="s", principal=ANONYMOUS, model="fake",
                                 unit="characters")
        asr = await factory.open(session_id="a", principal=ANONYMOUS, model="fake")
        tts.accept(42)
        asr.accept(20)
        return await tts.settle(), await asr.settle()

    tts, asr = run(scenario())
    assert (tts.unit, tts.units, tts.characters, tts.cost_micros) == ("characters", 42, 42, 42)
    assert (asr.unit, asr.units, asr.audio_ms) == ("audio_ms", 20, 20)
    with pytest.raises(ValueError):
        asr.characters  # noqa: B018


def test_tts_sessions_publish_their_queues_to_the_metrics() -> None:
    """What waits in a TTS session shows on /metrics like the ASR stages do: text not yet
    synthesized, audio not yet sent (queue_depth_ms{stage="tts_out"}), credit not yet filled;
    all back to zero once the session ended."""
    async def scenario() -> None:
        engine = StallingEngine(stall=True)
        runner, _, server = await open_runner(engine)
        metrics = runner.endpoint.metrics
        runner.on_text(b'{"type":"text","text":"One sentence here. ' + b"And more text. " * 20
                       + b'"}')
        runner.on_text(b'{"type":"flush"}')
        await asyncio.sleep(0.01)
        metrics.before_scrape()
        assert metrics.tts_pending_chars._value.get() > 0
        assert metrics.tts_playback_credit._value.get() >= 0
        runner.on_text(b'{"type":"close"}')
        runner.on_text(b'{"type":"clear"}')
        runner.on_connection_closed(1000)
        await asyncio.gather(*server.tasks, return_exceptions=True)
        metrics.before_scrape()
        assert metrics.tts_pending_chars._value.get() == 0
        assert metrics.queue_depth_ms.labels("tts_out")._value.get() == 0

    run(scenario())


def test_events_given_to_a_caller_stay_in_order_with_the_audio() -> None:
    """A caller that takes the events itself (a dialect, the HTTP route) gets each chunk's
    `audio_done` before the next chunk's first frame, as a WebSocket client would."""
    async def scenario() -> list[str]:
        # A tiny playback window: the chunks' audio queues until the credit below releases
        # all of it in one step.
        config = load_config(environ={}, overrides={"billing": {"enabled": False},
                                                    "tts": {"session": {"credit_ms": 10}}})
        server = FakeSessionHost()
        endpoint = TtsEndpoint(config=config, engines={"fake": cast(Synthesizer, StallingEngine())},
                               meters=PricedMeterFactory({}), server=server, metrics=Metrics())
        admission = await endpoint.open_session(
            UpgradeRequest(path="", query={"model": "fake"}, api_key=None), ANONYMOUS)
        assert not isinstance(admission, m.Error) and hasattr(admission, "start")
        order: list[str] = []

        class OrderedWire(RecordingWire):
            def send_binary(self, data: bytes) -> None:
                if not order or order[-1] != "audio":
                    order.append("audio")

        wire = OrderedWire(m.tts_server_decoder.decode)
        runner = admission.start(wire, on_events=lambda evs: order.extend(
            type(e).__name__ for e in evs))
        runner.handle(SubmitText("One here. Two here. Three here. "))
        runner.handle(Flush())
        await asyncio.sleep(0.05)  # the engine's audio waits for credit
        runner.handle(GrantCredit(10_000_000))
        runner.handle(EndInput())
        await asyncio.gather(*server.tasks, return_exceptions=True)
        return order

    order = run(scenario())
    spoken = [x for x in order if x in ("audio", "AudioDone")]
    assert spoken == ["audio", "AudioDone"] * 3, order


def _phone_machine() -> TtsSession:
    """Engine at 16 kHz, session at 8 kHz (a phone call's TTS), MQ."""
    s = TtsSession(
        session_id="s1", resume_token="tok", params=TtsParams(model="fake", sample_rate=8000),
        settings=TtsSessionConfig(), models=("fake",), engine_rate=16000, max_chars=200,
        max_tokens=None, early_first_frame=True, resample_quality="MQ",
        limits=m.Limits(max_frame_bytes=65536, idle_timeout_s=10.0, usage_interval_s=5.0,
                        max_utterance_ms=0))
    s.handle(Start())
    s.poll()
    return s


def _audio_out(s: TtsSession) -> npt.NDArray[np.int16]:
    frames = [o for o in s.poll().messages if isinstance(o, bytes)]
    return np.frombuffer(b"".join(frames), dtype="<i2")


@pytest.mark.parametrize("cut", ["barge-in", "engine failure"])
def test_the_next_reply_carries_nothing_of_a_cut_chunk(cut: str) -> None:
    """Review of issue 15: soxr holds back ~90 ms of its input; a barge-in (or a chunk that
    failed part-way) kept the resampler, so the next reply began with the cut chunk's audio."""
    s = _phone_machine()
    s.receive_text(b'{"type":"text","text":"First reply."}')
    s.receive_text(b'{"type":"flush"}')
    [first] = s.take_requests()
    tone = (np.sin(2 * np.pi * 440 * np.arange(3200) / 16000) * 20000).astype("<i2")
    s.handle(EngineAudio(first, tone.tobytes()))  # 200 ms of the first reply
    assert np.abs(_audio_out(s)).max() > 10000
    if cut == "barge-in":
        s.handle(Interrupt(peer_cleared=True))
    else:
        s.handle(EngineFailed(first, "upstream went away", True))
    s.poll()
    s.receive_text(b'{"type":"text","text":"Second reply."}')
    s.receive_text(b'{"type":"flush"}')
    [second] = s.take_requests()
    s.handle(EngineAudio(second, bytes(6400)))  # the second reply: silence
    s.handle(EngineDone(second))
    after = _audio_out(s)
    assert len(after) and np.abs(after).max() <= 2  # soxr's rounding, not the cut tone
