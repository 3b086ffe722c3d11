"""TTS time to first audio (issue 15, target 5), without sockets: what stands between a `flush`
and the engine, and between the engine's audio and the wire, on a fake wire and a fake clock.

- A `flush` hands its chunk to the engine in the same step (the synthesis task is queued there,
  not a loop turn later by the session's loop), and the next chunk starts as the last one ends.
- A request costs two resume-point saves (its text, its chunk charged), not three: a chunk done
  changes nothing a resume needs. Saves start a loop turn after they are asked for, behind the
  work that asked.
- The engine's PCM goes out as it came when it is already the session's format, frame for frame
  the same as through the resampler and encoder.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import cast

import pytest
from websockets.datastructures import Headers

from server.billing.auth import ANONYMOUS
from server.billing.meter import PricedMeterFactory
from server.config import TtsSessionConfig, load_config
from server.models.base import Synthesizer
from server.sessions.resume import AnyResumePoint, MemoryResumeStore, TtsResumePoint
from server.sessions.resume_writer import ResumeWriter
from server.sessions.tts import (
    EngineAudio,
    EngineDone,
    Flush,
    GrantCredit,
    Start,
    SubmitText,
    TtsParams,
    TtsSession,
)
from server.sessions.tts_runner import TtsEndpoint, TtsSessionRunner
from server.sessions.upgrade import Admitted, SessionSocket, UpgradeRequest
from server.telemetry.metrics import Metrics
from streamgate_protocol import messages as m
from tests.unit.session_fakes import FakeSessionHost, RecordingWire
from tests.unit.virtual_time import run

PCM_40MS = b"\x01\x00\x02\x00" * 320  # 40 ms at 16 kHz
LIMITS = m.Limits(max_frame_bytes=65536, idle_timeout_s=10.0, usage_interval_s=5.0,
                  max_utterance_ms=0)


class OnePieceEngine:
    """40 ms of audio per chunk, after `latency_s`; counts the synthesis calls that began
    running."""

    name = "fake"
    sample_rate = 16000
    max_chars = 200
    max_tokens: int | None = None

    def __init__(self, latency_s: float = 0.0) -> None:
        self.started = 0
        self.latency_s = latency_s

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def synthesize(self, text: str, *, voice: str | None, language: str
                         ) -> AsyncIterator[bytes]:
        self.started += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        yield PCM_40MS


class CountingStore(MemoryResumeStore):
    def __init__(self) -> None:
        super().__init__()
        self.saved: list[AnyResumePoint] = []

    async def save(self, token: str, point: AnyResumePoint, ttl_s: float) -> bool:
        self.saved.append(point)
        return await super().save(token, point, ttl_s)


async def open_runner(engine: OnePieceEngine, store: MemoryResumeStore
                      ) -> tuple[TtsSessionRunner, RecordingWire, FakeSessionHost]:
    config = load_config(environ={}, overrides={"billing": {"enabled": False}})
    host = FakeSessionHost()
    endpoint = TtsEndpoint(config=config, engines={"fake": cast(Synthesizer, engine)},
                           meters=PricedMeterFactory({}), server=host, metrics=Metrics(),
                           resume_store=store)
    decision = await endpoint.admit(
        UpgradeRequest(path="/v1/tts/stream", query={"model": "fake"}, api_key=None,
                       headers=Headers()), ANONYMOUS)
    assert isinstance(decision, Admitted)
    wire = RecordingWire(m.tts_server_decoder.decode)
    runner = decision.start(cast(SessionSocket, wire))
    assert isinstance(runner, TtsSessionRunner)
    await asyncio.sleep(0.01)  # the session's task is running, its resume point saved
    return runner, wire, host


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_flush_hands_its_chunk_to_the_engine_in_the_same_step() -> None:
    async def scenario() -> None:
        engine = OnePieceEngine()
        runner, wire, host = await open_runner(engine, MemoryResumeStore())
        runner.on_text(b'{"type":"text","text":"No sentence end yet"}')
        assert runner._current is None
        runner.on_text(b'{"type":"flush"}')
        assert runner._current is not None  # queued in the flush's own step
        await turns(1)
        assert engine.started == 1 and wire.audio_bytes > 0  # one turn: audio on the wire
        runner.on_text(b'{"type":"text","text":"One here. Two here. Three"}')
        assert runner._current is not None  # a sentence end starts its chunk the same way
        await turns(1)
        assert engine.started == 2
        await turns(1)
        assert engine.started == 3  # the next chunk began as the one before ended
        runner.on_text(b'{"type":"close"}')
        await asyncio.gather(*host.tasks)
        assert wire.close_code == 1000
        done = [e.chunk_id for e in wire.events if isinstance(e, m.AudioDone)]
        assert done == [1, 2, 3, 4]

    run(scenario())


def test_a_request_saves_its_resume_point_twice_text_then_charge() -> None:
    async def scenario() -> None:
        store = CountingStore()
        runner, wire, host = await open_runner(OnePieceEngine(latency_s=0.05), store)
        before = len(store.saved)
        runner.on_text(b'{"type":"text","text":"Hello there, how can I help you today?"}')
        runner.on_text(b'{"type":"flush"}')
        assert len(store.saved) == before  # asked for, not begun: the synthesis goes first
        await asyncio.sleep(0.1)
        assert any(isinstance(e, m.Flushed) for e in wire.events)
        saved = store.saved[before:]
        assert len(saved) == 2  # the text, then the chunk charged; its end is no change
        last = saved[-1]
        assert isinstance(last, TtsResumePoint)
        assert [(c.chunk_id, c.charged) for c in last.chunks] == [(1, True)]
        runner.on_text(b'{"type":"close"}')
        await asyncio.gather(*host.tasks)

    run(scenario())


def test_a_chunk_done_is_no_change_to_the_resume_point_but_its_charge_is() -> None:
    s = TtsSession(session_id="s1", resume_token="tok", params=TtsParams(model="fake"),
                   settings=TtsSessionConfig(), models=("fake",), engine_rate=16000,
                   max_chars=100, max_tokens=None, limits=LIMITS, early_first_frame=True)
    s.handle(Start())
    s.handle(SubmitText("Hello there."))
    s.handle(Flush())
    req = s.next_request()
    assert req is not None
    version = s.resume_version
    s.handle(EngineAudio(req, PCM_40MS))
    assert s.resume_version == version + 1  # charged
    before = s.resume_chunks()
    s.handle(EngineDone(req))
    s.handle(GrantCredit(1_000_000))
    assert any(isinstance(o, m.AudioDone) for o in s.poll().messages)
    assert s.resume_version == version + 1 and s.resume_chunks() == before


def test_a_background_save_begins_a_turn_later_with_the_newest_point() -> None:
    async def scenario() -> None:
        store = CountingStore()
        writer = ResumeWriter(store, "tok", epoch=0, ttl_s=60.0,
                              log=logging.getLogger("test"), log_extra={})
        points = [point(n) for n in range(3)]
        for p in points:
            writer.request(lambda p=p: p)  # type: ignore[misc]
        assert store.saved == []
        await turns(3)
        assert store.saved == [points[-1]]  # asked three times, written once: the newest
        writer.request(lambda: points[0])
        await writer.aclose()  # closed before its turn: never written
        await turns(3)
        assert store.saved == [points[-1]]

    run(scenario())


def point(n: int) -> TtsResumePoint:
    from server.sessions.resume import TtsParamsPoint

    return TtsResumePoint(session_id="s", tenant_id="t", next_chunk_id=n + 1,
                          params=TtsParamsPoint(model="fake", voice=None, language="en-US",
                                                encoding="pcm_s16le", sample_rate=16000))


@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("pieces", [[1280] * 7, [4000, 320, 3200, 6400, 2], [3200] * 3, [2]])
def test_engine_pcm_in_the_session_format_is_framed_as_through_the_encoder(
        early: bool, pieces: list[int]) -> None:
    def frames(raw: bool) -> list[bytes]:
        s = TtsSession(session_id="s1", resume_token="", params=TtsParams(model="fake"),
                       settings=TtsSessionConfig(), models=("fake",), engine_rate=16000,
                       max_chars=100, max_tokens=None, limits=LIMITS, early_first_frame=early)
        assert s._raw_pcm  # 16 kHz PCM16 in, 16 kHz pcm_s16le out
        s._raw_pcm = raw
        s.handle(Start())
        s.handle(SubmitText("Hello there. And again."))
        s.handle(Flush())
        s.handle(GrantCredit(10_000_000))
        out: list[bytes] = []
        for _ in range(2):
            req = s.next_request()
            assert req is not None
            for i, n in enumerate(pieces):
                s.handle(EngineAudio(req, bytes([i % 251, 1]) * (n // 2)))
            s.handle(EngineDone(req))
            out += [o for o in s.poll().messages if isinstance(o, bytes)]
        return out

    fast = frames(True)
    assert fast == frames(False)
    assert all(type(f) is bytes for f in fast)
