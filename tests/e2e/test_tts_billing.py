"""TTS with billing on (issue 11, item 3): characters are charged per chunk as the engine
synthesizes it, the lease is topped up between chunks, so one long `text` message never ends a
funded session; what is charged is what was synthesized. Real `streamgate serve`, real Redis
and PostgreSQL, real sockets (docs/billing.md, "Sessions")."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import ServerProcess
from tests.e2e.test_billing_e2e import (
    Billing,
    Tenant,
    assert_books_balance,
    billing_server,
)

pytestmark = pytest.mark.e2e
TTS_REDIS_DB = 7  # a Redis logical database of this module alone (see test_billing_e2e.py)
PRICE_PER_1K_CHARS = 1000  # [tts.models.synthetic] price_micros_per_1k_chars
LEASE_CHARS = 2000  # [billing] lease_chars
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today. "
LONG_TEXT = (SENTENCE * (15_000 // len(SENTENCE) + 1))[:15_000]


def char_cost(chars: int) -> int:
    return -(-chars * PRICE_PER_1K_CHARS // 1000)


@pytest.fixture(scope="module")
def tts_billing(redis_url: str, database_url: str) -> Iterator[Billing]:
    """A billing server whose synthetic voice makes 1 ms of audio per character (15,000
    characters are 15 s of audio, not 15 minutes) and reports TTS usage every 0.5 s."""
    with billing_server(redis_url, database_url, TTS_REDIS_DB,
                        tts__models__synthetic__ms_per_char=1,
                        tts__session__usage_interval_s=0.5) as env:
        yield env


async def speak(server: ServerProcess, tenant: Tenant, text: str
                ) -> tuple[list[dict[str, Any]], int, int | None]:
    """One `text` message, `flush`, `close`, granting credit for all audio: (events, audio
    bytes, close code)."""
    events: list[dict[str, Any]] = []
    audio = 0
    ws: ClientConnection
    async with connect(f"{server.ws}/v1/tts/stream?model=synthetic&sample_rate=8000",
                       additional_headers=tenant.auth, open_timeout=20,
                       max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "text", "text": text}))
        await ws.send(json.dumps({"type": "flush"}))
        await ws.send(json.dumps({"type": "close"}))
        try:
            async with asyncio.timeout(60):
                async for msg in ws:
                    if isinstance(msg, bytes):
                        audio += len(msg)
                        # The server may have closed already: what it sent before its close
                        # (the error) is still to be read, so a refused credit ends nothing.
                        with contextlib.suppress(ConnectionClosed):
                            await ws.send(json.dumps({"type": "credit", "bytes": len(msg)}))
                    else:
                        events.append(json.loads(msg))
        except ConnectionClosed:
            pass
    return events, audio, ws.close_code


async def charged_units(dsn: str, tenant_id: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT coalesce(sum(units), 0) AS units, coalesce(sum(cost_micros), 0) AS cost"
            " FROM usage_events WHERE tenant_id = $1 AND unit = 'characters'", tenant_id)
    finally:
        await conn.close()
    assert row is not None
    return int(row["units"]), int(row["cost"])


async def synthesized_in_log(server: ServerProcess, session_id: str) -> int:
    """The characters the server synthesized, from its "session ended" line (written once
    the session settled: shortly after the client saw the close)."""
    async with asyncio.timeout(10):
        while True:
            ended = [e for e in server.logs()
                     if e.get("msg") == "session ended" and e.get("session_id") == session_id]
            if ended:
                assert len(ended) == 1, ended
                return int(str(ended[0]["characters"]))
            await asyncio.sleep(0.05)


async def test_one_long_text_on_a_funded_tenant_is_spoken_and_charged_as_synthesized(
    tts_billing: Billing,
) -> None:
    """15,000 characters in one message: 7.5 leases of 2,000. Before the fix the whole text was
    metered at once: 4002 within milliseconds, no audio, 4,000 characters charged."""
    tenant = tts_billing.admin.tenant(funded=99_900_000)
    events, audio, close_code = await speak(tts_billing.server, tenant, LONG_TEXT)
    errors = [e for e in events if e["type"] == "error"]
    assert not errors, errors
    assert close_code == 1000
    done = [e for e in events if e["type"] == "audio_done"]
    spoken = sum(len(d["text"]) for d in done)
    assert len(done) > LONG_TEXT.count(". ") // 5  # many chunks, every one answered
    assert 14_000 < spoken <= 15_000  # whitespace between chunks is not billed
    summary = events[-1]
    assert summary["type"] == "summary"
    assert summary["characters"] == spoken
    assert audio >= spoken * 8 * 2 * 0.9  # ~1 ms of 8 kHz PCM16 per character
    assert summary["cost_micros"] == char_cost(spoken)
    session_id = str(events[0]["session_id"])
    assert await synthesized_in_log(tts_billing.server, session_id) == spoken
    await assert_books_balance(tts_billing.dsn, tts_billing.redis_url, tenant.tenant_id,
                               expected_usage=char_cost(spoken))
    assert await charged_units(tts_billing.dsn, tenant.tenant_id) == (spoken, char_cost(spoken))


async def test_a_wallet_running_dry_mid_text_ends_4002_charging_at_most_what_was_synthesized(
    tts_billing: Billing,
) -> None:
    funded = char_cost(5_000)  # a third of the text
    tenant = tts_billing.admin.tenant(funded=funded)
    events, audio, close_code = await speak(tts_billing.server, tenant, LONG_TEXT)
    assert close_code == 4002
    errors = [e for e in events if e["type"] == "error"]
    assert errors and errors[-1]["code"] == "insufficient_balance", events[-3:]
    assert audio > 0
    session_id = str(events[0]["session_id"])
    synthesized = await synthesized_in_log(tts_billing.server, session_id)
    assert 0 < synthesized < len(LONG_TEXT)
    pg = await assert_books_balance(tts_billing.dsn, tts_billing.redis_url, tenant.tenant_id,
                                    check_reconcile=False)
    units, cost = await charged_units(tts_billing.dsn, tenant.tenant_id)
    assert units <= synthesized and cost <= char_cost(synthesized)
    assert cost == pg.usage <= funded and pg.balance >= 0
    # The wallet paid for nearly all it held: cut off at a chunk boundary, not up front.
    assert units >= 5_000 - 400, (units, synthesized)
