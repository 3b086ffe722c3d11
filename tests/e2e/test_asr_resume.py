"""Resumable ASR sessions (issue 13 item 4, docs/protocol.md "Resuming a session"): two real
`streamgate serve` nodes share one Redis and one PostgreSQL; a session cut off on one (drained,
or killed with SIGKILL mid-stream) is resumed on the other by the reference client
(client/streamgate_client/asr_client.py), every final arrives exactly once, and the audio is
billed once: never twice, and after a crash short by at most what the dead node took in since
its last usage report (docs/billing.md)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.infra.embedded import create_database, drop_database
from streamgate_client.asr_client import stream_audio
from streamgate_protocol import messages as m
from tests.e2e.conftest import ServerProcess, espeak_pcm16, silence, start_server
from tests.e2e.test_billing_e2e import (
    Admin,
    Tenant,
    assert_books_balance,
    billing_env,
    cleanup_redis,
    pg_state,
    run_sync,
    with_redis_db,
)

pytestmark = pytest.mark.e2e
REDIS_DB = 0  # this module's Redis logical database (modules run one after another)
BYTES_PER_MS = 32  # 16 kHz PCM16
FUNDED = 50_000_000


@dataclass
class Nodes:
    a: ServerProcess
    b: ServerProcess
    admin: Admin
    redis_url: str
    dsn: str

    def asr_url(self, node: ServerProcess) -> str:
        return f"{node.ws}/v1/asr/stream"


@pytest.fixture
def nodes(redis_url: str, database_url: str) -> Iterator[Nodes]:
    """Two nodes of one deployment: A is the one cut off, B the one the client resumes on."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = run_sync(create_database(database_url, name))
    rurl = with_redis_db(redis_url, REDIS_DB)
    env = billing_env(rurl, dsn, server__drain_notice_s=0.2, server__drain_timeout_s=0.3)
    a = start_server(env)
    b = start_server(env)
    admin = Admin(b.http)
    try:
        yield Nodes(a, b, admin, rurl, dsn)
    finally:
        codes = []
        for node in (a, b):
            with contextlib.suppress(Exception):
                codes.append(node.stop())
        run_sync(cleanup_redis(rurl, admin.tenants, admin.key_ids))
        run_sync(drop_database(database_url, name))
    assert codes[-1] == 0, "\n".join(b.stderr_lines[-40:])


def phrases() -> bytes:
    """About 7 s: four phrases, each an utterance (700 ms of silence ends one)."""
    words = ["good morning everyone", "the quick brown fox", "jumps over the lazy dog",
             "thank you and goodbye"]
    return silence(300) + b"".join(espeak_pcm16(w) + silence(700) for w in words)


def finals(messages: list[object]) -> list[m.Transcript]:
    return [msg for msg in messages if isinstance(msg, m.Transcript) and msg.is_final]


def summaries(messages: list[object]) -> list[m.Summary]:
    return [msg for msg in messages if isinstance(msg, m.Summary)]


async def stream_and_cut(nodes: Nodes, tenant: Tenant, audio: bytes,
                         cut: signal.Signals) -> list[object]:
    """Stream `audio` in real time to A; once a final came back, send A `cut`."""
    first_final = asyncio.Event()

    def seen(msg: object) -> None:
        if isinstance(msg, m.Transcript) and msg.is_final:
            first_final.set()

    task = asyncio.create_task(stream_audio(
        nodes.asr_url(nodes.a), audio, encoding="pcm_s16le", sample_rate=16000, key=tenant.key,
        realtime=True, chunk_ms=40, on_event=seen,
        extra_params={"model": "synthetic", "interim_results": "false"},
        resume_urls=[nodes.asr_url(nodes.b)]))
    async with asyncio.timeout(20):
        await first_final.wait()
    await asyncio.sleep(0.7)  # into the next utterance: the cut lands mid-speech
    nodes.a.proc.send_signal(cut)
    async with asyncio.timeout(40):
        return await task


def assert_each_final_once(messages: list[object]) -> list[m.Transcript]:
    got = finals(messages)
    ids = [t.utterance_id for t in got]
    assert ids == list(range(1, len(ids) + 1)), ids  # in order, none twice, none missing
    assert len(ids) >= 4
    starts = [t.start_ms for t in got]
    assert starts == sorted(starts)  # one audio timeline across both nodes
    return got


def test_a_drained_session_resumes_on_another_node_billed_exactly_once(nodes: Nodes) -> None:
    tenant = nodes.admin.tenant(funded=FUNDED)
    audio = phrases()

    async def scenario() -> list[object]:
        return await stream_and_cut(nodes, tenant, audio, signal.SIGTERM)

    messages = run_sync(scenario())
    assert nodes.a.proc.wait(15) == 0  # A drained cleanly (no leaked task)
    readies = [msg for msg in messages if isinstance(msg, m.Ready)]
    assert [r.resumed for r in readies] == [False, True]
    assert readies[0].session_id == readies[1].session_id
    assert 0 < readies[1].resume_offset <= len(audio)
    drained = [msg for msg in messages if isinstance(msg, m.Error)]
    assert [e.code for e in drained] == ["draining"]
    assert drained[0].resume_token == readies[0].resume_token
    assert_each_final_once(messages)
    # Billed once: A's connection and B's together are exactly the audio.
    first, second = summaries(messages)
    total_ms = len(audio) // BYTES_PER_MS
    assert abs(first.billed_ms + second.billed_ms - total_ms) <= 2, (first, second, total_ms)
    run_sync(assert_books_balance(nodes.dsn, nodes.redis_url, tenant.tenant_id,
                                  expected_usage=first.cost_micros + second.cost_micros))


