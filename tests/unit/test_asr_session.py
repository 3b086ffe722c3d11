"""The ASR session machine without sockets: feed frames, drive a fake engine, assert events."""

from __future__ import annotations

import audioop
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from server.billing.meter import UsageReport
from server.config import AsrSessionConfig
from server.models.base import EngineError, Hypothesis, WordTiming
from server.protocol.decoding import BadMessage, decode_client_message
from server.sessions.asr import AsrSession, EngineFeed, EngineFinish
from server.sessions.asr_params import AsrParams
from streamgate_protocol import messages as m
from streamgate_protocol.audio import wav_header
from tests.speech import espeak_pcm16, silence

MODELS = frozenset({"fake", "other"})
FRAME = 640


@dataclass
class FakeEngine:
    """Counts audio per utterance; the 'text' says how much it heard, so tests can check it."""

    fail: bool = False
    audio: dict[int, int] = field(default_factory=dict)

    def run(self, session: AsrSession) -> None:
        while (req := session.next_engine_request()) is not None:
            if isinstance(req, EngineFeed):
                if self.fail:
                    session.receive_engine_error(req.utterance_id, EngineError("boom"))
                    continue
                self.audio[req.utterance_id] = self.audio.get(req.utterance_id, 0) + len(req.pcm)
                ms = self.audio[req.utterance_id] // 32
                session.receive_result(req.utterance_id, Hypothesis(f"heard {ms // 100}"),
                                       final=False)
            elif isinstance(req, EngineFinish):
                ms = self.audio.get(req.utterance_id, 0) // 32
                words = [WordTiming("heard", 0, ms // 2, 0.9)]
                session.receive_result(req.utterance_id, Hypothesis(f"heard {ms}", words),
                                       final=True)


def make(**params: object) -> AsrSession:
    p = AsrParams(**{"model": "fake", **params})  # type: ignore[arg-type]
    s = AsrSession(
        session_id="s1", resume_token="tok", params=p,
        settings=AsrSessionConfig(ingest_queue_ms=1000, usage_interval_s=5.0),
        models=MODELS, engine_rate=16000, engine_interim=True,
        max_frame_bytes=65536, idle_timeout_s=10.0,
    )
    s.start()
    return s


def text(session: AsrSession, data: str) -> None:
    """A text frame, decoded at the edge as the runner does."""
    try:
        msg = decode_client_message(data.encode(), m.asr_client_decoder)
    except BadMessage as exc:
        session.bad_message(str(exc))
    else:
        session.receive_control(msg)


def run_test(session: AsrSession, frames: Iterable[bytes | str], engine: FakeEngine | None = None,
             *, step: int = 10) -> list[m.AsrServerMessage]:
    """Feed frames (bytes = binary, str = text), stepping every `step` frames as the runner
    does when it drains its queue; return every event produced."""
    engine = engine or FakeEngine()
    out: list[m.AsrServerMessage] = []
    for i, frame in enumerate(frames, 1):
        if isinstance(frame, str):
            text(session, frame)
        else:
            session.receive_audio(frame)
        if i % step == 0:
            session.step(0.0)
            engine.run(session)
    session.step(0.0)
    engine.run(session)
    out += session.messages()
    return out


def frames(pcm: bytes, size: int = FRAME) -> list[bytes]:
    return [pcm[i:i + size] for i in range(0, len(pcm), size)]


def types(events: list[m.AsrServerMessage]) -> list[str]:
    return [type(e).__name__ for e in events]


SPEECH = silence(600) + espeak_pcm16("hello there, how are you") + silence(1000)


def test_ready_announces_format_credit_and_limits() -> None:
    s = make()
    (ready,) = s.messages()
    assert isinstance(ready, m.Ready)
    assert ready.credit_bytes == 1000 * 32
    assert ready.audio == m.AudioFormat(encoding="pcm_s16le", sample_rate=16000)
    assert ready.limits.max_frame_bytes == 65536


def test_speech_gives_one_utterance_in_audio_time() -> None:
    s = make(interim_results=True)
    s.messages()
    events = run_test(s, frames(SPEECH))
    names = types(events)
    assert names.count("SpeechStarted") == 1
    assert names.count("UtteranceEnd") == 1
    finals = [e for e in events if isinstance(e, m.Transcript) and e.is_final]
    interims = [e for e in events if isinstance(e, m.Transcript) and not e.is_final]
    assert len(finals) == 1 and interims
    started = next(e for e in events if isinstance(e, m.SpeechStarted))
    final = finals[0]
    # Speech begins at 600 ms; the pre-roll (300 ms) reaches back before it.
    assert 250 <= started.at_ms <= 650
    assert final.start_ms == started.at_ms
    assert final.words[0].start_ms == final.start_ms
    speech_ms = len(espeak_pcm16("hello there, how are you")) // 32
    assert final.end_ms - final.start_ms >= speech_ms - 200
    assert names.index("SpeechStarted") < names.index("Transcript") < names.index("UtteranceEnd")
    assert s.accepted_ms == len(SPEECH) // 32


def test_credit_is_granted_per_quarter_window() -> None:
    s = make()
    s.messages()
    events = run_test(s, frames(silence(2000)), step=1)
    credits = [e.bytes for e in events if isinstance(e, m.Credit)]
    assert credits and all(c >= 1000 * 32 // 4 for c in credits)
    assert s.credit.granted_total == 1000 * 32 + sum(credits)
    assert sum(credits) <= len(silence(2000))


def test_bad_text_frames_are_errors_not_closes() -> None:
    s = make()
    s.messages()
    events = run_test(s, ["{oops", '{"type":"jump"}', "[1,2]", '{"type":"keepalive"}'])
    errors = [e for e in events if isinstance(e, m.Error)]
    assert [e.code for e in errors] == ["bad_message"] * 3
    assert s.state == "open" and s.close_action is None


def test_empty_binary_frame_is_an_error_not_end_of_stream() -> None:
    s = make()
    s.messages()
    events = run_test(s, [b"", silence(100)])
    assert [e.code for e in events if isinstance(e, m.Error)] == ["empty_frame"]
    assert s.state == "open" and s.accepted_ms == 100


def test_block_asks_to_pause_reading_when_full() -> None:
    s = make(overflow="block")
    s.messages()
    pause = [s.receive_audio(f) for f in frames(silence(1100))]
    assert pause[-1] is True and pause[0] is False
    assert s.step(0.0).resume_reading
    assert s.queue.resumable and s.dropped_ms == 0 and s.accepted_ms == 1100


def test_drop_keeps_newest_and_accounts_every_ms() -> None:
    s = make(overflow="drop")
    s.messages()
    sent = silence(3000)
    for f in frames(sent):
        assert s.receive_audio(f) is False
    s.step(0.0)
    events = s.messages()
    warnings = [e for e in events if isinstance(e, m.Warning) and e.code == "audio_dropped"]
    assert warnings and warnings[0].dropped_ms == s.dropped_ms == 2000
    assert s.accepted_ms + s.dropped_ms == 3000
    assert any(isinstance(e, m.Warning) and e.code == "credit_exceeded" for e in events)


def test_finalize_ends_the_open_utterance() -> None:
    s = make()
    s.messages()
    talk = silence(300) + espeak_pcm16("one two three four")
    events = run_test(s, [*frames(talk), '{"type":"finalize"}'])
    assert types(events).count("UtteranceEnd") == 1
    final = next(e for e in events if isinstance(e, m.Transcript) and e.is_final)
    assert final.end_ms == s.accepted_ms  # forced end: the utterance runs to the last sample
    assert s.state == "open"


def test_close_flushes_finals_then_summary() -> None:
    s = make()
    s.messages()
    talk = silence(300) + espeak_pcm16("good morning")
    events = run_test(s, [*frames(talk), '{"type":"close"}', silence(100)])
    assert s.state == "closing" and not s.finals_pending
    assert types(events).count("UtteranceEnd") == 1
    assert s.accepted_ms == len(talk) // 32  # audio after close is not taken
    assert (s.step(0.0).settle, s.state) == (True, "settling")
    out = s.settled(UsageReport(s.accepted_ms, s.accepted_ms, 0, 42, None))
    (summary,) = s.messages()
    assert isinstance(summary, m.Summary)
    assert summary.utterances == 1 and summary.cost_micros == 42
    assert out.close is not None and out.close.code == 1000
    assert (s.state, s.close_action) == ("closed", out.close)


def test_drain_close_carries_error_with_reason() -> None:
    s = make()
    s.messages()
    s.drain()
    assert s.step(0.0).settle
    s.settled(UsageReport(0, 0, 0, 0, None))
    events = s.messages()
    assert types(events) == ["Summary", "Error"]
    assert isinstance(events[1], m.Error) and events[1].code == "draining"
    assert s.close_action is not None and s.close_action.code == 1001


def test_config_message_reconfigures_before_audio_only() -> None:
    s = make()
    s.messages()
    config = {"type": "config", "encoding": "mulaw", "sample_rate": 8000}
    text(s, json.dumps(config))
    (ready,) = s.messages()
    assert isinstance(ready, m.Ready) and ready.credit_bytes == 1000 * 8
    ulaw = audioop.lin2ulaw(silence(500, 8000), 2)
    events = run_test(s, [*frames(ulaw, 160), '{"type":"config","sample_rate":16000}'])
    assert [e.code for e in events if isinstance(e, m.Error)] == ["bad_message"]
    assert s.accepted_ms == 500


def test_bad_config_closes_4400() -> None:
    s = make()
    s.messages()
    text(s, '{"type":"config","model":"missing"}')
    (err,) = s.messages()
    assert isinstance(err, m.Error) and err.code == "bad_config"
    assert s.close_action is not None and s.close_action.code == 4400


def test_mulaw_8k_speech_is_resampled_and_transcribed() -> None:
    s = make(encoding="mulaw", sample_rate=8000)
    s.messages()
    pcm8k = silence(400, 8000) + espeak_pcm16("testing telephony audio", 8000) + silence(900, 8000)
    ulaw = audioop.lin2ulaw(pcm8k, 2)
    events = run_test(s, frames(ulaw, 160))
    assert types(events).count("UtteranceEnd") == 1
    assert s.accepted_ms == len(ulaw) // 8


def test_wav_header_rate_is_honoured() -> None:
    s = make(encoding="wav", sample_rate=16000)
    s.messages()
    body = audioop.lin2lin(silence(700, 8000), 2, 2)
    data = wav_header(8000, 1, len(body) // 2) + body
    run_test(s, frames(data, 100))
    assert s.decoder.sample_rate == 8000
    assert s.accepted_ms == 700


def test_bad_wav_header_closes_4400() -> None:
    s = make(encoding="wav")
    s.messages()
    events = run_test(s, [b"RIFX" + b"\x00" * 100])
    assert any(isinstance(e, m.Error) and e.code == "bad_audio" for e in events)
    assert s.close_action is not None and s.close_action.code == 4400


@pytest.mark.parametrize("encoding", ["pcm_s16le", "mulaw"])
def test_a_wav_file_streamed_as_raw_samples_is_refused_and_not_metered(encoding: str) -> None:
    """Decoded as raw samples, a 22 kHz WAV was transcribed as noise and billed +38 %."""
    s = make(encoding=encoding)
    s.messages()
    pcm = espeak_pcm16("hello")
    events = run_test(s, frames(wav_header(22050, 1, len(pcm) // 2) + pcm))
    errors = [e for e in events if isinstance(e, m.Error)]
    assert [e.code for e in errors] == ["bad_audio"] and "encoding=wav" in errors[0].message
    assert s.close_action is not None and s.close_action.code == 4400
    assert s.accepted_ms == 0 and s.take_metered_ms() == (0, 0)


def test_raw_samples_that_merely_start_like_riff_are_not_refused() -> None:
    s = make()
    s.messages()
    run_test(s, [b"RIFF" + b"\x00" * 636, *frames(silence(500))])
    assert s.close_action is None and s.accepted_ms > 500


def test_engine_error_reports_and_session_continues() -> None:
    s = make()
    s.messages()
    events = run_test(s, frames(SPEECH), FakeEngine(fail=True))
    errors = [e for e in events if isinstance(e, m.Error)]
    assert errors and errors[0].code == "engine_error" and errors[0].retryable
    assert s.state == "open"


def test_control_lane_is_bounded() -> None:
    s = make()
    s.messages()
    for _ in range(64):
        text(s, '{"type":"finalize"}')
    assert s.close_action is None
    text(s, '{"type":"finalize"}')
    assert s.close_action is not None and s.close_action.code == 1008


@pytest.mark.parametrize("vad", ["off", "low", "high"])
def test_vad_modes_all_produce_one_utterance_for_one_phrase(vad: str) -> None:
    s = make(vad=vad)
    s.messages()
    events = run_test(s, [*frames(SPEECH), '{"type":"finalize"}'])
    assert types(events).count("UtteranceEnd") == 1


def test_interim_end_never_passes_the_final_end() -> None:
    s = make(interim_results=True)
    s.messages()
    events = run_test(s, frames(SPEECH))
    final = next(e for e in events if isinstance(e, m.Transcript) and e.is_final)
    interims = [e for e in events if isinstance(e, m.Transcript) and not e.is_final]
    assert interims and all(i.end_ms <= final.end_ms for i in interims)
    assert all(i.start_ms == final.start_ms for i in interims)


@pytest.mark.parametrize("rate", [8000, 22050])
def test_engine_gets_speech_at_its_rate_in_chunks(rate: int) -> None:
    """VAD at the client's rate when webrtcvad takes it, else after resampling; either way the
    engine receives 16 kHz speech in chunks of >= 100 ms (the last of an utterance aside)."""
    s = make(sample_rate=rate, encoding="pcm_s16le")
    s.messages()
    speech = audioop.ratecv(SPEECH, 2, 1, 16000, rate, None)[0]
    frame = rate * 2 // 50
    reqs: list[EngineFeed | EngineFinish] = []

    def take() -> None:
        s.step(0.0)
        while (req := s.next_engine_request()) is not None:
            reqs.append(req)

    for i in range(0, len(speech), frame):
        s.receive_audio(speech[i : i + frame])
        take()
    s.end_of_input()
    take()
    feeds = [r for r in reqs if isinstance(r, EngineFeed)]
    assert isinstance(reqs[-1], EngineFinish) and len(feeds) >= 3
    assert all(len(f.pcm) >= 100 * 32 - 64 for f in feeds[:-1])
    fed_ms = sum(len(f.pcm) for f in feeds) // 32
    speech_ms = len(espeak_pcm16("hello there, how are you")) // 32
    assert speech_ms - 200 <= fed_ms <= len(SPEECH) // 32 + 50


def test_cached_credit_frames_are_the_encoded_message_framed() -> None:
    from websockets.frames import Frame, Opcode

    from server.sessions.asr_runner import CreditPayloads
    from server.ws.connection import frame_header
    from streamgate_protocol import messages as msgs

    cache = CreditPayloads(max_entries=2)
    for grant in (160, 160, 320, 640, 160):  # the third size clears the full cache
        payload = msgs.encoder.encode(msgs.Credit(bytes=grant))
        expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
        cached = cache.payload(grant)
        assert frame_header(0x1, len(cached)) + cached == expected
    assert len(cache.encoded) <= 2


def test_metrics_on_request_time_end_of_speech_to_final() -> None:
    """`metrics=true`: after each final, how long it took from the end of speech (the step
    that ended the utterance) and how much of that was engine time; the runner's histogram
    gets the same latency either way."""
    for asked in (True, False):
        s = make(metrics=asked, interim_results=False)
        s.messages()
        for frame in frames(SPEECH):
            s.receive_audio(frame)
        s.step(10.0)  # the VAD ends the utterance in this step
        finish = None
        while (req := s.next_engine_request()) is not None:
            if isinstance(req, EngineFinish):
                finish = req
        assert finish is not None
        s.receive_result(finish.utterance_id, Hypothesis("hello there"), final=True,
                         now=10.4, engine_s=0.12)
        events = s.messages()
        metrics = [e for e in events if isinstance(e, m.UtteranceMetrics)]
        if asked:
            assert metrics == [m.UtteranceMetrics(utterance_id=finish.utterance_id,
                                                  end_of_speech_to_final_ms=400,
                                                  engine_ms=120)]
            assert types(events)[-3:] == ["Transcript", "UtteranceEnd", "UtteranceMetrics"]
        else:
            assert metrics == []
        assert [round(x, 3) for x in s.take_final_latencies()] == [0.4]
        assert s.take_final_latencies() == []
