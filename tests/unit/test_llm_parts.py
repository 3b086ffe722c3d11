"""The LLM proxy's pieces without the network: SSE parsing, token estimates, idempotency cache,
OpenAPI conversion, config validation."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from server.config import ConfigError, LlmConfig, load_config
from server.http.openapi import components as openapi_components
from server.llm.idempotency import IdempotencyCache, IdempotencyConflict
from server.llm.metering import estimate_chat, message_chars, settle, token_prices
from server.llm.provider import AttemptFailed, parse_chunk, parse_completion
from server.llm.router import RouteError
from server.llm.schema import ChatCompletionRequest, ChatMessage
from server.llm.sse import SseError, SseParser

# --- SSE ---------------------------------------------------------------------------------------


def test_sse_events_split_across_reads() -> None:
    parser = SseParser()
    stream = (b'data: {"a":1}\n\n: keep-alive\n\nevent: x\ndata: {"b":\r\ndata: 2}\r\n\r\n'
              b"data: [DONE]")
    events: list[bytes] = []
    for i in range(len(stream)):  # one byte at a time: the worst split there is
        events += parser.feed(stream[i : i + 1])
    events += parser.close()
    assert events == [b'{"a":1}', b'{"b":\n2}', b"[DONE]"]


def test_sse_event_size_is_bounded() -> None:
    parser = SseParser(max_event_bytes=100)
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"x" * 200)


def test_chunk_and_completion_validation() -> None:
    assert parse_chunk(b'{"choices": [{"delta": {"content": "hi"}}]}').chunk.text == "hi"
    assert parse_chunk(b'{"choices": [], "usage": {"total_tokens": 5}}').chunk.usage is not None
    for bad in (b"nope", b"[1]", b'{"choices": [{"delta": "x"}]}', b'{"object": "x"}'):
        with pytest.raises(AttemptFailed) as err:
            parse_chunk(bad)
        assert err.value.kind == "malformed"
    with pytest.raises(AttemptFailed) as err:
        parse_chunk(b'{"error": {"message": "overloaded"}}')
    assert err.value.kind == "retryable"
    data, parsed = parse_completion(b'{"choices": [{"message": {"content": "ok"}}], "x": 1}')
    assert parsed.text == "ok" and data["x"] == 1
    for bad in (b'{"choices": []}', b'{"choices": [{"message": {"content": 3}}]}',
                b'{"error": {}}', b"<html>", b'{"choices": [{"message": {}}], '
                b'"usage": {"total_tokens": -1}}'):
        with pytest.raises(AttemptFailed):
            parse_completion(bad)


# --- metering ----------------------------------------------------------------------------------


def request(**extra: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 30}], **extra}
    return msgspec.convert(body, ChatCompletionRequest)


def test_estimate_is_prompt_chars_over_three_plus_max_tokens() -> None:
    cfg = LlmConfig(default_max_tokens=100, max_tokens_limit=1000)
    est = estimate_chat(request(), cfg)
    # "user" + 30 chars = 34 chars -> 12 tokens, + 4 per message
    assert (est.prompt_tokens, est.max_tokens, est.reserve_tokens) == (16, 100, 116)
    assert estimate_chat(request(max_tokens=10, n=3), cfg).reserve_tokens == 16 + 30
    assert estimate_chat(request(max_tokens=10, max_completion_tokens=20), cfg).max_tokens == 20
    with pytest.raises(RouteError) as err:
        estimate_chat(request(max_tokens=1001), cfg)
    assert err.value.status == 400


def test_message_chars_count_parts_and_tool_calls() -> None:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "abcd"},
                                   {"type": "image_url", "image_url": {"url": "u"}}]
    msg = ChatMessage(role="user", content=parts)
    assert message_chars([msg]) == 4 + 4 + len(msgspec.json.encode(parts[1]))


def test_token_prices_for_price_plans() -> None:
    assert token_prices(LlmConfig(price_micros_per_1k_tokens={"m": 500})) == {
        ("m", "tokens"): (500, 1000)}


class _Charge:
    def __init__(self) -> None:
        self.units: list[int] = []

    async def settle(self, actual_units: int) -> int:
        self.units.append(actual_units)
        return actual_units


async def test_settle_never_exceeds_the_reservation() -> None:
    charge = _Charge()
    await settle(charge, 500, 120)  # type: ignore[arg-type]
    await settle(charge, -3, 120)  # type: ignore[arg-type]
    assert charge.units == [120, 0]


# --- idempotency -------------------------------------------------------------------------------


async def test_idempotency_replays_and_detects_conflicts() -> None:
    now = [0.0]
    cache = IdempotencyCache(ttl_s=10, max_entries=2, clock=lambda: now[0])
    key = ("t", "/v1/x", "k")
    async with cache.claim(key, "f1") as claim:
        assert claim.replay is None
        claim.store(200, b"answer")
    async with cache.claim(key, "f1") as claim:
        assert claim.replay is not None and claim.replay.body == b"answer"
    with pytest.raises(IdempotencyConflict):
        async with cache.claim(key, "f2"):
            pass
    now[0] = 11.0  # expired: runs again
    async with cache.claim(key, "f2") as claim:
        assert claim.replay is None


async def test_idempotency_failed_attempt_is_not_kept_and_lru_is_bounded() -> None:
    cache = IdempotencyCache(ttl_s=10, max_entries=2)
    with pytest.raises(RuntimeError):
        async with cache.claim(("t", "/", "a"), "f"):
            raise RuntimeError("upstream failed")
    async with cache.claim(("t", "/", "a"), "f") as claim:
        assert claim.replay is None
        claim.store(200, b"a")
    for k in ("b", "c"):
        async with cache.claim(("t", "/", k), "f") as claim:
            claim.store(200, k.encode())
    assert len(cache) == 2
    async with cache.claim(("t", "/", "a"), "f") as claim:
        assert claim.replay is None  # evicted, oldest first


async def test_concurrent_duplicate_waits_for_the_first() -> None:
    cache = IdempotencyCache(ttl_s=10, max_entries=10)
    key = ("t", "/", "k")
    runs: list[str] = []
    release = asyncio.Event()

    async def call(name: str) -> bytes:
        async with cache.claim(key, "f") as claim:
            if claim.replay is not None:
                return claim.replay.body
            runs.append(name)
            await release.wait()
            claim.store(200, name.encode())
            return name.encode()

    first = asyncio.create_task(call("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(call("second"))
    await asyncio.sleep(0.01)
    assert runs == ["first"]
    release.set()
    assert list(await asyncio.gather(first, second)) == [b"first", b"first"]


# --- OpenAPI and config ------------------------------------------------------------------------


def test_openapi_components_are_openapi_30() -> None:
    schemas = openapi_components(ChatCompletionRequest)
    text = msgspec.json.encode(schemas).decode()
    assert '"type":"null"' not in text and '"required":[]' not in text
    props = schemas["ChatCompletionRequest"]["properties"]
    assert props["max_tokens"]["nullable"] is True
    assert props["stream_options"]["allOf"] == [
        {"$ref": "#/components/schemas/ChatStreamOptions"}]


def test_llm_config_from_env_and_validation() -> None:
    cfg = load_config(environ={
        "STREAMGATE_LLM__PROVIDERS": '[{name="a", url="http://h", models={m="up"}}]',
        "STREAMGATE_LLM__REQUEST_DEADLINE_S": "5",
    })
    assert cfg.llm.providers[0].models == {"m": "up"} and cfg.llm.request_deadline_s == 5
    assert load_config(environ={}).llm.providers == []  # none by default
    for bad in ('[{name="a", url="http://h"}, {name="a", url="http://i"}]',
                '[{name="a", url="http://h", retries=-1}]',
                '[{name="a", url="http://h", timeout_s=0}]'):
        with pytest.raises(ConfigError):
            load_config(environ={"STREAMGATE_LLM__PROVIDERS": bad})
