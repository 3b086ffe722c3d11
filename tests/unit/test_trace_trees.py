"""Span trees of whole sessions (issue 17): the server's own objects in this process, the SDK's
InMemorySpanExporter, a real WebSocket listener and client, and a fake upstream model server
that must receive our `traceparent`.

    ws.upgrade (child of the client's traceparent)
      admission.authenticate, admission.lease
      asr.session -> asr.utterance -> asr.engine.finish -> upstream.asr  (traceparent sent)
      tts.session -> tts.chunk -> upstream.tts                            (traceparent sent)
    telephony.call -> asr.session ..., telephony.turn (a Twilio call, in virtual time)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from websockets.asyncio.client import connect

from server.billing.auth import StaticKeyAuthenticator
from server.billing.meter import PricedMeterFactory
from server.config import load_config
from server.http.app import build_http_app
from server.models import tts_registry
from server.models.registry import aclose_all, build_transcribers, start_all
from server.sessions.asr_runner import AsrEndpoint
from server.sessions.tts_runner import TtsEndpoint
from server.telemetry import tracing
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import TRACING
from server.ws.server import WsServer
from tests.fakes.upstream import FakeReply, FakeUpstream
from tests.speech import espeak_pcm16, silence
from tests.unit.test_telephony_call import answered_call, open_call, twilio
from tests.unit.virtual_time import run

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
FRAME = 640


@dataclass
class Served:
    url: str
    upstream: FakeUpstream


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Served]:
    """Inside the test (not a fixture): the leak check runs before fixtures end."""
    async with FakeUpstream() as upstream:
        cfg = load_config(environ={}, overrides={
            "server": {"host": "127.0.0.1", "ws_port": 0},
            "auth": {"allow_anonymous": True}, "billing": {"enabled": False},
            "asr": {"session": {"default_model": "up"},
                    "models": {"up": {"engine": "upstream", "url": upstream.url,
                                      "retries": 0}}},
            "tts": {"session": {"default_model": "up"},
                    "models": {"up": {"engine": "upstream", "url": upstream.url,
                                      "retries": 0}}}})
        metrics = Metrics()
        server = WsServer(cfg.server, metrics,
                          StaticKeyAuthenticator(cfg.auth.key_sha256, allow_anonymous=True))
        asr_engines = build_transcribers(cfg.asr.models, metrics)
        tts_engines = tts_registry.build_synthesizers(cfg.tts.models)
        await start_all(asr_engines)
        await tts_registry.start_all(tts_engines)
        meters = PricedMeterFactory({})
        server.router.add("/v1/asr/stream", AsrEndpoint(
            config=cfg, engines=asr_engines, meters=meters, server=server, metrics=metrics))
        server.router.add("/v1/tts/stream", TtsEndpoint(
            config=cfg, engines=tts_engines, meters=meters, server=server, metrics=metrics))
        await server.start()
        try:
            yield Served(f"ws://127.0.0.1:{server.port}", upstream)
        finally:
            await server.drain(5.0)
            await aclose_all(asr_engines)
            await tts_registry.aclose_all(tts_engines)


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    parent: int = span.parent.span_id
    return parent


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    own: int = span.context.span_id
    return own


def trace_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def int_attr(span: ReadableSpan, key: str) -> int:
    value = (span.attributes or {}).get(key)
    assert isinstance(value, int), f"{span.name}.{key} = {value!r}"
    return value


def sent_traceparent(upstream: FakeUpstream, path: str) -> str:
    (request,) = [r for r in upstream.requests if r.path == path]
    headers = {k.lower(): v for k, v in request.headers.items()}
    return headers["traceparent"]


async def test_asr_session_span_tree_reaches_the_upstream(spans: InMemorySpanExporter) -> None:
    async with serving() as served:
        await asr_session(spans, served)


async def asr_session(spans: InMemorySpanExporter, served: Served) -> None:
    served.upstream.script(FakeReply.transcription("hello there", [("hello", 0.0, 0.4)]))
    audio = silence(400) + espeak_pcm16("hello there, how are you") + silence(900)
    events: list[dict[str, Any]] = []
    async with connect(f"{served.url}/v1/asr/stream?metrics=true",
                       additional_headers={"traceparent": TRACEPARENT}) as ws:
        for i in range(0, len(audio), FRAME):
            await ws.send(audio[i:i + FRAME])
        await ws.send(json.dumps({"type": "close"}))
        async for raw in ws:
            events.append(json.loads(raw))
    ready = events[0]
    assert ready["type"] == "ready" and ready["trace_id"] == CLIENT_TRACE
    (metrics,) = [e for e in events if e["type"] == "metrics"]
    assert metrics["queue_ms"] >= 0 and metrics["engine_ms"] >= 0

    tree = by_name(spans.get_finished_spans())
    (upgrade,) = tree["ws.upgrade"]
    assert parent_of(upgrade) == int(CLIENT_SPAN, 16) and trace_of(upgrade) == CLIENT_TRACE
    assert int_attr(upgrade, "http.response.status_code") == 101
    (auth,) = tree["admission.authenticate"]
    (lease,) = tree["admission.lease"]
    assert parent_of(auth) == parent_of(lease) == span_id(upgrade)
    (session,) = tree["asr.session"]
    assert parent_of(session) == span_id(upgrade)
    assert int_attr(session, "streamgate.close_code") == 1000
    (utterance,) = tree["asr.utterance"]
    assert parent_of(utterance) == span_id(session)
    assert [e.name for e in utterance.events] == ["end_of_speech"]
    (finish,) = tree["asr.engine.finish"]
    assert parent_of(finish) == span_id(utterance)
    assert all(parent_of(feed) == span_id(utterance) for feed in tree["asr.engine.feed"])
    (call,) = tree["upstream.asr"]
    assert parent_of(call) == span_id(finish)
    assert {s.context.trace_id for s in spans.get_finished_spans() if s.context} == {
        int(CLIENT_TRACE, 16)}
    # The model server was told to join: its parent is our upstream call's span.
    version, trace_id, parent, _ = sent_traceparent(
        served.upstream, "/v1/audio/transcriptions").split("-")
    assert (version, trace_id, parent) == ("00", CLIENT_TRACE, f"{span_id(call):016x}")


async def test_tts_session_span_tree_reaches_the_upstream(spans: InMemorySpanExporter) -> None:
    async with serving() as served:
        await tts_session(spans, served)


async def tts_session(spans: InMemorySpanExporter, served: Served) -> None:
    events: list[dict[str, Any]] = []
    audio_bytes = 0
    async with connect(f"{served.url}/v1/tts/stream?metrics=true") as ws:
        await ws.send(json.dumps({"type": "text", "text": "Hello there."}))
        await ws.send(json.dumps({"type": "flush"}))
        await ws.send(json.dumps({"type": "credit", "bytes": 10_000_000}))
        async for raw in ws:
            if isinstance(raw, bytes):
                audio_bytes += len(raw)
                continue
            event = json.loads(raw)
            events.append(event)
            if event["type"] == "flushed":
                await ws.send(json.dumps({"type": "close"}))
    assert audio_bytes > 0
    types = [e["type"] for e in events]
    assert types.index("metrics") == types.index("audio_done") + 1
    (metrics,) = [e for e in events if e["type"] == "metrics"]
    assert metrics["chunk_id"] == 1 and metrics["audio_ms"] > 0
    assert metrics["time_to_first_audio_ms"] <= metrics["synthesis_ms"]
    assert metrics["real_time_factor"] == pytest.approx(
        metrics["synthesis_ms"] / metrics["audio_ms"], abs=0.002)

    tree = by_name(spans.get_finished_spans())
    (upgrade,) = tree["ws.upgrade"]
    assert upgrade.parent is None  # no traceparent from this client: a trace of its own
    (session,) = tree["tts.session"]
    assert parent_of(session) == span_id(upgrade)
    assert events[0]["trace_id"] == trace_of(session)
    (chunk,) = tree["tts.chunk"]
    assert parent_of(chunk) == span_id(session)
    (call,) = tree["upstream.tts"]
    assert parent_of(call) == span_id(chunk)
    _, trace_id, parent, _ = sent_traceparent(served.upstream, "/v1/audio/speech").split("-")
    assert (trace_id, parent) == (trace_of(session), f"{span_id(call):016x}")


async def test_tracing_off_sends_no_trace_id_and_no_traceparent() -> None:
    async with serving() as served:
        await untraced_session(served)


async def untraced_session(served: Served) -> None:
    assert not TRACING.on
    async with connect(f"{served.url}/v1/tts/stream",
                       additional_headers={"traceparent": TRACEPARENT}) as ws:
        ready = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "text", "text": "Hi."}))
        await ws.send(json.dumps({"type": "flush"}))
        await ws.send(json.dumps({"type": "close"}))
        async for _ in ws:
            pass
    assert ready["type"] == "ready" and "trace_id" not in ready
    (request,) = served.upstream.requests
    assert "traceparent" not in {k.lower() for k in request.headers}


def test_twilio_call_span_tree(spans: InMemorySpanExporter) -> None:
    """telephony.call (parent: a traceparent in the start event's customParameters) ->
    asr.session -> asr.utterance -> asr.engine.*, and telephony.turn from the caller's end of
    speech to the agent's first audio, which the turn-latency histogram sees too."""
    start = twilio("start", {"start": {
        "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
        "customParameters": {"traceparent": TRACEPARENT},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
    observed: list[float] = []

    async def scenario() -> None:
        call = await open_call()
        await answered_call(call, start)
        await call.end()
        count = call.endpoint.metrics.registry.get_sample_value(
            "streamgate_telephony_turn_latency_seconds_count", {"agent": "echo"})
        observed.append(count or 0.0)

    run(scenario())
    tree = by_name(spans.get_finished_spans())
    (call_span,) = tree["telephony.call"]
    assert parent_of(call_span) == int(CLIENT_SPAN, 16) and trace_of(call_span) == CLIENT_TRACE
    assert int_attr(call_span, "streamgate.turns") >= 1
    (session,) = tree["asr.session"]
    assert parent_of(session) == span_id(call_span)
    utterances = tree["asr.utterance"]
    assert utterances and all(parent_of(u) == span_id(session) for u in utterances)
    engine_calls = tree.get("asr.engine.feed", []) + tree["asr.engine.finish"]
    assert {parent_of(c) for c in engine_calls} <= {span_id(u) for u in utterances}
    turns = tree["telephony.turn"]
    assert turns and all(parent_of(t) == span_id(call_span) for t in turns)
    # The agent's speech, chunk by chunk, under the call.
    chunks = tree["tts.chunk"]
    assert chunks and all(parent_of(c) == span_id(call_span) for c in chunks)
    assert all(int_attr(c, "streamgate.characters") > 0 for c in chunks)
    answered = [t for t in turns if t.attributes and "streamgate.turn_latency_ms" in t.attributes]
    assert answered, "no turn reached the agent's first audio"
    first = answered[0]
    # The caller's wait: the VAD's endpointing silence, then the final, then the agent.
    assert int_attr(first, "streamgate.turn_latency_ms") >= int_attr(
        first, "streamgate.caller_stopped_to_turn_ms") >= 500  # telephony.endpointing_ms
    assert observed and observed[0] > 0


async def test_http_request_span_follows_the_clients_traceparent(
        spans: InMemorySpanExporter) -> None:
    app = build_http_app(Metrics(), lambda: (True, ""))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/healthz", headers={"traceparent": TRACEPARENT})
        assert resp.status == 200
    (request,) = by_name(spans.get_finished_spans())["http.request"]
    assert parent_of(request) == int(CLIENT_SPAN, 16) and trace_of(request) == CLIENT_TRACE
    assert int_attr(request, "http.response.status_code") == 200


async def test_unsampled_session_still_exports_its_error_spans() -> None:
    """sample_ratio 0 with always_sample_errors: a session whose upstream engine fails exports
    the failing spans (and nothing else), still carrying the client's trace id."""
    exporter = InMemorySpanExporter()
    TRACING.configure(enabled=True, sample_ratio=0.0, always_sample_errors=True,
                      span_exporter=exporter)
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    try:
        async with serving() as served:
            served.upstream.script(FakeReply.error(500))
            audio = silence(400) + espeak_pcm16("hello there") + silence(900)
            async with connect(f"{served.url}/v1/asr/stream",
                               additional_headers={"traceparent": unsampled}) as ws:
                for i in range(0, len(audio), FRAME):
                    await ws.send(audio[i:i + FRAME])
                await ws.send(json.dumps({"type": "close"}))
                errors = [e async for e in ws if json.loads(e)["type"] == "error"]
            assert errors  # engine_error for the utterance
    finally:
        TRACING.shutdown()
    exported = exporter.get_finished_spans()
    names = sorted(s.name for s in exported)
    assert names == ["asr.engine.finish", "asr.utterance", "upstream.asr"]
    assert {trace_of(s) for s in exported} == {CLIENT_TRACE}


async def test_an_upgrade_with_two_traceparent_headers_is_served_under_a_trace_of_its_own(
        spans: InMemorySpanExporter) -> None:
    """Two `traceparent` headers (a proxy that adds its own) made the upgrade answer 500 with a
    traceback in the log; now the session is admitted and traced under a new trace."""
    async with serving() as served, connect(
            f"{served.url}/v1/asr/stream",
            additional_headers=[("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT),
                                ("tracestate", "a=1"), ("tracestate", "b=2")]) as ws:
        ready = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "close"}))
        async for _ in ws:
            pass
    assert ready["type"] == "ready" and ready["trace_id"] not in ("", CLIENT_TRACE)
    (upgrade,) = by_name(spans.get_finished_spans())["ws.upgrade"]
    assert upgrade.parent is None and int_attr(upgrade, "http.response.status_code") == 101


def test_a_call_without_a_traceparent_hangs_under_its_sockets_upgrade(
        spans: InMemorySpanExporter) -> None:
    """Providers send no headers: a call whose start event names no trace is a child of its
    provider socket's `ws.upgrade` (current where the socket's session is built), so the
    upgrade's admission and the call are one trace."""
    start = twilio("start", {"start": {
        "streamSid": "MZ2", "callSid": "CA2", "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
    upgrade_ids: list[int] = []

    async def scenario() -> None:
        with tracing.child("ws.upgrade") as upgrade:  # as the admission task holds it
            upgrade_ids.append(upgrade.get_span_context().span_id)
            call = await open_call()
        call.session.on_text(start)
        await asyncio.sleep(0)
        await call.media(0.5)
        await call.end()

    run(scenario())
    (call_span,) = by_name(spans.get_finished_spans())["telephony.call"]
    assert parent_of(call_span) == upgrade_ids[0]
