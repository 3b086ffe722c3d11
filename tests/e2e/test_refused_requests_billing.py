"""Refused requests cost nothing and count nowhere; every accepted telephony socket ends with
one `call ended` line (found by the hostile-input suite, tests/hostile).

A real billing server: an upgrade websockets refuses (CONNECT, Sec-WebSocket-Version 12, a bad
Sec-WebSocket-Key, no Upgrade header) with a valid key must leave usage_events, the wallet and
the key's rate limit as they were: the handshake is judged before admission reserves anything.
So must a `POST /v1/tts/synthesize` whose voice or language the engine does not have.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from websockets.asyncio.client import connect

from tests.e2e.conftest import ServerProcess
from tests.e2e.test_billing_e2e import (
    Billing,
    Tenant,
    billing_server,
    redis_state,
    wait_settled_and_flushed,
)

pytestmark = pytest.mark.e2e

REDIS_DB = 1  # a Redis logical database of this module alone
WS_PATHS = ("/v1/asr/stream", "/v1/tts/stream", "/v1/telephony/twilio")
ASR_QUERY = "?model=synthetic&encoding=pcm_s16le&sample_rate=16000"
TELEPHONY = "/v1/telephony/twilio"


@dataclass(frozen=True)
class Refusal:
    name: str
    method: str
    replace: dict[str, str | None]  # header -> new value (None: header left out)
    status: int


REFUSALS = (
    Refusal("CONNECT", "CONNECT", {}, 405),
    Refusal("version 12", "GET", {"Sec-WebSocket-Version": "12"}, 400),
    Refusal("bad key", "GET", {"Sec-WebSocket-Key": "not a base64 nonce"}, 400),
    Refusal("no Upgrade", "GET", {"Upgrade": None}, 426),
)


Env = Billing


@pytest.fixture(scope="module")
def env(redis_url: str, database_url: str) -> Iterator[Env]:
    with billing_server(redis_url, database_url, REDIS_DB, telephony__tts_model="synthetic",
                        telephony__start_timeout_s=1) as env:
        yield env


async def raw_upgrade(server: ServerProcess, path: str, method: str, key: str,
                      replace: dict[str, str | None]) -> tuple[int, dict[str, str], bytes]:
    headers: dict[str, str] = {
        "Host": f"127.0.0.1:{server.ws_port}", "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13", "Authorization": f"Bearer {key}",
    }
    for name, value in replace.items():
        if value is None:
            headers.pop(name)
        else:
            headers[name] = value
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ws_port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)  # a refusal closes the connection
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    got = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), got, body


async def assert_refused(env: Env, tenant: Tenant, path: str, refusal: Refusal) -> None:
    status, headers, body = await raw_upgrade(env.server, path, refusal.method, tenant.key,
                                              refusal.replace)
    case = f"{refusal.name} on {path}"
    assert status == refusal.status, (case, status, body)
    assert headers["content-type"] == "application/json", case
    assert json.loads(body)["error"]["code"] == "bad_request", (case, body)


async def test_refused_upgrades_with_a_valid_key_leave_the_books_unchanged(env: Env) -> None:
    tenant = env.admin.tenant(funded=1_000_000, requests_per_second=1000, burst=1000)
    pg_before, redis_before = await wait_settled_and_flushed(env.redis_url, env.dsn,
                                                             tenant.tenant_id)
    for path in WS_PATHS:
        for refusal in REFUSALS:
            await assert_refused(env, tenant, path, refusal)
    # Settled and flushed: no lease open, nothing in the usage stream, PostgreSQL up to date.
    pg, rs = await wait_settled_and_flushed(env.redis_url, env.dsn, tenant.tenant_id)
    assert pg.events == 0 and pg.events_by_id == {}, pg.events_by_id
    assert pg.balance == pg_before.balance == 1_000_000
    assert rs.spendable == redis_before.spendable
    logged = "\n".join(env.server.stderr_lines)
    assert "Traceback" not in logged and tenant.key not in logged


async def test_refused_upgrades_spend_no_rate_limit_token(env: Env) -> None:
    # One upgrade per second, no burst: a refused upgrade that spent the token would make the
    # next one a 429 (and the valid upgrade after them too).
    tenant = env.admin.tenant(funded=1_000_000, requests_per_second=1, burst=1)
    for refusal in REFUSALS:
        await assert_refused(env, tenant, "/v1/asr/stream" + ASR_QUERY, refusal)
    async with connect(env.server.ws + "/v1/asr/stream" + ASR_QUERY, open_timeout=10,
                       additional_headers=tenant.auth) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ready["type"] == "ready"


async def call_ended(server: ServerProcess, peer: str, timeout_s: float = 10.0
                     ) -> dict[str, object]:
    """The one `call ended` line of the socket from `peer`; a second one is an error."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [r for r in server.logs() if r.get("msg") == "call ended" and r.get("peer") == peer]
        if lines or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(lines) == 1, (peer, lines)
    return lines[0]


