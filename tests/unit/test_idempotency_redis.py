"""The shared Idempotency-Key store (server/idempotency/redis_store.py) against a real Redis:
instances with connections of their own stand for processes on different nodes, and one test
kills a real process mid-request."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.idempotency import (
    AnswerNotKept,
    IdempotencyCache,
    IdempotencyConflict,
    IdempotencyInProgress,
    IdempotencyStore,
    IdempotencyUnavailable,
    RedisIdempotency,
    reply_stores,
)
from server.idempotency.port import CacheKey
from server.idempotency.redis_store import redis_key
from tests.e2e.test_billing_e2e import with_redis_db

REDIS_DB = 13  # a Redis logical database no other test module uses
ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def connection(url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(url)
    try:
        yield r
    finally:
        await r.aclose()


@pytest.fixture
def db_url(redis_url: str) -> str:
    return with_redis_db(redis_url, REDIS_DB)


@pytest.fixture
def key() -> CacheKey:
    return (f"tenant-{uuid.uuid4().hex[:8]}", "/v1/chat/completions", "retry-1")


async def run_once(store: IdempotencyStore, key: CacheKey, fingerprint: str,
                   work: Callable[[], Awaitable[bytes]]) -> tuple[bytes, bool]:
    """What a route does: (answer, replayed)."""
    async with store.claim(key, fingerprint) as claim:
        if claim.replay is not None:
            return claim.replay.body, True
        body = await work()
        claim.store(200, body)
        return body, False


def test_keys_carry_the_tenant_as_hash_tag() -> None:
    name = redis_key(("acme", "/v1/translate", "k"))
    assert name.startswith("sg:idem:{acme}:/v1/translate:") and len(name.rsplit(":")[-1]) == 64
    odd = redis_key(("a}b", "/v1/translate", "k"))
    assert odd.count("{") == 1 and odd.count("}") == 1  # still one tag, one slot


async def test_two_processes_racing_one_key_run_it_once(db_url: str, key: CacheKey) -> None:
    async with connection(db_url) as ra, connection(db_url) as rb:
        a, b = (RedisIdempotency(r, ttl_s=60, poll_first_s=0.005) for r in (ra, rb))
        runs: list[str] = []
        started, release = asyncio.Event(), asyncio.Event()

        async def work(name: str) -> bytes:
            runs.append(name)
            started.set()
            await release.wait()
            return name.encode()

        first = asyncio.create_task(run_once(a, key, "f", lambda: work("a")))
        second = asyncio.create_task(run_once(b, key, "f", lambda: work("b")))
        await started.wait()
        await asyncio.sleep(0.05)  # the loser polls meanwhile, and must not run
        release.set()
        results = await asyncio.gather(first, second)
        assert len(runs) == 1
        answer = runs[0].encode()
        assert sorted(results, key=lambda r: r[1]) == [(answer, False), (answer, True)]
        assert await ra.pttl(redis_key(key)) > 50_000  # the answer, with its TTL
        await ra.delete(redis_key(key))


async def test_a_different_body_under_the_key_is_a_conflict(db_url: str, key: CacheKey) -> None:
    async with connection(db_url) as ra, connection(db_url) as rb:
        a, b = RedisIdempotency(ra, ttl_s=60), RedisIdempotency(rb, ttl_s=60)
        release = asyncio.Event()

        async def slow() -> bytes:
            await release.wait()
            return b"x"

        running = asyncio.create_task(run_once(a, key, "f1", slow))
        await asyncio.sleep(0.05)
        with pytest.raises(IdempotencyConflict):  # while it runs
            await run_once(b, key, "f2", slow)
        release.set()
        assert await running == (b"x", False)
        with pytest.raises(IdempotencyConflict) as refused:  # and once answered
            await run_once(b, key, "f2", slow)
        assert (refused.value.status, refused.value.code) == (409, "idempotency_conflict")
        await ra.delete(redis_key(key))


async def test_a_failed_request_frees_the_key_at_once(db_url: str, key: CacheKey) -> None:
    async with connection(db_url) as r:
        store = RedisIdempotency(r, ttl_s=60)
        with pytest.raises(RuntimeError):
            async with store.claim(key, "f"):
                raise RuntimeError("upstream failed")
        assert await r.exists(redis_key(key)) == 0
        assert await run_once(store, key, "f", _answer(b"second")) == (b"second", False)
        await r.delete(redis_key(key))


async def test_the_owner_refreshes_its_claim_while_it_runs(db_url: str, key: CacheKey) -> None:
    """A request running 4x the owner TTL keeps its key: the duplicate replays, never runs."""
    async with connection(db_url) as ra, connection(db_url) as rb:
        a = RedisIdempotency(ra, ttl_s=60, owner_ttl_s=0.15)
        b = RedisIdempotency(rb, ttl_s=60, owner_ttl_s=0.15, poll_first_s=0.01, poll_max_s=0.02)
        runs: list[str] = []

        async def work(name: str) -> bytes:
            runs.append(name)
            await asyncio.sleep(0.6)
            return name.encode()

        first = asyncio.create_task(run_once(a, key, "f", lambda: work("a")))
        await asyncio.sleep(0.02)
        assert await run_once(b, key, "f", lambda: work("b")) == (b"a", True)
        assert await first == (b"a", False) and runs == ["a"]
        await ra.delete(redis_key(key))


async def test_a_duplicate_stops_waiting_with_in_progress(db_url: str, key: CacheKey) -> None:
    async with connection(db_url) as ra, connection(db_url) as rb:
        a = RedisIdempotency(ra, ttl_s=60)
        b = RedisIdempotency(rb, ttl_s=60, wait_s=0.2, poll_first_s=0.01)
        release = asyncio.Event()

        async def slow() -> bytes:
            await release.wait()
            return b"done"

        running = asyncio.create_task(run_once(a, key, "f", slow))
        await asyncio.sleep(0.05)
        with pytest.raises(IdempotencyInProgress) as refused:
            await run_once(b, key, "f", slow)
        assert refused.value.status == 409 and refused.value.headers == {"Retry-After": "1"}
        release.set()
        await running
        assert await run_once(b, key, "f", slow) == (b"done", True)
        await ra.delete(redis_key(key))


async def test_an_answer_too_large_to_keep_is_refused_not_run_again(
    db_url: str, key: CacheKey,
) -> None:
    async with connection(db_url) as r:
        store = RedisIdempotency(r, ttl_s=60, max_answer_bytes=10)
        assert await run_once(store, key, "f", _answer(b"x" * 11)) == (b"x" * 11, False)
        assert await r.strlen(redis_key(key)) < 100  # its status only
        with pytest.raises(AnswerNotKept) as refused:
            await run_once(store, key, "f", _answer(b"again"))
        assert refused.value.code == "idempotency_answer_not_kept"
        small = (key[0], key[1], "small")
        assert await run_once(store, small, "f", _answer(b"x" * 10)) == (b"x" * 10, False)
        assert await run_once(store, small, "f", _answer(b"other")) == (b"x" * 10, True)
        await r.delete(redis_key(key), redis_key(small))


async def test_the_answer_expires_with_its_ttl(db_url: str, key: CacheKey) -> None:
    async with connection(db_url) as r:
        store = RedisIdempotency(r, ttl_s=0.3, owner_ttl_s=0.1)
        assert await run_once(store, key, "f", _answer(b"one")) == (b"one", False)
        assert 0 < await r.pttl(redis_key(key)) <= 300
        await asyncio.sleep(0.35)
        assert await run_once(store, key, "f", _answer(b"two")) == (b"two", False)
        await r.delete(redis_key(key))


_OWNER = """
import asyncio, sys
import redis.asyncio as aioredis
from server.idempotency import RedisIdempotency

