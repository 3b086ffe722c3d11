"""Revoking an API key ends the live sessions opened with it (docs/protocol.md: `error`
`key_revoked`, close 4001) within `billing.key_cache_ttl_s`, and nothing is charged beyond the
audio served. Real server with billing on, real Redis and Postgres."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.billing.store import BillingStore
from tests.e2e.test_billing_e2e import (
    Billing,
    Live,
    Tenant,
    assert_books_balance,
    billing_server,
    cost,
)
from tests.e2e.test_telephony_e2e import Peer, log_line

pytestmark = pytest.mark.e2e
REVOCATION_REDIS_DB = 12
KEY_CACHE_TTL_S = 1.0
USAGE_INTERVAL_S = 0.5
# The documented bound (key_cache_ttl_s; a silent session at its next usage report), plus
# slack for a loaded test machine.
BOUND_S = KEY_CACHE_TTL_S + USAGE_INTERVAL_S + 3.0
TTS_PRICE_PER_1K = 2000


Revocation = Billing


@pytest.fixture(scope="module")
def revocation(redis_url: str, database_url: str) -> Iterator[Revocation]:
    with billing_server(
            redis_url, database_url, REVOCATION_REDIS_DB,
            billing__key_cache_ttl_s=KEY_CACHE_TTL_S,
            asr__session__usage_interval_s=USAGE_INTERVAL_S,
            tts__session__usage_interval_s=USAGE_INTERVAL_S,
            telephony__tts_model="synthetic") as env:
        status, body, _ = env.admin.call("PUT", "/admin/prices/synthetic/characters",
                                         {"micros_per_block": TTS_PRICE_PER_1K,
                                          "block_units": 1000})
        assert status == 200, body
        yield env
    assert not any("Traceback" in line for line in env.server.stderr_lines)


@pytest_asyncio.fixture
async def streaming(revocation: Revocation) -> AsyncIterator[tuple[Tenant, Live]]:
    """A funded tenant's ASR session streaming silence in real time until the server ends it."""
    tenant = revocation.admin.tenant(funded=1_000_000)
    live = await Live.open(revocation.server, tenant)
    sender = asyncio.create_task(live.send_audio(None, until=live.closed))
    try:
        await live.wait_for(lambda lv: len(lv.of("usage")) >= 1, 10)
        yield tenant, live
    finally:
        live.closed.set()
        await asyncio.gather(sender, return_exceptions=True)
        await live.aclose()


async def assert_ends_revoked(live: Live, since: float) -> float:
    await asyncio.wait_for(live.closed.wait(), BOUND_S + 5)
    took = time.monotonic() - since
    await live.aclose()
    assert live.close_code == 4001, (live.close_code, live.msgs[-3:])
    last = live.msgs[-1]
    assert last["type"] == "error" and last["code"] == "key_revoked", live.msgs[-3:]
    assert last["retryable"] is False
    return took


async def assert_charged_at_most_served(revocation: Revocation, tenant: Tenant,
                                        live: Live) -> None:
    pg = await assert_books_balance(revocation.dsn, revocation.redis_url, tenant.tenant_id)
    reported = max(u["billed_ms"] for u in live.of("usage"))
    # What was charged covers what the server reported as used, and never more than was sent.
    assert cost(reported) <= pg.usage <= cost(live.sent_ms), (pg.usage, reported, live.sent_ms)
    assert pg.balance == 1_000_000 - pg.usage


async def test_revoked_via_admin_api_ends_the_live_asr_session(
        revocation: Revocation, streaming: tuple[Tenant, Live]) -> None:
    tenant, live = streaming
    revoked_at = time.monotonic()
    await asyncio.to_thread(revocation.admin.revoke_key, tenant.key_id)
    took = await assert_ends_revoked(live, revoked_at)
    assert took < BOUND_S, took
    await assert_charged_at_most_served(revocation, tenant, live)


