"""The TTS session machine without sockets: frame sizes around a chunk's first audio."""

from __future__ import annotations

import pytest

from server.config import TtsSessionConfig
from server.sessions.tts import (
    EngineAudio,
    EngineDone,
    Start,
    TtsParams,
    TtsSession,
)
from streamgate_protocol import messages as m


def make(early: bool) -> TtsSession:
    s = TtsSession(
        session_id="s1", resume_token="tok", params=TtsParams(model="fake", sample_rate=16000),
        settings=TtsSessionConfig(), models=("fake",), engine_rate=16000, max_chars=200,
        max_tokens=None, early_first_frame=early,
        limits=m.Limits(max_frame_bytes=65536, idle_timeout_s=10.0, usage_interval_s=5.0,
                        max_utterance_ms=0),
    )
    s.handle(Start())
    s.poll()
    return s


@pytest.mark.parametrize("early", [True, False])
def test_first_frame_leaves_with_the_first_audio_only_when_asked(early: bool) -> None:
    s = make(early)
    s.receive_text(b'{"type":"text","text":"Hello there."}')
    s.receive_text(b'{"type":"flush"}')
    [req] = s.take_requests()
    frame = s.frame_bytes  # 100 ms at 16 kHz PCM16 = 3200 bytes
    s.handle(EngineAudio(req, b"\x01\x00" * 400))  # the engine's first 25 ms
    first = [o for o in s.poll().messages if isinstance(o, bytes)]
    assert (sum(len(f) for f in first) > 0) is early
    for _ in range(10):  # then 250 ms more in pieces
        s.handle(EngineAudio(req, b"\x01\x00" * 400))
    s.handle(EngineDone(req))
    frames = first + [o for o in s.poll().messages if isinstance(o, bytes)]
    assert sum(len(f) for f in frames) == 11 * 800
    assert all(len(f) <= frame for f in frames)
    middle = frames[1:-1] if early else frames[:-1]
    assert middle and all(len(f) == frame for f in middle)
