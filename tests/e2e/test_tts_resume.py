"""Resumable TTS sessions (issue 13 item 4, docs/protocol.md "Resuming a session"): two real
nodes share one Redis and one PostgreSQL; a `/v1/tts/stream` session cut off on one (drained,
or killed with SIGKILL while its audio waits for the client's credit) is resumed on the other
with `last_chunk_id`: every chunk's audio ends (`audio_done`) exactly once across the two
connections, the text buffered at the cut is spoken after it, and characters are charged once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server.infra.embedded import create_database, drop_database
from tests.e2e.conftest import start_server
from tests.e2e.test_asr_resume import Nodes, lease_units
from tests.e2e.test_billing_e2e import (
    Admin,
    Tenant,
    assert_books_balance,
    billing_env,
    cleanup_redis,
    run_sync,
    with_redis_db,
)

pytestmark = pytest.mark.e2e
REDIS_DB = 0  # test_asr_resume's: modules run one after another, each cleans up
SENTENCES = [f"Sentence number {n} is spoken here." for n in range(1, 7)]


@pytest.fixture
def tts_nodes(redis_url: str, database_url: str) -> Iterator[Nodes]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = run_sync(create_database(database_url, name))
    rurl = with_redis_db(redis_url, REDIS_DB)
    env = billing_env(rurl, dsn, server__drain_notice_s=0.2, server__drain_timeout_s=0.3,
                      tts__session__usage_interval_s=0.3, tts__models__synthetic__ms_per_char=10)
    a, b = start_server(env), start_server(env)
    admin = Admin(b.http)
    try:
        yield Nodes(a, b, admin, rurl, dsn)
    finally:
        for node in (a, b):
            with contextlib.suppress(Exception):
                node.stop()
        run_sync(cleanup_redis(rurl, admin.tenants, admin.key_ids))
        run_sync(drop_database(database_url, name))


class Listener:
    """A TTS client that plays what it gets: it grants credit for audio while `playing`."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.playing = True
        self.audio = 0

    @classmethod
    async def open(cls, url: str, tenant: Tenant) -> Listener:
        ws = await connect(url, additional_headers=tenant.auth, open_timeout=20,
                           max_size=2**22)
        return cls(ws)

    async def read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    self.audio += len(msg)
                    if self.playing:
                        with contextlib.suppress(ConnectionClosed):
                            await self.ws.send(json.dumps({"type": "credit",
                                                           "bytes": len(msg)}))
                else:
                    self.events.append(json.loads(msg))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            assert time.monotonic() < deadline, (kind, count, self.events, self.audio)
            await asyncio.sleep(0.02)

    async def say(self, text: str, *, flush: bool = False, close: bool = False) -> None:
        await self.ws.send(json.dumps({"type": "text", "text": text}))
        if flush:
            await self.ws.send(json.dumps({"type": "flush"}))
        if close:
            await self.ws.send(json.dumps({"type": "close"}))


def url(node_ws: str, **query: str) -> str:
    qs = "&".join(f"{k}={v}" for k, v in {"model": "synthetic", **query}.items())
    return f"{node_ws}/v1/tts/stream?{qs}"


def test_a_drained_tts_session_resumes_elsewhere_with_its_buffered_text(
        tts_nodes: Nodes) -> None:
    tenant = tts_nodes.admin.tenant(funded=50_000_000)
    head, tail = " ".join(SENTENCES[:3]), "and then the words after"

    async def scenario() -> tuple[Listener, Listener]:
        first = await Listener.open(url(tts_nodes.a.ws), tenant)
        reading = asyncio.create_task(first.read())
        await first.say(head + " ")
        await first.say(tail)  # no sentence end: buffered when the node drains
        await first.wait_for("audio_done", 2)
        tts_nodes.a.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await reading
        [ready] = first.of("ready")
        last = first.of("audio_done")[-1]["chunk_id"]
        second = await Listener.open(url(tts_nodes.b.ws, resume_token=ready["resume_token"],
                                         last_chunk_id=str(last)), tenant)
        reading = asyncio.create_task(second.read())
        await second.say(" and the end.", flush=True, close=True)
        async with asyncio.timeout(20):
            await reading
        return first, second

    first, second = run_sync(scenario())
    assert tts_nodes.a.proc.wait(15) == 0
    assert first.ws.close_code == 1001 and first.of("error")[-1]["code"] == "draining"
    assert first.of("error")[-1]["resume_token"] == first.of("ready")[0]["resume_token"]
    assert second.ws.close_code == 1000 and second.of("ready")[0]["resumed"] is True
    assert second.of("ready")[0]["session_id"] == first.of("ready")[0]["session_id"]
    done = first.of("audio_done") + second.of("audio_done")
    assert [d["chunk_id"] for d in done] == list(range(1, len(done) + 1))  # each once
    assert second.of("audio_done")  # the buffered text was carried over and spoken there
    spoken = " ".join(d["text"] for d in done)
    assert spoken == f"{head} {tail} and the end."
    chars = sum(len(d["text"]) for d in done)
    [s1], [s2] = first.of("summary"), second.of("summary")
    assert s1["characters"] + s2["characters"] == chars  # charged once, across both nodes
    run_sync(assert_books_balance(tts_nodes.dsn, tts_nodes.redis_url, tenant.tenant_id,
                                  expected_usage=s1["cost_micros"] + s2["cost_micros"]))


def test_a_tts_session_on_a_killed_node_resumes_never_charged_twice(
        tts_nodes: Nodes) -> None:
    tenant = tts_nodes.admin.tenant(funded=50_000_000)
    text = " ".join(SENTENCES)

    async def scenario() -> tuple[Listener, Listener, float]:
        first = await Listener.open(url(tts_nodes.a.ws, sample_rate="8000"), tenant)
        first.playing = False  # the first credit window only: the rest waits on the server
        reading = asyncio.create_task(first.read())
        await first.say(text, flush=True)
        await first.wait_for("audio_done", 1)
        await asyncio.sleep(0.8)  # a usage report and a resume point pass
        tts_nodes.a.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        async with asyncio.timeout(20):
            await reading
        [ready] = first.of("ready")
        last = first.of("audio_done")[-1]["chunk_id"]
        second = await Listener.open(url(tts_nodes.b.ws, resume_token=ready["resume_token"],
                                         last_chunk_id=str(last)), tenant)
        reading = asyncio.create_task(second.read())
        await second.ws.send(json.dumps({"type": "close"}))
        async with asyncio.timeout(30):
            await reading
        return first, second, killed

    first, second, _ = run_sync(scenario())
    assert second.ws.close_code == 1000 and second.of("ready")[0]["resumed"] is True
    done = first.of("audio_done") + second.of("audio_done")
    assert [d["chunk_id"] for d in done] == list(range(1, len(SENTENCES) + 1))
    assert [d["text"] for d in done] == SENTENCES  # every sentence spoken, none twice
    total = sum(len(s) for s in SENTENCES)
    charged_a = run_sync(lease_units(tts_nodes.redis_url, tts_nodes.dsn, tenant.tenant_id,
                                     first.of("ready")[0]["session_id"]))
    [summary] = second.of("summary")
    billed = charged_a + summary["characters"]
    assert billed <= total  # never twice: what A charged, B did not charge again
    # Short at most by what A charged after its last usage report (0.3 s here): one chunk.
    assert billed >= total - max(len(s) for s in SENTENCES), (charged_a, summary, total)
