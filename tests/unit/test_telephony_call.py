"""A phone call without sockets (issue 12): `TelephonySession`, `Conversation` and `Playback`
with their real ASR and TTS machines and runners, the echo agent and synthetic engines, on a
fake provider connection and a virtual-time loop (timeouts pass in no wall time)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, cast

import pytest

from loadtest.loadgen import audio_frames
from server.billing.auth import ANONYMOUS, StaticKeyAuthenticator
from server.billing.meter import MeterFactory, PricedMeter, PricedMeterFactory, UsageReport
from server.config import Config, load_config
from server.models import tts_registry
from server.models.registry import aclose_all, build_transcribers, start_all
from server.sessions.asr_runner import AsrEndpoint
from server.telemetry.metrics import Metrics
from server.telephony.call.conversation import Conversation
from server.telephony.call.endpoint import TelephonyEndpoint
from server.telephony.call.session import TelephonySession
from server.ws.connection import WsConnection
from server.ws.server import WsServer
from tests.unit.virtual_time import run

OVERRIDES: dict[str, Any] = {
    "auth": {"allow_anonymous": True},
    "billing": {"enabled": False},
    "asr": {"session": {"default_model": "synthetic"},
            "models": {"synthetic": {"engine": "synthetic", "latency_base_ms": 1.0,
                                     "latency_per_item_ms": 0.0, "max_wait_ms": 1.0}}},
    "tts": {"session": {"default_model": "synthetic"},
            "models": {"synthetic": {"engine": "synthetic", "first_audio_ms": 5.0,
                                     "rtf": 0.01}}},
}


class ProviderConn:
    """The provider's socket: what the call sends (Twilio JSON), decoded for the test."""

    def __init__(self) -> None:
        self.peer = "10.0.0.1"
        self.write_paused = False
        self.reading_paused = False
        self.activity = False
        self.error_frames = True
        self.close_code: int | None = None
        self.sent: list[dict[str, Any]] = []

    def send_text(self, data: bytes) -> None:
        self.sent.append(json.loads(data))

    def send_binary(self, data: bytes) -> None:
        raise AssertionError("a provider socket only takes the provider's JSON")

    def flush(self) -> None:
        return None

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.sent if e["event"] == kind]


def twilio(event: str, body: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"event": event, "streamSid": "MZ1", "sequenceNumber": "1",
                       **(body or {})}).encode()