async def test_revoked_elsewhere_ends_the_session_within_the_key_cache_ttl(
        revocation: Revocation, streaming: tuple[Tenant, Live]) -> None:
    """Revoked on another node (straight in Postgres): this node's key watcher finds it."""
    tenant, live = streaming
    store = await BillingStore.connect(revocation.dsn, min_size=1, max_size=1)
    try:
        revoked_at = time.monotonic()
        assert await store.revoke_key(tenant.key_id)
    finally:
        await store.close()
    took = await assert_ends_revoked(live, revoked_at)
    assert took < BOUND_S, took
    await assert_charged_at_most_served(revocation, tenant, live)


async def test_silent_asr_session_ends_at_its_next_usage_report(
        revocation: Revocation) -> None:
    tenant = revocation.admin.tenant(funded=1_000_000)
    live = await Live.open(revocation.server, tenant)
    try:
        await live.send_audio(300)
        keep_alive = asyncio.create_task(_keepalive(live))  # idle timeout must not end it first
        revoked_at = time.monotonic()
        await asyncio.to_thread(revocation.admin.revoke_key, tenant.key_id)
        took = await assert_ends_revoked(live, revoked_at)
        keep_alive.cancel()
        await asyncio.gather(keep_alive, return_exceptions=True)
        assert took < BOUND_S, took
    finally:
        await live.aclose()
    pg = await assert_books_balance(revocation.dsn, revocation.redis_url, tenant.tenant_id)
    assert pg.usage == cost(300)


async def _keepalive(live: Live) -> None:
    while not live.closed.is_set():
        try:
            await live.ws.send(json.dumps({"type": "keepalive"}))
        except ConnectionClosed:
            return
        await asyncio.sleep(0.3)


TTS_TEXT = "Hello there. "


async def test_revoked_key_ends_a_tts_session(revocation: Revocation) -> None:
    srv, admin = revocation.server, revocation.admin
    tenant = admin.tenant(funded=1_000_000)
    msgs: list[dict[str, Any]] = []
    async with connect(f"{srv.ws}/v1/tts/stream?model=synthetic",
                       additional_headers=tenant.auth) as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready"
        await ws.send(json.dumps({"type": "text", "text": TTS_TEXT}))
        await ws.send(json.dumps({"type": "flush"}))
        revoked_at = time.monotonic()
        await asyncio.to_thread(admin.revoke_key, tenant.key_id)
        try:
            async with asyncio.timeout(BOUND_S + 5):
                async for msg in ws:
                    if isinstance(msg, str):
                        msgs.append(json.loads(msg))
                    else:  # audio: keep the credit flowing, as a listener does
                        await ws.send(json.dumps({"type": "credit", "bytes": len(msg)}))
        except ConnectionClosed:
            pass
        took = time.monotonic() - revoked_at
    assert ws.close_code == 4001, (ws.close_code, msgs[-3:])
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "key_revoked", msgs[-3:]
    assert took < BOUND_S, took
    pg = await assert_books_balance(revocation.dsn, revocation.redis_url, tenant.tenant_id)
    # At most the characters sent (synthesized or not); never a lease's worth.
    assert pg.usage <= -(-len(TTS_TEXT) * TTS_PRICE_PER_1K // 1000), pg.usage
    assert pg.balance == 1_000_000 - pg.usage


async def test_revoked_key_ends_a_telephony_call(revocation: Revocation) -> None:
    srv, admin = revocation.server, revocation.admin
    tenant = admin.tenant(funded=1_000_000)
    peer = await Peer.open(srv)
    try:
        await peer.start({"api_key": tenant.key})
        await peer.wait(lambda: peer.frames_sent >= 25)
        revoked_at = time.monotonic()
        await asyncio.to_thread(admin.revoke_key, tenant.key_id)
        await asyncio.wait_for(peer.ws.wait_closed(), BOUND_S + 5)
        took = time.monotonic() - revoked_at
    finally:
        await peer.close()
    assert peer.ws.close_code == 4001, peer.ws.close_code
    assert took < BOUND_S, took
    ended = await log_line(srv, "call ended", call_id=peer.call_sid)
    assert ended["reason"] == "key_revoked" and ended["close_code"] == 4001
    pg = await assert_books_balance(revocation.dsn, revocation.redis_url, tenant.tenant_id)
    assert pg.usage == ended["asr_cost_micros"] + ended["tts_cost_micros"]
    assert ended["asr_audio_ms"] <= peer.frames_sent * 20
