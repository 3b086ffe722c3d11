"""PostgreSQL, the money authority: tenants, keys, prices, wallets, ledger, usage, top-ups.

All amounts are integer micros. Every method that moves money is one transaction that writes
the ledger entry, the fact (top-up or usage event) and the wallet balance together, and is
idempotent on the fact's natural key, because callers (HTTP clients, the flusher) retry.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Self

import asyncpg

from server.billing.auth import key_digest
from server.billing.wallet_cache import MAX_MICROS as CACHE_MAX_MICROS

TENANT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # same rule as the CHECK in 001_init.sql
UNITS = frozenset({"audio_ms", "characters", "pages", "tokens"})
# The largest amount, balance, overdraft or price: what the Redis wallet cache computes exactly
# (Lua numbers are doubles, lua/_common.lua). A wallet that Postgres could hold but SEED could
# not load would refuse every session; and at 2^50 no balance + top-up can reach bigint's 2^63-1.
MAX_MICROS = CACHE_MAX_MICROS
MAX_TENANT_LIMIT = 2**31 - 1  # the tenants' limit columns are PostgreSQL `integer`


class BillingError(Exception):
    pass


class UnknownTenant(BillingError):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"no such tenant: {tenant_id}")
        self.tenant_id = tenant_id


class TenantExists(BillingError):
    pass


class IdempotencyConflict(BillingError):
    """The idempotency key was used before for a different request."""


class BalanceLimitExceeded(ValueError):
    """A top-up would lift the balance above MAX_MICROS; nothing was written."""


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant_id: str
    name: str
    overdraft_micros: int
    max_concurrent_sessions: int
    audio_seconds_per_minute: int
    requests_per_second: int
    burst: int


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_id: str
    key: str = field(repr=False)  # plaintext, shown to the caller once; kept out of reprs/logs
    prefix: str


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    tenant_id: str
    prefix: str
    revoked: bool
    overdraft_micros: int
    max_concurrent_sessions: int
    audio_seconds_per_minute: int
    requests_per_second: int
    burst: int


@dataclass(frozen=True, slots=True)
class Price:
    model: str
    unit: str
    micros_per_block: int
    block_units: int

    def cost(self, cumulative_units: int) -> int:
        """ceil(u * micros_per_block / block_units) in integers (docs/billing.md, Pricing)."""
        return -(-cumulative_units * self.micros_per_block // self.block_units)


@dataclass(frozen=True, slots=True)
class TopupResult:
    topup_id: int
    amount_micros: int
    created: bool


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: date
    model: str
    unit: str
    units: int
    cost_micros: int


@dataclass(frozen=True, slots=True)
class SeedSnapshot:
    balance_micros: int
    overdraft_micros: int
    topup_ids: list[int]


@dataclass(frozen=True, slots=True)
class UsageEvent:
    tenant_id: str
    event_id: str  # session_id:seq
    session_id: str
    model: str
    unit: str
    units: int  # delta
    cost_micros: int  # delta
    occurred_at: datetime  # timezone-aware (UTC)
    # The usage stream entry this event came from (usage_events.source, migration 002); the
    # flusher sets it, other callers may leave it None.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class StoredUsage:
    """The usage row of one event of a batch as Postgres has it after record_usage_detailed."""

    inserted: bool  # inserted by this call (else it was there already: a conflict)
    source: str | None  # the row's source: NULL for rows older than migration 002
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class RecordedUsage:
    inserted: list[str]  # event ids inserted by this call, in (tenant_id, event_id) order
    # Every (tenant_id, event_id) of the batch -> its row. Of two events with one key in a
    # batch, the first was inserted (or conflicted) and the others see the first one's row.
    rows: dict[tuple[str, str], StoredUsage]


_TENANT_COLS = ("tenant_id, name, overdraft_micros, max_concurrent_sessions, "
                "audio_seconds_per_minute, requests_per_second, burst")

# One round trip for the whole batch: the usage rows really inserted drive the ledger entries
# and one UPDATE per tenant (the aggregate), so a redelivered event changes nothing. The
# wallets are already locked (FOR UPDATE, tenant order) by the caller's first statement.
# The result has one row per event of the batch: `inserted`, and the source and occurred_at of
# the row Postgres keeps (for a conflict, the existing row's). The statement's snapshot does not
# show what `ins` inserts, hence `ins` for those rows and usage_events for the others; it shows
# every conflicting row, because every writer of a tenant's usage rows holds the tenant's wallet
# lock, which this transaction took (after their commit) before this statement began.
_RECORD_USAGE = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::bigint[], $7::bigint[], $8::timestamptz[], $9::text[])
        AS b (tenant_id, event_id, session_id, model, unit, units, cost_micros, occurred_at,
              source)
), ins AS (
    INSERT INTO usage_events
        (tenant_id, event_id, session_id, model, unit, units, cost_micros, occurred_at, source)
    SELECT * FROM batch
    ON CONFLICT (tenant_id, event_id) DO NOTHING
    RETURNING tenant_id, event_id, cost_micros, occurred_at, source
), led AS (
    INSERT INTO ledger_entries (tenant_id, kind, amount_micros, ref)
    SELECT tenant_id, 'usage', -cost_micros, event_id FROM ins
), per_tenant AS (
    SELECT tenant_id, sum(cost_micros)::bigint AS total FROM ins GROUP BY tenant_id
), wal AS (
    UPDATE wallets w SET balance_micros = w.balance_micros - p.total, updated_at = now()
    FROM per_tenant p WHERE w.tenant_id = p.tenant_id
)
SELECT b.tenant_id, b.event_id,
       i.event_id IS NOT NULL AS inserted,
       i.event_id IS NOT NULL OR u.event_id IS NOT NULL AS found,
       CASE WHEN i.event_id IS NOT NULL THEN i.source ELSE u.source END AS source,
       CASE WHEN i.event_id IS NOT NULL THEN i.occurred_at ELSE u.occurred_at END AS occurred_at
FROM batch b
LEFT JOIN ins i ON i.tenant_id = b.tenant_id AND i.event_id = b.event_id
LEFT JOIN usage_events u ON u.tenant_id = b.tenant_id AND u.event_id = b.event_id
"""

