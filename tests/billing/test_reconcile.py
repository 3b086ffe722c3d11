"""reconcile(): the invariants of docs/billing.md, on real PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from server.billing import keys
from server.billing.flusher import UsageFlusher
from server.billing.reconcile import ReconcileReport, reconcile, reconcile_main
from server.billing.store import BillingStore, UsageEvent
from server.billing.wallet_cache import ReplayEvent, WalletCache
from tests.billing.test_flusher import xadd

AT = datetime(2025, 3, 1, tzinfo=UTC)


def usage(tenant: str, event_id: str, cost: int) -> UsageEvent:
    return UsageEvent(tenant, event_id, event_id.split(":")[0], "asr-1", "audio_ms", 1000, cost,
                      AT)


async def check(store: BillingStore, r: aioredis.Redis | None, tenants_key: str = "unused",
                ) -> ReconcileReport:
    return await reconcile(store, r, retry_delay_s=0.01, tenants_key=tenants_key)


async def test_consistent_books_pass(billing_store: BillingStore) -> None:
    await billing_store.create_tenant("a", "A")
    await billing_store.create_tenant("b", "B")
    await billing_store.topup("a", 1_000, "k1")
    await billing_store.topup("a", 500, "k2")
    await billing_store.record_usage([usage("a", "s:1", 300), usage("a", "s:2", 0)])
    report = await check(billing_store, None)
    assert report.ok, report.render()
    assert report.tenants_checked == 2
    assert "OK" in report.render()


async def test_detects_a_corrupted_wallet_balance(billing_store: BillingStore) -> None:
    await billing_store.create_tenant("a", "A")
    await billing_store.create_tenant("b", "B")
    await billing_store.topup("a", 1_000, "k1")
    async with billing_store.pool.acquire() as conn:
        await conn.execute("UPDATE wallets SET balance_micros = balance_micros + 42"
                           " WHERE tenant_id = 'a'")
    report = await check(billing_store, None)
    assert not report.ok
    assert list(report.problems) == ["a"]
    assert any("off by 42" in p for p in report.problems["a"]), report.render()
    assert "tenant a:" in report.render()


async def test_detects_facts_without_ledger_entries(billing_store: BillingStore) -> None:
    await billing_store.create_tenant("a", "A")
    async with billing_store.pool.acquire() as conn:
        # A usage row and a top-up written around the store: no ledger, no wallet change.
        await conn.execute("INSERT INTO usage_events VALUES"
                           " ('a', 'x:1', 'x', 'asr-1', 'audio_ms', 10, 0, now())")
        await conn.execute("INSERT INTO topups (tenant_id, idempotency_key, amount_micros)"
                           " VALUES ('a', 'side-door', 99)")
        await conn.execute("INSERT INTO ledger_entries (tenant_id, kind, amount_micros, ref)"
                           " VALUES ('a', 'usage', -5, 'ghost:1')")
    report = await check(billing_store, None)
    text = "\n".join(report.problems["a"])
    assert "1 usage events without a matching ledger entry: x:1" in text
    assert "1 top-ups without a matching ledger entry: side-door" in text
    assert "1 ledger entries matching no top-up or usage event: usage:ghost:1" in text
    assert "!= wallet balance 0" in text


async def test_redis_cache_invariant(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await billing_store.create_tenant(t, "T", overdraft_micros=100)
    top = await billing_store.topup(t, 10_000, "k")
    await billing_store.record_usage([usage(t, "s:1", 30), usage(t, "r:1", 20)])
    await redis_client.sadd(tenants_key, t)
    # Stream: s:1 flushed but not yet acked (counts nothing), s:2 unflushed (50), and a replay
    # of r:1 that Postgres has and that is not refunded yet (the cache took 20 twice).
    await xadd(redis_client, t, "s", 1, 30)
    await xadd(redis_client, t, "s", 2, 50)
    await xadd(redis_client, t, "r", 1, 20, replay=True)
    # One open lease of this wallet (remainder 300) and one of an older epoch (ignored).
    await redis_client.hset(keys.lease_key(t, "s"), mapping={
        "granted": 500, "charged": 200, "epoch": "e1"})
    await redis_client.hset(keys.lease_key(t, "old"), mapping={
        "granted": 900, "charged": 0, "epoch": "e0"})
    await redis_client.zadd(keys.leases_key(t), {"s": 1, "old": 1})
    balance = 10_000 - 50
    spendable = balance - 50 - 20 - 300
    await redis_client.hset(keys.wallet_key(t), mapping={
        "spendable": spendable, "overdraft": 100, "epoch": "e1"})

    report = await check(billing_store, redis_client, tenants_key)
    assert report.problems[t] == [
        f"1 top-ups committed in Postgres but not applied to the cache (10000 micros):"
        f" {top.topup_id}"
    ]
    await redis_client.sadd(keys.topups_key(t), str(top.topup_id))  # as SEED records it
    report = await check(billing_store, redis_client, tenants_key)
    assert report.ok, report.render()
    assert report.redis_wallets_checked == 1

    await redis_client.sadd(keys.refunds_key(t), "r:1")  # refunded: spendable must be +20
    assert not (await check(billing_store, redis_client, tenants_key)).ok
    await redis_client.hincrby(keys.wallet_key(t), "spendable", 20)
    assert (await check(billing_store, redis_client, tenants_key)).ok

    await redis_client.hincrby(keys.wallet_key(t), "spendable", 7)
    report = await check(billing_store, redis_client, tenants_key)
    assert any("off by 7" in p for p in report.problems[t]), report.render()

    await redis_client.zadd(keys.leases_key(t), {"lost": 1})
    await redis_client.sadd(tenants_key, "stranger")
    report = await check(billing_store, redis_client, tenants_key)
    assert any("lease lost" in p for p in report.problems[t]), report.render()
    assert "stranger" in report.problems
    await redis_client.srem(tenants_key, "stranger")

    await redis_client.hset(keys.wallet_key(t), "spendable", -101)
    report = await check(billing_store, redis_client, tenants_key)
    assert any("beyond balance + overdraft" in p for p in report.problems[t])


async def test_wallet_cache_flusher_and_replay_keep_the_books(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    """The whole money path: SEED, RESERVE, REPORT, flush, SETTLE, then Redis loses
    everything and a session replays; reconcile must hold at every step."""
    t = new_tenant_id()
    await billing_store.create_tenant(t, "T", overdraft_micros=1_000)
    await billing_store.topup(t, 100_000, "k")
    cache = WalletCache(redis_client)
    await redis_client.sadd(tenants_key, t)
    flusher = UsageFlusher(redis_client, billing_store, consumer="c", tenants_key=tenants_key,
                           on_replay_conflict=lambda t_, e, c: _refund(cache, t_, e, c))

    async def seed() -> None:
        snap = await billing_store.seed_snapshot(t)
        await cache.seed(t, snap.balance_micros, snap.overdraft_micros,
                         [str(i) for i in snap.topup_ids])
        await redis_client.srem(keys.TENANTS_SET, t)  # keep the shared set clean

    async def books_ok() -> None:
        report = await check(billing_store, redis_client, tenants_key)
        assert report.ok, report.render()
        assert report.redis_wallets_checked == 1

    async def reserve(session: str) -> None:
        granted = await cache.reserve(t, session, min_micros=1_000, want_micros=5_000,
                                      ttl_ms=30_000, session_id=session, model="asr-1",
                                      unit="audio_ms")
        assert granted is not None

    report_args = {"topup_want": 5_000, "low_water": 1_000, "ttl_ms": 30_000}
    await seed()
    await reserve("s1")
    await cache.report(t, "s1", seq=1, cum_units=10_000, cum_cost=1_000, **report_args)
    await cache.report(t, "s1", seq=2, cum_units=50_000, cum_cost=5_000, **report_args)
    await books_ok()  # unflushed usage and an open lease
    assert await flusher.flush_once() == 2
    await books_ok()
    await cache.settle(t, "s1", seq=3, cum_units=52_000, cum_cost=5_200)
    assert await flusher.flush_once() == 1
    await books_ok()
    assert await cache.spendable(t) == await billing_store.balance(t) == 100_000 - 5_200

    # s2 reports once and is flushed; then Redis loses every key of the tenant.
    await reserve("s2")
    await cache.report(t, "s2", seq=1, cum_units=3_000, cum_cost=300, **report_args)
    assert await flusher.flush_once() == 1
    doomed = [k async for k in redis_client.scan_iter(match=keys.tenant_pattern(t))]
    await redis_client.delete(*doomed)
    await seed()
    answer = await cache.report(t, "s2", seq=2, cum_units=5_000, cum_cost=500, **report_args)
    assert answer.status == "unknown"
    await reserve("s2")
    await cache.replay(t, "s2", [ReplayEvent(1, 3_000, 300), ReplayEvent(2, 2_000, 200)],
                       ttl_ms=30_000)
    await books_ok()  # s2:1 charged twice in the cache until the flusher refunds it
    assert await flusher.flush_once() == 2
    await books_ok()
    await cache.settle(t, "s2", seq=2, cum_units=5_000, cum_cost=500)
    await books_ok()
    assert await cache.spendable(t) == await billing_store.balance(t) == 100_000 - 5_700


async def _refund(cache: WalletCache, tenant: str, event_id: str, cost: int) -> None:
    await cache.refund(tenant, event_id, cost)


async def test_reconcile_main_exit_status(
    billing_store: BillingStore, fresh_database: str, capsys: pytest.CaptureFixture[str],
) -> None:
    await billing_store.create_tenant("a", "A")
    await billing_store.topup("a", 10, "k")
    assert await reconcile_main(None, fresh_database) == 0
    assert "OK" in capsys.readouterr().out
    async with billing_store.pool.acquire() as conn:
        await conn.execute("UPDATE wallets SET balance_micros = 0")
    assert await reconcile_main(None, fresh_database) == 1
    assert "off by -10" in capsys.readouterr().out
