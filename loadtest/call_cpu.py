"""The per-call CPU of a phone call through the telephony session, without sockets:
`python -m loadtest.call_cpu`.

Issue 15 asks for 1,000 calls per core, so the session layer's cost per call-second matters.
This drives the server's own objects (TelephonySession -> AsrSessionRunner, Playback,
Conversation, EchoAgent, synthetic ASR and TTS engines with no latency) for `--calls` Twilio
calls at once, each `--seconds` long: a `start`, one 20 ms speech media message per call per
round, every outbound `mark` echoed the round after it was sent (a provider that plays the
audio), keypad digits now and then (an agent reply to play, and barge-ins), then `stop`.
It prints CPU microseconds per call-second (the provider socket and its WebSocket framing are
left out: a fake connection takes the provider's JSON). The best of `--repeat` runs; under
`valgrind --tool=callgrind` the instruction counts are repeatable on a shared machine.

    python -m loadtest.call_cpu [--calls 200] [--seconds 20] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import gc
import json
import pstats
import sys
import time
from typing import Any, cast

from loadtest.loadgen import audio_frames
from server.billing.auth import ANONYMOUS, StaticKeyAuthenticator
from server.billing.meter import PricedMeterFactory
from server.config import Config, load_config
from server.models import tts_registry
from server.models.registry import aclose_all, build_transcribers, start_all
from server.sessions.asr_runner import AsrEndpoint
from server.telemetry.metrics import Metrics
from server.telephony.call.endpoint import TelephonyEndpoint
from server.telephony.call.session import TelephonySession
from server.ws.connection import WsConnection
from server.ws.server import WsServer

OVERRIDES: dict[str, Any] = {
    "auth": {"allow_anonymous": True},
    "billing": {"enabled": False},
    "logging": {"level": "WARNING"},
    "server": {"idle_timeout_s": 600},
    "asr": {"session": {"default_model": "synthetic"},
            "models": {"synthetic": {"engine": "synthetic", "latency_base_ms": 0.0,
                                     "latency_per_item_ms": 0.0, "max_batch": 64,
                                     "max_wait_ms": 0.0}}},
    "tts": {"session": {"default_model": "synthetic"},
            "models": {"synthetic": {"engine": "synthetic", "first_audio_ms": 0.0,
                                     "rtf": 0.0}}},
}


class FakeProviderConn:
    """What TelephonySession and its runners use of WsConnection; keeps the names of the
    marks sent so the driver can echo them like a provider that played the audio."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.write_paused = False
        self.reading_paused = False
        self.activity = False
        self.error_frames = True
        self.close_code: int | None = None
        self.marks: list[bytes] = []
        self.sent = 0

    def send_text(self, data: bytes) -> None:
        self.sent += 1
        if data.startswith(b'{"event":"mark"'):
            # The codec's own shape ({"event":"mark",...,"mark":{"name":"..."}}); names are
            # ours (r<reply>-<n>), so no JSON escapes to undo.
            self.marks.append(data[data.rindex(b'"name":"') + 8 : -3])

    def send_binary(self, data: bytes) -> None:
        self.sent += 1

    def flush(self) -> None:
        return None

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False


def _twilio(event: str, sid: str, body: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"event": event, "streamSid": sid, "sequenceNumber": "1",
                       **(body or {})}).encode()


def _media(sid: bytes, r: int, payload: bytes) -> bytes:
    """What `_twilio("media", ...)` gives, without a json.dumps per message (the driver's own
    cost is not the server's): the same bytes but for json.dumps' spaces."""
    return b"".join((b'{"event":"media","streamSid":"', sid,
                     b'","sequenceNumber":"1","media":{"track":"inbound","chunk":"',
                     str(r).encode(), b'","timestamp":"', str(20 * r).encode(),
                     b'","payload":"', payload, b'"}}'))


