"""The billing layer as the gateway sees it: authentication, admission limits, session meters,
top-ups, and the background flusher and sweeper (docs/billing.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from server.billing import keys
from server.billing.auth import Principal, TenantLimits, key_digest
from server.billing.flusher import UsageFlusher, default_consumer
from server.billing.meter import (
    BillingUnavailable,
    InsufficientBalance,
    PricedMeter,
    RateLimited,
    SessionMeter,
)
from server.billing.ratelimit import RateLimiter
from server.billing.redis_client import BillingRedis
from server.billing.redis_client import connect as connect_redis
from server.billing.script_batch import ScriptBatcher
from server.billing.store import BillingStore, KeyRecord, Price, TopupResult
from server.billing.wallet_cache import WalletCache
from server.billing.wallet_meter import AudioLimit, LeasePolicy, WalletMeter
from server.config import BillingConfig
from server.protocol.errors import Rejected, rejection

log = logging.getLogger("streamgate.billing")
AUDIO_UNIT = "audio_ms"
# At stop, the flusher's round in progress gets this long to finish.
STOP_GRACE_S = 5.0


class _SettlingMeter(WalletMeter):
    """Releases the tenant's concurrency slot once the lease is settled, and is watched for
    the revocation of its key while it lives."""

    def __init__(self, service: BillingService, key_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._service = service
        self.key_id = key_id

    async def settle(self) -> Any:
        self._service.unwatch(self)
        try:
            return await super().settle()
        finally:
            await self._service.limits.release_session(self.tenant_id, self.session_id)


REQUEST_LEASE_TTL_MS = 10 * 60 * 1000  # a request's work (a long PDF, a slow LLM) fits in it


class RequestCharge:
    """One request's reservation; `settle` charges what was really used (at most the estimate:
    the reservation is what the tenant agreed to pay up front)."""

    def __init__(self, meter: SessionMeter) -> None:
        self._meter = meter
        self._settled: int | None = None

    async def settle(self, actual_units: int) -> int:
        """Charge `actual_units` (0 when the request failed); returns the cost in micros."""
        if self._settled is None:
            self._meter.accept(max(0, actual_units))
            self._settled = (await self._meter.settle()).cost_micros
        return self._settled


class UnmeteredRequests:
    """Billing off: requests are priced by config but nothing is reserved or charged."""

    async def reserve_request(
        self, *, principal: Principal, request_id: str, model: str, unit: str,
        estimate_units: int,
    ) -> RequestCharge:
        return RequestCharge(PricedMeter(0, 1))


class BillingService:
    def __init__(self, cfg: BillingConfig, *, report_interval_s: float) -> None:
        self.cfg = cfg
        self.report_interval_s = report_interval_s
        self.store: BillingStore | None = None
        self.redis: BillingRedis | None = None
        self.cache: WalletCache | None = None
        self.batcher: ScriptBatcher | None = None  # live sessions' reports, batched
        self.limits: RateLimiter
        self.prices: dict[tuple[str, str], Price] = {}
        self._keys: dict[str, tuple[float, KeyRecord | None]] = {}
        # Meters of live sessions by API key id: a revoked key ends its sessions.
        self._live: dict[str, set[_SettlingMeter]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, redis_url: str, database_url: str, *, background: bool = True) -> None:
        """Connect; with `background`, also run the flusher (if configured) and the sweeper."""
        self.store = await BillingStore.connect(database_url)
        self.redis = connect_redis(redis_url)
        self.batcher = ScriptBatcher(self.redis)
        self.cache = WalletCache(self.redis, batcher=self.batcher)
        self.limits = RateLimiter(self.redis, fallback_fraction=self.cfg.fallback_fraction,
                                  batcher=self.batcher)
        await self.refresh_prices()
        if not background:
            return
        loop = asyncio.get_running_loop()
        if self.cfg.run_flusher:
            flusher = UsageFlusher(self.redis, self.store, consumer=default_consumer(),
                                   on_replay_conflict=self._refund,
                                   claim_idle_ms=round(self.cfg.flush_claim_idle_s * 1000))
            self._flusher = loop.create_task(flusher.run(self._stop))
            self._tasks.append(self._flusher)
        self._tasks.append(loop.create_task(self._sweeper()))
        self._tasks.append(loop.create_task(self._price_refresher()))
        self._tasks.append(loop.create_task(self._key_watcher()))

    async def stop(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            # A flush round in progress finishes (commit, then XACK) instead of being cut
            # between XREADGROUP and XACK: its entries would wait pending on this dead
            # consumer until another node claims them (billing.flush_claim_idle_s, 30 s) — a drained
            # node's last usage would reach PostgreSQL half a minute late.
            await asyncio.wait([self._flusher], timeout=STOP_GRACE_S)
            self._flusher = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.batcher is not None:
            await self.batcher.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        if self.store is not None:
            await self.store.close()

    async def _refund(self, tenant_id: str, event_id: str, cost: int) -> None:
        assert self.cache is not None
        await self.cache.refund(tenant_id, event_id, cost)

    async def _sweeper(self) -> None:
        assert self.cache is not None and self.redis is not None
        while True:
            await asyncio.sleep(self.cfg.sweep_interval_s)
            try:
                for raw in await self.redis.smembers(keys.TENANTS_SET):
                    tenant = raw.decode() if isinstance(raw, bytes) else str(raw)
                    swept = await self.cache.sweep(tenant)
                    if swept:
                        log.warning("swept expired leases", extra={"tenant_id": tenant,
                                                                   "leases": swept})
            except RedisError as exc:
                log.warning("sweep skipped: %s", exc)

    async def _key_watcher(self) -> None:
        """Keys revoked on any node (admin API, CLI) end this node's sessions on them within
        `key_cache_ttl_s`: the keys of live sessions are looked up every half of it."""
        while True:
            await asyncio.sleep(self.cfg.key_cache_ttl_s / 2)
            if not self._live:
                continue
            try:
                revoked = await self._revoked_among(list(self._live))
            except Exception as exc:
                # Postgres down: sessions go on (their keys were valid when last seen).
                log.warning("key revocation check skipped: %s", exc)
                continue
            for key_id in revoked:
                self._end_sessions_of(key_id)

    async def _revoked_among(self, key_ids: list[str]) -> list[str]:
        assert self.store is not None
        rows = await self.store.pool.fetch(
            "SELECT key_id FROM api_keys WHERE key_id = ANY($1::text[])"
            " AND revoked_at IS NOT NULL", key_ids,
        )
        return [str(r["key_id"]) for r in rows]

    def _end_sessions_of(self, key_id: str) -> None:
        meters = self._live.pop(key_id, None)
        if not meters:
            return
        log.info("key revoked: ending its sessions", extra={"key_id": key_id,
                                                            "sessions": len(meters)})
        for meter in meters:
            meter.revoke()

    def unwatch(self, meter: _SettlingMeter) -> None:
        meters = self._live.get(meter.key_id)
        if meters is not None:
            meters.discard(meter)
            if not meters:
                del self._live[meter.key_id]

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke in Postgres; on this node the key stops working and its sessions end at
        once (other nodes: within key_cache_ttl_s). False if there is no such key."""
        assert self.store is not None
        if not await self.store.revoke_key(key_id):
            return False
        for digest, (_, record) in list(self._keys.items()):
            if record is not None and record.key_id == key_id:
                del self._keys[digest]
        self._end_sessions_of(key_id)
        return True

    async def _price_refresher(self) -> None:
        while True:
            await asyncio.sleep(30)
            with contextlib.suppress(Exception):
                await self.refresh_prices()

    async def refresh_prices(self) -> None:
        assert self.store is not None
        self.prices = await self.store.prices()

    # --- authentication and admission -------------------------------------------------------------

    async def authenticate(self, api_key: str | None) -> Principal | None:
        if not api_key:
            return None
        digest = key_digest(api_key)
        now = time.monotonic()
        cached = self._keys.get(digest)
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            assert self.store is not None
            try:
                record = await self.store.lookup_key(digest)
            except Exception:
                if cached is None:
                    raise
                record = cached[1]  # Postgres blip: a key known moments ago stays known
            if len(self._keys) > 100_000:
                self._keys.clear()
            self._keys[digest] = (now + self.cfg.key_cache_ttl_s, record)
        if record is None:
            return None
        if record.revoked:
            self._end_sessions_of(record.key_id)
            return None
        return Principal(
            tenant_id=record.tenant_id,
            key_id=record.key_id,
            limits=TenantLimits(
                max_concurrent_sessions=record.max_concurrent_sessions,
                audio_seconds_per_minute=record.audio_seconds_per_minute,
                requests_per_second=record.requests_per_second,
                burst=record.burst,
            ),
        )

    async def check_upgrade(self, principal: Principal) -> Rejected | None:
        limits = principal.limits
        if limits is None:
            return None
        decision = await self.limits.allow(principal.key_id, limits.requests_per_second,
                                           limits.burst)
        if decision.allowed:
            return None
        return rejection(RateLimited("too many requests for this key", decision.retry_after_s))

    # --- sessions -------------------------------------------------------------------------------

    def price_for(self, model: str, unit: str = AUDIO_UNIT) -> Price:
        price = self.prices.get((model, unit))
        if price is None:
            raise BillingUnavailable(f"no price plan for model {model!r} ({unit})")
        return price

    async def open(
        self, *, session_id: str, principal: Principal, model: str, unit: str = AUDIO_UNIT
    ) -> WalletMeter:
        assert self.cache is not None
        price = self.price_for(model, unit)
        limits = principal.limits
        if limits is not None:
            decision = await self.limits.acquire_session(
                principal.tenant_id, session_id, limits.max_concurrent_sessions,
                ttl_s=self.report_interval_s * 3,
            )
            if not decision.allowed:
                raise RateLimited("too many concurrent sessions for this tenant",
                                  decision.retry_after_s or 1.0)
        ttl_ms = int(self.report_interval_s * 3000)
        if unit == AUDIO_UNIT:
            policy = LeasePolicy(self.cfg.lease_s * 1000, self.cfg.min_lease_s * 1000,
                                 self.cfg.low_balance_s * 1000, ttl_ms)
        else:
            policy = LeasePolicy(self.cfg.lease_chars, self.cfg.min_lease_chars,
                                 self.cfg.low_balance_chars, ttl_ms)
        meter = _SettlingMeter(
            self, principal.key_id, cache=self.cache, tenant_id=principal.tenant_id,
            session_id=session_id,
            model=model, price=price, policy=policy, seed=self.ensure_wallet,
            on_audio=self._audio_limit(principal) if unit == AUDIO_UNIT else None,
        )
        try:
            granted = await meter.open()
        except RedisError as exc:
            await self.limits.release_session(principal.tenant_id, session_id)
            raise BillingUnavailable("wallet service unreachable; retry shortly") from exc
        except BaseException:
            await self.limits.release_session(principal.tenant_id, session_id)
            raise
        if not granted:
            await self.limits.release_session(principal.tenant_id, session_id)
            raise InsufficientBalance("wallet balance below the minimum lease; top up")
        self._live.setdefault(principal.key_id, set()).add(meter)
        return meter

    async def reserve_request(
        self, *, principal: Principal, request_id: str, model: str, unit: str,
        estimate_units: int,
    ) -> RequestCharge:
        """HTTP requests pay like sessions: reserve the estimate before the work (402 if the
        wallet cannot cover it), settle the actual usage after, release the rest."""
        assert self.cache is not None
        price = self.price_for(model, unit)
        units = max(1, estimate_units)
        policy = LeasePolicy(lease_units=units, min_units=units, low_units=0,
                             ttl_ms=REQUEST_LEASE_TTL_MS)
        meter = WalletMeter(cache=self.cache, tenant_id=principal.tenant_id,
                            session_id=request_id, model=model, price=price, policy=policy,
                            seed=self.ensure_wallet)
        try:
            granted = await meter.open()
        except RedisError as exc:
            raise BillingUnavailable("wallet service unreachable; retry shortly") from exc
        if not granted:
            raise InsufficientBalance(f"the wallet cannot cover this request ({units} {unit})")
        return RequestCharge(meter)

    def _audio_limit(self, principal: Principal) -> AudioLimit | None:
        limits = principal.limits
        if limits is None:
            return None

        async def check(tenant_id: str, session_id: str, audio_ms: int) -> bool:
            # Each report keeps the session's concurrency slot alive (it ages out otherwise).
            await self.limits.refresh_session(tenant_id, session_id, self.report_interval_s * 3)
            decision = await self.limits.add_audio(tenant_id, audio_ms,
                                                   limits.audio_seconds_per_minute)
            return decision.allowed

        return check

    # --- wallets --------------------------------------------------------------------------------

    async def ensure_wallet(self, tenant_id: str) -> None:
        """Seed the cache from Postgres (never increments an existing wallet), then re-apply
        recent top-ups by id: one committed while the seed was in flight must not be lost."""
        assert self.store is not None and self.cache is not None
        snap = await self.store.seed_snapshot(tenant_id)
        await self.cache.seed(tenant_id, snap.balance_micros, snap.overdraft_micros,
                              [str(i) for i in snap.topup_ids])
        for topup_id, amount in await self._recent_topups(tenant_id):
            await self.cache.topup(tenant_id, str(topup_id), amount)

    async def _recent_topups(self, tenant_id: str) -> list[tuple[int, int]]:
        assert self.store is not None
        rows = await self.store.pool.fetch(
            "SELECT topup_id, amount_micros FROM topups WHERE tenant_id = $1"
            " AND created_at > now() - interval '48 hours' ORDER BY topup_id",
            tenant_id,
        )
        return [(int(r["topup_id"]), int(r["amount_micros"])) for r in rows]

    async def topup(self, tenant_id: str, amount_micros: int, idempotency_key: str) -> TopupResult:
        """Postgres first (the money), then the cache, by top-up id (idempotent)."""
        assert self.store is not None and self.cache is not None
        result = await self.store.topup(tenant_id, amount_micros, idempotency_key)
        for attempt in range(5):
            try:
                await self.cache.topup(tenant_id, str(result.topup_id), result.amount_micros)
                break
            except RedisError as exc:
                if attempt == 4:
                    # Fails closed: the cache is short until the next seed or reconcile fixes it.
                    log.error("top-up %s not applied to the cache: %s", result.topup_id, exc)
                await asyncio.sleep(0.1 * (attempt + 1))
        return result
