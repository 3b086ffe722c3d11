"""End-to-end billing: real `streamgate serve` processes with billing on, real Redis and Postgres,
real WebSocket and HTTP sockets (docs/billing.md, docs/protocol.md "Metering and billing").

Isolation: every server process gets a database of its own, and a Redis logical database of its
own (the `/N` of the URL), so the flusher, the sweeper and reconcile of one server see only the
tenants of its tests (`sg:tenants` is per logical database). Tenant ids are unique per test.
The helpers here are reused by tests/faults.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.billing import keys
from server.billing.reconcile import ReconcileReport, reconcile
from server.billing.store import BillingStore
from server.infra.embedded import create_database, drop_database
from tests.e2e.conftest import ServerProcess, silence, start_server
from tests.e2e.test_asr_stream import recv_json, url

pytestmark = pytest.mark.e2e
T = TypeVar("T")

ADMIN_TOKEN = "admin_e2e_token"
PRICE_PER_MIN = 1000  # [asr.models.synthetic] price_micros_per_minute in config/default.toml
E2E_REDIS_DB = 3  # the module server's Redis logical database
CONCURRENCY_REDIS_DB = 4
FAST_REDIS_DB = 5


def cost(audio_ms: int) -> int:
    """docs/billing.md, Pricing: ceil(u * micros_per_block / block_units), 60000 ms blocks."""
    return -(-audio_ms * PRICE_PER_MIN // 60_000)


def run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine to completion from synchronous code, on a loop of its own (a thread, so
    it never meets the loop of a running test)."""
    async def main() -> T:
        return await coro

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def with_redis_db(redis_url: str, db: int) -> str:
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def billing_env(redis_url: str, database_url: str, **extra: Any) -> dict[str, str]:
    """Environment of a billing-enabled server; `extra` as section__key=value, e.g.
    billing__lease_s=6 -> STREAMGATE_BILLING__LEASE_S=6."""
    env = {
        "STREAMGATE_BILLING__ENABLED": "true",
        "STREAMGATE_BILLING__REDIS_URL": redis_url,
        "STREAMGATE_BILLING__DATABASE_URL": database_url,
        "STREAMGATE_BILLING__ADMIN_TOKEN": ADMIN_TOKEN,
        "STREAMGATE_BILLING__DEV_TENANT": "false",
        "STREAMGATE_ASR__SESSION__USAGE_INTERVAL_S": "0.5",
        "STREAMGATE_BILLING__SWEEP_INTERVAL_S": "0.5",
        "STREAMGATE_BILLING__KEY_CACHE_TTL_S": "0.5",
    }
    for name, value in extra.items():
        env[f"STREAMGATE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) \
            else str(value)
    return env


# --- admin API ---------------------------------------------------------------------------------


@dataclass
class Tenant:
    tenant_id: str
    key_id: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class Admin:
    """The HTTP admin API of one server (bearer admin token). Remembers what it created so the
    test can clean Redis up afterwards."""

    base: str
    token: str = ADMIN_TOKEN
    tenants: list[str] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None, dict(exc.headers)

    def create_tenant(self, prefix: str = "t", **limits: int) -> str:
        tenant_id = f"{prefix}-{uuid.uuid4().hex[:16]}"
        status, body, _ = self.call("POST", "/admin/tenants",
                                    {"name": tenant_id, "tenant_id": tenant_id, **limits})
        assert status == 201, body
        self.tenants.append(tenant_id)
        return tenant_id

    def issue_key(self, tenant_id: str) -> tuple[str, str]:
        status, body, _ = self.call("POST", f"/admin/tenants/{tenant_id}/keys")
        assert status == 201, body
        self.key_ids.append(body["key_id"])
        return body["key_id"], body["api_key"]

    def revoke_key(self, key_id: str) -> None:
        status, body, _ = self.call("DELETE", f"/admin/keys/{key_id}")
        assert status == 200 and body["revoked"], body

    def topup(self, tenant_id: str, amount: int, idempotency_key: str | None = None
              ) -> tuple[int, Any]:
        key = idempotency_key or f"topup-{uuid.uuid4().hex}"
        status, body, _ = self.call("POST", f"/admin/tenants/{tenant_id}/topups",
                                    {"amount_micros": amount}, {"Idempotency-Key": key})
        return status, body

    def tenant(self, funded: int = 0, prefix: str = "t", **limits: int) -> Tenant:
        tenant_id = self.create_tenant(prefix, **limits)
        key_id, key = self.issue_key(tenant_id)
        if funded:
            status, body = self.topup(tenant_id, funded, f"initial-{tenant_id}")
            assert status == 201, body
        return Tenant(tenant_id, key_id, key)

    def balance(self, tenant_id: str) -> dict[str, Any]:
        status, body, _ = self.call("GET", f"/admin/tenants/{tenant_id}/balance")
        assert status == 200, body
        return dict(body)

    def usage_cost(self, tenant_id: str) -> int:
        status, body, _ = self.call("GET", f"/admin/tenants/{tenant_id}/usage")
        assert status == 200, body
        return sum(int(row["cost_micros"]) for row in body["usage"])

    def reconcile(self) -> tuple[int, Any]:
        status, body, _ = self.call("GET", "/admin/reconcile")
        return status, body


async def cleanup_redis(redis_url: str, tenants: list[str], key_ids: list[str]) -> None:
    r = aioredis.from_url(redis_url)
    try:
        for tenant in tenants:
            doomed = [k async for k in r.scan_iter(match=keys.tenant_pattern(tenant))]
            if doomed:
                await r.delete(*doomed)
            await r.srem(keys.TENANTS_SET, tenant)
        if key_ids:
            await r.delete(*[keys.gcra_key(k) for k in key_ids])
    finally:
        await r.aclose()


# --- sessions ----------------------------------------------------------------------------------


def rejection(exc: InvalidStatus) -> tuple[int, dict[str, Any], str | None]:
    body = json.loads(exc.response.body or b"{}")
    return exc.response.status_code, body, exc.response.headers.get("Retry-After")


async def try_open(server: ServerProcess, headers: dict[str, str], **params: Any
                   ) -> tuple[int, dict[str, Any], str | None]:
    """Open and at once close a session: (101, ready, None) or (status, error body, Retry-After)."""
    try:
        async with connect(url(server, **params), additional_headers=headers,
                           open_timeout=20) as ws:
            ready = await recv_json(ws)
            assert ready["type"] == "ready", ready
            return 101, ready, None
    except InvalidStatus as exc:
        return rejection(exc)


class Live:
    """An open session with a reader task: collects every message and the credit it grants."""

    def __init__(self, ws: ClientConnection, ready: dict[str, Any]) -> None:
        self.ws = ws
        self.ready = ready
        self.msgs: list[dict[str, Any]] = [ready]
        self.credit = int(ready["credit_bytes"])
        self.sent_ms = 0
        self.closed = asyncio.Event()
        self._more = asyncio.Event()
        self._changed = asyncio.Event()  # set on every message and at the end
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, server: ServerProcess, tenant: Tenant, **params: Any) -> Live:
        ws = await connect(url(server, **params), additional_headers=tenant.auth,
                           open_timeout=20)
        try:
            ready = await recv_json(ws)
        except BaseException:
            await ws.close()
            raise
        assert ready["type"] == "ready", ready
        return cls(ws, ready)

    @property
    def session_id(self) -> str:
        return str(self.ready["session_id"])

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.msgs if m["type"] == type_]

    @property
    def summary(self) -> dict[str, Any] | None:
        found = self.of("summary")
        return found[-1] if found else None

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, str):
                    m = json.loads(msg)
                    self.msgs.append(m)
                    self._changed.set()
                    if m["type"] == "credit":
                        self.credit += int(m["bytes"])
                        self._more.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._more.set()
            self._changed.set()

    async def send_audio(self, ms: float | None, *, speed: float = 1.0, chunk_ms: int = 100,
                         until: asyncio.Event | None = None) -> int:
        """Send `ms` of audio (None: until `until` is set) at `speed` x real time, within the
        credit granted; stops early if the server closes. Returns the ms sent."""
        chunk = silence(chunk_ms)
        loop = asyncio.get_running_loop()
        t0, sent = loop.time(), 0
        while (ms is None or sent < ms) and not (until is not None and until.is_set()):
            while self.credit < len(chunk) and not self.closed.is_set():
                self._more.clear()
                if self.credit >= len(chunk):
                    break
                await asyncio.wait_for(self._more.wait(), 15)
            if self.closed.is_set():
                break
            try:
                await self.ws.send(chunk)
            except ConnectionClosed:
                break
            self.credit -= len(chunk)
            sent += chunk_ms
            self.sent_ms += chunk_ms
            delay = t0 + sent / 1000 / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        return sent

    async def wait_for(self, predicate: Callable[[Live], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                if self.closed.is_set():
                    raise AssertionError(f"session closed first: {self.msgs[-3:]}")
                await self._changed.wait()

    async def wait_closed(self, timeout: float = 15.0) -> None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        await self.aclose()

    async def close(self, timeout: float = 15.0) -> dict[str, Any]:
        """Client `close`: finals, `summary`, close 1000. Returns the summary."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps({"type": "close"}))
        await self.wait_closed(timeout)
        summary = self.summary
        assert summary is not None, self.msgs[-5:]
        assert self.close_code == 1000, (self.close_code, self.msgs[-3:])
        return summary

    async def aclose(self) -> None:
        """Release everything (idempotent): the reader task and the connection."""
        if not self._reader.done():
            self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        with contextlib.suppress(Exception):
            await self.ws.close()


# --- Postgres and Redis checks ---------------------------------------------------------------


@dataclass
class PgState:
    topups: int
    usage: int
    balance: int
    events: int
    duplicate_events: list[Any]
    ledger_mismatches: list[Any]  # usage events without exactly one matching ledger entry
    events_by_id: dict[str, int]  # event_id -> cost
    sources: list[str]


async def pg_state(dsn: str, tenant: str) -> PgState:
    conn = await asyncpg.connect(dsn)
    try:
        topups = await conn.fetchval(
            "SELECT coalesce(sum(amount_micros), 0) FROM topups WHERE tenant_id = $1", tenant)
        rows = await conn.fetch(
            "SELECT event_id, cost_micros, source FROM usage_events WHERE tenant_id = $1", tenant)
        balance = await conn.fetchval(
            "SELECT balance_micros FROM wallets WHERE tenant_id = $1", tenant)
        dups = await conn.fetch(
            "SELECT event_id, count(*) FROM usage_events WHERE tenant_id = $1"
            " GROUP BY event_id HAVING count(*) > 1", tenant)
        mismatches = await conn.fetch(
            "SELECT u.event_id, count(l.entry_id) AS n FROM usage_events u"
            " LEFT JOIN ledger_entries l ON l.tenant_id = u.tenant_id AND l.kind = 'usage'"
            "  AND l.ref = u.event_id AND l.amount_micros = -u.cost_micros"
            " WHERE u.tenant_id = $1 GROUP BY u.event_id HAVING count(l.entry_id) <> 1", tenant)
    finally:
        await conn.close()
    return PgState(
        topups=int(topups), usage=sum(int(r["cost_micros"]) for r in rows), balance=int(balance),
        events=len(rows), duplicate_events=[tuple(r) for r in dups],
        ledger_mismatches=[tuple(r) for r in mismatches],
        events_by_id={str(r["event_id"]): int(r["cost_micros"]) for r in rows},
        sources=[str(r["source"]) for r in rows],
    )


@dataclass
class RedisState:
    spendable: int | None
    leases: int
    stream_len: int
    pending: int


async def redis_state(redis_url: str, tenant: str) -> RedisState:
    r = aioredis.from_url(redis_url)
    try:
        spendable = await r.hget(keys.wallet_key(tenant), "spendable")
        leases = await r.zcard(keys.leases_key(tenant))
        stream = keys.usage_stream(tenant)
        stream_len = await r.xlen(stream)
        pending = 0
        if await r.exists(stream):
            with contextlib.suppress(ResponseError):  # no group yet
                pending = int((await r.xpending(stream, keys.FLUSHER_GROUP))["pending"])
    finally:
        await r.aclose()
    return RedisState(None if spendable is None else int(spendable), int(leases),
                      int(stream_len), pending)


async def wait_settled_and_flushed(redis_url: str, dsn: str, tenant: str, *,
                                   expected_usage: int | None = None,
                                   timeout: float = 20.0) -> tuple[PgState, RedisState]:
    """Poll until no lease is open, the usage stream is empty (the flusher deletes what it
    acknowledged) and, if given, Postgres has `expected_usage`."""
    deadline = time.monotonic() + timeout
    while True:
        rs = await redis_state(redis_url, tenant)
        pg = await pg_state(dsn, tenant)
        done = (rs.leases == 0 and rs.stream_len == 0 and rs.pending == 0
                and (expected_usage is None or pg.usage == expected_usage))
        if done:
            return pg, rs
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled/flushed in {timeout} s: {rs}, PG usage {pg.usage}"
                                 f" (expected {expected_usage})")
        await asyncio.sleep(0.2)


async def reconcile_report(dsn: str, redis_url: str) -> ReconcileReport:
    store = await BillingStore.connect(dsn, min_size=1, max_size=2)
    r = aioredis.from_url(redis_url)
    try:
        return await reconcile(store, r)
    finally:
        await r.aclose()
        await store.close()


async def assert_books_balance(dsn: str, redis_url: str, tenant: str,
                               expected_usage: int | None = None, *,
                               check_reconcile: bool = True, timeout: float = 20.0) -> PgState:
    """After everything settled and flushed: the ledger adds up, every event charged once,
    Redis spendable == Postgres balance, reconcile finds nothing."""
    pg, rs = await wait_settled_and_flushed(redis_url, dsn, tenant,
                                            expected_usage=expected_usage, timeout=timeout)
    assert pg.topups - pg.usage == pg.balance
    assert pg.duplicate_events == [] and pg.ledger_mismatches == []
    assert rs.spendable == pg.balance, (rs, pg.balance)
    if check_reconcile:
        report = await reconcile_report(dsn, redis_url)
        assert report.ok, report.render()
    return pg


# --- the module's server -----------------------------------------------------------------------


@dataclass
class Billing:
    server: ServerProcess
    admin: Admin
    redis_url: str
    dsn: str


@contextlib.contextmanager
def billing_server(redis_url: str, database_url: str, redis_db: int,
                   **extra: Any) -> Iterator[Billing]:
    """A billing-enabled server on a database and a Redis logical database of its own (`extra`
    as for billing_env); on exit it is stopped (exit 0 asserted: no leaked task), the tenants'
    Redis keys deleted and the database dropped."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = run_sync(create_database(database_url, name))
    rurl = with_redis_db(redis_url, redis_db)
    srv = start_server(billing_env(rurl, dsn, **extra))
    admin = Admin(srv.http)
    code: int | None = None
    try:
        yield Billing(srv, admin, rurl, dsn)
    finally:
        try:
            code = srv.stop()
        finally:
            run_sync(cleanup_redis(rurl, admin.tenants, admin.key_ids))
            run_sync(drop_database(database_url, name))
    tail = "\n".join(srv.stderr_lines[-40:])
    assert code == 0, f"server exited with {code}:\n{tail}"


@pytest.fixture(scope="module")
def billing(redis_url: str, database_url: str) -> Iterator[Billing]:
    """One billing-enabled server for the module."""
    with billing_server(redis_url, database_url, E2E_REDIS_DB) as env:
        yield env


# --- authentication ------------------------------------------------------------------------------


async def test_no_key_wrong_key_and_revoked_key_are_401(billing: Billing) -> None:
    srv, admin = billing.server, billing.admin
    tenant = admin.tenant(funded=1_000_000)
    for headers in ({}, {"Authorization": "Bearer sg_not-a-key"}):
        status, body, _ = await try_open(srv, headers)
        assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, ready, _ = await try_open(srv, tenant.auth)
    assert status == 101 and ready["session_id"]
    admin.revoke_key(tenant.key_id)
    revoked_at = time.monotonic()
    while True:  # key_cache_ttl_s = 0.5: refused within that (plus slack for the test)
        status, body, _ = await try_open(srv, tenant.auth)
        if status == 401:
            break
        assert status == 101
        assert time.monotonic() - revoked_at < 3.0, "revoked key still accepted"
        await asyncio.sleep(0.1)
    assert body["error"]["code"] == "unauthorized"
    assert time.monotonic() - revoked_at < 3.0


# --- money ---------------------------------------------------------------------------------------


async def test_funded_session_is_charged_exactly_its_usage(billing: Billing) -> None:
    admin = billing.admin
    funded = 1_000_000
    tenant = admin.tenant(funded=funded)
    live = await Live.open(billing.server, tenant)
    try:
        await live.send_audio(3000, speed=2.0)
        summary = await live.close()
    finally:
        await live.aclose()
    assert summary["audio_ms"] == 3000 and summary["billed_ms"] == 3000
    assert summary["cost_micros"] == cost(3000)
    usage = live.of("usage")
    assert len(usage) >= 2, live.msgs
    assert usage[-1]["cost_micros"] > 0
    for u in usage:
        # The whole wallet minus what this (only) session used so far.
        assert isinstance(u["balance_micros"], int)
        assert u["balance_micros"] == funded - u["cost_micros"], u
        assert u["cost_micros"] == cost(u["billed_ms"])
    pg = await assert_books_balance(billing.dsn, billing.redis_url, tenant.tenant_id,
                                    expected_usage=summary["cost_micros"])
    assert pg.balance == funded - summary["cost_micros"]
    assert all(e.startswith(live.session_id + ":") for e in pg.events_by_id)
    assert admin.usage_cost(tenant.tenant_id) == summary["cost_micros"]
    bal = admin.balance(tenant.tenant_id)
    assert bal["balance_micros"] == bal["spendable_micros"] == funded - summary["cost_micros"]
    status, body = admin.reconcile()
    assert status == 200 and body["ok"], body


async def test_empty_wallet_is_402(billing: Billing) -> None:
    tenant = billing.admin.tenant(funded=0)
    status, body, _ = await try_open(billing.server, tenant.auth)
    assert status == 402
    assert body["error"]["code"] == "insufficient_balance" and body["error"]["message"]


async def test_topup_reaches_the_cache_without_restart(billing: Billing) -> None:
    admin = billing.admin
    tenant = admin.tenant(funded=0)
    status, _, _ = await try_open(billing.server, tenant.auth)
    assert status == 402  # the wallet cache now exists, at 0
    assert admin.balance(tenant.tenant_id)["spendable_micros"] == 0
    st, body = admin.topup(tenant.tenant_id, 50_000)
    assert st == 201 and body["created"], body
    assert admin.balance(tenant.tenant_id)["spendable_micros"] == 50_000
    status, ready, _ = await try_open(billing.server, tenant.auth)
    assert status == 101 and ready["type"] == "ready"
    await assert_books_balance(billing.dsn, billing.redis_url, tenant.tenant_id)


async def test_topup_retried_with_the_same_idempotency_key_credits_once(billing: Billing) -> None:
    admin = billing.admin
    tenant = admin.tenant(funded=0)
    assert (await try_open(billing.server, tenant.auth))[0] == 402  # seed the cache at 0
    first = admin.topup(tenant.tenant_id, 7_000, "pay-42")
    again = admin.topup(tenant.tenant_id, 7_000, "pay-42")
    assert first[0] == 201 and first[1]["created"] is True
    assert again[0] == 200 and again[1]["created"] is False
    assert again[1]["topup_id"] == first[1]["topup_id"]
    conflict = admin.topup(tenant.tenant_id, 8_000, "pay-42")
    assert conflict[0] == 409 and conflict[1]["error"]["code"] == "idempotency_conflict"
    bal = admin.balance(tenant.tenant_id)
    assert bal["balance_micros"] == bal["spendable_micros"] == 7_000
    pg = await pg_state(billing.dsn, tenant.tenant_id)
    assert pg.topups == pg.balance == 7_000
    await assert_books_balance(billing.dsn, billing.redis_url, tenant.tenant_id)


async def _run_dry(billing: Billing, funded: int, chunk_ms: int) -> tuple[Tenant, Live]:
    tenant = billing.admin.tenant(funded=funded)
    live = await Live.open(billing.server, tenant)
    try:
        await live.send_audio(20_000, speed=4.0, chunk_ms=chunk_ms)
        await live.wait_closed()
    finally:
        await live.aclose()
    return tenant, live


async def test_balance_low_then_insufficient_balance_closes_4002(billing: Billing) -> None:
    """100 micros = 6 s of audio: streamed at 4x real time the wallet runs dry in ~1.5 s, after
    a few usage reports. low_balance_s (60 s) is above the whole wallet: the first report warns."""
    funded = cost(6000)
    tenant, live = await _run_dry(billing, funded, chunk_ms=100)
    types = [m["type"] for m in live.msgs]
    warnings = [i for i, m in enumerate(live.msgs)
                if m["type"] == "warning" and m["code"] == "balance_low"]
    errors = [i for i, m in enumerate(live.msgs) if m["type"] == "error"]
    assert warnings, types
    assert errors and live.msgs[errors[-1]]["code"] == "insufficient_balance", live.msgs[-3:]
    assert warnings[0] < errors[-1]
    assert live.close_code == 4002
    assert 6000 <= live.sent_ms < 20_000  # it was cut off once the wallet was used up
    # Charged up to the grant, never past it (test below), and the books add up.
    pg = await assert_books_balance(billing.dsn, billing.redis_url, tenant.tenant_id)
    assert funded - cost(100) <= pg.usage <= funded


async def test_running_dry_never_charges_beyond_balance_plus_overdraft(billing: Billing) -> None:
    """450 ms frames: 13 frames (5850 ms, 98 micros) fit a 100 micros wallet, the 14th crosses
    it in one ingest batch, so no usage report can catch the wallet at exactly zero first."""
    funded = cost(6000)
    tenant, live = await _run_dry(billing, funded, chunk_ms=450)
    assert live.close_code == 4002
    pg = await assert_books_balance(billing.dsn, billing.redis_url, tenant.tenant_id,
                                    check_reconcile=False)
    assert pg.usage <= funded and pg.balance >= 0, (pg.usage, pg.balance)
    report = await reconcile_report(billing.dsn, billing.redis_url)
    assert report.ok, report.render()


async def test_a_funded_session_faster_than_real_time_is_not_cut_off(
    redis_url: str, fresh_database: str,
) -> None:
    """A 2 s lease and reports every 0.5 s; the client streams at 20x real time (10 s of audio
    per report interval) with a wallet worth ~16 hours of audio."""
    rurl = with_redis_db(redis_url, FAST_REDIS_DB)
    srv = start_server(billing_env(rurl, fresh_database, billing__lease_s=2,
                                   billing__min_lease_s=1))
    admin = Admin(srv.http)
    try:
        tenant = admin.tenant(funded=1_000_000)
        live = await Live.open(srv, tenant)
        try:
            await live.send_audio(20_000, speed=20.0)
            assert not live.closed.is_set(), (live.close_code, live.msgs[-2:])
            summary = await live.close()
        finally:
            await live.aclose()
        assert summary["audio_ms"] == 20_000
        assert not [m for m in live.msgs if m["type"] == "error"]
        await assert_books_balance(fresh_database, rurl, tenant.tenant_id,
                                   expected_usage=summary["cost_micros"])
    finally:
        code = srv.stop()
        await cleanup_redis(rurl, admin.tenants, admin.key_ids)
    assert code == 0, "\n".join(srv.stderr_lines[-40:])


# --- rate limits ---------------------------------------------------------------------------------


async def test_upgrades_faster_than_the_key_rate_get_429_with_retry_after(
    billing: Billing,
) -> None:
    tenant = billing.admin.tenant(funded=1_000_000, requests_per_second=1, burst=2)
    results = [await try_open(billing.server, tenant.auth) for _ in range(4)]
    statuses = [r[0] for r in results]
    assert statuses[:2] == [101, 101], statuses
    limited = [r for r in results if r[0] == 429]
    assert limited, statuses
    _, body, retry_after = limited[0]
    assert body["error"]["code"] == "rate_limited"
    assert retry_after is not None and int(retry_after) >= 1
    await asyncio.sleep(int(retry_after))
    assert (await try_open(billing.server, tenant.auth))[0] == 101


async def test_concurrent_session_limit_is_429(billing: Billing) -> None:
    tenant = billing.admin.tenant(funded=1_000_000, max_concurrent_sessions=2)
    first = await Live.open(billing.server, tenant)
    second = await Live.open(billing.server, tenant)
    try:
        status, body, retry_after = await try_open(billing.server, tenant.auth)
        assert status == 429 and body["error"]["code"] == "rate_limited", body
        assert retry_after is not None and int(retry_after) >= 1
        await first.close()
        # The slot is released once the closed session settled.
        deadline = time.monotonic() + 5
        while (status := (await try_open(billing.server, tenant.auth))[0]) == 429:
            assert time.monotonic() < deadline, "slot not released"
            await asyncio.sleep(0.1)
        assert status == 101
        await second.close()
    finally:
        await first.aclose()
        await second.aclose()


# --- 200 sessions at once against 50 leases ----------------------------------------------------


async def test_200_sessions_at_once_against_50_leases(redis_url: str,
                                                      fresh_database: str) -> None:
    """lease_s == min_lease_s: each session reserves exactly one lease (100 micros); the wallet
    holds exactly 50. low_balance_s = 0: reports never top a lease up, so admissions are not
    raced by top-ups of sessions already running."""
    rurl = with_redis_db(redis_url, CONCURRENCY_REDIS_DB)
    srv = start_server(billing_env(
        rurl, fresh_database, billing__lease_s=6, billing__min_lease_s=6,
        billing__low_balance_s=0, server__idle_timeout_s=30,
    ))
    admin = Admin(srv.http)
    lease = cost(6000)
    n_sessions, n_leases = 200, 50
    try:
        tenant = admin.tenant(funded=lease * n_leases, max_concurrent_sessions=1000,
                              requests_per_second=1000, burst=1000)
        all_tried = asyncio.Event()
        tried = 0
        opened: list[Live] = []

        async def one() -> int | Live:
            nonlocal tried
            try:
                live = await Live.open(srv, tenant)
            except InvalidStatus as exc:
                return exc.response.status_code
            finally:
                tried += 1
                if tried == n_sessions:
                    all_tried.set()
            opened.append(live)
            return live

        results = await asyncio.wait_for(
            asyncio.gather(*(one() for _ in range(n_sessions)), return_exceptions=True), 60)
        try:
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors[:3]
            admitted = [r for r in results if isinstance(r, Live)]
            statuses = sorted(r for r in results if isinstance(r, int))
            assert len(admitted) == n_leases, (len(admitted), statuses[:5])
            assert statuses == [402] * (n_sessions - n_leases)
            assert all_tried.is_set()
            # Every lease is out; nothing granted beyond the balance.
            rs = await redis_state(rurl, tenant.tenant_id)
            assert (rs.spendable, rs.leases) == (0, n_leases)

            async def stream_and_close(live: Live) -> dict[str, Any]:
                await live.send_audio(1000, speed=4.0)
                return await live.close(timeout=30)

            summaries = await asyncio.wait_for(
                asyncio.gather(*(stream_and_close(live) for live in admitted)), 60)
        finally:
            await asyncio.gather(*(live.aclose() for live in opened))
        assert all(s["audio_ms"] == 1000 for s in summaries)
        charged = sum(s["cost_micros"] for s in summaries)
        assert charged == n_leases * cost(1000)
        pg = await assert_books_balance(fresh_database, rurl, tenant.tenant_id,
                                        expected_usage=charged)
        assert pg.balance == lease * n_leases - charged
        sessions = {live.session_id for live in admitted}
        assert {e.rsplit(":", 1)[0] for e in pg.events_by_id} == sessions
    finally:
        code = srv.stop()
        await cleanup_redis(rurl, admin.tenants, admin.key_ids)
    assert code == 0, "\n".join(srv.stderr_lines[-40:])
