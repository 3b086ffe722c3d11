"""Telephony agents (server/telephony/call/agents.py) against real HTTP servers on loopback, and the
played-text estimate that goes into an agent's history after a barge-in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.config import TelephonyAgentConfig
from server.telemetry import tracing
from server.telephony.call.agents import (
    AgentError,
    AgentTurn,
    ChatAgent,
    EchoAgent,
    HistoryEntry,
    WebhookAgent,
    build_agent,
)
from server.telephony.call.playback import Reply, _ChunkPlay, _prefix
from tests.fakes.upstream import FakeChat, FakeUpstream

HISTORY = (
    HistoryEntry("caller", "hello"),
    HistoryEntry("agent", "Hi, how can I", interrupted=True),
)
TURN = AgentTurn(call_id="CA1", stream_id="MZ1", text="what time is it", history=HISTORY)


async def collect(pieces: AsyncIterator[str]) -> list[str]:
    return [p async for p in pieces]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/hook"


def webhook_cfg(url: str, **kw: Any) -> TelephonyAgentConfig:
    return TelephonyAgentConfig(kind="webhook", url=url, **kw)


# --- echo ---------------------------------------------------------------------------------------


async def test_echo_agent_repeats_speech_and_digits() -> None:
    agent = EchoAgent()
    assert await collect(agent.respond(TURN)) == ["You said: what time is it"]
    digits = AgentTurn(call_id="CA1", stream_id="MZ1", dtmf="12#")
    assert await collect(agent.respond(digits)) == ["You pressed 12#"]
    assert await collect(agent.respond(AgentTurn(call_id="CA1", stream_id="MZ1"))) == []
    await agent.aclose()


def test_build_agent_by_kind() -> None:
    assert isinstance(build_agent(TelephonyAgentConfig()), EchoAgent)
    assert isinstance(build_agent(webhook_cfg("http://x/hook")), WebhookAgent)
    chat = build_agent(TelephonyAgentConfig(kind="chat", url="http://x:1"))
    assert isinstance(chat, ChatAgent)
    assert chat.endpoint == "http://x:1/v1/chat/completions"


# --- webhook ------------------------------------------------------------------------------------


async def test_webhook_posts_the_turn_and_speaks_the_json_text() -> None:
    seen: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return web.json_response({"text": "It is noon."})

    runner, url = await serve(hook)
    agent = WebhookAgent(webhook_cfg(url))
    try:
        assert await collect(agent.respond(TURN)) == ["It is noon."]
    finally:
        await agent.aclose()
        await runner.cleanup()
    assert seen == [{
        "call_id": "CA1", "stream_id": "MZ1", "text": "what time is it", "dtmf": None,
        "history": [{"role": "caller", "text": "hello", "interrupted": False},
                    {"role": "agent", "text": "Hi, how can I", "interrupted": True}],
    }]


async def test_traced_agent_calls_carry_traceparent_and_a_stopped_reply_is_cancelled(
        spans: InMemorySpanExporter) -> None:
    """Issue 17: each agent request is an `upstream.agent` client span under the turn's span,
    and the agent's server receives its `traceparent`; a reply the call stops reading
    (barge-in) ends its span as cancelled, not as an error."""
    received: list[str] = []

    async def hook(request: web.Request) -> web.StreamResponse:
        received.append(request.headers.get("traceparent", ""))
        return web.json_response({"text": "It is noon."})

    runner, url = await serve(hook)
    webhook = WebhookAgent(webhook_cfg(url))
    try:
        with tracing.child("telephony.turn") as turn:
            assert await collect(webhook.respond(TURN)) == ["It is noon."]
        async with FakeUpstream() as fake:
            fake.script_chat(FakeChat(["One.", " Two.", " Three."], delay_s=0.05))
            chat = ChatAgent(TelephonyAgentConfig(kind="chat", url=fake.url))
            try:
                with tracing.child("telephony.turn"):
                    pieces = chat.respond(TURN)
                    assert await anext(pieces) == "One."
                    await pieces.aclose()  # type: ignore[attr-defined]
            finally:
                await chat.aclose()
    finally:
        await webhook.aclose()
        await runner.cleanup()
    hook_span, chat_span = [s for s in spans.get_finished_spans()
                            if s.name == "upstream.agent"]
    assert hook_span.parent is not None
    assert hook_span.parent.span_id == turn.get_span_context().span_id
    assert hook_span.attributes is not None
    assert hook_span.attributes["streamgate.agent"] == "webhook"
    assert hook_span.attributes["http.response.status_code"] == 200
    assert hook_span.status.is_ok
    _, trace_id, span_id, _ = received[0].split("-")
    assert (trace_id, span_id) == (format(hook_span.context.trace_id, "032x"),
                                   format(hook_span.context.span_id, "016x"))
    assert chat_span.attributes is not None and chat_span.attributes["streamgate.cancelled"] is True
    assert chat_span.status.is_ok


async def test_webhook_plain_text_is_spoken_as_it_streams() -> None:
    """The second part is only written after the agent consumed the first: streaming, not
    buffering. A multi-byte character split across writes is decoded whole."""
    go_on = asyncio.Event()
    euro = "€".encode()

    async def hook(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        await resp.write(b"First part. " + euro[:1])
        await asyncio.wait_for(go_on.wait(), 5)
        await resp.write(euro[1:] + b"5 later.")
        await resp.write_eof()
        return resp

    runner, url = await serve(hook)
    agent = WebhookAgent(webhook_cfg(url))
    pieces: list[str] = []
    try:
        async for piece in agent.respond(TURN):
            pieces.append(piece)
            go_on.set()
    finally:
        await agent.aclose()
        await runner.cleanup()
    assert pieces[0] == "First part. "
    assert "".join(pieces) == "First part. €5 later."


async def test_webhook_http_error_is_an_agent_error() -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    runner, url = await serve(hook)
    agent = WebhookAgent(webhook_cfg(url))
    try:
        with pytest.raises(AgentError, match="HTTP 500: boom"):
            await collect(agent.respond(TURN))
    finally:
        await agent.aclose()
        await runner.cleanup()


async def test_webhook_json_without_text_is_an_agent_error() -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        return web.json_response({"say": "hi"})

    runner, url = await serve(hook)
    agent = WebhookAgent(webhook_cfg(url))
    try:
        with pytest.raises(AgentError, match="no \"text\""):
            await collect(agent.respond(TURN))
    finally:
        await agent.aclose()
        await runner.cleanup()


async def test_webhook_that_never_answers_times_out() -> None:
    release = asyncio.Event()

    async def hook(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"text": "too late"})

    runner, url = await serve(hook)
    agent = WebhookAgent(webhook_cfg(url, first_text_timeout_s=0.3))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        with pytest.raises(AgentError, match="timed out"):
            await collect(agent.respond(TURN))
    finally:
        release.set()
        await agent.aclose()
        await runner.cleanup()
    assert loop.time() - t0 < 2.0


async def test_webhook_stalling_mid_reply_times_out_after_the_first_piece() -> None:
    release = asyncio.Event()

    async def hook(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(b"Hello. ")
        await release.wait()
        return resp

    runner, url = await serve(hook)
    agent = WebhookAgent(webhook_cfg(url, read_timeout_s=0.3))
    pieces: list[str] = []
    try:
        with pytest.raises(AgentError, match="timed out"):
            async for piece in agent.respond(TURN):
                pieces.append(piece)
    finally:
        release.set()
        await agent.aclose()
        await runner.cleanup()
    assert pieces == ["Hello. "]


async def test_webhook_unreachable_is_an_agent_error() -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        return web.Response()

    runner, url = await serve(hook)
    await runner.cleanup()  # nothing listens there any more
    agent = WebhookAgent(webhook_cfg(url))
    try:
        with pytest.raises(AgentError, match="request failed"):
            await collect(agent.respond(TURN))
    finally:
        await agent.aclose()


# --- chat completions ---------------------------------------------------------------------------


async def test_chat_agent_streams_tokens_as_they_arrive() -> None:
    async with FakeUpstream() as fake:
        fake.script_chat(FakeChat(["It", " is", " noon", "."], delay_s=0.05))
        agent = ChatAgent(TelephonyAgentConfig(kind="chat", url=fake.url, model="fake-llm",
                                               system_prompt="Be brief."))
        try:
            pieces = await collect(agent.respond(TURN))
        finally:
            await agent.aclose()
    assert pieces == ["It", " is", " noon", "."]
    [body] = fake.chat_requests
    assert body["stream"] is True and body["model"] == "fake-llm"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi, how can I [interrupted by the caller]"},
        {"role": "user", "content": "what time is it"},
    ]


async def test_chat_agent_dtmf_turn_and_early_stop() -> None:
    """The consumer may stop mid-reply (barge-in): the stream is closed, nothing leaks."""
    async with FakeUpstream() as fake:
        fake.script_chat(FakeChat(["One.", " Two.", " Three."], delay_s=0.05))
        agent = ChatAgent(TelephonyAgentConfig(kind="chat", url=fake.url + "/v1"))
        pieces = agent.respond(AgentTurn(call_id="CA1", stream_id="MZ1", dtmf="7"))
        try:
            first = await anext(pieces)
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
            await agent.aclose()
    assert first == "One."
    assert fake.chat_requests[0]["messages"][-1] == {
        "role": "user", "content": "(The caller pressed keys: 7)"}


async def test_chat_agent_upstream_error_is_an_agent_error() -> None:
    async with FakeUpstream() as fake:
        fake.script_chat(FakeChat(status=503))
        agent = ChatAgent(TelephonyAgentConfig(kind="chat", url=fake.url))
        try:
            with pytest.raises(AgentError, match="HTTP 503"):
                await collect(agent.respond(TURN))
        finally:
            await agent.aclose()


async def test_chat_agent_bad_sse_payload_is_an_agent_error() -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: {not json\n\n")
        await resp.write_eof()
        return resp

    runner, url = await serve(hook)
    agent = ChatAgent(TelephonyAgentConfig(kind="chat", url=url.replace("/hook", "") + "/hook"))
    agent.endpoint = url
    try:
        with pytest.raises(AgentError):
            await collect(agent.respond(TURN))
    finally:
        await agent.aclose()
        await runner.cleanup()


# --- what the agent learns after a barge-in -------------------------------------------------------


def test_played_text_is_whole_chunks_then_a_proportional_word_prefix() -> None:
    reply = Reply(1, pieces=["Hello there. How are you doing today?"])
    reply.chunks = {
        1: _ChunkPlay("Hello there.", duration_ms=800, sent_ms=800, played_ms=800),
        2: _ChunkPlay("How are you doing today?", duration_ms=1600, sent_ms=1000,
                      played_ms=800),
        3: _ChunkPlay("Never sent.", duration_ms=None),
    }
    assert reply.played_text(70.0) == "Hello there. How are you"  # 12 of 24 characters
    nothing = Reply(2, chunks={1: _ChunkPlay("Hello.", duration_ms=500, sent_ms=500)})
    assert nothing.played_text(70.0) == ""


def test_played_text_of_a_chunk_still_being_synthesized_is_estimated_from_its_length() -> None:
    text = "one two three four five six seven eight nine ten"  # 48 characters
    reply = Reply(1, chunks={1: _ChunkPlay(text, sent_ms=300, played_ms=1680)})
    # 48 chars * 70 ms = 3360 ms expected; 1680 ms played = half: 24 characters.
    assert reply.played_text(70.0) == "one two three four five"
    reply.chunks[1].played_ms = 1500  # 21 characters, inside "five": cut back to a whole word
    assert reply.played_text(70.0) == "one two three four"


def test_prefix_cuts_at_word_boundaries() -> None:
    assert _prefix("alpha beta gamma", 0.0) == ""
    assert _prefix("alpha beta gamma", 0.5) == "alpha"
    assert _prefix("alpha beta gamma", 1.0) == "alpha beta gamma"
    assert _prefix("alpha beta gamma", 11 / 16) == "alpha beta"


def test_history_entry_json() -> None:
    assert json.loads(json.dumps(HISTORY[1].to_json())) == {
        "role": "agent", "text": "Hi, how can I", "interrupted": True}
