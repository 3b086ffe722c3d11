"""Two nodes behind a real HAProxy (issue 13 item 5; tests/haproxy.py starts it all): sessions
and requests go through the balancer and land on both nodes, the money adds up across them,
an Idempotency-Key holds across them, and a node that is told to stop (SIGTERM) is taken out by
its /readyz before it closes, while its live sessions finish. Each node is a supervisor with
two workers (tests/haproxy.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.e2e.test_asr_stream import recv_json
from tests.e2e.test_billing_e2e import (
    Live,
    Tenant,
    assert_books_balance,
    cost,
    pg_state,
    redis_state,
)
from tests.e2e.test_cli import streamgate
from tests.haproxy import CHECK_BOUND_S, LoadBalanced, Node, load_balanced

pytestmark = pytest.mark.e2e
REDIS_DB = 11  # a Redis logical database of this module alone
LEASE_MS = 2000


@pytest.fixture(scope="module")
def lb(redis_url: str, database_url: str,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadBalanced]:
    with load_balanced(redis_url, database_url, REDIS_DB, tmp_path_factory.mktemp("haproxy"),
                       billing__lease_s=LEASE_MS // 1000, billing__min_lease_s=LEASE_MS // 1000,
                       server__idle_timeout_s=10, server__drain_timeout_s=2,
                       server__drain_notice_s=1,
                       tts__models__synthetic__ms_per_char=1) as env:
        yield env


async def sessions_started(http: aiohttp.ClientSession, node: Node) -> int:
    """ASR sessions the node has admitted: live ones plus ended ones, from its /metrics."""
    async with http.get(f"{node.http}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    started = 0.0
    for family in text_string_to_metric_families(text):
        if family.name in ("streamgate_sessions_active", "streamgate_sessions"):
            started += sum(s.value for s in family.samples if s.labels.get("kind") == "asr"
                           and not s.name.endswith("_created"))
    return int(started)


async def open_session(lb: LoadBalanced, tenant: Tenant) -> Live | int:
    """A session through the balancer, or the status that refused it."""
    try:
        ws = await connect(f"{lb.balancer.ws}/v1/asr/stream?model=synthetic",
                           additional_headers=tenant.auth, open_timeout=30)
    except InvalidStatus as exc:
        return exc.response.status_code
    try:
        ready = await recv_json(ws, timeout=30)
    except BaseException:
        await ws.close()
        raise
    assert ready["type"] == "ready", ready
    return Live(ws, ready)


async def finish(live: Live) -> dict[str, Any] | None:
    """Client `close`, then the summary (None if the server had ended it without one)."""
    with contextlib.suppress(Exception):
        await live.ws.send(json.dumps({"type": "close"}))
    await live.wait_closed(30)
    return live.summary


async def test_200_sessions_on_one_wallet_across_both_nodes(lb: LoadBalanced) -> None:
    """One wallet worth 50 s of audio, 200 sessions at once through the balancer, each sending
    3 s: admitted on both nodes, never charged beyond the balance, the books reconcile."""
    balance = cost(50_000)
    tenant = await asyncio.to_thread(lb.admin.tenant, balance, "lb",
                                     max_concurrent_sessions=1000, requests_per_second=1000,
                                     burst=1000)
    async with aiohttp.ClientSession() as http:
        for node in lb.nodes:  # each node has met the key and the wallet: a fair race
            async with connect(f"{node.ws}/v1/asr/stream?model=synthetic",
                               additional_headers=tenant.auth, open_timeout=30) as ws:
                assert (await recv_json(ws))["type"] == "ready"
        before = [await sessions_started(http, node) for node in lb.nodes]
        results = await asyncio.wait_for(
            asyncio.gather(*(open_session(lb, tenant) for _ in range(200))), 60)
        admitted = [r for r in results if isinstance(r, Live)]
        try:
            refused = sorted({r for r in results if isinstance(r, int)})
            assert admitted and set(refused) <= {402}, refused
            # 3 s each at 10x real time: more than a lease, so sessions top up from the
            # one wallet on both nodes at once until it runs dry.
            await asyncio.wait_for(
                asyncio.gather(*(live.send_audio(3000, speed=10.0) for live in admitted)), 60)
            summaries = await asyncio.wait_for(
                asyncio.gather(*(finish(live) for live in admitted)), 60)
        finally:
            await asyncio.gather(*(live.aclose() for live in admitted))
        after = [await sessions_started(http, node) for node in lb.nodes]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert all(n > 0 for n in served) and sum(served) == len(admitted), served
    assert all(live.close_code in (1000, 4002) for live in admitted), \
        sorted({live.close_code for live in admitted}, key=str)
    pg = await assert_books_balance(lb.dsn, lb.redis_url, tenant.tenant_id,
                                    check_reconcile=False, timeout=30)
    charged = sum(s["cost_micros"] for s in summaries if s is not None)
    assert pg.usage <= balance and pg.balance >= 0 and pg.balance == balance - pg.usage
    assert charged <= pg.usage  # a session cut without a summary is charged all the same
    rs = await redis_state(lb.redis_url, tenant.tenant_id)
    assert rs.spendable is not None and rs.spendable >= 0
    done = await asyncio.to_thread(streamgate, lb.redis_url, lb.dsn, "reconcile")
    assert done.returncode == 0, (done.stdout, done.stderr)


async def test_a_topup_sent_to_both_nodes_at_once_is_applied_once(lb: LoadBalanced) -> None:
    tenant = await asyncio.to_thread(lb.admin.tenant, 0, "topup")
    admins = [lb.admin, *(type(lb.admin)(node.http) for node in lb.nodes), lb.admin]
    results = await asyncio.gather(*(
        asyncio.to_thread(admin.topup, tenant.tenant_id, 12_345, "order-77") for admin in admins))
    assert sorted(status for status, _ in results) == [200, 200, 200, 201], results
    assert len({body["topup_id"] for _, body in results}) == 1
    assert [body["created"] for _, body in results].count(True) == 1
    pg = await pg_state(lb.dsn, tenant.tenant_id)
    assert pg.topups == pg.balance == 12_345


async def test_an_idempotency_key_holds_across_the_balancer(lb: LoadBalanced) -> None:
    """The same synthesis with one key, four times at once through the balancer (round robin:
    both nodes get some): synthesized and charged once, the same audio for all four."""
    tenant = await asyncio.to_thread(lb.admin.tenant, 10_000_000, "idem")
    body = {"text": "Spoken once, whichever node hears it. " * 8, "model": "synthetic",
            "sample_rate": 8000}
    headers = {**tenant.auth, "Idempotency-Key": "speak-1"}

    async def one(http: aiohttp.ClientSession) -> tuple[int, bytes, bool]:
        async with http.post(f"{lb.balancer.http}/v1/tts/synthesize", json=body,
                             headers=headers) as resp:
            return (resp.status, await resp.read(),
                    resp.headers.get("Idempotent-Replayed") == "true")

    async with aiohttp.ClientSession() as http:
        results = await asyncio.wait_for(asyncio.gather(*(one(http) for _ in range(4))), 30)
    assert [status for status, _, _ in results] == [200] * 4
    assert len({audio for _, audio, _ in results}) == 1
    assert sorted(replayed for _, _, replayed in results) == [False, True, True, True]
    pg = await assert_books_balance(lb.dsn, lb.redis_url, tenant.tenant_id,
                                    check_reconcile=False)
    assert pg.events >= 1 and len({e.rsplit(":", 1)[0] for e in pg.events_by_id}) == 1


async def test_sigterm_takes_a_node_out_while_its_sessions_finish(lb: LoadBalanced) -> None:
    """Last in the module: node A stops for good. HAProxy sees /readyz 503 and takes it out
    within the health-check bound; upgrades after that all land on B; the sessions that were
    live on A finish there (summary, close 1001), charged for what they sent."""
    node_a, node_b = lb.node("node-a"), lb.node("node-b")
    assert node_a.server is not None
    tenant = await asyncio.to_thread(lb.admin.tenant, cost(600_000), "drain",
                                     max_concurrent_sessions=1000, requests_per_second=1000,
                                     burst=1000)
    stop_sending = asyncio.Event()
    second: list[Live] = []
    ended_on_a: list[Live] = []
    summaries: list[dict[str, Any] | None] = []
    async with aiohttp.ClientSession() as http:
        before = {n.name: await sessions_started(http, n) for n in lb.nodes}
        first = [s for s in await asyncio.gather(*(open_session(lb, tenant) for _ in range(20)))
                 if isinstance(s, Live)]
        assert len(first) == 20
        senders = [asyncio.create_task(live.send_audio(None, until=stop_sending))
                   for live in first]
        try:
            on_a = await sessions_started(http, node_a) - before["node-a"]
            assert 0 < on_a < 20  # leastconn spread them
            node_a.server.proc.send_signal(signal.SIGTERM)
            took = await asyncio.to_thread(lb.balancer.wait_for, "node-a", "DOWN")
            assert took <= CHECK_BOUND_S, took
            a_at_down = await sessions_started(http, node_a)
            b_at_down = await sessions_started(http, node_b)
            later = await asyncio.gather(*(open_session(lb, tenant) for _ in range(10)))
            assert all(isinstance(s, Live) for s in later), later
            second = [s for s in later if isinstance(s, Live)]
            with contextlib.suppress(aiohttp.ClientError):  # A may have closed by now
                assert await sessions_started(http, node_a) == a_at_down
            assert await sessions_started(http, node_b) == b_at_down + 10
            # A's live sessions end there, whole; B's go on until their clients close.
            ended_on_a = [live for live in first if live.closed.is_set()]
            deadline = time.monotonic() + 20
            while len(ended_on_a) < on_a and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                ended_on_a = [live for live in first if live.closed.is_set()]
            assert len(ended_on_a) == on_a
            assert all(live.close_code == 1001 and live.summary is not None
                       for live in ended_on_a), [live.close_code for live in ended_on_a]
            stop_sending.set()
            await asyncio.gather(*senders)
            on_b = [live for live in first + second if live not in ended_on_a]
            summaries = list(await asyncio.wait_for(
                asyncio.gather(*(finish(live) for live in on_b)), 30))
            assert all(live.close_code == 1000 for live in on_b)
        finally:
            stop_sending.set()
            await asyncio.gather(*senders, return_exceptions=True)
            await asyncio.gather(*(live.aclose() for live in first + second))
    assert await asyncio.to_thread(node_a.stop) == 0
    charged = sum(s["cost_micros"] for s in summaries if s is not None) + sum(
        live.summary["cost_micros"] for live in ended_on_a if live.summary is not None)
    await assert_books_balance(lb.dsn, lb.redis_url, tenant.tenant_id, expected_usage=charged,
                               check_reconcile=False, timeout=30)