START = twilio("start", {"start": {
    "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


class Call:
    def __init__(self, config: Config, endpoint: TelephonyEndpoint, server: WsServer,
                 session: TelephonySession, conn: ProviderConn) -> None:
        self.config, self.endpoint, self.server = config, endpoint, server
        self.session, self.conn = session, conn
        self.frames = [base64.b64encode(f).decode() for f in audio_frames("speech")]
        self.sent_frames = 0
        self.echoed: set[str] = set()
        self.engines: tuple[Any, Any] = ({}, {})

    async def media(self, seconds: float, echo: bool = True) -> None:
        """Caller audio at real-time pace (virtual), echoing the agent's marks as played."""
        for _ in range(int(seconds * 50)):
            payload = self.frames[self.sent_frames % len(self.frames)]
            self.sent_frames += 1
            self.session.on_text(twilio("media", {"media": {
                "track": "inbound", "chunk": str(self.sent_frames),
                "timestamp": str(20 * self.sent_frames), "payload": payload}}))
            self.session.on_read_done()
            if echo:
                self.echo()
            await asyncio.sleep(0.02)

    def echo(self) -> None:
        for e in self.conn.events("mark"):
            name = e["mark"]["name"]
            if name not in self.echoed:
                self.echoed.add(name)
                self.session.on_text(twilio("mark", {"mark": {"name": name}}))

    async def end(self) -> None:
        if self.conn.close_code is None:
            self.session.on_text(twilio("stop"))
            for _ in range(1000):
                if self.conn.close_code is not None:
                    break
                await asyncio.sleep(0.01)
        self.session.on_connection_closed(self.conn.close_code or 1006)
        await self.server.close_tasks(30.0)
        await aclose_all(self.engines[0])
        await tts_registry.aclose_all(self.engines[1])


class EmptyWallet(PricedMeter):
    """The wallet paying for agent speech runs dry: its next report says so."""

    async def report(self) -> UsageReport:
        r = await super().report()
        return UsageReport(r.audio_ms, r.billed_ms, r.dropped_ms, r.cost_micros, 0,
                           exhausted=True)


class Wallets:
    def __init__(self, tts_exhausted: bool) -> None:
        self.tts_exhausted = tts_exhausted

    async def open(self, *, session_id: str, principal: Any, model: str,
                   unit: str = "audio_ms") -> PricedMeter:
        if unit == "characters" and self.tts_exhausted:
            return EmptyWallet(0)
        return PricedMeter(0)


async def open_call(principal_in_upgrade: bool = True, tts_exhausted: bool = False,
                    **telephony: Any) -> Call:
    config = load_config(environ={}, overrides={**OVERRIDES, "telephony": telephony})
    metrics = Metrics()
    asr_engines = build_transcribers({"synthetic": config.asr.models["synthetic"]}, metrics)
    tts_engines = tts_registry.build_synthesizers({"synthetic": config.tts.models["synthetic"]})
    await start_all(asr_engines)
    await tts_registry.start_all(tts_engines)
    auth = StaticKeyAuthenticator(config.auth.key_sha256, allow_anonymous=True)
    server = WsServer(config.server, metrics, auth)
    server._loop = asyncio.get_running_loop()
    meters: MeterFactory = Wallets(tts_exhausted) if tts_exhausted else PricedMeterFactory({})
    asr = AsrEndpoint(config=config, engines=asr_engines, meters=meters, server=server,
                      metrics=metrics)
    endpoint = TelephonyEndpoint(config=config, asr=asr, tts_engines=tts_engines, meters=meters,
                                 authenticator=auth, server=server, metrics=metrics)
    conn = ProviderConn()
    principal = ANONYMOUS if principal_in_upgrade else None
    call_meters = await endpoint.open_meters(ANONYMOUS) if principal_in_upgrade else None
    session = TelephonySession(endpoint, cast(WsConnection, conn), provider="twilio",
                               principal=principal, meters=call_meters)
    session.start()
    call = Call(config, endpoint, server, session, conn)
    call.engines = (asr_engines, tts_engines)
    return call


async def answered_call(call: Call, start: bytes = START) -> Conversation:
    """Start the call and send the caller's speech until the agent has answered once."""
    call.session.on_text(start)
    await asyncio.sleep(0)
    conversation = call.session.conversation
    assert conversation is not None
    for _ in range(20):
        await call.media(1.0)
        if any(h.role == "agent" for h in conversation.history):
            break
    return conversation


def test_no_start_event_closes_4001_after_the_start_timeout_in_no_wall_time(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        call = await open_call(start_timeout_s=5.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(20):  # polled on the virtual clock: the fake socket has no event
            if call.conn.close_code is not None:
                break
            await asyncio.sleep(0.5)
        assert call.conn.close_code == 4001
        assert 5.0 <= loop.time() - t0 <= 5.5
        assert call.conn.sent == []  # nothing but provider messages, and none of those
        await call.end()

    with caplog.at_level(logging.INFO, logger="streamgate.telephony"):
        run(scenario())
    ended = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert len(ended) == 1 and ended[0].close_code == 4001  # type: ignore[attr-defined]


def test_a_call_hears_the_caller_answers_and_hangs_up_1000(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        call = await open_call()
        call.session.on_text(START)
        await asyncio.sleep(0)
        assert call.session.state == "live"
        conversation = call.session.conversation
        assert conversation is not None
        for _ in range(20):
            await call.media(1.0)
            if conversation.turns and any(h.role == "agent" for h in conversation.history):
                break
        assert conversation.turns >= 1
        agent = [h for h in conversation.history if h.role == "agent"]
        assert agent and agent[0].text.startswith("You said:") and not agent[0].interrupted
        assert call.conn.events("media") and call.conn.events("mark")
        await call.end()
        assert call.conn.close_code == 1000

    with caplog.at_level(logging.INFO, logger="streamgate.telephony"):
        run(scenario())
    ended = [r for r in caplog.records if r.getMessage() == "call ended"]
    assert len(ended) == 1 and ended[0].close_code == 1000  # type: ignore[attr-defined]


def test_the_agents_speech_is_resampled_to_the_call_at_the_configured_quality() -> None:
    """Decisions 15M1, 15R2: HB by default (16 kHz engine -> 8 kHz G.711: the half-band FIR),
    kept across the agent's replies (each chunk gets a fresh resampler), and
    `telephony.tts_resample_quality` rules."""
    async def scenario(quality: str | None) -> str:
        call = await (open_call() if quality is None else
                      open_call(tts_resample_quality=quality))
        await answered_call(call)
        assert call.conn.events("media")  # the agent spoke, through the resampler
        playback = call.session.playback
        assert playback is not None
        machine = playback.machine
        assert machine.resampler.in_rate == 16000 and machine.resampler.out_rate == 8000
        runner = call.session.runner
        assert runner is not None
        # The caller's direction (8 kHz up to the engine's 16 kHz) alike.
        assert runner.machine.settings.resample_quality == "HB"
        got = machine.resampler.quality
        await call.end()
        return got

    assert run(scenario(None)) == "HB"
    assert run(scenario("HQ")) == "HQ"


def test_keypad_digits_reach_the_agent_after_the_quiet_timeout() -> None:
    async def scenario() -> None:
        call = await open_call(dtmf_timeout_s=1.5)
        call.session.on_text(START)
        await asyncio.sleep(0)
        conversation = call.session.conversation
        assert conversation is not None
        for digit in "42":
            call.session.on_text(twilio("dtmf", {"dtmf": {"track": "inbound_track",
                                                          "digit": digit}}))
        await asyncio.sleep(1.0)
        assert conversation.turns == 0  # still collecting
        await asyncio.sleep(1.0)
        assert conversation.turns == 1
        assert conversation.history[0].text == "(pressed keys: 42)"
        for _ in range(200):
            call.echo()
            if len(conversation.history) == 2:
                break
            await asyncio.sleep(0.02)
        assert conversation.history[1].text == "You pressed 42"
        await call.end()

    run(scenario())


def test_caller_speech_during_a_reply_barges_in_with_what_was_played() -> None:
    async def scenario() -> None:
        call = await open_call(credit_ms=200)
        call.session.on_text(START)
        await asyncio.sleep(0)
        conversation = call.session.conversation
        playback = call.session.playback
        assert conversation is not None and playback is not None
        call.session.on_text(twilio("dtmf", {"dtmf": {"track": "inbound_track",
                                                      "digit": "#"}}))
        for _ in range(100):
            if call.conn.events("mark"):
                break
            await asyncio.sleep(0.01)
        # The provider plays (and echoes) nothing: the caller speaks over the reply.
        await call.media(8.0, echo=False)
        assert conversation.barge_ins >= 1
        assert call.conn.events("clear")
        interrupted = [h for h in conversation.history if h.interrupted]
        assert interrupted and interrupted[0].text == ""  # nothing was heard
        await call.end()

    run(scenario())


@pytest.mark.parametrize("how", ["drain", "wallet"])
def test_a_call_ended_by_the_server_closes_with_its_code(
        how: str, caplog: pytest.LogCaptureFixture) -> None:
    """The call tells its ASR runner how it ends (a command, not a fake client message)."""
    async def scenario() -> None:
        call = await open_call(tts_exhausted=how == "wallet")
        call.session.on_text(START)
        await asyncio.sleep(0)
        assert call.session.state == "live"
        if how == "drain":
            call.session.on_drain()
        for _ in range(30):  # the usage report comes within its interval (virtual time)
            if call.conn.close_code is not None:
                break
            await call.media(1.0)
        await call.end()

    with caplog.at_level(logging.INFO, logger="streamgate.telephony"):
        run(scenario())
    ended = [r for r in caplog.records if r.getMessage() == "call ended"]
    expected = 1001 if how == "drain" else 4002
    assert len(ended) == 1 and ended[0].close_code == expected  # type: ignore[attr-defined]
