"""Issue 11 item 18, end to end: a real `streamgate serve` with billing on (Redis, PostgreSQL)
proxies streamed chat completions to a fake upstream (a real HTTP server on loopback) that dies
after 3 SSE events. Three broken streams open its circuit breaker, count as failures in
/metrics, end with a final event carrying the usage they are charged, and the wallet is charged
exactly the completion tokens that reached the client (docs/billing.md, LLM requests).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import start_server
from tests.e2e.test_billing_e2e import (
    Admin,
    assert_books_balance,
    billing_env,
    cleanup_redis,
    with_redis_db,
)
from tests.fakes.upstream import FakeLlmUpstream, LlmReply

pytestmark = pytest.mark.e2e
REDIS_DB = 15  # a Redis logical database of this module's own (see test_billing_e2e.py)
PRICE_PER_1K = 1000  # micros per 1000 tokens: one micro per token
CHARS_PER_TOKEN = 3.0  # llm.chars_per_token default
BODY = {"model": "chat", "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 50, "stream": True}


async def stream(http: aiohttp.ClientSession, body: dict[str, Any]
                 ) -> tuple[list[dict[str, Any]], str, str]:
    """(decoded events, the last raw event, X-Request-Id)."""
    async with http.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        request_id = resp.headers["X-Request-Id"]
        raw = (await asyncio.wait_for(resp.read(), 30)).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    return [json.loads(e) for e in events if e != "[DONE]"], events[-1], request_id


def delivered_text(events: list[dict[str, Any]]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events
                   for c in e.get("choices", []))


async def usage_by_request(dsn: str, tenant: str) -> dict[str, tuple[int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT session_id, sum(units) AS units, sum(cost_micros) AS cost FROM usage_events"
            " WHERE tenant_id = $1 AND unit = 'tokens' GROUP BY session_id", tenant)
    finally:
        await conn.close()
    return {str(r["session_id"]): (int(r["units"]), int(r["cost"])) for r in rows}


async def test_broken_streams_open_the_breaker_and_charge_what_was_delivered(
        redis_url: str, fresh_database: str) -> None:
    primary, fallback = FakeLlmUpstream("primary"), FakeLlmUpstream("fallback")
    await primary.start()
    await fallback.start()
    # Dies after 3 events: the role chunk, "Once", " upon" (9 characters delivered).
    primary.llm_default = LlmReply(content="Once upon a time there was", drop_after=3)
    rurl = with_redis_db(redis_url, REDIS_DB)
    providers = (f'[{{name="primary", url="{primary.url}", models={{chat="p"}}, '
                 f'breaker_failures=3, breaker_reset_s=300}}, '
                 f'{{name="fallback", url="{fallback.url}", priority=1, models={{chat="f"}}}}]')
    env = billing_env(rurl, fresh_database, llm__providers=providers,
                      llm__price_micros_per_1k_tokens=f"{{chat={PRICE_PER_1K}}}")
    srv = await asyncio.to_thread(start_server, env)
    admin = Admin(srv.http)
    try:
        tenant = await asyncio.to_thread(admin.tenant, 1_000_000, "llm")
        async with aiohttp.ClientSession(srv.http, headers=tenant.auth) as http:
            broken: dict[str, int] = {}  # request id -> tokens delivered
            for n in range(3):
                # One client asks for usage (the usage chunk SDKs parse), the others do not.
                body = {**BODY, "stream_options": {"include_usage": True}} if n == 1 else BODY
                events, _, request_id = await stream(http, body)
                final = events[-1]
                assert final["error"]["code"] == "upstream_error", final
                assert "primary" in final["error"]["message"]
                text = delivered_text(events)
                assert text == "Once upon"
                tokens = math.ceil(len(text) / CHARS_PER_TOKEN)
                usage = {"prompt_tokens": 0, "completion_tokens": tokens,
                         "total_tokens": tokens}
                assert final["usage"] == usage  # the final event says what is charged
                if n == 1:
                    assert events[-2]["choices"] == [] and events[-2]["usage"] == usage
                broken[request_id] = tokens
            assert len(primary.llm_requests) == 3
            # The breaker opened after the third: the next request goes to the fallback.
            events, last, ok_id = await stream(http, BODY)
            assert last == "[DONE]" and delivered_text(events) == "Hello there."
            assert len(primary.llm_requests) == 3 and len(fallback.llm_requests) == 1
            async with http.get("/metrics") as resp:
                metrics = await resp.text()
        assert 'streamgate_llm_upstream_breaker_state{provider="primary"} 2.0' in metrics
        assert ('streamgate_llm_upstream_attempts_total{outcome="retryable",provider="primary"}'
                ' 3.0') in metrics
        assert 'outcome="ok",provider="primary"' not in metrics
        assert ('streamgate_llm_upstream_attempts_total{outcome="ok",provider="fallback"} 1.0'
                in metrics)
        # Charged per request: a broken stream the completion tokens delivered, no prompt;
        # the whole answer its upstream usage.
        whole = fallback.llm_requests[0]
        prompt = sum(len(m["content"]) for m in whole["messages"]) // 4 + 1  # the fake's usage
        expected = {**{rid: (tokens, tokens * PRICE_PER_1K // 1000)
                       for rid, tokens in broken.items()},
                    ok_id: (prompt + 2, (prompt + 2) * PRICE_PER_1K // 1000)}
        await assert_books_balance(fresh_database, rurl, tenant.tenant_id,
                                   expected_usage=sum(cost for _, cost in expected.values()))
        assert await usage_by_request(fresh_database, tenant.tenant_id) == expected
    finally:
        code = await asyncio.to_thread(srv.stop)
        await cleanup_redis(rurl, admin.tenants, admin.key_ids)
        await primary.aclose()
        await fallback.aclose()
    assert code == 0, "\n".join(srv.stderr_lines[-40:])
