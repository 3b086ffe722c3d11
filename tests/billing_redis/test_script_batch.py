"""ScriptBatcher: many sessions' billing scripts in one pipeline, each caller getting exactly
what its own script would have given it (docs/decisions/15L1). Against one Redis server and a
Redis Cluster, like every test of this package."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from server.billing import keys
from server.billing.ratelimit import RateLimiter
from server.billing.redis_client import BillingRedis, connect
from server.billing.script_batch import ScriptBatcher
from server.billing.wallet_cache import LuaScript, WalletCache
from tests.billing_redis.test_wallet_cache import TTL, drop_tenant, new_tenant

META = {"model": "asr-1", "unit": "audio_ms"}


async def _reports(wc: WalletCache, tenant: str, leases: list[str], seq: int,
                   cost: int) -> list[Any]:
    return list(await asyncio.gather(*(
        wc.report(tenant, lease, seq=seq, cum_units=cost * 10, cum_cost=cost,
                  topup_want=100, low_water=50, ttl_ms=TTL)
        for lease in leases)))


@asynccontextmanager
async def _leased(redis_url: str, window_s: float, leases: tuple[str, ...]
                  ) -> AsyncIterator[tuple[BillingRedis, ScriptBatcher, WalletCache, str]]:
    """A tenant with 10,000 micros and a lease of 1,000 per name, its reports batched."""
    r = connect(redis_url)
    batcher = ScriptBatcher(r, window_s=window_s)
    wc = WalletCache(r, batcher=batcher)
    tenant = new_tenant()
    try:
        await wc.seed(tenant, 10_000, 0)
        for lease in leases:
            await wc.reserve(tenant, lease, min_micros=1, want_micros=1_000, ttl_ms=TTL,
                             session_id=lease, **META)
        yield r, batcher, wc, tenant
    finally:
        await drop_tenant(r, tenant)
        await batcher.aclose()
        await r.aclose()


async def test_batched_reports_answer_as_single_ones(redis_url: str) -> None:
    r = connect(redis_url)
    batcher = ScriptBatcher(r, window_s=0.01)
    batched, single = WalletCache(r, batcher=batcher), WalletCache(r)
    tenants = [new_tenant(), new_tenant()]
    try:
        await batched.load_scripts()  # a NOSCRIPT would add a round trip to the count
        answers: list[list[Any]] = []
        for wc, tenant in zip((batched, single), tenants, strict=True):
            await wc.seed(tenant, 100_000, 0)
            leases = [f"s{i}" for i in range(40)]
            for lease in leases:
                assert await wc.reserve(tenant, lease, min_micros=10, want_micros=100,
                                        ttl_ms=TTL, session_id=lease, **META) is not None
            before = batcher.batches
            first = await _reports(wc, tenant, leases, 1, 30)
            again = await _reports(wc, tenant, leases, 1, 30)  # the same seq: no new charge
            later = await _reports(wc, tenant, leases, 2, 80)  # tops up under the low water
            if wc is batched:
                assert batcher.batches - before == 3  # one round trip per 40 reports
            answers.append([first, again, later])
            assert await wc.spendable(tenant) == 100_000 - 40 * 100 - 40 * 100
            events: Any = await r.xrange(keys.usage_stream(tenant))
            assert len(events) == 80  # two charging reports per lease, each once
        assert [[(a.status, a.remaining, a.granted, a.topped_up) for a in batch]
                for batch in answers[0]] == [
            [(a.status, a.remaining, a.granted, a.topped_up) for a in batch]
            for batch in answers[1]]
        assert {a.status for a in answers[0][1]} == {"duplicate"}
    finally:
        for tenant in tenants:
            await drop_tenant(r, tenant)
        await batcher.aclose()
        await r.aclose()


async def test_a_flushed_redis_loads_the_scripts_again(redis_url: str) -> None:
    async with _leased(redis_url, 0.01, ("a", "b")) as (r, batcher, wc, tenant):
        await r.script_flush()
        before = batcher.batches
        results = await _reports(wc, tenant, ["a", "b"], 1, 10)
        assert [res.status for res in results] == ["ok", "ok"]
        assert batcher.batches - before == 2  # NOSCRIPT for both, then both again at once


async def test_a_script_error_is_its_callers_alone(redis_url: str) -> None:
    async with _leased(redis_url, 0.01, ("a",)) as (_r, batcher, wc, tenant):
        report = LuaScript("report")
        bad = batcher(report, keys.lease_script_keys(tenant, "a"),
                      ["a", "not-a-number", 1, 1, 0, 0, TTL])
        good = wc.report(tenant, "a", seq=1, cum_units=10, cum_cost=10, topup_want=0,
                         low_water=0, ttl_ms=TTL)
        outcome = await asyncio.gather(bad, good, return_exceptions=True)
        assert isinstance(outcome[0], ResponseError) and "seq" in str(outcome[0])
        assert not isinstance(outcome[1], BaseException) and outcome[1].status == "ok"


async def test_a_caller_that_stops_waiting_leaves_the_batch_alone(redis_url: str) -> None:
    async with _leased(redis_url, 0.05, ("a", "b")) as (_r, _batcher, wc, tenant):
        loop = asyncio.get_running_loop()
        gone = loop.create_task(wc.report(tenant, "a", seq=1, cum_units=5, cum_cost=5,
                                          topup_want=0, low_water=0, ttl_ms=TTL))
        stays = loop.create_task(wc.report(tenant, "b", seq=1, cum_units=7, cum_cost=7,
                                           topup_want=0, low_water=0, ttl_ms=TTL))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert (await stays).status == "ok"
        with pytest.raises(asyncio.CancelledError):
            await gone
        # Its script went with the batch (as a cancelled single call's may): the same seq
        # again is a duplicate, never a second charge.
        again = await wc.report(tenant, "a", seq=1, cum_units=5, cum_cost=5, topup_want=0,
                                low_water=0, ttl_ms=TTL)
        assert again.status == "duplicate"
        assert await wc.spendable(tenant) == 10_000 - 2_000


async def test_rate_limit_refreshes_and_audio_go_in_the_batch(redis_url: str) -> None:
    r = connect(redis_url)
    batcher = ScriptBatcher(r, window_s=0.01)
    limits = RateLimiter(r, batcher=batcher)
    tenant = new_tenant()
    try:
        assert (await limits.acquire_session(tenant, "s1", 2, ttl_s=60)).allowed
        await limits.add_audio(tenant, 0, 60)  # loads its script (NOSCRIPT: a round trip)
        before = batcher.batches
        refreshed, counted, over = await asyncio.gather(
            limits.refresh_session(tenant, "s1", 60),
            limits.add_audio(tenant, 30_000, 60),
            limits.add_audio(tenant, 40_000, 60))
        assert batcher.batches - before == 1
        assert refreshed.allowed and not refreshed.fallback
        assert counted.allowed and not over.allowed  # 70 s of audio against 60 s a minute
    finally:
        await drop_tenant(r, tenant)
        await batcher.aclose()
        await r.aclose()


async def test_an_unreachable_redis_fails_every_call_of_the_batch() -> None:
    r = connect("redis://127.0.0.1:1/0")  # nothing listens on port 1
    batcher = ScriptBatcher(r, window_s=0.0)
    wc = WalletCache(r, batcher=batcher)
    try:
        outcome = await asyncio.gather(*(
            wc.report("t", lease, seq=1, cum_units=1, cum_cost=1, topup_want=0, low_water=0,
                      ttl_ms=TTL) for lease in ("a", "b", "c")), return_exceptions=True)
        assert all(isinstance(o, RedisConnectionError) for o in outcome), outcome
        assert batcher.batches == 1
    finally:
        await batcher.aclose()
        await r.aclose()


async def test_a_full_batch_goes_at_once() -> None:
    r = connect("redis://127.0.0.1:1/0")
    batcher = ScriptBatcher(r, window_s=3600, max_batch=2)
    wc = WalletCache(r, batcher=batcher)
    try:
        outcome = await asyncio.wait_for(asyncio.gather(*(
            wc.report("t", lease, seq=1, cum_units=1, cum_cost=1, topup_want=0, low_water=0,
                      ttl_ms=TTL) for lease in ("a", "b")), return_exceptions=True), 10)
        assert all(isinstance(o, RedisConnectionError) for o in outcome)  # sent, not waiting
    finally:
        await batcher.aclose()
        await r.aclose()


def test_bad_settings_are_refused() -> None:
    r = connect("redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="window_s"):
        ScriptBatcher(r, window_s=-1)
    with pytest.raises(ValueError, match="max_batch"):
        ScriptBatcher(r, max_batch=0)


class _Unloadable(LuaScript):
    """A script Redis never saw (NOSCRIPT) whose SCRIPT LOAD fails: the NOSCRIPT recovery's
    round trip fails."""

    def __init__(self) -> None:
        super().__init__("audio")
        self.sha = "f" * 40

    async def load(self, r: Any) -> str:
        raise RedisConnectionError("SCRIPT LOAD failed (injected)")


async def test_a_failed_noscript_recovery_fails_only_the_scripts_it_retried(
        redis_url: str) -> None:
    """The calls whose scripts ran in the first round trip keep their replies: add_audio's
    audio is counted in Redis once, not also locally as if Redis were down (reviewer F4)."""
    r = connect(redis_url)
    batcher = ScriptBatcher(r, window_s=0.01)
    limits = RateLimiter(r, batcher=batcher)
    tenant = new_tenant()
    try:
        await limits.add_audio(tenant, 0, 60)  # loads audio.lua (NOSCRIPT on a fresh Redis)
        before = batcher.batches
        outcome: list[Any] = list(await asyncio.gather(
            limits.add_audio(tenant, 40_000, 60),
            batcher(_Unloadable(), [keys.audio_key(tenant) + ":none"], [1, 1, 1]),
            return_exceptions=True))
        counted, lost = outcome
        assert batcher.batches - before == 1  # one pipeline; the load failed before a second
        assert isinstance(lost, RedisConnectionError) and "injected" in str(lost)
        assert not isinstance(counted, BaseException)
        assert counted.allowed and not counted.fallback  # Redis answered it
        stored: Any = await r.hget(keys.audio_key(tenant), "cur")
        assert int(stored) == 40_000  # counted once, in Redis
        # Redis counts on (no outage was marked): 40 + 30 s is over 60 s a minute.
        over = await limits.add_audio(tenant, 30_000, 60)
        assert not over.allowed and not over.fallback
    finally:
        await drop_tenant(r, tenant)
        await batcher.aclose()
        await r.aclose()