def _mark(sid: bytes, name: bytes) -> bytes:
    return b"".join((b'{"event":"mark","streamSid":"', sid,
                     b'","sequenceNumber":"1","mark":{"name":"', name, b'"}}'))


async def run(config: Config, calls: int, seconds: int, profile: bool) -> tuple[float, int]:
    metrics = Metrics()
    asr_engines = build_transcribers({"synthetic": config.asr.models["synthetic"]}, metrics)
    tts_engines = tts_registry.build_synthesizers({"synthetic": config.tts.models["synthetic"]})
    await start_all(asr_engines)
    await tts_registry.start_all(tts_engines)
    auth = StaticKeyAuthenticator(config.auth.key_sha256, allow_anonymous=True)
    server = WsServer(config.server, metrics, auth)
    server._loop = asyncio.get_running_loop()
    server.now = server._loop.time()
    meters = PricedMeterFactory({})
    asr = AsrEndpoint(config=config, engines=asr_engines, meters=meters, server=server,
                      metrics=metrics)
    endpoint = TelephonyEndpoint(config=config, asr=asr, tts_engines=tts_engines, meters=meters,
                                 authenticator=auth, server=server, metrics=metrics)
    frames = [base64.b64encode(f) for f in audio_frames("speech")]
    sessions: list[tuple[TelephonySession, FakeProviderConn, str]] = []
    for i in range(calls):
        conn = FakeProviderConn(f"10.0.0.{i}")
        meter = await endpoint.open_meters(ANONYMOUS)
        session = TelephonySession(endpoint, cast(WsConnection, conn), provider="twilio",
                                   principal=ANONYMOUS, meters=meter)
        session.start()
        sid = f"MZ{i}"
        session.on_text(_twilio("start", sid, {"start": {
            "streamSid": sid, "callSid": f"CA{i}", "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
        sessions.append((session, conn, sid))
    while any(s.state != "live" for s, _, _ in sessions):  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    prof = cProfile.Profile() if profile else None
    gc.collect()
    t0 = time.process_time()
    if prof is not None:
        prof.enable()
    for r in range(seconds * 50):
        for i, (session, conn, sid) in enumerate(sessions):
            sid_b = sid.encode()
            marks, conn.marks = conn.marks, []
            for name in marks:
                session.on_text(_mark(sid_b, name))
            session.on_text(_media(sid_b, r, frames[(r + 37 * i) % len(frames)]))
            if (r + i) % 150 == 0:
                session.on_text(_twilio("dtmf", sid, {"dtmf": {"track": "inbound_track",
                                                               "digit": "#"}}))
            session.on_read_done()
        await asyncio.sleep(0)
    for session, _, sid in sessions:
        session.on_text(_twilio("stop", sid))
    for _ in range(200):
        if all(c.close_code is not None for _, c, _ in sessions):
            break
        await asyncio.sleep(0.01)
    if prof is not None:
        prof.disable()
    busy = time.process_time() - t0
    sent = sum(c.sent for _, c, _ in sessions)
    turns = sum(s.conversation.turns for s, _, _ in sessions if s.conversation is not None)
    print(f"turns {turns}, barge-ins "
          f"{sum(s.conversation.barge_ins for s, _, _ in sessions if s.conversation)}")
    for session, _, _ in sessions:
        session.on_connection_closed(1000)
    await server.close_tasks(5.0)
    await aclose_all(asr_engines)
    await tts_registry.aclose_all(tts_engines)
    if prof is not None:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    return busy / (calls * seconds), sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    config = load_config(environ={}, overrides=OVERRIDES)
    best = float("inf")
    sent = 0
    for _ in range(args.repeat):
        per_call_s, sent = asyncio.run(run(config, args.calls, args.seconds, args.profile))
        best = min(best, per_call_s)
    print(f"{args.calls} calls x {args.seconds} s: {best * 1e6:.0f} us CPU per call-second "
          f"(best of {args.repeat}; {sent} provider messages sent in the last run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
