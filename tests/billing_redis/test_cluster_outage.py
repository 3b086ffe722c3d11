"""A Redis Cluster that stops answering altogether fails batched scripts and transactions with
redis' ConnectionError, as single commands do (server/billing/redis_client.py): redis-py's
pipelines give up with RedisClusterUnreachableError, no RedisError, once a topology refresh
reached no node, and every `except RedisError` in billing (usage reports deferred, rate limits
failing open, 503 billing_unavailable) must see it. Runs a cluster of its own and stops it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterUnreachableError

from server.billing.ratelimit import RateLimiter
from server.billing.redis_client import connect
from server.billing.script_batch import ScriptBatcher
from server.billing.wallet_cache import ReportResult, WalletCache
from tests.billing_redis.test_wallet_cache import TTL, new_tenant
from tests.redis_cluster import TestRedisCluster

OUTAGE_SEEN_WITHIN_S = 15.0  # redis-py refreshes the topology at most every few 100 ms


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[TestRedisCluster]:
    c = TestRedisCluster(tmp_path / "cluster")
    c.start()
    try:
        yield c
    finally:
        c.stop()


async def test_batched_scripts_and_transactions_on_a_cluster_gone_fail_as_connection_errors(
        cluster: TestRedisCluster) -> None:
    r = connect(cluster.url)
    batcher = ScriptBatcher(r, window_s=0.0)
    wc = WalletCache(r, batcher=batcher)
    limits = RateLimiter(r, batcher=batcher)
    tenant = new_tenant()

    async def report() -> ReportResult:
        return await wc.report(tenant, "a", seq=1, cum_units=1, cum_cost=1, topup_want=0,
                               low_water=0, ttl_ms=TTL)

    try:
        await wc.load_scripts()
        assert (await report()).status == "unknown"  # no such lease: the cluster answers
        cluster.stop()
        # The first failures are plain connection errors; once a topology refresh has
        # reached no node, redis-py's pipeline raises its RedisClusterUnreachableError.
        deadline = time.monotonic() + OUTAGE_SEEN_WITHIN_S
        while True:
            outcome: list[object] = list(await asyncio.gather(report(), report(),
                                                              return_exceptions=True))
            assert all(isinstance(o, RedisConnectionError) for o in outcome), outcome
            if any(isinstance(o, BaseException)
                   and isinstance(o.__cause__, RedisClusterUnreachableError) for o in outcome):
                break
            assert time.monotonic() < deadline, "the cluster never reported unreachable"
            await asyncio.sleep(0.1)
        assert "unreachable" in str(outcome[0])
        # The rate limiter's batched scripts fail open, as with one server down.
        decision = await limits.add_audio(tenant, 1_000, 60)
        assert decision.allowed and decision.fallback
        refreshed = await limits.refresh_session(tenant, "s1", 60)
        assert refreshed.allowed and refreshed.fallback
        # WATCH/MULTI (reconcile's snapshot) through the transaction pipeline alike.
        with pytest.raises(RedisConnectionError, match="unreachable"):
            await wc.snapshot(tenant)
    finally:
        await batcher.aclose()
        await r.aclose()
