"""Idempotency-Key across processes (issue 13 item 2): two real `streamgate serve` processes
share one Redis and one PostgreSQL; the same charged request with one Idempotency-Key sent to
both at once runs once, is charged once, and both get its answer (one of them replayed)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest

from server.infra.embedded import create_database, drop_database
from tests.e2e.conftest import ServerProcess, start_server
from tests.e2e.test_billing_e2e import (
    Admin,
    Tenant,
    assert_books_balance,
    billing_env,
    cleanup_redis,
    run_sync,
    with_redis_db,
)
from tests.fakes.upstream import FakeLlmUpstream, LlmReply

pytestmark = pytest.mark.e2e
REDIS_DB = 10  # a Redis logical database of this module alone
PRICE_PER_1K = 1000  # micros per 1000 LLM tokens


@dataclass
class TwoNodes:
    a: ServerProcess
    b: ServerProcess
    admin: Admin
    upstream: FakeLlmUpstream
    redis_url: str
    dsn: str


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeLlmUpstream]:
    fake = FakeLlmUpstream("shared")
    # Slow enough that the second node's copy arrives while the first still runs.
    fake.llm_default = LlmReply(content="Bonjour tout le monde", delay_s=0.8)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(fake.start())
    # The fake serves from this loop's thread while the tests run on their own loops.
    thread = _LoopThread(loop)
    thread.start()
    try:
        yield fake
    finally:
        thread.stop()
        loop.run_until_complete(fake.aclose())
        loop.close()


class _LoopThread:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def nodes(redis_url: str, database_url: str, upstream: FakeLlmUpstream) -> Iterator[TwoNodes]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = run_sync(create_database(database_url, name))
    rurl = with_redis_db(redis_url, REDIS_DB)
    providers = f'[{{name="shared", url="{upstream.url}", models={{chat="c"}}}}]'
    env = billing_env(rurl, dsn, llm__providers=providers,
                      llm__price_micros_per_1k_tokens=f"{{chat={PRICE_PER_1K}}}",
                      tts__models__synthetic__ms_per_char=1)
    started: list[ServerProcess] = []
    try:
        # One after the other: both bootstrap the same database.
        started.append(start_server(env))
        started.append(start_server(env))
        a, b = started
        admin = Admin(a.http)
        yield TwoNodes(a, b, admin, upstream, rurl, dsn)
        codes = [srv.stop() for srv in started]
        assert codes == [0, 0], "\n".join(a.stderr_lines[-20:] + b.stderr_lines[-20:])
        run_sync(cleanup_redis(rurl, admin.tenants, admin.key_ids))
    finally:
        for srv in started:
            srv.stop()
        run_sync(drop_database(database_url, name))


@pytest.fixture
async def tenant(nodes: TwoNodes) -> AsyncIterator[Tenant]:
    yield await asyncio.to_thread(nodes.admin.tenant, 10_000_000, "idem")


async def post_both(nodes: TwoNodes, tenant: Tenant, path: str, body: dict[str, Any],
                    key: str) -> list[tuple[int, bytes, dict[str, str]]]:
    """The same request with the same key to both nodes at once."""
    headers = {**tenant.auth, "Idempotency-Key": key}

    async def one(base: str) -> tuple[int, bytes, dict[str, str]]:
        async with aiohttp.ClientSession() as http, \
                http.post(base + path, json=body, headers=headers) as resp:
            return resp.status, await resp.read(), dict(resp.headers)

    return list(await asyncio.wait_for(
        asyncio.gather(one(nodes.a.http), one(nodes.b.http)), 30))


async def usage_rows(dsn: str, tenant: str) -> list[tuple[str, str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT session_id, unit, sum(cost_micros) AS cost"
                                " FROM usage_events WHERE tenant_id = $1"
                                " GROUP BY session_id, unit", tenant)
    finally:
        await conn.close()
    return [(str(r["session_id"]), str(r["unit"]), int(r["cost"])) for r in rows]


def replayed(results: list[tuple[int, bytes, dict[str, str]]]) -> list[bool]:
    return sorted(h.get("Idempotent-Replayed") == "true" for _, _, h in results)


async def test_one_chat_completion_sent_to_both_nodes_runs_and_is_charged_once(
    nodes: TwoNodes, tenant: Tenant,
) -> None:
    before = len(nodes.upstream.llm_requests)
    body = {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 20}
    results = await post_both(nodes, tenant, "/v1/chat/completions", body, "chat-1")
    assert [status for status, _, _ in results] == [200, 200], results
    assert results[0][1] == results[1][1]  # the same answer, byte for byte
    assert replayed(results) == [False, True]
    assert len(nodes.upstream.llm_requests) == before + 1
    # A different body under the key, on either node: refused, not run.
    other = {**body, "max_tokens": 21}
    conflicts = await post_both(nodes, tenant, "/v1/chat/completions", other, "chat-1")
    assert [s for s, _, _ in conflicts] == [409, 409]
    assert b"idempotency_conflict" in conflicts[0][1]
    assert len(nodes.upstream.llm_requests) == before + 1
    pg = await assert_books_balance(nodes.dsn, nodes.redis_url, tenant.tenant_id)
    rows = await usage_rows(nodes.dsn, tenant.tenant_id)
    assert len(rows) == 1 and rows[0][1] == "tokens" and pg.usage == rows[0][2] > 0


async def test_one_synthesis_sent_to_both_nodes_runs_and_is_charged_once(
    nodes: TwoNodes, tenant: Tenant,
) -> None:
    text = "The same words, spoken and paid for once. " * 10
    body = {"text": text, "model": "synthetic", "sample_rate": 8000}
    results = await post_both(nodes, tenant, "/v1/tts/synthesize", body, "tts-1")
    assert [status for status, _, _ in results] == [200, 200], results
    assert results[0][1] == results[1][1] and len(results[0][1]) > 1000
    assert replayed(results) == [False, True]
    pg = await assert_books_balance(nodes.dsn, nodes.redis_url, tenant.tenant_id)
    rows = await usage_rows(nodes.dsn, tenant.tenant_id)
    assert [unit for _, unit, _ in rows] == ["characters"]  # one session
    assert pg.usage == rows[0][2] > 0
