"""BillingStore and migrations against a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from server.billing.auth import key_digest
from server.billing.migrate import discover, migrate
from server.billing.reconcile import reconcile
from server.billing.store import (
    BillingStore,
    IdempotencyConflict,
    Price,
    StoredUsage,
    TenantExists,
    UnknownTenant,
    UsageEvent,
    UsageRow,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def event(tenant: str, session: str, seq: int, cost: int, *, units: int = 1000,
          at: datetime = T0, model: str = "asr-1") -> UsageEvent:
    return UsageEvent(tenant, f"{session}:{seq}", session, model, "audio_ms", units, cost, at)


async def test_migrate_is_idempotent(fresh_database: str) -> None:
    names = [m.name for m in discover()]
    assert names[0] == "001_init"
    assert await migrate(fresh_database) == names
    assert await migrate(fresh_database) == []
    conn = await asyncpg.connect(fresh_database)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [(r["version"], r["name"]) for r in rows] == [(int(n[:3]), n) for n in names]


async def test_concurrent_migrations_apply_each_file_once(fresh_database: str) -> None:
    results = await asyncio.gather(*(migrate(fresh_database) for _ in range(3)))
    names = [m.name for m in discover()]
    assert sorted(results, key=len) == [[], [], names]


async def test_create_tenant_creates_wallet(billing_store: BillingStore) -> None:
    tenant = await billing_store.create_tenant(None, "Acme", overdraft_micros=500, burst=7)
    assert tenant.tenant_id.startswith("t_")
    assert (tenant.overdraft_micros, tenant.burst, tenant.requests_per_second) == (500, 7, 50)
    assert await billing_store.tenant(tenant.tenant_id) == tenant
    assert await billing_store.balance(tenant.tenant_id) == 0
    assert await billing_store.tenant("nobody") is None
    with pytest.raises(TenantExists):
        await billing_store.create_tenant(tenant.tenant_id, "again")
    with pytest.raises(ValueError):
        await billing_store.create_tenant("bad{tag}", "braces would break the hash tag")
    with pytest.raises(UnknownTenant):
        await billing_store.balance("nobody")


async def test_topup_is_idempotent(billing_store: BillingStore) -> None:
    t = (await billing_store.create_tenant("acme", "Acme")).tenant_id
    first = await billing_store.topup(t, 5_000_000, "order-1")
    again = await billing_store.topup(t, 5_000_000, "order-1")
    assert first.created and not again.created
    assert again.topup_id == first.topup_id
    assert await billing_store.balance(t) == 5_000_000
    with pytest.raises(IdempotencyConflict):
        await billing_store.topup(t, 6_000_000, "order-1")
    assert await billing_store.balance(t) == 5_000_000
    # The same key raced from many connections still credits once.
    racing = await asyncio.gather(*(billing_store.topup(t, 1_000, "order-2") for _ in range(8)))
    assert sum(r.created for r in racing) == 1
    assert len({r.topup_id for r in racing}) == 1
    assert await billing_store.balance(t) == 5_001_000
    assert (await reconcile(billing_store, None)).ok


async def test_topup_refuses_bad_input(billing_store: BillingStore) -> None:
    await billing_store.create_tenant("acme", "Acme")
    with pytest.raises(ValueError):
        await billing_store.topup("acme", 0, "k")
    with pytest.raises(TypeError):
        await billing_store.topup("acme", 1.5, "k")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await billing_store.topup("acme", 10, "")
    with pytest.raises(UnknownTenant):
        await billing_store.topup("nobody", 10, "k")


async def test_keys_are_stored_as_hashes_only(billing_store: BillingStore) -> None:
    t = (await billing_store.create_tenant("acme", "Acme", requests_per_second=9)).tenant_id
    issued = await billing_store.issue_key(t)
    assert issued.key.startswith("sg_") and issued.prefix == issued.key[:8]
    assert issued.key not in repr(issued)
    record = await billing_store.lookup_key(key_digest(issued.key))
    assert record is not None
    assert (record.key_id, record.tenant_id, record.revoked) == (issued.key_id, t, False)
    assert record.requests_per_second == 9
    assert await billing_store.lookup_key(key_digest(issued.key).upper()) == record
    assert await billing_store.lookup_key(key_digest("sg_not-a-key")) is None

    async with billing_store.pool.acquire() as conn:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
        for row in tables:
            dump = await conn.fetch(f'SELECT t::text AS r FROM "{row["tablename"]}" t')
            assert all(issued.key not in r["r"] for r in dump), row["tablename"]

    assert await billing_store.revoke_key(issued.key_id)
    assert await billing_store.revoke_key(issued.key_id)  # retried revoke: same answer
    revoked = await billing_store.lookup_key(key_digest(issued.key))
    assert revoked is not None and revoked.revoked
    assert not await billing_store.revoke_key("k_nope")
    with pytest.raises(UnknownTenant):
        await billing_store.issue_key("nobody")


async def test_prices(billing_store: BillingStore) -> None:
    await billing_store.set_price("asr-1", "audio_ms", 6000, 60000)
    await billing_store.set_price("tts-1", "characters", 15, 1000)
    await billing_store.set_price("asr-1", "audio_ms", 9000, 60000)  # update
    prices = await billing_store.prices()
    asr = prices[("asr-1", "audio_ms")]
    assert asr == Price("asr-1", "audio_ms", 9000, 60000)
    assert set(prices) == {("asr-1", "audio_ms"), ("tts-1", "characters")}
    # ceil of cumulative usage: costs of cumulative reports telescope to cost(total).
    assert asr.cost(0) == 0 and asr.cost(1) == 1 and asr.cost(60000) == 9000
    assert asr.cost(6667) == 1001  # 6667 * 9000 / 60000 = 1000.05
    with pytest.raises(ValueError):
        await billing_store.set_price("x", "seconds", 1, 1)
    with pytest.raises(ValueError):
        await billing_store.set_price("x", "pages", 1, 0)


async def test_record_usage_charges_exactly_once(billing_store: BillingStore) -> None:
    for t in ("a", "b"):
        await billing_store.create_tenant(t, t.upper())
        await billing_store.topup(t, 1_000_000, f"{t}-1")
    events = [event("a", "s1", i, 100 * i) for i in range(1, 4)]
    events += [event("b", "s2", 1, 7), event("b", "s2", 2, 0)]  # a zero delta is an event too
    inserted = await billing_store.record_usage(list(reversed(events)))
    assert inserted == ["s1:1", "s1:2", "s1:3", "s2:1", "s2:2"]
    assert await billing_store.record_usage(events) == []  # redelivery
    assert await billing_store.record_usage([*events[:1], event("a", "s1", 4, 50)]) == ["s1:4"]
    assert await billing_store.balance("a") == 1_000_000 - 600 - 50
    assert await billing_store.balance("b") == 1_000_000 - 7
    # Two entries of one event in one batch (an original and its replay) count once.
    assert await billing_store.record_usage([event("b", "s3", 1, 5)] * 2) == ["s3:1"]
    assert await billing_store.balance("b") == 1_000_000 - 12
    assert await billing_store.record_usage([]) == []
    report = await reconcile(billing_store, None)
    assert report.ok, report.render()


async def test_record_usage_detailed_reports_the_source_of_every_row(
    billing_store: BillingStore,
) -> None:
    await billing_store.create_tenant("a", "A")
    await billing_store.create_tenant("b", "B")
    legacy = event("a", "s", 1, 5)  # no source, as rows written before migration 002
    assert await billing_store.record_usage([legacy]) == ["s:1"]
    first = await billing_store.record_usage_detailed([
        replace(event("a", "s", 2, 7), source="e2"),
        replace(event("b", "s", 2, 1), source="b2"),
        replace(event("a", "s", 1, 5), source="r1"),  # conflicts with the legacy row
    ])
    assert first.inserted == ["s:2", "s:2"]
    assert first.rows == {
        ("a", "s:1"): StoredUsage(False, None, T0),
        ("a", "s:2"): StoredUsage(True, "e2", T0),
        ("b", "s:2"): StoredUsage(True, "b2", T0),
    }
    # Redelivery of e2 and its replay r2 in one batch: both see the row e2 inserted; a new
    # event whose first entry in the batch wins, the later one sees the first one's row.
    later = T0 + timedelta(minutes=1)
    again = await billing_store.record_usage_detailed([
        replace(event("a", "s", 2, 7), source="e2"),
        replace(event("a", "s", 2, 7, at=later), source="r2"),
        replace(event("a", "s", 3, 9), source="e3"),
        replace(event("a", "s", 3, 9, at=later), source="r3"),
    ])
    assert again.inserted == ["s:3"]
    assert again.rows == {
        ("a", "s:2"): StoredUsage(False, "e2", T0),
        ("a", "s:3"): StoredUsage(True, "e3", T0),
    }
    assert await billing_store.balance("a") == -21
    with pytest.raises(ValueError):
        await billing_store.record_usage([replace(event("a", "s", 4, 1), source="")])
    async with billing_store.pool.acquire() as conn:
        rows = await conn.fetch("SELECT event_id, source FROM usage_events"
                                " WHERE tenant_id = 'a' ORDER BY event_id")
        assert [(r["event_id"], r["source"]) for r in rows] == [
            ("s:1", None), ("s:2", "e2"), ("s:3", "e3")]
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE usage_events SET source = '' WHERE event_id = 's:1'")
    report = await reconcile(billing_store, None)
    assert report.ok, report.render()


async def test_record_usage_refuses_unknown_tenant_and_bad_events(
    billing_store: BillingStore,
) -> None:
    await billing_store.create_tenant("a", "A")
    with pytest.raises(UnknownTenant):
        await billing_store.record_usage([event("a", "s", 1, 5), event("zz", "s", 1, 5)])
    assert await billing_store.balance("a") == 0  # nothing of the batch was written
    naive = UsageEvent("a", "s:1", "s", "m", "audio_ms", 1, 1, datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        await billing_store.record_usage([naive])
    with pytest.raises(ValueError):
        await billing_store.record_usage([event("a", "s", 1, -5)])


async def test_concurrent_overlapping_batches_never_double_charge(
    billing_store: BillingStore,
) -> None:
    tenants = ["t1", "t2", "t3", "t4"]
    for t in tenants:
        await billing_store.create_tenant(t, t)
        await billing_store.topup(t, 10_000_000, "initial")
    rng = random.Random(7)
    all_events = [event(t, f"{t}-s", i, rng.randrange(0, 500))
                  for t in tenants for i in range(1, 41)]
    inserted: list[str] = []
    for _ in range(5):
        # Each task gets a random overlapping subset, in its own (unsorted) order.
        batches = [rng.sample(all_events, 60) for _ in range(4)]
        results = await asyncio.gather(
            *(asyncio.wait_for(billing_store.record_usage(b), 20) for b in batches)
        )
        for r in results:
            inserted.extend(r)
    await billing_store.record_usage(all_events)  # whatever no batch picked
    assert len(inserted) == len(set(inserted))  # no event inserted by two calls
    for t in tenants:
        spent = sum(e.cost_micros for e in all_events if e.tenant_id == t)
        assert await billing_store.balance(t) == 10_000_000 - spent
    report = await reconcile(billing_store, None)
    assert report.ok, report.render()


async def test_usage_summary_by_day_and_model(billing_store: BillingStore) -> None:
    await billing_store.create_tenant("a", "A")
    day2 = T0 + timedelta(days=1)
    await billing_store.record_usage([
        event("a", "s1", 1, 10, units=100),
        event("a", "s1", 2, 20, units=200),
        event("a", "s2", 1, 5, units=50, model="asr-2"),
        event("a", "s3", 1, 7, units=70, at=day2),
    ])
    d1, d2 = T0.date(), day2.date()
    assert await billing_store.usage_summary("a", None, None) == [
        UsageRow(d1, "asr-1", "audio_ms", 300, 30),
        UsageRow(d1, "asr-2", "audio_ms", 50, 5),
        UsageRow(d2, "asr-1", "audio_ms", 70, 7),
    ]
    assert await billing_store.usage_summary("a", d2, None) == [
        UsageRow(d2, "asr-1", "audio_ms", 70, 7)
    ]
    assert len(await billing_store.usage_summary("a", d1, d1)) == 2  # until is inclusive
    assert await billing_store.usage_summary("a", date(2030, 1, 1), None) == []


async def test_seed_snapshot_lists_recent_topups(billing_store: BillingStore) -> None:
    await billing_store.create_tenant("a", "A", overdraft_micros=250)
    old = await billing_store.topup("a", 1_000, "old")
    new = await billing_store.topup("a", 2_000, "new")
    await billing_store.record_usage([event("a", "s", 1, 300)])
    async with billing_store.pool.acquire() as conn:
        await conn.execute("UPDATE topups SET created_at = now() - interval '3 days'"
                           " WHERE topup_id = $1", old.topup_id)
    snap = await billing_store.seed_snapshot("a")
    assert (snap.balance_micros, snap.overdraft_micros) == (2_700, 250)
    assert snap.topup_ids == [new.topup_id]
    with pytest.raises(UnknownTenant):
        await billing_store.seed_snapshot("nobody")


async def test_schema_constraints(billing_store: BillingStore) -> None:
    await billing_store.create_tenant("a", "A")
    await billing_store.topup("a", 10, "k")
    async with billing_store.pool.acquire() as conn:
        with pytest.raises(asyncpg.RaiseError):  # ledger is append-only
            await conn.execute("UPDATE ledger_entries SET amount_micros = 11")
        with pytest.raises(asyncpg.RaiseError):
            await conn.execute("DELETE FROM ledger_entries")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO ledger_entries (tenant_id, kind, amount_micros, ref)"
                               " VALUES ('a', 'usage', 5, 'x:1')")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO topups (tenant_id, idempotency_key, amount_micros)"
                               " VALUES ('a', 'neg', -1)")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO price_plans VALUES ('m', 'tokens', 1, 0)")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO usage_events VALUES ('a', 's:1', 's', 'm', 'tokens', -1, 0, now())"
            )
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute("INSERT INTO wallets (tenant_id) VALUES ('nobody')")



async def test_record_usage_detailed_sees_a_row_committed_during_its_insert(
    billing_store: BillingStore,
) -> None:
    """A writer that bypasses the wallet lock commits a conflicting row after the statement's
    snapshot was taken: the row is read again instead of being reported without a source."""
    await billing_store.create_tenant("a", "A")
    async with billing_store.pool.acquire() as side:
        tx = side.transaction()
        await tx.start()
        await side.execute("INSERT INTO usage_events VALUES"
                           " ('a', 's:1', 's', 'asr-1', 'audio_ms', 1, 0, $1, 'side')", T0)
        task = asyncio.create_task(billing_store.record_usage_detailed(
            [replace(event("a", "s", 1, 0), source="mine")]))
        for _ in range(200):  # until the INSERT waits for the side transaction
            # Not on `side`: pg_stat_activity is a snapshot per transaction.
            waiting = await billing_store.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()")
            if waiting:
                break
            await asyncio.sleep(0.01)
        else:
            task.cancel()
            pytest.fail("record_usage never waited for the side transaction")
        await tx.commit()
        recorded = await asyncio.wait_for(task, 10)
    assert recorded.inserted == []
    assert recorded.rows == {("a", "s:1"): StoredUsage(False, "side", T0)}
