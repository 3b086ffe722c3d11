"""UsageFlusher against real Redis streams and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.billing import keys
from server.billing.flusher import (
    FAULT_ENV,
    FAULT_EXIT_AFTER_COMMIT,
    FAULT_EXIT_CODE,
    GROUP,
    UsageFlusher,
)
from server.billing.reconcile import reconcile
from server.billing.store import BillingStore, UsageEvent

ROOT = Path(__file__).resolve().parents[2]
TS = 1_740_830_400_000  # 2025-03-01T12:00:00Z in ms


async def add_tenant(store: BillingStore, r: aioredis.Redis, tenants_key: str, tenant: str,
                     balance: int = 1_000_000) -> None:
    await store.create_tenant(tenant, tenant)
    await store.topup(tenant, balance, "initial")
    await r.sadd(tenants_key, tenant)


async def xadd(r: aioredis.Redis, tenant: str, session: str, seq: int, cost: int, *,
               units: int = 1000, replay: bool = False) -> str:
    """One entry exactly as the REPORT script writes it (docs/billing.md, `sg:{t}:usage`)."""
    entry_id = await r.xadd(keys.usage_stream(tenant), {
        "event_id": f"{session}:{seq}", "session_id": session, "model": "asr-1",
        "unit": "audio_ms", "units": str(units), "cost": str(cost),
        "replay": "1" if replay else "0", "ts": str(TS + seq),
    })
    return str(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)


async def pending(r: aioredis.Redis, tenant: str) -> int:
    info = await r.xpending(keys.usage_stream(tenant), GROUP)
    return int(info["pending"])


async def test_flushes_every_tenant_stream(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    a, b = new_tenant_id(), new_tenant_id()
    for t in (a, b):
        await add_tenant(billing_store, redis_client, tenants_key, t)
    for seq in range(1, 6):
        await xadd(redis_client, a, "sa", seq, 10 * seq)
    for seq in range(1, 4):
        await xadd(redis_client, b, "sb", seq, 3)
    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key)
    assert await flusher.flush_once() == 8
    assert await flusher.flush_once() == 0
    assert await billing_store.balance(a) == 1_000_000 - 150
    assert await billing_store.balance(b) == 1_000_000 - 9
    rows = await billing_store.usage_summary(a, None, None)
    assert [(r.day, r.units, r.cost_micros) for r in rows] == [
        (datetime(2025, 3, 1, tzinfo=UTC).date(), 5000, 150)
    ]
    for t in (a, b):
        assert await pending(redis_client, t) == 0
        assert await redis_client.xlen(keys.usage_stream(t)) == 0  # acked entries deleted
    report = await reconcile(billing_store, None)
    assert report.ok, report.render()


async def test_redelivered_entries_charge_nothing(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    # As after a crash between COMMIT and XACK: Postgres has s:1 and s:2 already.
    at = datetime(2025, 3, 1, tzinfo=UTC)
    await billing_store.record_usage([
        UsageEvent(t, f"s:{i}", "s", "asr-1", "audio_ms", 1000, 100, at) for i in (1, 2)
    ])
    for seq in (1, 2, 3):
        await xadd(redis_client, t, "s", seq, 100)
    calls: list[tuple[str, str, int]] = []

    async def refund(tenant: str, event_id: str, cost: int) -> None:
        calls.append((tenant, event_id, cost))

    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key,
                           on_replay_conflict=refund)
    assert await flusher.flush_once() == 3
    assert await billing_store.balance(t) == 1_000_000 - 300
    assert calls == []  # conflicts of non-replayed entries are redeliveries, not refunds
    assert await pending(redis_client, t) == 0


async def test_dead_consumers_entries_are_claimed(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    stream = keys.usage_stream(t)
    await redis_client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for seq in (1, 2, 3):
        await xadd(redis_client, t, "s", seq, 40)
    # A consumer reads the entries and dies before committing anything.
    await redis_client.xreadgroup(GROUP, "dead", {stream: ">"}, count=10)
    assert await pending(redis_client, t) == 3
    await xadd(redis_client, t, "s", 4, 40)  # new work arrives meanwhile

    survivor = UsageFlusher(redis_client, billing_store, consumer="alive", claim_idle_ms=500,
                            tenants_key=tenants_key)
    assert await survivor.flush_once() == 1  # the dead one's entries are not idle long enough
    assert await pending(redis_client, t) == 3
    await asyncio.sleep(0.55)
    assert await survivor.flush_once() == 3
    assert await pending(redis_client, t) == 0
    assert await billing_store.balance(t) == 1_000_000 - 160


async def test_crash_after_commit_before_ack(
    billing_store: BillingStore, fresh_database: str, redis_url: str,
    redis_client: aioredis.Redis, tenants_key: str, new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    for seq in range(1, 6):
        await xadd(redis_client, t, "s", seq, 25)
    code = (
        "import asyncio, sys\n"
        "from server.billing.flusher import flusher_main\n"
        f"sys.exit(asyncio.run(flusher_main({redis_url!r}, {fresh_database!r},"
        f" consumer='doomed', tenants_key={tenants_key!r})))\n"
    )
    env = {**os.environ, FAULT_ENV: FAULT_EXIT_AFTER_COMMIT}
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr
    assert await billing_store.balance(t) == 1_000_000 - 125  # committed ...
    assert await pending(redis_client, t) == 5  # ... but not acknowledged

    second = UsageFlusher(redis_client, billing_store, consumer="next", claim_idle_ms=1,
                          tenants_key=tenants_key)
    await asyncio.sleep(0.01)
    assert await second.flush_once() == 5
    assert await billing_store.balance(t) == 1_000_000 - 125  # nothing charged twice
    assert await pending(redis_client, t) == 0
    report = await reconcile(billing_store, None)
    assert report.ok, report.render()


async def test_replay_conflicts_call_the_refund_hook(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    at = datetime(2025, 3, 1, tzinfo=UTC)
    # Flushed before Redis lost the session's lease.
    await billing_store.record_usage([
        UsageEvent(t, f"s:{i}", "s", "asr-1", "audio_ms", 1000, 10 * i, at) for i in (1, 2)
    ])
    await xadd(redis_client, t, "s", 1, 10, replay=True)  # conflict: refund
    await xadd(redis_client, t, "s", 2, 20)  # redelivered original: conflict, no refund
    await xadd(redis_client, t, "s", 3, 30, replay=True)  # Postgres never had it: charged
    await xadd(redis_client, t, "s", 4, 40)  # original and its replay in one batch:
    await xadd(redis_client, t, "s", 4, 40, replay=True)  # the cache took it twice
    calls: list[tuple[str, str, int]] = []
    fail = [True]

    async def refund(tenant: str, event_id: str, cost: int) -> None:
        if fail[0]:
            fail[0] = False
            raise ConnectionError("Redis went away during REFUND")
        calls.append((tenant, event_id, cost))

    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key,
                           on_replay_conflict=refund)
    with pytest.raises(ConnectionError):
        await flusher.flush_once()
    assert await pending(redis_client, t) == 5  # committed, but nothing acknowledged
    assert await flusher.flush_once() == 5
    assert calls == [(t, "s:1", 10), (t, "s:4", 40)]
    assert await billing_store.balance(t) == 1_000_000 - 100
    assert await pending(redis_client, t) == 0


async def test_postgres_failure_loses_nothing(
    billing_store: BillingStore, fresh_database: str, redis_client: aioredis.Redis,
    tenants_key: str, new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    await xadd(redis_client, t, "s", 1, 70)
    broken = await BillingStore.connect(fresh_database)
    await broken.close()  # every query now fails, as with Postgres down
    flusher = UsageFlusher(redis_client, broken, consumer="c1", tenants_key=tenants_key)
    with pytest.raises(Exception):  # noqa: B017 - whatever asyncpg raises on a closed pool
        await flusher.flush_once()
    assert await pending(redis_client, t) == 1
    healthy = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key)
    assert await healthy.flush_once() == 1
    assert await billing_store.balance(t) == 1_000_000 - 70


async def test_malformed_entries_stay_pending_and_unknown_tenants_are_skipped(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    t, ghost = new_tenant_id(), new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    await redis_client.sadd(tenants_key, ghost)  # cached in Redis, unknown to Postgres
    await xadd(redis_client, ghost, "g", 1, 5)
    bad = (await redis_client.xadd(keys.usage_stream(t), {"event_id": "x:1", "cost": "a lot"}))
    await xadd(redis_client, t, "s", 1, 5)
    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key)
    assert await flusher.flush_once() == 1
    assert await flusher.flush_once() == 0
    assert await billing_store.balance(t) == 1_000_000 - 5
    left = await redis_client.xpending_range(keys.usage_stream(t), GROUP, "-", "+", 10)
    assert [e["message_id"] for e in left] == [bad]
    assert await pending(redis_client, ghost) == 1


async def test_run_flushes_until_stopped(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    stop = asyncio.Event()
    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", block_ms=20,
                           tenants_key=tenants_key)
    task = asyncio.create_task(flusher.run(stop))
    try:
        for seq in range(1, 4):
            await xadd(redis_client, t, "s", seq, 1)
        for _ in range(250):  # up to 5 s
            if await billing_store.balance(t) == 1_000_000 - 3:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the running flusher did not charge the entries")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