def test_a_session_on_a_killed_node_resumes_on_another_never_billed_twice(
        nodes: Nodes) -> None:
    tenant = nodes.admin.tenant(funded=FUNDED)
    audio = phrases()

    async def scenario() -> list[object]:
        return await stream_and_cut(nodes, tenant, audio, signal.SIGKILL)

    messages = run_sync(scenario())
    readies = [msg for msg in messages if isinstance(msg, m.Ready)]
    assert [r.resumed for r in readies] == [False, True]
    assert_each_final_once(messages)
    checkpoints = [msg for msg in messages if isinstance(msg, m.Checkpoint)]
    assert checkpoints, "a resumable session reports its checkpoints"
    # B continued from the last point A stored: at or after A's last checkpoint the client saw.
    before_kill = [c for c in checkpoints if messages.index(c) < messages.index(readies[1])]
    assert readies[1].resume_offset >= before_kill[-1].offset
    # A never settled (it was killed): what it charged is its lease's; B's is in its summary.
    [summary] = summaries(messages)
    charged_a = run_sync(lease_units(nodes.redis_url, nodes.dsn, tenant.tenant_id,
                                     readies[0].session_id))
    total_ms = len(audio) // BYTES_PER_MS
    billed = charged_a + summary.billed_ms
    assert billed <= total_ms + 2  # never twice
    # Short by at most one usage interval (0.5 s here) of what A took in, plus a chunk in flight
    # and scheduling slack on a loaded machine.
    assert billed >= total_ms - 500 - 300, (charged_a, summary, total_ms)


async def lease_units(redis_url: str, dsn: str, tenant_id: str, session_id: str) -> int:
    """What the session's usage events charged (audio ms), wherever they are now: flushed to
    PostgreSQL, or still in the tenant's usage stream (a dead node's flusher never
    acknowledged them; another node's claims them later). Waits for its lease to be settled
    (the dead node's by another node's sweeper)."""
    import asyncpg
    import redis.asyncio as aioredis

    from server.billing import keys

    r = aioredis.from_url(redis_url)
    try:
        async with asyncio.timeout(40):
            while await r.exists(keys.lease_key(tenant_id, session_id)):  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # another process settles it: nothing to wait on
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                       await r.xrange(keys.usage_stream(tenant_id)))
    finally:
        await r.aclose()
    units = {e[b"event_id"].decode(): int(e[b"units"]) for _, e in entries
             if e[b"session_id"].decode() == session_id}
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT event_id, units FROM usage_events"
                                " WHERE tenant_id = $1 AND session_id = $2", tenant_id, session_id)
    finally:
        await conn.close()
    units.update({str(row["event_id"]): int(row["units"]) for row in rows})
    return sum(units.values())


def test_resume_refusals_are_clear_and_cost_nothing(nodes: Nodes) -> None:
    tenant = nodes.admin.tenant(funded=FUNDED)
    other = nodes.admin.tenant(funded=FUNDED)

    async def refused(url: str, key: str) -> tuple[int, bytes]:
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}):
                pass
        return info.value.response.status_code, bytes(info.value.response.body or b"")

    async def scenario() -> int:
        base = nodes.asr_url(nodes.b)
        status, body = await refused(f"{base}?resume_token=nope", tenant.key)
        assert status == 404 and b"resume_not_found" in body
        status, body = await refused(f"{base}?resume_token=x&last_utterance_id=-1", tenant.key)
        assert status == 400 and b"bad_request" in body
        # A finished session cannot be resumed; another tenant never sees one.
        messages = await stream_audio(base, silence(600), encoding="pcm_s16le",
                                      sample_rate=16000, key=tenant.key, realtime=False,
                                      extra_params={"model": "synthetic"})
        token = next(msg.resume_token for msg in messages if isinstance(msg, m.Ready))
        assert token
        for key in (tenant.key, other.key):
            status, body = await refused(f"{base}?resume_token={token}", key)
            assert status == 404 and b"resume_not_found" in body
        [summary] = summaries(messages)
        return summary.cost_micros

    cost = run_sync(scenario())
    # Refused resumes charge nothing: the tenant paid for its one session, the other for none.
    run_sync(assert_books_balance(nodes.dsn, nodes.redis_url, tenant.tenant_id,
                                  expected_usage=cost))
    untouched = run_sync(pg_state(nodes.dsn, other.tenant_id))
    assert (untouched.usage, untouched.events, untouched.balance) == (0, 0, FUNDED)
