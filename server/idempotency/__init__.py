"""`Idempotency-Key` on POSTs that charge: a completed answer is kept per (tenant, route, key)
for a while and replayed without running (or charging) the request again; a duplicate that
arrives while the first is still running waits for it.

Two stores behind one port (port.py): in this process (memory.py, when there is no Redis) or in
Redis, shared by every worker and node (redis_store.py, whenever billing runs: a retry that the
balancer sends to another node must not be charged twice).
"""

from __future__ import annotations

from server.idempotency.memory import IdempotencyCache
from server.idempotency.port import (
    AnswerNotKept,
    CacheKey,
    Claim,
    IdempotencyConflict,
    IdempotencyInProgress,
    IdempotencyRefused,
    IdempotencyStore,
    IdempotencyUnavailable,
    Replay,
    ReplyStores,
)
from server.idempotency.redis_store import RedisIdempotency, RedisReplyStores, SharedRedis

__all__ = [
    "AnswerNotKept",
    "CacheKey",
    "Claim",
    "IdempotencyCache",
    "IdempotencyConflict",
    "IdempotencyInProgress",
    "IdempotencyRefused",
    "IdempotencyStore",
    "IdempotencyUnavailable",
    "RedisIdempotency",
    "RedisReplyStores",
    "Replay",
    "ReplyStores",
    "SharedRedis",
    "reply_stores",
]


def reply_stores(redis: SharedRedis | None) -> ReplyStores:
    """Shared through Redis when there is one, else in this process."""
    return RedisReplyStores(redis) if redis is not None else IdempotencyCache
