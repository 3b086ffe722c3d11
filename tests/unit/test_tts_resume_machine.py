"""Resume in the TTS machine (server/sessions/tts.py; docs/protocol.md "Resuming a session"):
what a session keeps for a resume (the newest done chunks, every chunk not done, the buffered
text), and what a resumed machine does with it (speaks the chunks again under their own ids,
charges none that was charged, carries the buffered text on); a clear forgets what was
cleared."""

from __future__ import annotations

from server.config import TtsSessionConfig
from server.sessions.resume import TtsChunkPoint, TtsResumeStart
from server.sessions.tts import (
    EngineAudio,
    EngineDone,
    Flush,
    GrantCredit,
    Interrupt,
    Start,
    SubmitText,
    TtsParams,
    TtsSession,
)
from streamgate_protocol import messages as m
from tests.unit.test_tts_machine import LIMITS, PCM_10MS


def machine(resume: TtsResumeStart | None = None) -> TtsSession:
    s = TtsSession(session_id="s1", resume_token="tok", params=TtsParams(model="fake"),
                   settings=TtsSessionConfig(), models=("fake",), engine_rate=16000,
                   max_chars=100, max_tokens=None, limits=LIMITS, resume=resume)
    s.handle(Start())
    return s


def speak_next(s: TtsSession) -> None:
    """The engine speaks the next chunk in full; the client has credit for all of it."""
    req = s.next_request()
    assert req is not None
    s.handle(EngineAudio(req, PCM_10MS * 10))
    s.handle(EngineDone(req))
    s.handle(GrantCredit(1_000_000))
    s.poll()


def test_the_point_holds_done_chunks_pending_ones_and_the_buffered_text() -> None:
    s = machine()
    s.poll()
    s.handle(SubmitText("First one here. Second one here. Third one here. And a tail"))
    version = s.resume_version
    speak_next(s)  # chunk 1 done and sent
    req = s.next_request()  # chunk 2 charged (first audio), not done
    assert req is not None
    s.handle(EngineAudio(req, PCM_10MS))
    assert s.resume_version > version
    chunks = s.resume_chunks()
    assert [(c.chunk_id, c.charged) for c in chunks] == [(1, True), (2, True), (3, False)]
    assert s.chunker.buffered == "And a tail" and s.next_chunk_id == 4
    s.handle(Interrupt())
    assert s.resume_chunks() == []  # a clear forgets what was cleared


def test_a_resumed_machine_speaks_again_under_the_same_ids_charging_only_the_uncharged() -> None:
    s = machine(TtsResumeStart(
        next_chunk_id=4,
        chunks=[TtsChunkPoint(2, "Second one here.", True), TtsChunkPoint(3, "Third.", False)],
        buffered="and a tail"))
    [ready] = s.poll().messages
    assert isinstance(ready, m.Ready) and ready.resumed
    speak_next(s)
    speak_next(s)
    assert s.characters_synthesized == len("Third.")  # chunk 2 was paid for already
    s.handle(SubmitText(" that ends."))
    s.handle(Flush())
    speak_next(s)
    done = [msg for msg in s.poll().messages if isinstance(msg, m.AudioDone)]
    assert s.chunks_done == 3 and done == []  # every audio_done already went out in order
    assert [c.chunk_id for c in s.resume_chunks()] == [2, 3, 4]
    assert s.resume_chunks()[-1].text == "and a tail that ends."