# Only if a conflicting row was invisible to _RECORD_USAGE (a writer that bypassed the wallet
# lock): a new statement, hence a new snapshot, in the same transaction.
_USAGE_ROWS = """
SELECT u.tenant_id, u.event_id, u.source, u.occurred_at
FROM unnest($1::text[], $2::text[]) AS k (tenant_id, event_id)
JOIN usage_events u USING (tenant_id, event_id)
"""


def _tenant(row: Any) -> Tenant:
    # asyncpg returns text as str and integer/bigint as int: the columns map 1:1.
    return Tenant(**dict(row))


def _check_micros(name: str, value: int, *, positive: bool = False,
                  maximum: int = MAX_MICROS) -> None:
    # bool is an int subclass and float is not money: refuse both before they reach SQL.
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    low = 1 if positive else 0
    if not low <= value <= maximum:
        raise ValueError(f"{name} must be {low}..{maximum}, got {value}")


class BillingStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> Self:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        return cls(pool)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    # -- tenants and keys ------------------------------------------------------------------

    async def create_tenant(
        self,
        tenant_id: str | None,
        name: str,
        *,
        overdraft_micros: int = 0,
        max_concurrent_sessions: int = 100,
        audio_seconds_per_minute: int = 6000,
        requests_per_second: int = 50,
        burst: int = 100,
    ) -> Tenant:
        tid = tenant_id if tenant_id is not None else "t_" + secrets.token_hex(8)
        if not TENANT_ID.match(tid):
            raise ValueError(f"tenant id must match {TENANT_ID.pattern}: {tid!r}")
        _check_micros("overdraft_micros", overdraft_micros)
        # What the rate limiter can enforce (server/billing/ratelimit.py): at least one session,
        # request and burst slot; 0 audio seconds per minute is a tenant that may send none.
        for name, limit, positive in (
                ("max_concurrent_sessions", max_concurrent_sessions, True),
                ("audio_seconds_per_minute", audio_seconds_per_minute, False),
                ("requests_per_second", requests_per_second, True), ("burst", burst, True)):
            _check_micros(name, limit, positive=positive, maximum=MAX_TENANT_LIMIT)
        async with self._pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    f"INSERT INTO tenants ({_TENANT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                    f" RETURNING {_TENANT_COLS}",
                    tid, name, overdraft_micros, max_concurrent_sessions,
                    audio_seconds_per_minute, requests_per_second, burst,
                )
            except asyncpg.UniqueViolationError:
                raise TenantExists(f"tenant {tid!r} exists") from None
            # Same transaction: a tenant never exists without its wallet.
            await conn.execute("INSERT INTO wallets (tenant_id) VALUES ($1)", tid)
        return _tenant(row)

    async def tenant(self, tenant_id: str) -> Tenant | None:
        row = await self._pool.fetchrow(
            f"SELECT {_TENANT_COLS} FROM tenants WHERE tenant_id = $1", tenant_id
        )
        return None if row is None else _tenant(row)

    async def issue_key(self, tenant_id: str) -> IssuedKey:
        key = "sg_" + secrets.token_urlsafe(32)
        key_id = "k_" + secrets.token_hex(8)
        prefix = key[:8]
        try:
            await self._pool.execute(
                "INSERT INTO api_keys (key_id, tenant_id, prefix, key_sha256)"
                " VALUES ($1, $2, $3, $4)",
                key_id, tenant_id, prefix, key_digest(key),
            )
        except asyncpg.ForeignKeyViolationError:
            raise UnknownTenant(tenant_id) from None
        return IssuedKey(key_id=key_id, key=key, prefix=prefix)

    async def revoke_key(self, key_id: str) -> bool:
        """True if the key exists (now revoked; a second revoke keeps the first time)."""
        row = await self._pool.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
            " WHERE key_id = $1 RETURNING key_id",
            key_id,
        )
        return row is not None

    async def lookup_key(self, key_sha256: str) -> KeyRecord | None:
        row = await self._pool.fetchrow(
            "SELECT k.key_id, k.tenant_id, k.prefix, k.revoked_at IS NOT NULL AS revoked,"
            " t.overdraft_micros, t.max_concurrent_sessions, t.audio_seconds_per_minute,"
            " t.requests_per_second, t.burst"
            " FROM api_keys k JOIN tenants t USING (tenant_id) WHERE k.key_sha256 = $1",
            key_sha256.lower(),
        )
        return None if row is None else KeyRecord(**dict(row))

    # -- prices ----------------------------------------------------------------------------

    async def set_price(
        self, model: str, unit: str, micros_per_block: int, block_units: int
    ) -> Price:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {sorted(UNITS)}, got {unit!r}")
        _check_micros("micros_per_block", micros_per_block)
        _check_micros("block_units", block_units, positive=True)
        await self._pool.execute(
            "INSERT INTO price_plans (model, unit, micros_per_block, block_units)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (model, unit) DO UPDATE"
            " SET micros_per_block = EXCLUDED.micros_per_block,"
            " block_units = EXCLUDED.block_units",
            model, unit, micros_per_block, block_units,
        )
        return Price(model, unit, micros_per_block, block_units)

    async def prices(self) -> dict[tuple[str, str], Price]:
        rows = await self._pool.fetch(
            "SELECT model, unit, micros_per_block, block_units FROM price_plans"
        )
        return {
            (str(r["model"]), str(r["unit"])): Price(
                str(r["model"]), str(r["unit"]), int(r["micros_per_block"]),
                int(r["block_units"]),
            )
            for r in rows
        }

    # -- money -----------------------------------------------------------------------------

    async def topup(self, tenant_id: str, amount_micros: int, idempotency_key: str) -> TopupResult:
        _check_micros("amount_micros", amount_micros, positive=True)
        if not idempotency_key:
            raise ValueError("idempotency_key must not be empty")
        async with self._pool.acquire() as conn, conn.transaction():
            try:
                topup_id = await conn.fetchval(
                    "INSERT INTO topups (tenant_id, idempotency_key, amount_micros)"
                    " VALUES ($1, $2, $3)"
                    " ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING topup_id",
                    tenant_id, idempotency_key, amount_micros,
                )
            except asyncpg.ForeignKeyViolationError:
                raise UnknownTenant(tenant_id) from None
            if topup_id is None:
                # READ COMMITTED: a concurrent insert of the same key made ours wait for its
                # commit, and this new statement sees the committed row.
                prior = await conn.fetchrow(
                    "SELECT topup_id, amount_micros FROM topups"
                    " WHERE tenant_id = $1 AND idempotency_key = $2",
                    tenant_id, idempotency_key,
                )
                if int(prior["amount_micros"]) != amount_micros:
                    raise IdempotencyConflict(
                        f"top-up key {idempotency_key!r} of tenant {tenant_id!r} was used for "
                        f"{prior['amount_micros']} micros, not {amount_micros}"
                    )
                return TopupResult(int(prior["topup_id"]), amount_micros, created=False)
            await conn.execute(
                "INSERT INTO ledger_entries (tenant_id, kind, amount_micros, ref)"
                " VALUES ($1, 'topup', $2, $3)",
                tenant_id, amount_micros, idempotency_key,
            )
            credited = await conn.fetchval(
                "UPDATE wallets SET balance_micros = balance_micros + $2, updated_at = now()"
                " WHERE tenant_id = $1 AND balance_micros <= $3::bigint - $2::bigint"
                " RETURNING balance_micros",
                tenant_id, amount_micros, MAX_MICROS,
            )
            if credited is None:
                # Raised inside the transaction: the top-up row and its ledger entry roll back.
                raise BalanceLimitExceeded(
                    f"amount_micros: the balance would exceed the maximum {MAX_MICROS} micros")
            return TopupResult(int(topup_id), amount_micros, created=True)

    async def balance(self, tenant_id: str) -> int:
        value = await self._pool.fetchval(
            "SELECT balance_micros FROM wallets WHERE tenant_id = $1", tenant_id
        )
        if value is None:
            raise UnknownTenant(tenant_id)
        return int(value)

    async def seed_snapshot(self, tenant_id: str) -> SeedSnapshot:
        """Balance and the top-ups it includes (last 48 h) from ONE snapshot, for Redis SEED."""
        async with self._pool.acquire() as conn, conn.transaction(
            isolation="repeatable_read", readonly=True
        ):
            row = await conn.fetchrow(
                "SELECT w.balance_micros, t.overdraft_micros FROM wallets w"
                " JOIN tenants t USING (tenant_id) WHERE w.tenant_id = $1",
                tenant_id,
            )
            if row is None:
                raise UnknownTenant(tenant_id)
            ids = await conn.fetch(
                "SELECT topup_id FROM topups WHERE tenant_id = $1"
                " AND created_at > now() - interval '48 hours' ORDER BY topup_id",
                tenant_id,
            )
        return SeedSnapshot(
            balance_micros=int(row["balance_micros"]),
            overdraft_micros=int(row["overdraft_micros"]),
            topup_ids=[int(r["topup_id"]) for r in ids],
        )

    async def usage_summary(
        self, tenant_id: str, since: date | None = None, until: date | None = None
    ) -> list[UsageRow]:
        """Usage per UTC day, model and unit; `since` and `until` are inclusive days."""
        day = "(occurred_at AT TIME ZONE 'UTC')::date"  # the indexed expression, verbatim
        where = ["tenant_id = $1"]
        args: list[Any] = [tenant_id]
        # Conditions are added only when given, so the planner sees plain range predicates.
        if since is not None:
            args.append(since)
            where.append(f"{day} >= ${len(args)}")
        if until is not None:
            args.append(until)
            where.append(f"{day} <= ${len(args)}")
        rows = await self._pool.fetch(
            f"SELECT {day} AS day, model, unit, sum(units)::bigint AS units,"
            f" sum(cost_micros)::bigint AS cost_micros FROM usage_events"
            f" WHERE {' AND '.join(where)} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            *args,
        )
        # An empty answer for a tenant that does not exist would read as "used nothing".
        if not rows and await self.tenant(tenant_id) is None:
            raise UnknownTenant(tenant_id)
        return [
            UsageRow(r["day"], str(r["model"]), str(r["unit"]), int(r["units"]),
                     int(r["cost_micros"]))
            for r in rows
        ]

    async def record_usage(self, events: list[UsageEvent]) -> list[str]:
        """Charge each event exactly once; returns the event ids inserted by THIS call."""
        return (await self.record_usage_detailed(events)).inserted

    async def record_usage_detailed(self, events: list[UsageEvent]) -> RecordedUsage:
        """Charge each event exactly once; returns what was inserted by THIS call and, for
        every event of the batch, the row Postgres keeps (its `source` tells the flusher which
        stream entry inserted it).

        Redelivered events hit the primary key and change nothing. Wallets are locked in
        tenant order before any insert, so overlapping batches from two flushers serialize
        instead of deadlocking.
        """
        if not events:
            return RecordedUsage([], {})
        for e in events:
            _check_micros("units", e.units)
            _check_micros("cost_micros", e.cost_micros)
            if e.occurred_at.tzinfo is None:
                raise ValueError(f"occurred_at of {e.event_id!r} must be timezone-aware")
            if e.source == "":
                raise ValueError(f"source of {e.event_id!r} must be None or not empty")
        # Stable sort: of two entries for one event (an original and its replay) the first
        # in stream order is the one whose values are kept.
        ordered: list[UsageEvent] = []
        seen: set[tuple[str, str]] = set()
        for e in sorted(events, key=lambda e: (e.tenant_id, e.event_id)):
            if (e.tenant_id, e.event_id) not in seen:
                seen.add((e.tenant_id, e.event_id))
                ordered.append(e)
        tenants = sorted({e.tenant_id for e in ordered})
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await conn.fetch(
                "SELECT tenant_id FROM wallets WHERE tenant_id = ANY($1::text[])"
                " ORDER BY tenant_id FOR UPDATE",
                tenants,
            )
            missing = set(tenants) - {str(r["tenant_id"]) for r in locked}
            if missing:
                raise UnknownTenant(", ".join(sorted(missing)))
            rows = await conn.fetch(
                _RECORD_USAGE,
                [e.tenant_id for e in ordered],
                [e.event_id for e in ordered],
                [e.session_id for e in ordered],
                [e.model for e in ordered],
                [e.unit for e in ordered],
                [e.units for e in ordered],
                [e.cost_micros for e in ordered],
                [e.occurred_at for e in ordered],
                [e.source for e in ordered],
            )
            stored = {
                (str(r["tenant_id"]), str(r["event_id"])): StoredUsage(
                    bool(r["inserted"]), r["source"], r["occurred_at"])
                for r in rows if r["found"]
            }
            unseen = sorted(seen - stored.keys())
            if unseen:
                for r in await conn.fetch(
                    _USAGE_ROWS, [k[0] for k in unseen], [k[1] for k in unseen]
                ):
                    key = (str(r["tenant_id"]), str(r["event_id"]))
                    stored[key] = StoredUsage(False, r["source"], r["occurred_at"])
                if seen - stored.keys():
                    # Cannot be: the row conflicted, so it exists. Refuse to guess (a wrong
                    # answer would refund or not refund); the transaction rolls back.
                    raise RuntimeError("usage rows in conflict but not found: "
                                       f"{sorted(seen - stored.keys())[:5]}")
        inserted = sorted(k for k, v in stored.items() if v.inserted)
        return RecordedUsage([event_id for _, event_id in inserted], stored)
