"""The bound on TTS text waiting for synthesis (issue 11, item 15), without sockets: the bound
itself, the machine's accounting, and the runner's back pressure on a fake wire."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import cast

import pytest
from websockets.datastructures import Headers

from server.billing.auth import ANONYMOUS
from server.billing.meter import PricedMeterFactory
from server.config import TtsSessionConfig, load_config
from server.flow_control.text_backlog import READ_SLACK_CHARS, TextBacklogBound
from server.models.base import Synthesizer
from server.sessions.tts import (
    EngineAudio,
    Interrupt,
    Start,
    TtsParams,
    TtsSession,
)
from server.sessions.tts_runner import TtsEndpoint, TtsSessionRunner
from server.sessions.upgrade import Admitted, SessionSocket, UpgradeRequest
from server.telemetry.metrics import Metrics
from streamgate_protocol import messages as m
from tests.unit.session_fakes import FakeSessionHost, RecordingWire

SENTENCE = "One short sentence to speak. "


def text(t: str) -> bytes:
    return json.dumps({"type": "text", "text": t}).encode()


FLUSH = b'{"type":"flush"}'


def test_bound_levels() -> None:
    bound = TextBacklogBound(1000)
    assert bound.limit == 1000 + READ_SLACK_CHARS
    assert not bound.full(999) and bound.full(1000)
    assert bound.resumable(500) and not bound.resumable(501)
    assert bound.admits(bound.limit - 10, 10) and not bound.admits(bound.limit - 10, 11)
    with pytest.raises(ValueError):
        TextBacklogBound(0)


def machine(max_pending_chars: int) -> TtsSession:
    s = TtsSession(
        session_id="s1", resume_token="tok", params=TtsParams(model="fake"),
        settings=TtsSessionConfig(max_pending_chars=max_pending_chars), models=("fake",),
        engine_rate=16000, max_chars=100, max_tokens=None,
        limits=m.Limits(max_frame_bytes=65536, idle_timeout_s=10.0, usage_interval_s=5.0,
                        max_utterance_ms=0),
    )
    s.handle(Start())
    s.poll()
    return s


def test_machine_counts_text_waiting_until_the_engine_takes_it() -> None:
    s = machine(100)
    s.receive_text(text("Hello there. General"))
    # One chunk queued, the rest buffered; the space between them is not text to speak.
    assert s.pending_chars == len("Hello there.") + len("General")
    s.receive_text(FLUSH)
    assert s.pending_chars == len("Hello there.") + len("General")
    first = s.next_request()
    assert first is not None and first.text == "Hello there."
    assert s.pending_chars == len("General")
    # Charged only once the engine produced audio for it.
    assert s.characters_synthesized == 0
    s.handle(EngineAudio(first, b"\x01\x00" * 160))
    assert s.characters_synthesized == len("Hello there.")
    s.handle(Interrupt())
    assert s.pending_chars == 0 and s.next_request() is None
    assert s.characters_synthesized == len("Hello there.")  # clear keeps what was synthesized


def test_machine_refuses_text_beyond_the_limit_and_goes_on() -> None:
    s = machine(100)
    limit = s.text_backlog.limit
    piece = SENTENCE * (15_000 // len(SENTENCE))  # under max_text_chars: whole sentences
    for _ in range(2 * limit // len(piece)):
        if s.pending_chars + len(piece) > limit:
            break
        s.receive_text(text(piece))
    assert s.pending_chars + len(piece) > limit
    assert not [o for o in s.poll().messages if isinstance(o, m.Error)]
    before = s.pending_chars
    s.receive_text(text(piece))
    [err] = [o for o in s.poll().messages if isinstance(o, m.Error)]
    assert err.code == "text_backlog_full"
    assert s.pending_chars == before <= limit
    assert s.state == "open"


# --- the runner on a fake wire -----------------------------------------------------------------


class FakeEngine:
    """Synthesizer fake: 10 ms of audio per character, in one piece per chunk."""

    name = "fake"
    sample_rate = 16000
    max_chars = 200
    max_tokens: int | None = None

    def __init__(self) -> None:
        self.chunks = 0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def synthesize(self, text: str, *, voice: str | None, language: str
                         ) -> AsyncIterator[bytes]:
        self.chunks += 1
        yield b"\x01\x00" * 160 * len(text)


async def open_runner(
        max_pending_chars: int) -> tuple[TtsSessionRunner, RecordingWire, FakeSessionHost]:
    config = load_config(environ={}, overrides={
        "billing": {"enabled": False},
        "tts": {"session": {"max_pending_chars": max_pending_chars}},
    })
    server = FakeSessionHost()
    endpoint = TtsEndpoint(config=config, engines={"fake": cast(Synthesizer, FakeEngine())},
                           meters=PricedMeterFactory({}), server=server,
                           metrics=Metrics())
    decision = await endpoint.admit(
        UpgradeRequest(path="/v1/tts/stream", query={"model": "fake"}, api_key=None,
                       headers=Headers()), ANONYMOUS)
    assert isinstance(decision, Admitted)
    wire = RecordingWire(json.loads)
    runner = decision.start(cast(SessionSocket, wire))
    assert isinstance(runner, TtsSessionRunner)
    return runner, wire, server


async def settle(steps: int = 50) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


async def end(runner: TtsSessionRunner, server: FakeSessionHost) -> None:
    runner.on_connection_closed(1006)
    await asyncio.gather(*server.tasks)


async def test_reading_pauses_while_text_waits_and_the_client_reads_no_audio() -> None:
    """The issue's client: credit granted, sentences with `flush`, audio never read (the
    socket's write buffer stays full). The runner stops reading once `max_pending_chars`
    wait; nothing it was handed in the meantime grows the backlog past the bound."""
    runner, wire, server = await open_runner(max_pending_chars=2000)
    machine = runner.machine
    try:
        runner.on_text(json.dumps({"type": "credit", "bytes": 50_000_000}).encode())
        wire.write_paused = True  # the client does not read
        sent = 0
        while not wire.reading_paused:
            runner.on_text(text(SENTENCE * 10))
            runner.on_text(FLUSH)
            sent += len(SENTENCE) * 10
            await settle()
            assert sent < 100_000, "reading never paused"
        assert machine.text_backlog.full(machine.pending_chars)
        assert machine.pending_chars <= 2000 + len(SENTENCE) * 10
        # While paused, the socket delivers no more; synthesis waits for the client too.
        await settle()
        assert wire.reading_paused and machine.pending_chars >= 2000
        # The client reads its audio again: text drains, reading resumes at half the bound.
        wire.write_paused = False
        runner.on_writable()
        for _ in range(200):
            await settle(5)
            if not wire.reading_paused:
                break
        assert not wire.reading_paused
        assert machine.pending_chars <= 1000
        assert not [e for e in wire.events if e["type"] == "error"]
    finally:
        await end(runner, server)
    assert machine.pending_peak <= 2000 + len(SENTENCE) * 10


async def test_reading_goes_on_while_the_session_needs_the_clients_credit() -> None:
    """Without credit nothing can be sent; the client's `credit` sits behind its text, so the
    socket must be read: text beyond the limit is then refused, not buffered."""
    runner, wire, server = await open_runner(max_pending_chars=2000)
    machine = runner.machine
    try:
        piece = SENTENCE * (15_000 // len(SENTENCE))
        refused = 0
        for _ in range(40):  # ~600 k characters offered
            runner.on_text(text(piece))
            await settle()
            assert not wire.reading_paused or not machine.awaiting_credit
            refused = len([e for e in wire.events if e.get("code") == "text_backlog_full"])
            if refused:
                break
        assert machine.awaiting_credit and not wire.reading_paused
        assert refused == 1
        assert machine.pending_chars <= machine.text_backlog.limit
        assert machine.state == "open"
    finally:
        await end(runner, server)
