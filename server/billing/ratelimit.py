"""Rate limits in Redis (docs/billing.md, "Rate limits"), failing open to a local fallback.

Three limits, each one Lua script with Redis TIME as the clock (nodes' clocks drift):
- GCRA per API key (`allow`): requests per second with a burst -> 429 + Retry-After.
- concurrent sessions per tenant (`acquire_session` / `refresh_session` / `release_session`).
- audio seconds per minute per tenant (`add_audio`), a two-bucket sliding-window estimate; call
  it with batched audio (e.g. once a second), not per frame.

Rate limits protect capacity, not money, so they fail open: when Redis is unreachable each
process enforces `fallback_fraction` of every limit by itself (N processes each allowing a
fraction is a rough stand-in for the shared limit), logs once per outage and marks its
decisions `fallback=True`. After a failure Redis is not tried again for `retry_interval_s`, so an
outage does not add a connect timeout to every request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.billing import keys
from server.billing.redis_client import BillingRedis
from server.billing.script_batch import ScriptBatcher
from server.billing.wallet_cache import LuaScript

log = logging.getLogger("streamgate.ratelimit")

# OSError covers refused/reset sockets that escape redis-py's wrapping; TimeoutError covers our
# own deadline (asyncio.timeout raises the builtin TimeoutError). A Redis Cluster failing over
# answers CLUSTERDOWN / TRYAGAIN for a while: for rate limits that is an outage too.
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError,
                ClusterDownError, TryAgainError)
_PRUNE_AT = 10_000  # local fallback entries before expired ones are dropped


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0
    fallback: bool = False  # decided by the in-process limiter because Redis was unreachable


_ALLOW = Decision(True)
_ALLOW_FALLBACK = Decision(True, fallback=True)


class RateLimiter:
    def __init__(
        self,
        redis: BillingRedis,
        *,
        fallback_fraction: float = 0.5,
        retry_interval_s: float = 1.0,
        timeout_s: float | None = 0.5,
        audio_window_ms: int = 60_000,
        clock: Callable[[], float] = time.monotonic,
        batcher: ScriptBatcher | None = None,
    ) -> None:
        """`batcher`: the calls every live session makes with each usage report
        (`refresh_session`, `add_audio`) go through it, in one round trip with the other
        sessions' (docs/decisions/15L1); admission calls are sent at once."""
        if not 0 < fallback_fraction <= 1:
            raise ValueError("fallback_fraction must be in (0, 1]")
        self._r = redis
        self._fraction = fallback_fraction
        self._retry_interval = retry_interval_s
        self._timeout = timeout_s
        # Limits are per minute; the window is a parameter only so tests need not wait a minute.
        self._window_ms = audio_window_ms
        self._clock = clock
        self._batch = batcher
        self._gcra = LuaScript("gcra")
        self._sessions = LuaScript("sessions")
        self._audio = LuaScript("audio")
        self._down_until = 0.0
        self._outage = False
        self._local = _LocalLimits()

    @property
    def degraded(self) -> bool:
        """True while the last Redis call failed (decisions are local)."""
        return self._outage

    async def _call(self, script: LuaScript, keys_: Sequence[str], args: Sequence[Any],
                    *, batched: bool = False) -> Any:
        """The script's reply, or None if Redis is unreachable (caller falls back)."""
        if self._clock() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                if batched and self._batch is not None:
                    res = await self._batch(script, keys_, args)
                else:
                    res = await script(self._r, keys_, args)
        except _UNREACHABLE as exc:
            self._failed(exc)
            return None
        if self._outage:
            self._outage = False
            log.info("rate limits: Redis reachable again; shared limits restored")
        return res

    def _failed(self, exc: BaseException) -> None:
        self._down_until = self._clock() + self._retry_interval
        if not self._outage:
            self._outage = True
            log.warning(
                "rate limits: Redis unreachable (%s: %s); local fallback at %.0f%% of limits",
                type(exc).__name__, exc, self._fraction * 100,
            )

    def _scaled(self, limit: float) -> float:
        return limit * self._fraction

    async def allow(
        self, key_id: str, rate_per_s: float, burst: int, cost: int = 1
    ) -> Decision:
        """GCRA: up to `burst` requests at once, refilled at `rate_per_s`."""
        if rate_per_s <= 0 or burst < 1 or not 1 <= cost <= burst:
            raise ValueError("need rate_per_s > 0 and 1 <= cost <= burst")
        interval_us = max(1, round(1_000_000 / rate_per_s))
        res = await self._call(self._gcra, [keys.gcra_key(key_id)], [interval_us, burst, cost])
        if res is None:
            local_burst = max(1, math.floor(self._scaled(burst)))
            return self._local.gcra(
                key_id, self._clock(), 1 / self._scaled(rate_per_s), local_burst,
                min(cost, local_burst),
            )
        return Decision(bool(int(res[0])), int(res[1]) / 1_000_000)

    async def acquire_session(
        self, tenant: str, session_id: str, limit: int, ttl_s: float
    ) -> Decision:
        """Admit a session if the tenant has fewer than `limit` live ones (429 otherwise).
        The entry expires after `ttl_s` unless refreshed; acquiring twice is harmless."""
        if limit < 1 or ttl_s <= 0:
            raise ValueError("need limit >= 1 and ttl_s > 0")
        ttl_ms = max(1, round(ttl_s * 1000))
        res = await self._call(
            self._sessions, [keys.sessions_key(tenant)], ["acquire", session_id, limit, ttl_ms]
        )
        if res is None:
            local_limit = max(1, math.floor(self._scaled(limit)))
            return self._local.acquire(tenant, session_id, local_limit, ttl_s, self._clock())
        return Decision(bool(int(res[0])), int(res[1]) / 1000)

    async def refresh_session(self, tenant: str, session_id: str, ttl_s: float) -> Decision:
        """Extend a live session's entry; always allowed (it was admitted already)."""
        ttl_ms = max(1, round(ttl_s * 1000))
        res = await self._call(
            self._sessions, [keys.sessions_key(tenant)], ["refresh", session_id, 1, ttl_ms],
            batched=True,
        )
        if res is None:
            self._local.refresh(tenant, session_id, ttl_s, self._clock())
            return _ALLOW_FALLBACK
        return _ALLOW

    async def release_session(self, tenant: str, session_id: str) -> None:
        # Also released locally: it may have been admitted by the fallback during an outage.
        self._local.release(tenant, session_id)
        if self._clock() < self._down_until:
            return  # its entry ages out of Redis by itself
        try:
            async with asyncio.timeout(self._timeout):
                await self._r.zrem(keys.sessions_key(tenant), session_id)
        except _UNREACHABLE as exc:
            self._failed(exc)

    async def add_audio(
        self, tenant: str, audio_ms: int, limit_seconds_per_minute: int
    ) -> Decision:
        """Count `audio_ms` against the tenant's audio seconds per minute; refused audio is not
        counted (the session is closed with 4029)."""
        if audio_ms < 0 or limit_seconds_per_minute < 0:
            raise ValueError("need audio_ms >= 0 and limit_seconds_per_minute >= 0")
        limit_ms = limit_seconds_per_minute * self._window_ms // 60  # per window, integer ms
        res = await self._call(
            self._audio, [keys.audio_key(tenant)], [audio_ms, limit_ms, self._window_ms],
            batched=True,
        )
        if res is None:
            local_limit = math.floor(self._scaled(limit_ms))
            now_ms = int(self._clock() * 1000)
            return self._local.audio(tenant, audio_ms, local_limit, self._window_ms, now_ms)
        return Decision(bool(int(res[0])), int(res[1]) / 1000)


