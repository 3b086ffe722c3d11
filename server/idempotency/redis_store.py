"""Idempotency-Key answers shared by every process and node through Redis.

One key per (tenant, route, Idempotency-Key): `sg:idem:{<tenant>}:<route>:<sha256(key)>` (the
hash tag keeps a tenant's keys in one Redis Cluster slot, like its wallet's). Its value is an
`Entry`, either

- a running marker (`status` 0): the request's fingerprint and a random owner token, set with
  SET NX PX (GET: the same command tells a duplicate what holds the key) and an owner TTL of a
  few seconds that the owner refreshes while it runs. A process killed mid-request stops
  refreshing; its key is free again within the owner TTL and a retry runs;
- or the answer (status, body, fingerprint), kept for the answer TTL. An answer larger than
  `max_answer_bytes` keeps only its status: a replay is then refused (409
  `idempotency_answer_not_kept`) rather than run and charged a second time.

The owner replaces its marker by the answer (or deletes it, when there is nothing to keep) only
if the key still holds its very marker (compare-and-set in Lua): an owner whose marker expired
under it never overwrites the next owner's.

A duplicate that finds a marker with its fingerprint polls (SET NX GET again, with backoff)
until the answer is there (replay), the key is free (the first failed or died: it runs), or
`wait_s` passed (409 `idempotency_in_progress`, Retry-After: 1). Polling, not pub/sub: it is a
few commands per second per waiter, works the same on Redis Cluster and needs no subscriber
connection per process. docs/decisions/13C1-shared-idempotency.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from server.flow_control.idempotency import (
    MAX_ANSWER_BYTES,
    OWNER_TTL_S,
    POLL_FIRST_S,
    POLL_MAX_S,
    WAIT_S,
)
from server.idempotency.port import (
    AnswerNotKept,
    CacheKey,
    Claim,
    IdempotencyConflict,
    IdempotencyInProgress,
    IdempotencyUnavailable,
    Replay,
)

log = logging.getLogger("streamgate.idempotency")

# One server or a Redis Cluster: every command here touches one key.
SharedRedis = aioredis.Redis | RedisCluster

# KEYS[1] the key; ARGV[1] the owner's marker. Each acts only while the key holds that marker.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Entry(msgspec.Struct, array_like=True, frozen=True):
    fingerprint: str
    owner: str
    status: int = 0  # 0: running; else the answer's HTTP status
    body: bytes | None = None  # the answer; None with a status: too large, not kept


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode


def redis_key(key: CacheKey) -> str:
    tenant, route, idempotency_key = key
    # A brace in the tag would end it early; such (odd) tenant ids are tagged by their hash.
    tag = tenant if tenant and "{" not in tenant and "}" not in tenant \
        else hashlib.sha256(tenant.encode()).hexdigest()[:32]
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"sg:idem:{{{tag}}}:{route}:{digest}"


class RedisIdempotency:
    def __init__(self, redis: SharedRedis, *, ttl_s: float, wait_s: float = WAIT_S,
                 owner_ttl_s: float = OWNER_TTL_S, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 poll_first_s: float = POLL_FIRST_S, poll_max_s: float = POLL_MAX_S) -> None:
        if ttl_s <= 0 or owner_ttl_s <= 0:
            raise ValueError("ttl_s and owner_ttl_s must be positive")
        self._r = redis
        self.ttl_ms = max(1, int(ttl_s * 1000))
        # A running request never outlives the answer it would leave.
        self.owner_ttl_ms = max(1, int(min(owner_ttl_s, ttl_s) * 1000))
        self.wait_s = wait_s
        self.max_answer_bytes = max_answer_bytes
        self._poll = (poll_first_s, poll_max_s)
        self._refresh = redis.register_script(_REFRESH)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)

    @asynccontextmanager
    async def claim(self, key: CacheKey, fingerprint: str) -> AsyncIterator[Claim]:
        name = redis_key(key)
        marker = _encode(Entry(fingerprint, secrets.token_hex(12)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        delay, cap = self._poll
        while True:
            try:
                held = await self._r.set(name, marker, nx=True, px=self.owner_ttl_ms, get=True)
            except RedisError as exc:
                log.warning("idempotency store unreachable", extra={"error": str(exc)})
                raise IdempotencyUnavailable from exc
            if held is None:
                break  # ours: run
            entry = _decode(cast(bytes, held))
            if entry.fingerprint != fingerprint:
                raise IdempotencyConflict
            if entry.status:
                if entry.body is None:
                    raise AnswerNotKept(entry.status, self.max_answer_bytes)
                yield Claim(fingerprint, Replay(entry.status, entry.body))
                return
            if loop.time() + delay > deadline:
                raise IdempotencyInProgress(self.wait_s)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, cap)
        claim = Claim(fingerprint)
        keeper = loop.create_task(self._keep_alive(name, marker))
        try:
            yield claim
        finally:
            keeper.cancel()
            await asyncio.wait([keeper])  # not `await keeper`: our own cancellation stays ours
            await self._settle(name, marker, claim)

    async def _keep_alive(self, name: str, marker: bytes) -> None:
        interval = self.owner_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                held = await self._refresh(keys=[name], args=[marker, self.owner_ttl_ms])
            except RedisError as exc:
                log.warning("idempotency claim not refreshed", extra={"error": str(exc)})
                continue  # the next try may reach it; the marker lives until its TTL
            if not held:
                log.warning("idempotency claim lost while running", extra={"key": name})
                return

    async def _settle(self, name: str, marker: bytes, claim: Claim) -> None:
        """Replace the marker by the answer, or free the key when there is none to keep (the
        request failed: a retry runs). An error here only costs the replay: the marker then
        expires and a retry runs again."""
        try:
            if claim.result is None:
                await self._release(keys=[name], args=[marker])
                return
            status, body = claim.result
            owner = _decode(marker).owner
            kept = body if len(body) <= self.max_answer_bytes else None
            answer = _encode(Entry(claim.fingerprint, owner, status, kept))
            if not await self._finish(keys=[name], args=[marker, answer, self.ttl_ms]):
                log.warning("idempotency answer not kept: the claim expired while running",
                            extra={"key": name})
        except RedisError as exc:
            log.warning("idempotency answer not kept", extra={"key": name, "error": str(exc)})


class RedisReplyStores:
    """ReplyStores over one Redis client. `max_entries` is not used: Redis holds each answer
    for its TTL (memory: answers per TTL x their size, see docs/deploy.md)."""

    def __init__(self, redis: SharedRedis) -> None:
        self._r = redis

    def __call__(self, *, ttl_s: float, max_entries: int) -> RedisIdempotency:
        return RedisIdempotency(self._r, ttl_s=ttl_s)
