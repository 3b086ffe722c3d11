"""Idempotency-Key answers kept in this process (LRU + TTL): the store when there is no Redis
(billing off). Correct for one process only: behind a balancer or with several workers a retry
may land elsewhere and run again, which is what server/idempotency/redis_store.py is for."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from server.flow_control.idempotency import MAX_ANSWER_BYTES
from server.idempotency.port import (
    AnswerNotKept,
    CacheKey,
    Claim,
    IdempotencyConflict,
    Replay,
)


@dataclass(frozen=True, slots=True)
class Stored:
    status: int
    body: bytes | None  # None: too large to keep (a replay is refused, not run again)
    fingerprint: str
    expires_at: float


class IdempotencyCache:
    def __init__(self, ttl_s: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic, *,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_answer_bytes = max_answer_bytes
        self._clock = clock
        self._done: OrderedDict[CacheKey, Stored] = OrderedDict()
        self._running: dict[CacheKey, tuple[str, asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._done)

    def _lookup(self, key: CacheKey) -> Stored | None:
        stored = self._done.get(key)
        if stored is None:
            return None
        if stored.expires_at <= self._clock():
            del self._done[key]
            return None
        self._done.move_to_end(key)
        return stored

    @asynccontextmanager
    async def claim(self, key: CacheKey, fingerprint: str) -> AsyncIterator[Claim]:
        while True:
            stored = self._lookup(key)
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    raise IdempotencyConflict
                if stored.body is None:
                    raise AnswerNotKept(stored.status, self.max_answer_bytes)
                yield Claim(fingerprint, Replay(stored.status, stored.body))
                return
            running = self._running.get(key)
            if running is None:
                break
            if running[0] != fingerprint:
                raise IdempotencyConflict
            # asyncio.wait, not await: a waiter that is cancelled must not cancel the future
            # the other waiters share. The first request is bounded by its deadline.
            await asyncio.wait([running[1]])
            # Then: replay its answer, or (it failed, nothing stored) run this one.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running[key] = (fingerprint, done)
        claim = Claim(fingerprint)
        try:
            yield claim
        finally:
            if claim.result is not None:
                status, body = claim.result
                kept = body if len(body) <= self.max_answer_bytes else None
                self._done[key] = Stored(status, kept, fingerprint, self._clock() + self.ttl_s)
                self._done.move_to_end(key)
                while len(self._done) > self.max_entries:
                    self._done.popitem(last=False)
            del self._running[key]
            done.set_result(None)
