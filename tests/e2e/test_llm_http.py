"""/v1/chat/completions and /v1/translate over real HTTP, against fake upstreams on loopback.

Most tests serve the routes from an in-process aiohttp app (auth middleware, /metrics and
/openapi.json as the gateway has them); the last one runs a real `streamgate serve` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from server.billing.auth import Principal, StaticKeyAuthenticator, key_digest
from server.billing.meter import InsufficientBalance, PricedMeter
from server.billing.service import RequestCharge
from server.config import LlmConfig, LlmProviderConfig
from server.http.app import build_http_app
from server.http.auth import install_api_auth
from server.http.llm import add_llm_routes
from server.http.openapi import add_openapi_route
from server.llm.schema import ChatCompletion, TranslateResponse
from server.telemetry.metrics import Metrics
from tests.e2e.conftest import TEST_KEY, start_server
from tests.fakes.upstream import FakeLlmUpstream, LlmReply, closed_port_url

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "Say hello."}]
CHAT = {"model": "chat", "messages": MESSAGES, "max_tokens": 50}


@dataclass
class Reservation:
    model: str
    unit: str
    estimate: int
    meter: PricedMeter

    async def settled(self) -> int:
        return (await self.meter.report()).audio_ms  # the meter's units (tokens here)


@dataclass
class RecordingMeter:
    """Billing stand-in: real RequestCharges on PricedMeters, every reservation kept."""

    reservations: list[Reservation] = field(default_factory=list)
    refuse: bool = False

    async def reserve_request(self, *, principal: Principal, request_id: str, model: str,
                              unit: str, estimate_units: int) -> RequestCharge:
        if self.refuse:
            raise InsufficientBalance("the wallet cannot cover this request")
        meter = PricedMeter(500, 1000)
        self.reservations.append(Reservation(model, unit, estimate_units, meter))
        return RequestCharge(meter)


@dataclass
class Gateway:
    http: aiohttp.ClientSession
    meter: RecordingMeter

    async def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
        async with self.http.post(path, json=body, **kw) as resp:
            data = await resp.json(content_type=None)
            return resp.status, data, resp.headers

    async def metrics(self) -> str:
        async with self.http.get("/metrics") as resp:
            return await resp.text()


def provider(name: str, url: str, **overrides: Any) -> LlmProviderConfig:
    values: dict[str, Any] = {
        "name": name, "url": url, "models": {"chat": f"{name}-model"}, "retries": 1,
        "connect_timeout_s": 0.5, "first_byte_timeout_s": 0.3, "timeout_s": 2.0,
        "backoff_s": 0.01, "breaker_failures": 2, "breaker_reset_s": 30.0,
    }
    values.update(overrides)
    return LlmProviderConfig(**values)


@contextlib.asynccontextmanager
async def gateway(*providers: LlmProviderConfig, **llm: Any) -> AsyncIterator[Gateway]:
    metrics, meter = Metrics(), RecordingMeter()
    app = build_http_app(metrics, lambda: (True, ""))
    install_api_auth(app, StaticKeyAuthenticator([key_digest(TEST_KEY)], allow_anonymous=False),
                     None)
    add_openapi_route(app)
    cfg = LlmConfig(providers=list(providers), **{"request_deadline_s": 3.0, **llm})
    add_llm_routes(app, config=cfg, metrics=metrics, requests=meter)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession(f"http://{host}:{port}", headers={
                "Authorization": f"Bearer {TEST_KEY}"}) as http:
            yield Gateway(http, meter)
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def upstreams(n: int = 2) -> AsyncIterator[list[FakeLlmUpstream]]:
    fakes = [FakeLlmUpstream(f"u{i}") for i in range(n)]
    try:
        for fake in fakes:
            await fake.start()
        yield fakes
    finally:
        for fake in fakes:
            await fake.aclose()


async def test_completion_is_routed_metered_and_settled_to_usage() -> None:
    async with upstreams(1) as (a,), gateway(provider("a", a.url)) as gw:
        a.llm_default = LlmReply(content="Hello!", usage={
            "prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13})
        status, body, headers = await gw.post("/v1/chat/completions", CHAT)
        assert status == 200, body
        answer = msgspec.convert(body, ChatCompletion)
        assert answer.model == "chat" and answer.choices[0].message.content == "Hello!"
        assert answer.usage.total_tokens == 13 and headers["X-Request-Id"]
        assert a.llm_requests[0]["model"] == "a-model"
        [r] = gw.meter.reservations
        # ceil(("user" + "Say hello.") 14 chars / 3) + 4 per message, + max_tokens
        assert (r.model, r.unit, r.estimate) == ("chat", "tokens", 5 + 4 + 50)
        assert await r.settled() == 13


async def test_missing_usage_is_estimated_and_default_max_tokens_sent() -> None:
    async with upstreams(1) as (a,), gateway(provider("a", a.url), default_max_tokens=40) as gw:
        a.llm_default = LlmReply(content="x" * 30, usage=None)
        status, body, _ = await gw.post("/v1/chat/completions", {**CHAT, "max_tokens": None})
        assert status == 200, body
        assert a.llm_requests[0]["max_tokens"] == 40
        assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 10, "total_tokens": 19}
        assert await gw.meter.reservations[0].settled() == 19


@pytest.mark.parametrize("failure", ["down", "slow", "garbage"])
async def test_failover_to_the_secondary_with_breaker_in_metrics(failure: str) -> None:
    async with upstreams() as (a, b):
        primary = provider("primary", closed_port_url() if failure == "down" else a.url)
        a.llm_default = LlmReply(delay_s=5.0) if failure == "slow" else LlmReply.garbage()
        async with gateway(primary, provider("secondary", b.url, priority=1),
                           request_deadline_s=2.0) as gw:
            for _ in range(3):
                t0 = time.perf_counter()
                status, body, _ = await gw.post("/v1/chat/completions", CHAT)
                assert status == 200, body
                assert time.perf_counter() - t0 < 2.0  # inside the request deadline
            assert len(b.llm_requests) == 3
            text = await gw.metrics()
            assert 'streamgate_llm_upstream_breaker_state{provider="primary"} 2.0' in text
            assert 'streamgate_llm_upstream_breaker_state{provider="secondary"} 0.0' in text


async def sse(gw: Gateway, body: dict[str, Any]) -> tuple[list[Any], str]:
    async with gw.http.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    return [json.loads(e) for e in events if e != "[DONE]"], events[-1]


async def test_stream_passes_chunks_in_order_and_settles_usage() -> None:
    async with upstreams(1) as (a,), gateway(provider("a", a.url)) as gw:
        a.llm_default = LlmReply(content="one two three four", chunk_delay_s=0.01)
        chunks, last = await sse(gw, {**CHAT, "stream": True})
        assert last == "[DONE]"
        texts = [c["choices"][0]["delta"].get("content") for c in chunks]
        assert texts == ["", "one", " two", " three", " four", None]
        assert {c["model"] for c in chunks} == {"chat"}
        assert a.llm_requests[0]["stream_options"] == {"include_usage": True}
        assert await gw.meter.reservations[0].settled() == 3 + 4  # the fake's usage
        # A client asking for usage gets the usage chunk too.
        chunks, _ = await sse(gw, {**CHAT, "stream": True,
                                   "stream_options": {"include_usage": True}})
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7


async def test_cached_prompt_tokens_and_output_rate_are_in_metrics() -> None:
    """Issue 17's comparison with LiveKit's LLMMetrics: the prompt tokens the upstream served
    from its cache (`prompt_tokens_details.cached_tokens`) and the output rate (completion
    tokens over the request) of answered requests, streamed or not."""
    async with upstreams(1) as (a,), gateway(provider("a", a.url)) as gw:
        a.script_llm(LlmReply(content="Hello!", usage={
            "prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 8}}))
        status, body, _ = await gw.post("/v1/chat/completions", CHAT)
        assert status == 200, body
        a.llm_default = LlmReply(content="one two three four", chunk_delay_s=0.01)
        _, last = await sse(gw, {**CHAT, "stream": True})
        assert last == "[DONE]"
        text = await gw.metrics()
    assert 'streamgate_llm_cached_prompt_tokens_total{model="chat"} 8.0' in text
    assert 'streamgate_llm_output_tokens_per_second_count{model="chat"} 2.0' in text
    # 2 + 4 completion tokens in well under a second each: more than 6 tokens/s in all.
    rate_sum = re.search(r'streamgate_llm_output_tokens_per_second_sum\{model="chat"\} (\S+)',
                         text)
    assert rate_sum is not None and float(rate_sum[1]) > 6.0


async def test_stream_failing_mid_answer_ends_with_an_error_event_and_its_charge() -> None:
    async with upstreams() as (a, b), gateway(provider("a", a.url), provider("b", b.url)) as gw:
        a.llm_default = LlmReply(content="a b c d e f", drop_after=3)
        chunks, _ = await sse(gw, {**CHAT, "stream": True})
        assert [c["choices"][0]["delta"]["content"] for c in chunks[:-1]] == ["", "a", " b"]
        last = chunks[-1]
        assert last["error"]["code"] == "upstream_error"
        assert last["error"]["type"] == "server_error"
        assert last["error"]["message"] == ("provider 'a' failed mid-answer: connection lost; "
                                            "the answer is incomplete")
        assert b.llm_requests == []  # bytes reached the client: no failover
        # Charged: the completion tokens delivered ("a b", 3 chars -> 1 token), no prompt;
        # and the final event says so.
        assert last["usage"] == {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}
        assert await gw.meter.reservations[0].settled() == 1
        # A client that asked for usage also gets it as the usage chunk SDKs parse, before
        # the error event.
        chunks, _ = await sse(gw, {**CHAT, "stream": True,
                                   "stream_options": {"include_usage": True}})
        usage_chunk, error_event = chunks[-2], chunks[-1]
        assert usage_chunk["object"] == "chat.completion.chunk"
        assert usage_chunk["choices"] == [] and usage_chunk["model"] == "chat"
        assert usage_chunk["id"] == chunks[0]["id"]
        assert usage_chunk["usage"] == error_event["usage"] == {
            "prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}
        assert "error" in error_event
        assert await gw.meter.reservations[1].settled() == 1


async def test_three_broken_streams_open_the_breaker_and_count_as_failures() -> None:
    async with upstreams() as (a, b), gateway(provider("a", a.url, breaker_failures=3),
                                              provider("b", b.url, priority=1)) as gw:
        a.llm_default = LlmReply(content="a b c d e f", drop_after=3)
        for _ in range(3):
            chunks, _ = await sse(gw, {**CHAT, "stream": True})
            assert "error" in chunks[-1]
        assert len(a.llm_requests) == 3
        chunks, last = await sse(gw, {**CHAT, "stream": True})
        assert last == "[DONE]" and len(b.llm_requests) == 1  # the fallback answered
        assert len(a.llm_requests) == 3
        text = await gw.metrics()
        assert 'streamgate_llm_upstream_breaker_state{provider="a"} 2.0' in text
        assert 'streamgate_llm_upstream_attempts_total{outcome="retryable",provider="a"} 3.0' \
            in text
        assert 'outcome="ok",provider="a"' not in text
        settled = [await r.settled() for r in gw.meter.reservations]
        assert settled[:3] == [1, 1, 1] and settled[3] == 3 + 2  # the fake's usage


async def test_client_hanging_up_mid_stream_stops_the_upstream_and_settles() -> None:
    async with upstreams(1) as (a,), gateway(provider("a", a.url, first_byte_timeout_s=1.0)
                                             ) as gw:
        a.llm_default = LlmReply(content=" ".join(["word"] * 50), chunk_delay_s=0.05)
        async with gw.http.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            assert (await resp.content.readline()).startswith(b"data: ")
            resp.close()  # hang up after the first event
        for _ in range(100):  # the next write to the closed socket ends the handler
            if gw.meter.reservations and (await gw.meter.reservations[0].settled()) > 0:
                break
            await asyncio.sleep(0.02)
        # No usage chunk arrived: the prompt estimate plus the little that was streamed,
        # far below the reservation.
        settled = await gw.meter.reservations[0].settled()
        assert 9 <= settled < gw.meter.reservations[0].estimate


async def test_stream_fails_over_before_the_first_byte() -> None:
    async with upstreams() as (a, b), gateway(provider("a", a.url), provider("b", b.url)) as gw:
        a.llm_default = LlmReply.garbage()
        chunks, last = await sse(gw, {**CHAT, "stream": True})
        assert last == "[DONE]" and "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello there."


async def test_idempotency_key_replays_without_charging_again() -> None:
    async with upstreams(1) as (a,), gateway(provider("a", a.url)) as gw:
        a.llm_default = LlmReply(delay_s=0.2)
        key = {"Idempotency-Key": "order-42"}
        results = await asyncio.gather(*(gw.post("/v1/chat/completions", CHAT, headers=key)
                                         for _ in range(3)))  # concurrent duplicates wait
        again = await gw.post("/v1/chat/completions", CHAT, headers=key)
        assert {r[0] for r in [*results, again]} == {200}
        assert len({json.dumps(r[1]) for r in [*results, again]}) == 1
        assert again[2]["Idempotent-Replayed"] == "true"
        assert len(a.llm_requests) == 1 and len(gw.meter.reservations) == 1
        status, body, _ = await gw.post("/v1/chat/completions", {**CHAT, "max_tokens": 7},
                                        headers=key)
        assert (status, body["error"]["code"]) == (409, "idempotency_conflict")
        await gw.post("/v1/chat/completions", CHAT)  # no key: runs (and charges) again
        assert len(a.llm_requests) == 2 and len(gw.meter.reservations) == 2


async def test_translate_on_the_chat_upstream() -> None:
    async with upstreams(1) as (a,), gateway(provider("a", a.url)) as gw:
        a.llm_default = LlmReply(content=" Bonjour le monde ")
        status, body, _ = await gw.post("/v1/translate", {
            "text": "Hello world", "source_language": "English", "target_language": "French"})
        assert status == 200, body
        answer = msgspec.convert(body, TranslateResponse)
        assert (answer.translation, answer.model) == ("Bonjour le monde", "chat")
        sent = a.llm_requests[0]
        assert sent["messages"][0]["role"] == "system"
        assert "from English into French" in sent["messages"][0]["content"]
        assert sent["messages"][1] == {"role": "user", "content": "Hello world"}
        assert await gw.meter.reservations[0].settled() == answer.usage.total_tokens


async def test_errors_have_the_json_shape_and_status() -> None:
    async with upstreams() as (a, b), gateway(provider("a", a.url, breaker_failures=9),
                                              provider("b", b.url, breaker_failures=9),
                                              max_request_bytes=2048) as gw:
        async def error(body: Any, status: int, code: str, **kw: Any) -> None:
            got, data, _ = await gw.post("/v1/chat/completions", body, **kw)
            assert (got, data["error"]["code"]) == (status, code), data
            assert isinstance(data["error"]["message"], str)

        await error({"model": "chat"}, 400, "bad_request")
        await error({**CHAT, "messages": []}, 400, "bad_request")
        await error({**CHAT, "stream": "yes"}, 400, "bad_request")
        await error({**CHAT, "max_tokens": 10**6}, 400, "bad_request")
        await error({**CHAT, "model": "gpt-9"}, 404, "unknown_model")
        await error({**CHAT, "messages": [{"role": "user", "content": "x" * 4000}]},
                    413, "payload_too_large")
        await error(CHAT, 401, "unauthorized", headers={"Authorization": "Bearer wrong"})
        async with gw.http.post("/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
        gw.meter.refuse = True
        await error(CHAT, 402, "insufficient_balance")
        gw.meter.refuse = False
        a.llm_default = b.llm_default = LlmReply.error(500)
        await error(CHAT, 502, "upstream_error")
        a.llm_default = b.llm_default = LlmReply(delay_s=5.0)
        await error(CHAT, 504, "upstream_timeout")
        assert all([await r.settled() == 0 for r in gw.meter.reservations])
    async with gateway() as gw:
        status, data, _ = await gw.post("/v1/chat/completions", CHAT)
        assert (status, data["error"]["code"]) == (503, "no_upstream")


async def test_openapi_documents_both_routes() -> None:
    async with gateway() as gw, gw.http.get("/openapi.json") as resp:
        doc = await resp.json()
    for path in ("/v1/chat/completions", "/v1/translate"):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert {"200", "400", "402", "404", "413", "502", "503", "504"} <= set(op["responses"])
    assert {"ChatCompletionRequest", "ChatCompletion", "TranslateRequest",
            "TranslateResponse", "Error"} <= set(doc["components"]["schemas"])


async def test_real_server_process_fails_over() -> None:
    """Against `streamgate serve`, configured by env: the composition root wires the routes."""
    async with upstreams(1) as (b,):
        providers = (f'[{{name="primary", url="{closed_port_url()}", models={{chat="p"}}, '
                     f'retries=0, breaker_failures=1}}, {{name="secondary", url="{b.url}", '
                     f'priority=1, models={{chat="s"}}}}]')
        srv = await asyncio.to_thread(start_server, {"STREAMGATE_LLM__PROVIDERS": providers,
                                                     "STREAMGATE_LLM__REQUEST_DEADLINE_S": "5"})
        try:
            async with aiohttp.ClientSession(srv.http, headers={
                    "Authorization": f"Bearer {TEST_KEY}"}) as http:
                async with http.get("/openapi.json") as resp:
                    paths = (await resp.json())["paths"]
                assert {"/v1/chat/completions", "/v1/translate"} <= set(paths)
                for _ in range(2):
                    async with http.post("/v1/chat/completions", json=CHAT) as resp:
                        assert resp.status == 200, await resp.text()
                async with http.get("/metrics") as resp:
                    text = await resp.text()
                assert 'streamgate_llm_upstream_breaker_state{provider="primary"} 2.0' in text
                assert len(b.llm_requests) == 2
        finally:
            assert await asyncio.to_thread(srv.stop) == 0
