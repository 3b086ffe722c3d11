"""RateLimiter against a real Redis, and its fail-open fallback against a closed port."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from server.billing import keys
from server.billing.ratelimit import RateLimiter
from server.billing.redis_client import BillingRedis, connect


@asynccontextmanager
async def limiter_env(redis_url: str, **kw: Any) -> AsyncIterator[tuple[RateLimiter, str]]:
    """A limiter and a fresh id (used as tenant and API key id); keys deleted and the client
    closed inside the test body."""
    r = connect(redis_url)
    ident = f"test-{uuid.uuid4().hex[:12]}"
    try:
        yield RateLimiter(r, **kw), ident
    finally:
        try:
            await r.delete(keys.gcra_key(ident), keys.sessions_key(ident), keys.audio_key(ident))
        finally:
            await r.aclose()


@asynccontextmanager
async def dead_limiter(**kw: Any) -> AsyncIterator[RateLimiter]:
    # Nothing listens on port 1: connection refused at once; no retries so it stays quick.
    r = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    try:
        yield RateLimiter(r, **kw)
    finally:
        await r.aclose()


async def test_gcra_allows_the_burst_then_throttles(redis_url: str) -> None:
    async with limiter_env(redis_url) as (rl, key):
        first = [await rl.allow(key, rate_per_s=10, burst=5) for _ in range(5)]
        assert all(d.allowed and not d.fallback for d in first)
        denied = await rl.allow(key, rate_per_s=10, burst=5)
        assert not denied.allowed and 0 < denied.retry_after_s <= 0.1
        await asyncio.sleep(denied.retry_after_s + 0.01)
        assert (await rl.allow(key, rate_per_s=10, burst=5)).allowed
        assert not (await rl.allow(key, rate_per_s=10, burst=5)).allowed  # one cell came back


async def test_gcra_cost_takes_several_cells(redis_url: str) -> None:
    async with limiter_env(redis_url) as (rl, key):
        assert (await rl.allow(key, rate_per_s=100, burst=4, cost=3)).allowed
        denied = await rl.allow(key, rate_per_s=100, burst=4, cost=3)
        assert not denied.allowed and 0.015 < denied.retry_after_s <= 0.02
        with pytest.raises(ValueError):
            await rl.allow(key, rate_per_s=100, burst=4, cost=5)


async def test_concurrent_sessions_limit_release_and_ageing(redis_url: str) -> None:
    async with limiter_env(redis_url) as (rl, tenant):
        assert (await rl.acquire_session(tenant, "a", limit=2, ttl_s=0.3)).allowed
        assert (await rl.acquire_session(tenant, "b", limit=2, ttl_s=0.3)).allowed
        full = await rl.acquire_session(tenant, "c", limit=2, ttl_s=0.3)
        assert not full.allowed and 0 < full.retry_after_s <= 0.3
        assert (await rl.acquire_session(tenant, "a", limit=2, ttl_s=0.3)).allowed  # a retry
        await rl.release_session(tenant, "b")
        assert (await rl.acquire_session(tenant, "c", limit=2, ttl_s=0.3)).allowed
        # a is kept alive, c is not refreshed: c's slot ages out (a crashed node's session)
        assert (await rl.refresh_session(tenant, "a", ttl_s=5)).allowed
        await asyncio.sleep(0.35)
        assert (await rl.acquire_session(tenant, "d", limit=2, ttl_s=5)).allowed
        assert not (await rl.acquire_session(tenant, "e", limit=2, ttl_s=5)).allowed


async def _at_window_offset(r: BillingRedis, window_ms: int, offset_ms: int) -> None:
    """Sleep until Redis TIME is `offset_ms` into the next window (the scripts' clock)."""
    sec, usec = await r.time()
    now_ms = sec * 1000 + usec // 1000
    await asyncio.sleep((window_ms - now_ms % window_ms + offset_ms) / 1000)


async def test_audio_seconds_sliding_window(redis_url: str) -> None:
    window = 500  # a 60 s/min limit allows 500 ms of audio per 500 ms window
    async with limiter_env(redis_url, audio_window_ms=window) as (rl, tenant):
        r = rl._r
        await _at_window_offset(r, window, 20)
        assert (await rl.add_audio(tenant, 300, 60)).allowed
        over = await rl.add_audio(tenant, 300, 60)
        assert not over.allowed and over.retry_after_s > 0
        assert (await rl.add_audio(tenant, 200, 60)).allowed  # exactly the limit
        # Next window, 50 ms in: ~90% of the previous 500 ms still counts.
        await _at_window_offset(r, window, 50)
        early = await rl.add_audio(tenant, 100, 60)
        assert not early.allowed and 0 < early.retry_after_s <= 0.2
        await asyncio.sleep(early.retry_after_s + 0.02)
        assert (await rl.add_audio(tenant, 100, 60)).allowed
        with pytest.raises(ValueError):
            await rl.add_audio(tenant, -1, 60)


async def test_fallback_is_local_at_a_fraction_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="streamgate.ratelimit")
    async with dead_limiter(fallback_fraction=0.5) as rl:
        got = [await rl.allow("k", rate_per_s=10, burst=4) for _ in range(3)]
        assert [d.allowed for d in got] == [True, True, False]  # burst 4 -> 2 locally
        assert all(d.fallback for d in got) and 0 < got[2].retry_after_s <= 0.2
        s = [await rl.acquire_session("t", sid, limit=4, ttl_s=60) for sid in "abc"]
        assert [d.allowed for d in s] == [True, True, False] and all(d.fallback for d in s)
        await rl.release_session("t", "a")
        assert (await rl.acquire_session("t", "c", limit=4, ttl_s=60)).allowed
        assert (await rl.refresh_session("t", "c", ttl_s=60)).fallback
        assert (await rl.add_audio("t", 30_000, 60)).allowed  # 60 s/min -> 30 s locally
        assert not (await rl.add_audio("t", 1, 60)).allowed
        assert rl.degraded
    warnings = [rec for rec in caplog.records if rec.name == "streamgate.ratelimit"]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()


async def test_fallback_ends_when_redis_is_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamgate.ratelimit")
    now = [1000.0]
    async with limiter_env(redis_url, clock=lambda: now[0], retry_interval_s=1.0) as (rl, key):

        async def refused(*_: Any, **__: Any) -> Any:
            raise RedisConnectionError("Connection refused")

        monkeypatch.setattr(rl._r, "evalsha", refused)
        assert (await rl.allow(key, rate_per_s=10, burst=4)).fallback
        monkeypatch.undo()
        now[0] += 0.5  # within retry_interval_s: Redis is not tried yet
        assert (await rl.allow(key, rate_per_s=10, burst=4)).fallback
        now[0] += 1.0
        back = await rl.allow(key, rate_per_s=10, burst=4)
        assert back.allowed and not back.fallback and not rl.degraded
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "streamgate.ratelimit"]
    assert len(messages) == 2 and "reachable again" in messages[1]
