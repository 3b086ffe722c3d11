"""UsageFlusher against real Redis streams and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from server.billing import keys
from server.billing.flusher import (
    FAULT_ENV,
    FAULT_EXIT_AFTER_COMMIT,
    FAULT_EXIT_CODE,
    GROUP,
    ReplayConflict,
    UsageFlusher,
    as_str,
    entry_source,
    flusher_main,
    parse_entry,
)
from server.billing.reconcile import reconcile
from server.billing.store import BillingStore, RecordedUsage, UsageEvent
from server.billing.wallet_cache import ReplayEvent, WalletCache

ROOT = Path(__file__).resolve().parents[2]
TS = 1_740_830_400_000  # 2025-03-01T12:00:00Z in ms


async def add_tenant(store: BillingStore, r: aioredis.Redis, tenants_key: str, tenant: str,
                     balance: int = 1_000_000) -> None:
    await store.create_tenant(tenant, tenant)
    await store.topup(tenant, balance, "initial")
    await r.sadd(tenants_key, tenant)


async def xadd(r: aioredis.Redis, tenant: str, session: str, seq: int, cost: int, *,
               units: int = 1000, replay: bool = False, ts: int | None = None,
               entry_id: str = "*") -> str:
    """One entry exactly as the REPORT script writes it (docs/billing.md, `sg:{t}:usage`)."""
    added = await r.xadd(keys.usage_stream(tenant), {
        "event_id": f"{session}:{seq}", "session_id": session, "model": "asr-1",
        "unit": "audio_ms", "units": str(units), "cost": str(cost),
        "replay": "1" if replay else "0", "ts": str(TS + seq if ts is None else ts),
    }, id=entry_id)
    return str(added.decode() if isinstance(added, bytes) else added)


async def pending(r: aioredis.Redis, tenant: str) -> int:
    info = await r.xpending(keys.usage_stream(tenant), GROUP)
    return int(info["pending"])


def refund_recorder() -> tuple[list[str], ReplayConflict]:
    """A refund hook that records the event ids it is called with, and that record."""
    calls: list[str] = []

    async def refund(tenant: str, event_id: str, cost: int) -> None:
        calls.append(event_id)

    return calls, refund


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
        # The replayed ones were never in Postgres: the doomed flusher inserts them itself.
        await xadd(redis_client, t, "s", seq, 25, replay=seq >= 4)
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

    calls: list[tuple[str, str, int]] = []

    async def refund(tenant: str, event_id: str, cost: int) -> None:
        calls.append((tenant, event_id, cost))

    second = UsageFlusher(redis_client, billing_store, consumer="next", claim_idle_ms=1,
                          tenants_key=tenants_key, on_replay_conflict=refund)
    await asyncio.sleep(0.01)
    assert await second.flush_once() == 5
    assert await billing_store.balance(t) == 1_000_000 - 125  # nothing charged twice
    assert calls == []  # the replayed entries conflicted with their own rows: no refund
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


# --- replays: REFUND exactly when Postgres got the event from ANOTHER stream entry -------------


class CrashAfterCommit(BillingStore):
    """A store whose flusher "dies" right after COMMIT: before REFUND and before XACK."""

    async def record_usage_detailed(self, events: list[UsageEvent]) -> RecordedUsage:
        await super().record_usage_detailed(events)
        raise ConnectionError("flusher crashed after COMMIT")


class Replayed:
    """A tenant whose Redis lost everything after one of its session's two reports was flushed.

    s:1 reached Postgres from its original entry; s:2 died with the old Redis. The session then
    reserved again and replayed both (replay=1), and reported s:3 (replay=0) in the new Redis:
    the new wallet took s:1 a second time (its seed already had it), so only s:1 needs a REFUND.
    """

    def __init__(self, store: BillingStore, r: aioredis.Redis, tenants_key: str,
                 tenant: str) -> None:
        self.store, self.r, self.tenants_key, self.t = store, r, tenants_key, tenant
        self.cache = WalletCache(r)
        self.credited: list[str] = []  # event ids whose REFUND really credited the wallet
        self.calls: list[str] = []  # every call of the refund hook

    async def refund(self, tenant: str, event_id: str, cost: int) -> None:
        self.calls.append(event_id)
        if await self.cache.refund(tenant, event_id, cost):
            self.credited.append(event_id)

    def flusher(self, consumer: str, **kw: Any) -> UsageFlusher:
        return UsageFlusher(self.r, kw.pop("store", self.store), consumer=consumer,
                            tenants_key=self.tenants_key, on_replay_conflict=self.refund, **kw)

    async def seed(self) -> None:
        snap = await self.store.seed_snapshot(self.t)
        await self.cache.seed(self.t, snap.balance_micros, snap.overdraft_micros,
                              [str(i) for i in snap.topup_ids])
        await self.r.srem(keys.TENANTS_SET, self.t)  # keep the shared set clean

    async def reserve(self) -> None:
        granted = await self.cache.reserve(self.t, "s", min_micros=1_000, want_micros=5_000,
                                           ttl_ms=60_000, session_id="s", model="asr-1",
                                           unit="audio_ms")
        assert granted is not None

    async def report(self, seq: int, cum_cost: int) -> str:
        answer = await self.cache.report(self.t, "s", seq=seq, cum_units=10 * cum_cost,
                                         cum_cost=cum_cost, topup_want=0, low_water=0,
                                         ttl_ms=60_000)
        return answer.status

    async def setup(self) -> None:
        await self.store.create_tenant(self.t, "T")
        await self.store.topup(self.t, 100_000, "k")
        await self.r.sadd(self.tenants_key, self.t)
        await self.seed()
        await self.reserve()
        assert await self.report(1, 300) == "ok"
        assert await self.flusher("first").flush_once() == 1  # s:1 in Postgres
        assert await self.report(2, 500) == "ok"  # s:2: lost with Redis
        doomed = [k async for k in self.r.scan_iter(match=keys.tenant_pattern(self.t))]
        await self.r.delete(*doomed)
        await self.seed()
        assert await self.report(3, 600) == "unknown"
        await self.reserve()
        replayed = await self.cache.replay(
            self.t, "s", [ReplayEvent(1, 3_000, 300), ReplayEvent(2, 2_000, 200)],
            ttl_ms=60_000)
        assert replayed.applied == 2
        assert await self.report(3, 600) == "ok"
        assert await self.r.xlen(keys.usage_stream(self.t)) == 3

    async def entries(self) -> list[tuple[str, dict[str, str]]]:
        raw: Any = await self.r.xrange(keys.usage_stream(self.t))
        return [(as_str(i), {as_str(k): as_str(v) for k, v in f.items()}) for i, f in raw]

    async def check_books(self) -> None:
        """Everything flushed and acknowledged, the session settled: the cache must equal
        Postgres to the micro, and s:1 must have been credited exactly once."""
        assert await pending(self.r, self.t) == 0
        assert await self.r.xlen(keys.usage_stream(self.t)) == 0
        settled = await self.cache.settle(self.t, "s", seq=3, cum_units=6_000, cum_cost=600)
        assert settled.status == "ok"
        assert await self.store.balance(self.t) == 100_000 - 600
        assert await self.cache.spendable(self.t) == 100_000 - 600
        assert self.credited == ["s:1"]
        report = await reconcile(self.store, self.r, retry_delay_s=0.01,
                                 tenants_key=self.tenants_key)
        assert report.ok, report.render()


async def test_replay_of_an_event_postgres_had_from_its_original_is_refunded_once(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    books = Replayed(billing_store, redis_client, tenants_key, new_tenant_id())
    await books.setup()
    # The first flusher REFUNDs, then dies before XACK; the next one (a restarted process, no
    # memory of the first) sees the same conflict and calls REFUND again: credited once.
    real_refund = books.refund

    async def refund_then_crash(tenant: str, event_id: str, cost: int) -> None:
        await real_refund(tenant, event_id, cost)
        raise ConnectionError("crashed after REFUND")

    books.refund = refund_then_crash  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await books.flusher("c1").flush_once()
    assert await pending(redis_client, books.t) == 3
    books.refund = real_refund  # type: ignore[method-assign]
    assert await books.flusher("c1").flush_once() == 3
    assert await books.flusher("c1").flush_once() == 0
    assert books.calls == ["s:1", "s:1"]  # s:2 came into Postgres from its own replay
    await books.check_books()


async def test_replayed_entry_committed_then_crashed_before_xack_is_not_refunded(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    books = Replayed(billing_store, redis_client, tenants_key, new_tenant_id())
    await books.setup()
    t, stream = books.t, keys.usage_stream(books.t)
    # A flusher reads the batch and commits it, then crashes: no REFUND, no XACK.
    await redis_client.xgroup_create(stream, GROUP, id="0")
    await redis_client.xreadgroup(GROUP, "c1", {stream: ">"}, count=10)
    events = [parse_entry(t, f, entry_id=i)[0] for i, f in await books.entries()]
    recorded = await billing_store.record_usage_detailed(events)
    assert recorded.inserted == ["s:2", "s:3"]  # s:1 conflicted with its original
    # Restarted under the same name, it finds the batch in its pending list.
    assert await books.flusher("c1").flush_once() == 3
    assert books.calls == ["s:1"]  # not s:2: Postgres has it from this very entry
    await books.check_books()


async def test_replayed_entry_claimed_from_a_dead_consumer_is_not_refunded(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    books = Replayed(billing_store, redis_client, tenants_key, new_tenant_id())
    await books.setup()
    dead = books.flusher("dead", store=CrashAfterCommit(billing_store.pool))
    with pytest.raises(ConnectionError):
        await dead.flush_once()
    assert books.calls == []
    assert await billing_store.balance(books.t) == 100_000 - 600  # committed
    survivor = books.flusher("alive", claim_idle_ms=500)
    assert await survivor.flush_once() == 0  # not idle long enough yet
    await asyncio.sleep(0.55)
    assert await survivor.flush_once() == 3  # claimed
    assert books.calls == ["s:1"]  # s:2 (and s:3, not a replay) conflicted with their own rows
    await books.check_books()


async def test_non_replayed_redelivery_after_a_crash_is_not_refunded(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    for seq in (1, 2):
        await xadd(redis_client, t, "s", seq, 100)
    calls, refund = refund_recorder()
    with pytest.raises(ConnectionError):
        await UsageFlusher(redis_client, CrashAfterCommit(billing_store.pool), consumer="c1",
                           tenants_key=tenants_key, on_replay_conflict=refund).flush_once()
    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key,
                           on_replay_conflict=refund)
    assert await flusher.flush_once() == 2
    assert calls == []
    assert await billing_store.balance(t) == 1_000_000 - 200


async def test_replay_in_a_new_redis_reusing_the_originals_entry_id_is_refunded(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    """A Redis that lost its data and runs on a clock behind the old one's can give the replay
    the very stream id of the original: the source still tells them apart (replay, ts)."""
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    calls, refund = refund_recorder()
    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key,
                           on_replay_conflict=refund)
    await xadd(redis_client, t, "s", 1, 100, entry_id="1000-0")
    assert await flusher.flush_once() == 1
    await redis_client.delete(keys.usage_stream(t))  # Redis lost everything
    await xadd(redis_client, t, "s", 1, 100, entry_id="1000-0", replay=True, ts=TS + 5)
    assert await flusher.flush_once() == 1  # NOGROUP: the group is created again
    assert calls == ["s:1"]
    assert await billing_store.balance(t) == 1_000_000 - 100


async def test_rows_without_a_source_fall_back_to_occurred_at(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    """Rows written before migration 002 have no source; their occurred_at is the ts of the
    entry that inserted them, and a replay's ts is later than its original's."""
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    at = datetime.fromtimestamp((TS + 1) // 1000, UTC) + timedelta(milliseconds=(TS + 1) % 1000)
    await billing_store.record_usage([  # as an old flusher wrote them
        UsageEvent(t, "s:1", "s", "asr-1", "audio_ms", 1000, 10, at),
        UsageEvent(t, "s:2", "s", "asr-1", "audio_ms", 1000, 20, at),
    ])
    await xadd(redis_client, t, "s", 1, 10, replay=True, ts=TS + 1)  # the inserting entry
    await xadd(redis_client, t, "s", 2, 20, replay=True, ts=TS + 9)  # a later replay
    calls, refund = refund_recorder()
    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key,
                           on_replay_conflict=refund)
    assert await flusher.flush_once() == 2
    assert calls == ["s:2"]
    assert await billing_store.balance(t) == 1_000_000 - 30


def test_entry_source_names_the_entry() -> None:
    fields = {"event_id": "s:1", "replay": "1", "ts": "1740830400001"}
    assert entry_source("1740830400001-0", fields) == "1740830400001-0 ts=1740830400001 replay=1"
    assert entry_source("1740830400001-0", {**fields, "replay": "0"}) != \
        entry_source("1740830400001-0", fields)
    assert entry_source("1740830400001-0", {**fields, "ts": "1740830400002"}) != \
        entry_source("1740830400001-0", fields)
    event, replay = parse_entry("t", {**fields, "session_id": "s", "model": "m",
                                      "unit": "audio_ms", "units": "1", "cost": "1"},
                                entry_id="1740830400001-0")
    assert replay and event.source == entry_source("1740830400001-0", fields)


async def test_until_empty_flushes_every_stream_then_exits_0(
    billing_store: BillingStore, fresh_database: str, redis_url: str,
    redis_client: aioredis.Redis, tenants_key: str, new_tenant_id: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`streamgate flusher --until-empty`: the flush barrier before moving to another Redis
    (docs/decisions/13B1-redis-cluster.md)."""
    t, u = new_tenant_id(), new_tenant_id()
    for tenant in (t, u):
        await add_tenant(billing_store, redis_client, tenants_key, tenant)
        for seq in (1, 2):
            await xadd(redis_client, tenant, "s", seq, 10)
    code = await flusher_main(redis_url, fresh_database, consumer="barrier",
                              tenants_key=tenants_key, until_empty=True)
    assert (code, capsys.readouterr().out.strip()) == (0, "usage streams: empty")
    for tenant in (t, u):
        assert await redis_client.xlen(keys.usage_stream(tenant)) == 0
        assert await billing_store.balance(tenant) == 1_000_000 - 20


async def test_until_empty_gives_up_on_entries_it_cannot_flush(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    t = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, t)
    await redis_client.xadd(keys.usage_stream(t), {"event_id": "x:1", "cost": "a lot"})
    await xadd(redis_client, t, "s", 1, 5)
    flusher = UsageFlusher(redis_client, billing_store, consumer="c1", tenants_key=tenants_key,
                           block_ms=10)
    assert await flusher.run_until_empty(asyncio.Event(), give_up_s=0.1) == 1  # the bad one
    assert await billing_store.balance(t) == 1_000_000 - 5