async def test_a_telephony_socket_closed_before_start_logs_its_call_ended(env: Env) -> None:
    """Key at the upgrade: the meters opened with the 101 are settled at no cost, and the line
    says so once they are (it names their session id)."""
    tenant = env.admin.tenant(funded=1_000_000)
    async with connect(env.server.ws + TELEPHONY, open_timeout=10,
                       additional_headers=tenant.auth) as ws:
        host, port = ws.local_address[:2]
    assert ws.close_code == 1000
    line = await call_ended(env.server, f"{host}:{port}")
    assert line["started"] is False and line["close_code"] == 1000, line
    assert line["reason"] == "socket closed" and line["tenant_id"] == tenant.tenant_id, line
    session_id = line["session_id"]
    assert isinstance(session_id, str) and session_id
    # Settled before the line was written: both leases released; the flusher then moves the
    # two zero-cost usage events to PostgreSQL.
    assert (await redis_state(env.redis_url, tenant.tenant_id)).leases == 0
    pg, _ = await wait_settled_and_flushed(env.redis_url, env.dsn, tenant.tenant_id)
    assert sorted(pg.events_by_id) == [f"{session_id}-tts:1", f"{session_id}:1"], pg
    assert pg.usage == 0 and pg.balance == 1_000_000


async def test_telephony_sockets_without_a_key_log_their_call_ended(env: Env) -> None:
    """No key at the upgrade: closed by the peer, or by us when no `start` came in time."""
    async with connect(env.server.ws + TELEPHONY, open_timeout=10) as ws:
        host, port = ws.local_address[:2]
    line = await call_ended(env.server, f"{host}:{port}")
    assert line["started"] is False and line["close_code"] == 1000, line
    assert "session_id" not in line and "tenant_id" not in line, line

    async with connect(env.server.ws + TELEPHONY, open_timeout=10) as ws:
        host, port = ws.local_address[:2]
        await asyncio.wait_for(ws.wait_closed(), 10)  # telephony.start_timeout_s = 1
    assert ws.close_code == 4001
    line = await call_ended(env.server, f"{host}:{port}")
    assert line["started"] is False and line["close_code"] == 4001, line
    assert line["reason"] == "unauthorized", line


def post_json(env: Env, path: str, body: object, tenant: Tenant) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(env.server.http + path, data=json.dumps(body).encode(),
                                 method="POST", headers={**tenant.auth,
                                                         "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("body", [
    {"text": "Hello.", "voice": "\u00ef"},  # the hostile suite's case
    {"text": "Hello.", "voice": "nonexistent"},
    {"text": "Hello.", "voice": "-v en"},  # never reaches espeak-ng's command line
    {"text": "Hello.", "model": "espeak-hi", "voice": "hi+nosuchvariant"},
])
async def test_synthesize_with_a_voice_the_engine_lacks_is_refused_before_any_lease(
        env: Env, body: dict[str, str]) -> None:
    tenant = env.admin.tenant(funded=1_000_000)
    status, answer = post_json(env, "/v1/tts/synthesize", body, tenant)
    assert status == 400, (status, answer)
    error = answer["error"]
    assert isinstance(error, dict) and error["code"] == "engine_error", answer
    assert "espeak-ng voice" in str(error["message"]), answer
    pg, rs = await wait_settled_and_flushed(env.redis_url, env.dsn, tenant.tenant_id)
    assert pg.events_by_id == {} and pg.balance == 1_000_000
    assert rs.spendable in (None, 1_000_000)  # None: Redis never had to load the wallet
