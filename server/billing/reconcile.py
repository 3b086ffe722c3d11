"""`streamgate reconcile`: check the billing invariants of docs/billing.md, per tenant.

Postgres checks run in one REPEATABLE READ snapshot, so they are exact even under traffic.
The Redis check compares two stores that cannot be read atomically together; a report or a
top-up landing between the reads shows up as a difference, so a tenant whose cache does not
add up is re-read a few times and reported only if it never does.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import WatchError

from server.billing import keys
from server.billing.flusher import as_str, parse_entry
from server.billing.redis_client import BillingRedis
from server.billing.redis_client import connect as connect_redis
from server.billing.store import BillingStore, UsageEvent

_EXAMPLES = 5  # ids listed per finding; the count says how many there are in all


@dataclass
class ReconcileReport:
    tenants_checked: int = 0
    redis_wallets_checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, tenant_id: str, problem: str) -> None:
        self.problems.setdefault(tenant_id, []).append(problem)

    def render(self) -> str:
        head = (f"reconcile: {self.tenants_checked} tenants, {self.redis_wallets_checked} "
                f"Redis wallets checked: {'OK' if self.ok else 'PROBLEMS'}")
        lines = [head]
        for tenant_id in sorted(self.problems):
            lines.append(f"tenant {tenant_id}:")
            lines.extend(f"  - {p}" for p in self.problems[tenant_id])
        return "\n".join(lines)


def _examples(ids: list[str]) -> str:
    more = f" (+{len(ids) - _EXAMPLES} more)" if len(ids) > _EXAMPLES else ""
    return ", ".join(ids[:_EXAMPLES]) + more


_TOTALS = """
SELECT t.tenant_id, w.balance_micros,
       coalesce(tp.total, 0)::bigint AS topups,
       coalesce(u.total, 0)::bigint AS usage,
       coalesce(l.total, 0)::bigint AS ledger
FROM tenants t
LEFT JOIN wallets w USING (tenant_id)
LEFT JOIN (SELECT tenant_id, sum(amount_micros) AS total FROM topups GROUP BY 1) tp
    USING (tenant_id)
LEFT JOIN (SELECT tenant_id, sum(cost_micros) AS total FROM usage_events GROUP BY 1) u
    USING (tenant_id)
LEFT JOIN (SELECT tenant_id, sum(amount_micros) AS total FROM ledger_entries GROUP BY 1) l
    USING (tenant_id)