class _LocalLimits:
    """The same three limits in process memory, used only while Redis is unreachable."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._sessions: dict[str, dict[str, float]] = {}
        self._audio: dict[str, tuple[int, int, int]] = {}  # tenant -> (window, cur, prev)

    def gcra(self, key_id: str, now: float, interval: float, burst: int, cost: int) -> Decision:
        if len(self._tat) > _PRUNE_AT:
            self._tat = {k: t for k, t in self._tat.items() if t > now}
        tat = max(self._tat.get(key_id, now), now)
        new_tat = tat + cost * interval
        allow_at = new_tat - burst * interval
        if allow_at > now:
            return Decision(False, allow_at - now, fallback=True)
        self._tat[key_id] = new_tat
        return _ALLOW_FALLBACK

    def _live(self, tenant: str, now: float) -> dict[str, float]:
        live = {s: exp for s, exp in self._sessions.get(tenant, {}).items() if exp > now}
        self._sessions[tenant] = live
        return live

    def acquire(
        self, tenant: str, session_id: str, limit: int, ttl_s: float, now: float
    ) -> Decision:
        live = self._live(tenant, now)
        if session_id not in live and len(live) >= limit:
            return Decision(False, min(live.values()) - now, fallback=True)
        live[session_id] = now + ttl_s
        return _ALLOW_FALLBACK

    def refresh(self, tenant: str, session_id: str, ttl_s: float, now: float) -> None:
        self._live(tenant, now)[session_id] = now + ttl_s

    def release(self, tenant: str, session_id: str) -> None:
        live = self._sessions.get(tenant)
        if live is not None:
            live.pop(session_id, None)
            if not live:
                del self._sessions[tenant]

    def audio(
        self, tenant: str, audio_ms: int, limit_ms: int, window_ms: int, now_ms: int
    ) -> Decision:
        if len(self._audio) > _PRUNE_AT:
            current = now_ms // window_ms
            self._audio = {t: v for t, v in self._audio.items() if v[0] >= current - 1}
        w, elapsed = divmod(now_ms, window_ms)
        w0, cur, prev = self._audio.get(tenant, (w, 0, 0))
        if w0 != w:
            cur, prev = 0, (cur if w0 == w - 1 else 0)
        est = prev * (window_ms - elapsed) // window_ms + cur
        if est + audio_ms > limit_ms:
            # Coarser than the Redis script's estimate: the rest of this window.
            return Decision(False, (window_ms - elapsed) / 1000, fallback=True)
        self._audio[tenant] = (w, cur + audio_ms, prev)
        return _ALLOW_FALLBACK