async def main() -> None:
    r = aioredis.Redis.from_url(sys.argv[1])
    store = RedisIdempotency(r, ttl_s=60, owner_ttl_s=0.3)
    async with store.claim((sys.argv[2], "/v1/translate", "k"), "f"):
        print("claimed", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_owner_frees_its_key_after_the_owner_ttl(db_url: str) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    key = (tenant, "/v1/translate", "k")
    owner = await asyncio.create_subprocess_exec(sys.executable, "-c", _OWNER, db_url, tenant,
                                                 cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(owner.stdout.readline(), 20)
        assert line.strip() == b"claimed"
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        await owner.wait()
    async with connection(db_url) as r:
        assert await r.exists(redis_key(key)) == 1  # its marker outlives it...
        retry = RedisIdempotency(r, ttl_s=60, poll_first_s=0.02, poll_max_s=0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # ...for at most the owner TTL: the retry waits for it, then runs.
        assert await run_once(retry, key, "f", _answer(b"retried")) == (b"retried", False)
        assert loop.time() - started < 2.0
        await r.delete(redis_key(key))


async def test_an_unreachable_store_refuses_rather_than_runs() -> None:
    r = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        store = RedisIdempotency(r, ttl_s=60)
        with pytest.raises(IdempotencyUnavailable) as refused:
            await run_once(store, ("t", "/v1/translate", "k"), "f", _answer(b"never"))
        assert refused.value.status == 503
    finally:
        await r.aclose()


async def test_reply_stores_pick_redis_when_there_is_one(db_url: str) -> None:
    assert reply_stores(None) is IdempotencyCache
    async with connection(db_url) as r:
        assert isinstance(reply_stores(r)(ttl_s=5, max_entries=1), RedisIdempotency)


async def test_in_process_store_bounds_answers_the_same_way() -> None:
    cache = IdempotencyCache(ttl_s=10, max_entries=10, max_answer_bytes=4)
    key = ("t", "/v1/translate", "k")
    assert await run_once(cache, key, "f", _answer(b"12345")) == (b"12345", False)
    with pytest.raises(AnswerNotKept):
        await run_once(cache, key, "f", _answer(b"again"))


def _answer(body: bytes) -> Callable[[], Awaitable[bytes]]:
    async def work() -> bytes:
        return body
    return work
