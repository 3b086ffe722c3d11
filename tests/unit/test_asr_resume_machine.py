"""Resume in the ASR machine (server/sessions/asr.py; docs/protocol.md "Resuming a session"):
where a resume may start (quiet points, backed off by the pre-roll), what a resumed machine
sends (ready with the offset, the finals the client missed, never one it has), its timeline
(audio time and utterance ids go on) and its metering (audio already reported is not metered
again)."""

from __future__ import annotations

from server.billing.meter import UsageReport
from server.config import AsrSessionConfig
from server.sessions.asr import AsrSession
from server.sessions.asr_params import AsrParams
from server.sessions.resume import ResumeStart
from streamgate_protocol import messages as m
from tests.speech import espeak_pcm16, silence
from tests.unit.test_asr_session import MODELS, FakeEngine, frames, run_test

SETTINGS = AsrSessionConfig(ingest_queue_ms=1000, usage_interval_s=5.0, preroll_ms=300)


def machine(resume: ResumeStart | None = None) -> AsrSession:
    s = AsrSession(session_id="s1", resume_token="tok", params=AsrParams(model="fake"),
                   settings=SETTINGS, models=MODELS, engine_rate=16000, engine_interim=True,
                   max_frame_bytes=65536, idle_timeout_s=10.0, resume=resume)
    s.start()
    return s


def finals(events: list[m.AsrServerMessage]) -> list[m.Transcript]:
    return [e for e in events if isinstance(e, m.Transcript) and e.is_final]


SPEECH = espeak_pcm16("hello there")


def test_a_quiet_point_backs_off_by_the_preroll_and_none_exists_mid_utterance() -> None:
    s = machine()
    s.messages()
    run_test(s, frames(silence(1000)))
    pos = s.position()
    assert pos is not None
    assert pos.offset == (1000 - 300) * 32 and pos.at_ms == 700 and pos.next_utterance_id == 1
    run_test(s, frames(silence(200) + SPEECH[: len(SPEECH) // 2]))
    assert s.position() is None  # an utterance is open: nowhere to start afresh
    events = run_test(s, frames(SPEECH[len(SPEECH) // 2:] + silence(1500)))
    assert len(finals(events)) == 1
    pos = s.position()
    assert pos is not None and pos.next_utterance_id == 2
    sent = len(silence(1000) + silence(200) + SPEECH + silence(1500))
    assert s.billed_offset == 0  # nothing metered yet
    s.take_metered_ms()
    # Every byte taken in is what a report pays for (to the whole ms the meter counts in).
    assert sent - 32 < s.billed_offset <= sent
    assert pos.offset == sent - 300 * 32  # the quiet point, backed off by the pre-roll


def test_a_resumed_machine_replays_what_the_client_missed_and_never_what_it_has() -> None:
    first = machine()
    first.messages()
    run_test(first, frames(silence(300) + SPEECH + silence(800) + SPEECH + silence(1500)))
    kept = first.replay.items()
    assert [u for u, _ in kept] == [1, 1, 2, 2]  # a transcript and an utterance_end each
    pos = first.position()
    assert pos is not None

    def resumed(last_seen: int) -> list[m.AsrServerMessage]:
        s = machine(ResumeStart(offset=pos.offset, at_ms=pos.at_ms,
                                next_utterance_id=pos.next_utterance_id,
                                billed_offset=pos.offset, last_utterance_id=last_seen,
                                finals=kept))
        return s.messages()

    ready, *replayed = resumed(last_seen=1)
    assert isinstance(ready, m.Ready) and ready.resumed and ready.resume_offset == pos.offset
    assert [(type(e).__name__, getattr(e, "utterance_id", None)) for e in replayed] == [
        ("Transcript", 2), ("UtteranceEnd", 2)]
    assert resumed(last_seen=2)[1:] == []


def test_the_timeline_and_the_ids_go_on_and_reported_audio_is_not_metered_again() -> None:
    start = ResumeStart(offset=32_000, at_ms=1000, next_utterance_id=4,
                        billed_offset=32_000 + 16_000, last_utterance_id=3)
    s = machine(start)
    s.messages()
    events = run_test(s, frames(silence(300) + SPEECH + silence(1500)))
    [final] = finals(events)
    assert final.utterance_id == 4
    assert final.start_ms >= 1000 + 300 - 300  # on the session's timeline, pre-roll included
    started = [e for e in events if isinstance(e, m.SpeechStarted)]
    assert started and started[0].at_ms >= 1000
    sent_ms = (len(silence(300) + SPEECH + silence(1500))) // 32
    accepted, _ = s.take_metered_ms()
    assert accepted == sent_ms - 500  # the first 500 ms were paid for on the old connection
    pos = s.position()
    assert pos is not None and pos.offset > 32_000 and pos.next_utterance_id == 5


def test_a_final_the_client_has_is_not_sent_when_its_audio_is_transcribed_again() -> None:
    # The client saw final 4 before the node died; the point was written before it.
    s = machine(ResumeStart(offset=0, at_ms=0, next_utterance_id=4, billed_offset=0,
                            last_utterance_id=4))
    s.messages()
    events = run_test(s, frames(silence(300) + SPEECH + silence(800) + SPEECH + silence(1500)),
                      FakeEngine())
    assert [f.utterance_id for f in finals(events)] == [5]  # 4 again is not sent; 5 is new
    assert not [e for e in events if isinstance(e, m.SpeechStarted) and e.at_ms < 300]


def test_a_wav_session_is_not_resumable() -> None:
    s = AsrSession(session_id="s1", resume_token="tok",
                   params=AsrParams(model="fake", encoding="wav"), settings=SETTINGS,
                   models=MODELS, engine_rate=16000, engine_interim=True, max_frame_bytes=65536,
                   idle_timeout_s=10.0)
    s.start()
    [ready] = s.messages()
    assert isinstance(ready, m.Ready) and ready.resume_token == "" and not s.resumable


def test_a_drained_resumable_session_gives_its_token_after_the_summary() -> None:
    s = machine()
    s.messages()
    s.drain()
    assert s.step(0.0).settle
    s.settled(UsageReport(0, 0, 0, 0, None))
    summary, error = s.messages()
    assert isinstance(summary, m.Summary)
    assert isinstance(error, m.Error) and error.code == "draining"
    assert error.resume_token == "tok"
    assert s.close_action is not None and s.close_action.code == 1001
