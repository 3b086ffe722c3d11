"""Upgrading to this version, and moving a deployment from one Redis server to a Redis Cluster
(docs/decisions/13B1-redis-cluster.md).

Upgrading in place changes nothing in Redis: the key names are the ones every version wrote
(pinned below). Moving to a cluster starts from an empty cache: the procedure is drain, flush the
old Redis's usage streams to empty, then point the nodes at the cluster. The switch test drives
it against a real Redis, a real 3-master cluster and a real PostgreSQL: a session that ended with
unflushed usage, one whose node died mid-lease and resumes on the cluster (REPORT `unknown`,
RESERVE, REPLAY of its acknowledged reports, as WalletMeter does), and a new one; every event is
charged once, nothing is lost, and the cluster's cache and reconcile agree with PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.billing import keys
from server.billing.flusher import UsageFlusher
from server.billing.reconcile import reconcile
from server.billing.redis_client import BillingRedis, connect
from server.billing.store import BillingStore
from server.billing.wallet_cache import ReplayEvent, WalletCache, WalletMissing

TTL = 600_000
META = {"model": "asr-1", "unit": "audio_ms"}


def test_key_names_are_what_earlier_versions_wrote() -> None:
    """An in-place upgrade finds its wallets, leases and streams under the same names: renaming
    a key is a data migration (decision 13B1), not a refactoring."""
    t, lease = "acme", "s-1"
    assert keys.reserve_keys(t, lease) == [
        "sg:{acme}:wallet", "sg:{acme}:lease:s-1", "sg:{acme}:leases", "sg:{acme}:settled:s-1"]
    assert keys.lease_script_keys(t, lease)[-1] == "sg:{acme}:usage"
    assert (keys.topups_key(t), keys.refunds_key(t)) == ("sg:{acme}:topups", "sg:{acme}:refunds")
    assert (keys.sessions_key(t), keys.audio_key(t)) == ("sg:{acme}:sessions", "sg:{acme}:audio")
    assert keys.gcra_key("k1") == "sg:{key:k1}:gcra"
    assert (keys.TENANTS_SET, keys.FLUSHER_GROUP) == ("sg:tenants", "flusher")


class Side:
    """One Redis deployment (one server, or the cluster) with its cache and its flusher."""

    def __init__(self, url: str, store: BillingStore, tenant: str) -> None:
        self.r: BillingRedis = connect(url)
        self.wc = WalletCache(self.r)
        self.tenants_key = f"sg:test:{uuid.uuid4().hex}:tenants"
        self.flusher = UsageFlusher(self.r, store, consumer="switch",
                                    on_replay_conflict=self._refund,
                                    tenants_key=self.tenants_key)
        self.store = store
        self.tenant = tenant

    async def _refund(self, tenant: str, event_id: str, cost: int) -> None:
        await self.wc.refund(tenant, event_id, cost)  # as BillingService._refund

    async def seed(self) -> None:
        """BillingService.ensure_wallet: the cache from a PostgreSQL snapshot."""
        snap = await self.store.seed_snapshot(self.tenant)
        await self.wc.seed(self.tenant, snap.balance_micros, snap.overdraft_micros,
                           [str(i) for i in snap.topup_ids])
        await self.r.sadd(self.tenants_key, self.tenant)

    async def reserve(self, lease: str) -> None:
        for _ in range(2):
            try:
                res = await self.wc.reserve(self.tenant, lease, min_micros=1_000,
                                            want_micros=50_000, ttl_ms=TTL, session_id=lease,
                                            **META)
                assert res is not None
                return
            except WalletMissing:
                await self.seed()
        raise AssertionError("no wallet after seeding")

    async def report(self, lease: str, seq: int, cum_cost: int) -> str:
        res = await self.wc.report(self.tenant, lease, seq=seq, cum_units=cum_cost * 10,
                                   cum_cost=cum_cost, topup_want=50_000, low_water=10_000,
                                   ttl_ms=TTL)
        return res.status

    async def flush_all(self) -> int:
        total = 0
        while n := await self.flusher.flush_once():
            total += n
        return total

    async def close(self) -> None:
        try:
            doomed = [k async for k in self.r.scan_iter(match=keys.tenant_pattern(self.tenant))]
            if doomed:
                await self.r.delete(*doomed)
            await self.r.srem(keys.TENANTS_SET, self.tenant)
            await self.r.delete(self.tenants_key)
        finally:
            await self.r.aclose()


@asynccontextmanager
async def side(url: str, store: BillingStore, tenant: str) -> AsyncIterator[Side]:
    s = Side(url, store, tenant)
    try:
        yield s
    finally:
        await s.close()


async def test_switch_from_one_server_to_a_cluster_charges_every_event_once(
    billing_store: BillingStore, redis_url: str, redis_cluster_url: str,
) -> None:
    store, tenant = billing_store, f"mv-{uuid.uuid4().hex[:12]}"
    await store.create_tenant(tenant, tenant)
    await store.topup(tenant, 1_000_000, "initial")
    async with side(redis_url, store, tenant) as old, side(redis_cluster_url, store,
                                                           tenant) as new:
        await old.seed()
        # Session A ends on the old Redis; part of its usage is flushed before the switch.
        await old.reserve("A")
        assert await old.report("A", 1, 3_000) == "ok"
        await old.flush_all()
        assert await old.report("A", 2, 7_000) == "ok"
        assert (await old.wc.settle(tenant, "A", seq=3, cum_units=90_000,
                                    cum_cost=9_000)).status == "ok"
        # Session B's node dies mid-lease: its lease stays open in the old Redis.
        await old.reserve("B")
        assert await old.report("B", 1, 2_000) == "ok"
        assert await old.report("B", 2, 5_000) == "ok"
        b_acks = [ReplayEvent(1, 20_000, 2_000), ReplayEvent(2, 30_000, 3_000)]  # deltas

        # The switch: old nodes drained, the old streams flushed to empty (the barrier)...
        await old.flush_all()
        assert await old.r.xlen(keys.usage_stream(tenant)) == 0
        # ...then the nodes use the cluster. B resumes there: its lease is unknown, so it
        # reserves anew (seeding the cluster's wallet from PostgreSQL) and replays its reports.
        assert await new.report("B", 3, 6_000) == "unknown"
        await new.reserve("B")
        replayed = await new.wc.replay(tenant, "B", b_acks, ttl_ms=TTL)
        assert (replayed.status, replayed.applied) == ("ok", 2)
        assert await new.report("B", 3, 6_000) == "ok"
        assert (await new.wc.settle(tenant, "B", seq=3, cum_units=60_000,
                                    cum_cost=6_000)).status == "ok"
        # A new session on the cluster.
        await new.reserve("C")
        assert (await new.wc.settle(tenant, "C", seq=1, cum_units=40_000,
                                    cum_cost=4_000)).status == "ok"
        await new.flush_all()

        rows = await store.pool.fetch(
            "SELECT event_id, cost_micros FROM usage_events WHERE tenant_id = $1"
            " ORDER BY event_id", tenant)
        assert [(r["event_id"], r["cost_micros"]) for r in rows] == [
            ("A:1", 3_000), ("A:2", 4_000), ("A:3", 2_000),
            ("B:1", 2_000), ("B:2", 3_000), ("B:3", 1_000), ("C:1", 4_000)]
        balance = await store.balance(tenant)
        assert balance == 1_000_000 - 9_000 - 6_000 - 4_000
        # B's replayed reports were already in PostgreSQL: charged there once, refunded in
        # the cluster's cache, which now agrees with PostgreSQL.
        assert await new.wc.spendable(tenant) == balance
        report = await reconcile(store, new.r, tenants_key=new.tenants_key)
        assert report.ok, report.render()


async def test_without_the_flush_barrier_reconcile_shows_the_gap(
    billing_store: BillingStore, redis_url: str, redis_cluster_url: str,
) -> None:
    """Why the procedure flushes the old streams first: a cluster wallet seeded while the old
    Redis still holds unflushed usage starts without that usage (PostgreSQL has not seen it).
    PostgreSQL stays right once the old stream is flushed, but the cache is ahead by exactly
    that usage until it is re-seeded, and reconcile says so (never silently)."""
    store, tenant = billing_store, f"mv-{uuid.uuid4().hex[:12]}"
    await store.create_tenant(tenant, tenant)
    await store.topup(tenant, 1_000_000, "initial")
    async with side(redis_url, store, tenant) as old, side(redis_cluster_url, store,
                                                           tenant) as new:
        await old.seed()
        await old.reserve("A")
        assert (await old.wc.settle(tenant, "A", seq=1, cum_units=70_000,
                                    cum_cost=7_000)).status == "ok"
        await new.seed()  # no barrier: A's usage is still in the old stream
        await old.flush_all()
        assert await store.balance(tenant) == 1_000_000 - 7_000
        assert await new.wc.spendable(tenant) == 1_000_000
        report = await reconcile(store, new.r, tenants_key=new.tenants_key)
        assert not report.ok and "off by 7000" in report.render(), report.render()
