"""`Idempotency-Key` on POSTs that charge: a completed answer is kept per (tenant, route, key)
for a while and replayed without running (or charging) the request again; a duplicate that
arrives while the first is still running waits for it.

In-process (LRU + TTL): correct for one gateway process. Several processes or machines would
have to share it (Redis: SET NX on the key to claim it, the answer stored under it with a TTL,
waiters polling or subscribing), or a client retrying through the balancer may be charged twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

CacheKey = tuple[str, str, str]  # tenant, route, Idempotency-Key


class IdempotencyConflict(Exception):
    """The key was used with a different request body."""


@dataclass(frozen=True, slots=True)
class Stored:
    status: int
    body: bytes
    fingerprint: str
    expires_at: float


class Claim:
    """Held by the request that runs; `store` what it answered to make it replayable."""

    __slots__ = ("fingerprint", "replay", "result")

    def __init__(self, fingerprint: str, replay: Stored | None = None) -> None:
        self.fingerprint = fingerprint
        self.replay = replay  # set: answer with this, do nothing else
        self.result: tuple[int, bytes] | None = None

    def store(self, status: int, body: bytes) -> None:
        self.result = (status, body)


class IdempotencyCache:
    def __init__(self, ttl_s: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
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
                yield Claim(fingerprint, stored)
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
                self._done[key] = Stored(status, body, fingerprint, self._clock() + self.ttl_s)
                self._done.move_to_end(key)
                while len(self._done) > self.max_entries:
                    self._done.popitem(last=False)
            del self._running[key]
            done.set_result(None)