ORDER BY t.tenant_id
"""

# (finding, query returning tenant_id, ref) for every fact without exactly one matching ledger
# entry and every ledger entry without its fact. UNIQUE (tenant_id, kind, ref) rules out two.
_MATCHING = [
    ("usage events without a matching ledger entry", """
        SELECT u.tenant_id, u.event_id AS ref FROM usage_events u
        LEFT JOIN ledger_entries l
            ON l.tenant_id = u.tenant_id AND l.kind = 'usage' AND l.ref = u.event_id
        WHERE l.entry_id IS NULL OR l.amount_micros <> -u.cost_micros
        ORDER BY 1, 2"""),
    ("top-ups without a matching ledger entry", """
        SELECT p.tenant_id, p.idempotency_key AS ref FROM topups p
        LEFT JOIN ledger_entries l
            ON l.tenant_id = p.tenant_id AND l.kind = 'topup' AND l.ref = p.idempotency_key
        WHERE l.entry_id IS NULL OR l.amount_micros <> p.amount_micros
        ORDER BY 1, 2"""),
    ("ledger entries matching no top-up or usage event", """
        SELECT l.tenant_id, l.kind || ':' || l.ref AS ref FROM ledger_entries l
        WHERE (l.kind = 'usage' AND NOT EXISTS (
                   SELECT 1 FROM usage_events u WHERE u.tenant_id = l.tenant_id
                   AND u.event_id = l.ref AND -u.cost_micros = l.amount_micros))
           OR (l.kind = 'topup' AND NOT EXISTS (
                   SELECT 1 FROM topups p WHERE p.tenant_id = l.tenant_id
                   AND p.idempotency_key = l.ref AND p.amount_micros = l.amount_micros))
        ORDER BY 1, 2"""),
    # The primary key makes this impossible; checked anyway because it is the promise.
    ("event ids recorded more than once", """
        SELECT tenant_id, event_id AS ref FROM usage_events
        GROUP BY tenant_id, event_id HAVING count(*) > 1 ORDER BY 1, 2"""),
]


async def reconcile(
    store: BillingStore,
    redis: BillingRedis | None,
    *,
    redis_attempts: int = 3,
    retry_delay_s: float = 0.2,
    tenants_key: str = keys.TENANTS_SET,
) -> ReconcileReport:
    report = ReconcileReport()
    async with store.pool.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        totals = await conn.fetch(_TOTALS)
        findings: list[tuple[str, dict[str, list[str]]]] = []
        for finding, sql in _MATCHING:
            refs: dict[str, list[str]] = defaultdict(list)
            for row in await conn.fetch(sql):
                refs[str(row["tenant_id"])].append(str(row["ref"]))
            findings.append((finding, refs))
    report.tenants_checked = len(totals)
    for row in totals:
        tenant_id = str(row["tenant_id"])
        if row["balance_micros"] is None:
            report.add(tenant_id, "no wallet row")
            continue
        balance, topups, usage = (int(row["balance_micros"]), int(row["topups"]),
                                  int(row["usage"]))
        if topups - usage != balance:
            report.add(tenant_id, f"top-ups {topups} - usage {usage} = {topups - usage}"
                                  f" != wallet balance {balance}"
                                  f" (off by {balance - topups + usage})")
        if int(row["ledger"]) != balance:
            report.add(tenant_id, f"ledger sum {row['ledger']} != wallet balance {balance}")
    for finding, refs in findings:
        for tenant_id, ids in sorted(refs.items()):
            report.add(tenant_id, f"{len(ids)} {finding}: {_examples(ids)}")
    if redis is not None:
        known = {str(row["tenant_id"]) for row in totals}
        await _check_redis(store, redis, known, report, redis_attempts, retry_delay_s,
                           tenants_key)
    return report


async def _check_redis(
    store: BillingStore,
    redis: BillingRedis,
    known: set[str],
    report: ReconcileReport,
    attempts: int,
    delay_s: float,
    tenants_key: str,
) -> None:
    cached: Any = await redis.smembers(tenants_key)
    for tenant_id in sorted({as_str(t) for t in cached} - known):
        report.add(tenant_id, f"in {tenants_key} but not a tenant in Postgres")
    for tenant_id in sorted(known):
        problems: list[str] = []
        for attempt in range(max(attempts, 1)):
            if attempt:
                await asyncio.sleep(delay_s)
            snap = await _cache_snapshot(redis, tenant_id)
            if snap is None:
                problems = []  # no wallet cache (any more): nothing to compare
                break
            if attempt == 0:
                report.redis_wallets_checked += 1
            problems = await _check_cache(store, tenant_id, snap)
            if not problems:
                break
        for problem in problems:
            report.add(tenant_id, problem)


@dataclass
class _CacheSnapshot:
    wallet: dict[str, str]
    leases: dict[str, dict[str, str]]  # lease id -> hash ({} if the hash is missing)
    stream: list[tuple[str, dict[str, str]]]
    refunded: set[str]
    topups: set[str]  # top-up ids already in spendable


async def _cache_snapshot(redis: BillingRedis, tenant_id: str) -> _CacheSnapshot | None:
    """Wallet, leases, usage stream and refunds of one tenant as of one instant (WATCH/MULTI,
    retried when a script changes them in between)."""
    wallet_k, leases_k = keys.wallet_key(tenant_id), keys.leases_key(tenant_id)
    stream_k, refunds_k = keys.usage_stream(tenant_id), keys.refunds_key(tenant_id)
    topups_k = keys.topups_key(tenant_id)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(wallet_k, leases_k, stream_k, refunds_k, topups_k)
                ids = [as_str(i) for i in await pipe.zrange(leases_k, 0, -1)]
                lease_ks = [keys.lease_key(tenant_id, i) for i in ids]
                if lease_ks:
                    await pipe.watch(*lease_ks)
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hgetall(wallet_k)
                pipe.xrange(stream_k)
                pipe.smembers(refunds_k)
                pipe.smembers(topups_k)
                for k in lease_ks:
                    pipe.hgetall(k)
                res: list[Any] = await pipe.execute()
                break
            except WatchError:
                continue
    wallet = {as_str(k): as_str(v) for k, v in res[0].items()}
    if not wallet:
        return None
    return _CacheSnapshot(
        wallet=wallet,
        leases={i: {as_str(k): as_str(v) for k, v in h.items()}
                for i, h in zip(ids, res[4:], strict=True)},
        stream=[(as_str(i), {as_str(k): as_str(v) for k, v in f.items()}) for i, f in res[1]],
        refunded={as_str(r) for r in res[2]},
        topups={as_str(r) for r in res[3]},
    )


async def _check_cache(store: BillingStore, tenant_id: str, snap: _CacheSnapshot) -> list[str]:
    """Problems with `spendable == balance - unflushed - open lease remainders`."""
    problems: list[str] = []
    try:
        spendable, overdraft = int(snap.wallet["spendable"]), int(snap.wallet["overdraft"])
        epoch = snap.wallet["epoch"]
    except (KeyError, ValueError):
        return [f"malformed Redis wallet (fields {sorted(snap.wallet)})"]
    remainders = 0
    for lease_id, lease in sorted(snap.leases.items()):
        if not lease:
            problems.append(f"lease {lease_id} is in the leases set but has no hash")
        elif lease.get("epoch") == epoch:
            # A lease of an older wallet generation holds no money of this wallet (the
            # scripts drop it without release), so only current-epoch leases count.
            remainders += int(lease["granted"]) - int(lease["charged"])
    entries: list[tuple[UsageEvent, bool]] = []
    for entry_id, fields in snap.stream:
        try:
            entries.append(parse_entry(tenant_id, fields, entry_id=entry_id))
        except ValueError as exc:
            problems.append(f"usage stream entry {entry_id}: {exc}")
    async with store.pool.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        balance = await conn.fetchval(
            "SELECT balance_micros FROM wallets WHERE tenant_id = $1", tenant_id
        )
        rows = await conn.fetch(
            "SELECT event_id, source FROM usage_events WHERE tenant_id = $1"
            " AND event_id = ANY($2::text[])",
            tenant_id, sorted({e.event_id for e, _ in entries}),
        )
        # Every top-up of the last 48 h is in the cache's id set: SEED records the ones in
        # its snapshot, TOPUP the later ones (docs/billing.md, Redis).
        recent = await conn.fetch(
            "SELECT topup_id, amount_micros FROM topups WHERE tenant_id = $1"
            " AND created_at > now() - interval '48 hours' ORDER BY topup_id",
            tenant_id,
        )
    missing = [r for r in recent if str(r["topup_id"]) not in snap.topups]
    if missing:
        problems.append(
            f"{len(missing)} top-ups committed in Postgres but not applied to the cache"
            f" ({sum(int(r['amount_micros']) for r in missing)} micros):"
            f" {_examples([str(r['topup_id']) for r in missing])}"
        )
    if balance is None:
        return [*problems, "no wallet row"]
    in_pg = {str(r["event_id"]): r["source"] for r in rows}
    # The cache charged every stream entry once. Not in Postgres yet: the cache is ahead by
    # its cost. A replay of an event Postgres got from ANOTHER entry (the original), not
    # refunded yet: the cache took it twice and the flusher's REFUND will give it back. A replay
    # whose own row is in Postgres (committed, not yet acked) was charged once: nothing owed.
    unflushed = sum(e.cost_micros for e, _ in entries if e.event_id not in in_pg)
    unrefunded = sum(
        e.cost_micros for e, replay in entries
        if replay and e.event_id in in_pg and in_pg[e.event_id] != e.source
        and e.event_id not in snap.refunded
    )
    expected = int(balance) - unflushed - unrefunded - remainders
    if spendable != expected:
        problems.append(
            f"Redis spendable {spendable} != PG balance {balance} - unflushed {unflushed}"
            f" - unrefunded replays {unrefunded} - open lease remainders {remainders}"
            f" = {expected} (off by {spendable - expected})"
        )
    if spendable + overdraft < 0:
        # Open grants (plus usage beyond them) exceed the balance and the overdraft.
        problems.append(f"granted beyond balance + overdraft: spendable {spendable},"
                        f" overdraft {overdraft}")
    return problems


async def reconcile_main(redis_url: str | None, database_url: str) -> int:
    """Print the report; exit status 0 when every invariant holds, 1 otherwise."""
    store = await BillingStore.connect(database_url, min_size=1, max_size=2)
    client = connect_redis(redis_url) if redis_url else None
    try:
        report = await reconcile(store, client)
    finally:
        await store.close()
        if client is not None:
            await client.aclose()
    print(report.render())
    return 0 if report.ok else 1
