"""The wallet model (tests/billing_redis/wallet_model.py) extended to Postgres: a Hypothesis
state machine drives RESERVE / REPORT / SETTLE / expiry + SWEEP / TOPUP on the real Redis
scripts (WalletCache) and FLUSH (UsageFlusher.flush_once) into a real migrated Postgres
(BillingStore), and checks after every step that Redis matches the model and that the cache
invariant holds against Postgres:

    spendable == PG balance - unflushed usage - open lease remainders

and at teardown, after a final flush: top-ups - charged usage == PG balance, every event once
(and with one ledger entry), the usage rows are exactly the model's events, reconcile is ok.

Hypothesis calls rules synchronously: the machine drives the async clients on an event loop of
its own, and closes every client and the loop in teardown.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from server.billing import keys
from server.billing.flusher import UsageFlusher
from server.billing.migrate import migrate
from server.billing.reconcile import reconcile
from server.billing.redis_client import connect
from server.billing.store import BillingStore, IdempotencyConflict
from server.billing.wallet_cache import LeaseSettled, WalletCache
from tests.billing_redis.wallet_model import WalletModel

T = TypeVar("T")
TTL = 600_000
META = {"model": "asr-1", "unit": "audio_ms"}
LEASES = [f"s{n}" for n in range(10)]
TOPUP_KEYS = ["pay-a", "pay-b", "pay-c", "pay-d"]
money = st.integers(0, 40_000)
pick = st.integers(0, 13)  # mostly an open lease (see FlushMachine.lease), else any id


class FlushMachine(RuleBasedStateMachine):
    redis_url = ""
    dsn = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.r = connect(self.redis_url)
        self.wc = WalletCache(self.r)
        self.store: BillingStore | None = None
        self.store = self.run(BillingStore.connect(self.dsn, min_size=1, max_size=2))
        self.tenants_key = f"sg:test:{uuid.uuid4().hex}:tenants"
        self.flusher = UsageFlusher(self.r, self.store, consumer="model",
                                    tenants_key=self.tenants_key)
        self.t = f"mf-{uuid.uuid4().hex[:16]}"
        self.m = WalletModel()
        self.flushed = 0  # events of m.stream already flushed to Postgres
        self.topups: dict[str, tuple[int, int]] = {}  # idempotency key -> (topup_id, amount)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def lease(self, i: int) -> str:
        open_ = sorted(self.m.leases)
        return open_[i % len(open_)] if open_ and i < 10 else LEASES[i % len(LEASES)]

    def _affordable(self, lease: str, wanted: int) -> int:
        """Cap a charge at what the lease and the wallet (with overdraft) can pay: a meter never
        reports usage it was not granted (the server side: test_billing_e2e's
        test_running_dry_never_charges_beyond_balance_plus_overdraft)."""
        cur = self.m.leases.get(lease)
        if cur is None:
            return wanted
        return min(wanted, cur.remaining + max(0, self.m.spendable + self.m.overdraft))

    # --- setup and teardown -----------------------------------------------------------------

    @initialize(balance=st.integers(0, 300_000), overdraft=st.integers(0, 30_000),
                wants=st.lists(st.integers(0, 60_000), min_size=1, max_size=3))
    def seed(self, balance: int, overdraft: int, wants: list[int]) -> None:
        assert self.store is not None
        self.run(self.store.create_tenant(self.t, self.t, overdraft_micros=overdraft))
        if balance:
            self._pg_topup("initial", balance)
        snap = self.run(self.store.seed_snapshot(self.t))
        ids = [str(i) for i in snap.topup_ids]
        assert snap.balance_micros == balance
        assert self.run(self.wc.seed(self.t, snap.balance_micros, snap.overdraft_micros, ids))
        assert self.m.seed(balance, overdraft, ids)
        self.run(self.r.sadd(self.tenants_key, self.t))
        for n, want in enumerate(wants):
            self.reserve(n, 0, want, 1)

    def teardown(self) -> None:
        try:
            if self.store is not None and self.m.exists:
                self._final_checks()
        finally:
            try:
                self.run(self._cleanup())
            finally:
                self.loop.close()

    def _final_checks(self) -> None:
        assert self.store is not None
        self.flush()
        pool = self.store.pool
        topups = self.run(pool.fetchval(
            "SELECT coalesce(sum(amount_micros), 0) FROM topups WHERE tenant_id = $1", self.t))
        usage = self.run(pool.fetchval(
            "SELECT coalesce(sum(cost_micros), 0) FROM usage_events WHERE tenant_id = $1",
            self.t))
        assert topups - usage == self.run(self.store.balance(self.t))
        dups = self.run(pool.fetch(
            "SELECT event_id, count(*) FROM usage_events WHERE tenant_id = $1"
            " GROUP BY event_id HAVING count(*) > 1", self.t))
        assert dups == []
        ledger = self.run(pool.fetch(
            "SELECT u.event_id FROM usage_events u LEFT JOIN ledger_entries l"
            " ON l.tenant_id = u.tenant_id AND l.kind = 'usage' AND l.ref = u.event_id"
            " AND l.amount_micros = -u.cost_micros WHERE u.tenant_id = $1"
            " GROUP BY u.event_id HAVING count(l.entry_id) <> 1", self.t))
        assert ledger == []
        rows = self.run(pool.fetch(
            "SELECT event_id, units, cost_micros FROM usage_events WHERE tenant_id = $1",
            self.t))
        assert sorted((r["event_id"], r["units"], r["cost_micros"]) for r in rows) == sorted(
            (e.event_id, e.units, e.cost) for e in self.m.stream)
        report = self.run(reconcile(self.store, self.r, tenants_key=self.tenants_key))
        assert report.ok, report.render()

    async def _cleanup(self) -> None:
        try:
            doomed = [k async for k in self.r.scan_iter(match=keys.tenant_pattern(self.t))]
            if doomed:
                await self.r.delete(*doomed)
            await self.r.srem(keys.TENANTS_SET, self.t)  # SEED adds it to the shared set
            await self.r.delete(self.tenants_key)
        finally:
            try:
                await self.r.aclose()
            finally:
                if self.store is not None:
                    await self.store.close()

    # --- Postgres helpers ---------------------------------------------------------------------

    def _pg_topup(self, key: str, amount: int) -> int | None:
        """Top-up in Postgres (idempotent by key); its id, or None on a key conflict."""
        assert self.store is not None
        try:
            res = self.run(self.store.topup(self.t, amount, key))
        except IdempotencyConflict:
            assert self.topups[key][1] != amount
            return None
        if key in self.topups:
            assert not res.created and res.topup_id == self.topups[key][0]
        else:
            assert res.created
            self.topups[key] = (res.topup_id, amount)
        return res.topup_id

    # --- rules ----------------------------------------------------------------------------------

    @rule(i=pick, min_=st.integers(0, 10_000), extra=money, times=st.integers(1, 2))
    def reserve(self, i: int, min_: int, extra: int, times: int) -> None:
        lease = LEASES[i % len(LEASES)]
        for _ in range(times):
            expected = self.m.reserve(lease, min_, min_ + extra)
            try:
                res = self.run(self.wc.reserve(self.t, lease, min_micros=min_,
                                               want_micros=min_ + extra, ttl_ms=TTL,
                                               session_id=lease, **META))
            except LeaseSettled:
                assert expected[0] == "settled"
                continue
            got = ("insufficient", 0, 0, expected[3]) if res is None else (
                "ok", res.granted, res.remaining, res.spendable)
            assert got == expected

    def _next(self, lease: str, advance: bool) -> tuple[int, int, int]:
        cur = self.m.leases.get(lease)
        if cur is None:
            return (1, 0, 0)
        return (cur.seq + 1 if advance else cur.seq, cur.units, cur.charged)

    def _report(self, lease: str, seq: int, cum_units: int, cum_cost: int, want: int, low: int,
                ttl_ms: int) -> None:
        res = self.run(self.wc.report(self.t, lease, seq=seq, cum_units=cum_units,
                                      cum_cost=cum_cost, topup_want=want, low_water=low,
                                      ttl_ms=ttl_ms))
        expected = self.m.report(lease, seq, cum_units, cum_cost, want, low)
        assert (res.status, res.remaining, res.spendable, res.granted, res.topped_up) == expected

    @rule(i=pick, advance=st.booleans(), du=st.integers(0, 5_000), dc=money, want=money,
          low=money, times=st.integers(1, 2))
    def report(self, i: int, advance: bool, du: int, dc: int, want: int, low: int,
               times: int) -> None:
        lease = self.lease(i)
        seq, units, charged = self._next(lease, advance)
        dc = self._affordable(lease, dc)
        for _ in range(times):  # a retry of the same report changes nothing
            self._report(lease, max(seq, 1), units + du, charged + dc, want, low, TTL)

    @rule(i=pick, advance=st.booleans(), dc=money, times=st.integers(1, 2))
    def settle(self, i: int, advance: bool, dc: int, times: int) -> None:
        lease = self.lease(i)
        seq, units, charged = self._next(lease, advance)
        dc = self._affordable(lease, dc)
        for _ in range(times):
            res = self.run(self.wc.settle(self.t, lease, seq=seq, cum_units=units,
                                          cum_cost=charged + dc))
            expected = self.m.settle(lease, seq, units, charged + dc)
            assert (res.status, res.released, res.charged) == expected

    @rule(i=pick, du=st.integers(0, 5_000), dc=money)
    def expire_and_sweep(self, i: int, du: int, dc: int) -> None:
        """A last report with a tiny ttl, then the lease lapses and the sweeper settles it at
        that usage (no new event)."""
        lease = self.lease(i)
        seq, units, charged = self._next(lease, True)
        self._report(lease, seq, units + du, charged + self._affordable(lease, dc), 0, 0, 1)
        time.sleep(0.003)  # past the 1 ms expiry on Redis' clock
        expired = [lease] if lease in self.m.leases else []
        assert self.run(self.wc.sweep(self.t)) == self.m.sweep(expired)

    @rule(key=st.sampled_from(TOPUP_KEYS), amount=st.integers(1, 50_000),
          retry_amount=st.booleans(), times=st.integers(1, 2))
    def topup(self, key: str, amount: int, retry_amount: bool, times: int) -> None:
        """Postgres first, then the cache by top-up id (BillingService.topup); a key used
        before is mostly retried with its amount (a retry), else refused (a conflict)."""
        if key in self.topups and retry_amount:
            amount = self.topups[key][1]
        for _ in range(times):
            topup_id = self._pg_topup(key, amount)
            if topup_id is None:
                return
            assert self.run(self.wc.topup(self.t, str(topup_id), amount)) is self.m.topup(
                str(topup_id), amount)

    @rule()
    def flush(self) -> None:
        flushed = self.run(self.flusher.flush_once())
        assert flushed == len(self.m.stream) - self.flushed
        self.flushed = len(self.m.stream)
        assert self.run(self.flusher.flush_once()) == 0

    # --- checks after every step ---------------------------------------------------------------

    @invariant()
    def redis_matches_model_and_postgres(self) -> None:
        if not self.m.exists:
            return
        assert self.store is not None
        snap = self.run(self.wc.snapshot(self.t))
        assert snap is not None and snap.spendable == self.m.spendable
        assert {ls.lease_id: (ls.granted, ls.charged, ls.units, ls.seq) for ls in snap.leases} == {
            k: (v.granted, v.charged, v.units, v.seq) for k, v in self.m.leases.items()}
        entries: Any = self.run(self.r.xrange(keys.usage_stream(self.t)))
        got = [(f[b"event_id"].decode(), int(f[b"units"]), int(f[b"cost"])) for _, f in entries]
        unflushed = self.m.stream[self.flushed:]
        assert got == [(e.event_id, e.units, e.cost) for e in unflushed]
        assert self.m.invariant_holds()
        balance = self.run(self.store.balance(self.t))
        held = sum(ls.remaining for ls in snap.leases)
        assert snap.spendable == balance - sum(e.cost for e in unflushed) - held


@pytest.mark.parametrize("redis_kind", ["single", "cluster"])
def test_wallet_model_with_flush_to_postgres(
    redis_kind: str, request: pytest.FixtureRequest, fresh_database: str
) -> None:
    """Also on a 3-master Redis Cluster, with fewer examples (the cluster run repeats what the
    one-server run explores; it checks the same scripts, flusher and reconcile through the
    cluster client)."""
    cluster = redis_kind == "cluster"
    redis_url: str = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(migrate(fresh_database))
    finally:
        loop.close()
    machine = type("Machine", (FlushMachine,), {"redis_url": redis_url, "dsn": fresh_database})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=12 if cluster else 25, stateful_step_count=60, deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    ))
