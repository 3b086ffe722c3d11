"""Billing under faults: a server SIGKILLed mid-session, the flusher killed between COMMIT and
XACK, PostgreSQL down for 30 s, Redis restarted (all data lost) while sessions stream.

Real server processes, real sockets, the suite's real Redis and PostgreSQL (tests/conftest.py).
Each test gets a database and a Redis logical database of its own (see test_billing_e2e). Tests
that stop or restart a server skip when the suite runs against external servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from server.billing import keys
from server.billing.flusher import FAULT_ENV, FAULT_EXIT_AFTER_COMMIT, FAULT_EXIT_CODE
from server.infra.embedded import Services
from tests.e2e.conftest import HERE as E2E_DIR
from tests.e2e.conftest import ROOT, ServerProcess, start_server
from tests.e2e.test_billing_e2e import (
    Admin,
    Live,
    Tenant,
    assert_books_balance,
    billing_env,
    cleanup_redis,
    pg_state,
    redis_state,
    with_redis_db,
)

pytestmark = pytest.mark.e2e
FUNDED = 1_000_000
SERVER_TOML = E2E_DIR / "server.toml"


@dataclass
class Env:
    redis_url: str
    dsn: str
    env: dict[str, str]
    servers: list[ServerProcess]
    admins: list[Admin]

    def start(self) -> tuple[ServerProcess, Admin]:
        srv = start_server(self.env)
        self.servers.append(srv)
        admin = Admin(srv.http)
        self.admins.append(admin)
        return srv, admin


@contextlib.asynccontextmanager
async def billing_servers(redis_url: str, dsn: str, db: int, **extra: Any
                          ) -> AsyncIterator[Env]:
    """Servers started with env.start() are stopped at the end (a clean exit is asserted for
    those still alive: exit 0 means no leaked task), then the test's Redis keys are deleted."""
    rurl = with_redis_db(redis_url, db)
    env = Env(rurl, dsn, billing_env(rurl, dsn, **extra), [], [])
    failed = False
    try:
        yield env
    except BaseException:
        failed = True
        raise
    finally:
        codes = []
        for srv in env.servers:
            alive = srv.proc.poll() is None
            code = srv.stop()
            if alive:
                codes.append((code, srv))
        tenants = [t for a in env.admins for t in a.tenants]
        key_ids = [k for a in env.admins for k in a.key_ids]
        await cleanup_redis(rurl, tenants, key_ids)
        if not failed:
            for code, srv in codes:
                assert code == 0, f"server exited {code}:\n" + "\n".join(srv.stderr_lines[-40:])


def require_embedded(services: Services, what: str) -> None:
    if getattr(services, what) is None:
        pytest.skip(f"external {what}: this fault test needs to stop/restart it")


async def stream_all(lives: list[Live], stop: asyncio.Event) -> list[asyncio.Task[int]]:
    loop = asyncio.get_running_loop()
    return [loop.create_task(live.send_audio(None, speed=1.0, until=stop)) for live in lives]


async def stop_streaming(stop: asyncio.Event, senders: list[asyncio.Task[int]]) -> None:
    stop.set()
    await asyncio.wait_for(asyncio.gather(*senders, return_exceptions=True), 15)


@dataclass
class Streams:
    lives: list[Live]
    stop: asyncio.Event
    senders: list[asyncio.Task[int]]

    async def halt(self) -> None:
        await stop_streaming(self.stop, self.senders)


@contextlib.asynccontextmanager
async def streaming(srv: ServerProcess, tenant: Tenant, count: int) -> AsyncIterator[Streams]:
    """`count` sessions streaming real-time audio until halted, each with two usage reports in
    on entry; on exit the senders are halted and every session's socket closed."""
    lives = [await Live.open(srv, tenant) for _ in range(count)]
    stop = asyncio.Event()
    streams = Streams(lives, stop, await stream_all(lives, stop))
    try:
        for live in lives:
            await live.wait_for(lambda s: len(s.of("usage")) >= 2, 15)
        yield streams
    finally:
        await streams.halt()
        for live in lives:
            await live.aclose()


def errors_of(live: Live) -> list[dict[str, Any]]:
    return [m for m in live.msgs if m["type"] == "error"]


# --- a. kill -9 mid-session ----------------------------------------------------------------------


async def test_server_killed_mid_session_is_settled_by_another_server(
    redis_url: str, fresh_database: str,
) -> None:
    async with billing_servers(redis_url, fresh_database, 10) as env:
        srv1, admin = env.start()
        tenant = admin.tenant(funded=FUNDED)
        async with streaming(srv1, tenant, 1) as streams:
            [live] = streams.lives
            sent_before_kill_ms = live.sent_ms
            srv1.proc.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(srv1.proc.wait, 10) == -signal.SIGKILL
            await streams.halt()
            await live.wait_closed()
        # Nobody can touch the lease now: its charge is the last usage the dead server reported.
        r = aioredis.from_url(env.redis_url)
        try:
            lease: Any = await r.hgetall(keys.lease_key(tenant.tenant_id, live.session_id))
        finally:
            await r.aclose()
        assert lease, "the dead server's lease should still be open"
        charged, seq = int(lease[b"charged"]), int(lease[b"seq"])
        assert charged > 0 and seq >= 2
        # The revenue leak of a crash is bounded (docs/billing.md): at most one usage interval of
        # the audio the server took in goes uncharged. Slack: one 100 ms chunk in flight and one
        # of scheduling on a loaded machine.
        interval_ms = 1000 * float(env.env["STREAMGATE_ASR__SESSION__USAGE_INTERVAL_S"])
        uncharged_ms = sent_before_kill_ms - int(lease[b"units"])
        assert uncharged_ms <= interval_ms + 200, (sent_before_kill_ms, lease)

        srv2, admin2 = env.start()  # its sweeper settles the lease once it has expired
        admin2.tenants.append(tenant.tenant_id)
        # A dead consumer's unacknowledged entries are claimed after claim_idle_ms (30 s).
        pg = await assert_books_balance(env.dsn, env.redis_url, tenant.tenant_id,
                                        expected_usage=charged, timeout=45)
        assert pg.balance == FUNDED - charged
        assert sorted(pg.events_by_id) == sorted(
            f"{live.session_id}:{n}" for n in range(1, seq + 1))
        bal = admin2.balance(tenant.tenant_id)
        assert bal["balance_micros"] == bal["spendable_micros"] == FUNDED - charged
        # The server still works for the tenant afterwards.
        live2 = await Live.open(srv2, tenant)
        try:
            await live2.send_audio(500, speed=4.0)
            summary = await live2.close()
        finally:
            await live2.aclose()
        await assert_books_balance(env.dsn, env.redis_url, tenant.tenant_id,
                                   expected_usage=charged + summary["cost_micros"])


# --- b. flusher killed between COMMIT and XACK ---------------------------------------------------


def flusher_cmd() -> list[str]:
    return [sys.executable, "-m", "server", "flusher", "--config", str(SERVER_TOML)]


async def test_flusher_killed_between_commit_and_xack_charges_once(
    redis_url: str, fresh_database: str, tmp_path: Path,
) -> None:
    async with billing_servers(redis_url, fresh_database, 11,
                               billing__run_flusher=False) as env:
        srv, admin = env.start()
        tenant = admin.tenant(funded=FUNDED)
        summary = await one_session(srv, tenant, 2500)
        before = await redis_state(env.redis_url, tenant.tenant_id)
        assert before.stream_len >= 2 and before.leases == 0  # settled, nothing flushed
        assert (await pg_state(env.dsn, tenant.tenant_id)).usage == 0

        flusher_env = {
            **os.environ,
            "STREAMGATE_BILLING__REDIS_URL": env.redis_url,
            "STREAMGATE_BILLING__DATABASE_URL": env.dsn,
            # The dead consumer's entries are claimed after 3 s instead of the default 30.
            "STREAMGATE_BILLING__FLUSH_CLAIM_IDLE_S": "3",
        }
        crashed = await asyncio.to_thread(
            subprocess.run, flusher_cmd(), cwd=ROOT, capture_output=True, text=True,
            timeout=60, env={**flusher_env, FAULT_ENV: FAULT_EXIT_AFTER_COMMIT},
        )
        assert crashed.returncode == FAULT_EXIT_CODE, crashed.stderr[-3000:]
        committed = await pg_state(env.dsn, tenant.tenant_id)
        assert committed.usage == summary["cost_micros"]
        assert committed.events == before.stream_len
        after_crash = await redis_state(env.redis_url, tenant.tenant_id)
        assert after_crash.stream_len == before.stream_len
        assert after_crash.pending == before.stream_len  # committed, never acknowledged

        log_path = tmp_path / "flusher.log"
        with log_path.open("w") as log_file:
            second = await asyncio.to_thread(
                subprocess.Popen, flusher_cmd(), cwd=ROOT, env=flusher_env,
                stdout=log_file, stderr=subprocess.STDOUT,
            )
        try:
            # It claims the dead consumer's entries once idle for flush_claim_idle_s (3 s).
            deadline = time.monotonic() + 30
            while True:
                rs = await redis_state(env.redis_url, tenant.tenant_id)
                if rs.pending == 0 and rs.stream_len == 0:
                    break
                assert second.poll() is None, "flusher exited"
                assert time.monotonic() < deadline, f"flusher did not drain: {rs}"
                await asyncio.sleep(0.25)
        finally:
            if second.poll() is None:
                second.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(second.wait, 15)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait()
                raise
        assert code == 0, log_path.read_text()[-3000:]
        pg = await assert_books_balance(env.dsn, env.redis_url, tenant.tenant_id,
                                        expected_usage=summary["cost_micros"])
        assert pg.events == before.stream_len
        assert pg.balance == FUNDED - summary["cost_micros"]


async def one_session(srv: ServerProcess, tenant: Tenant, ms: int) -> dict[str, Any]:
    live = await Live.open(srv, tenant)
    try:
        await live.send_audio(ms, speed=2.0)
        return await live.close()
    finally:
        await live.aclose()


# --- c. PostgreSQL down for 30 s -------------------------------------------------------------


async def test_postgres_down_30s_sessions_go_on_and_nothing_is_lost(
    redis_url: str, fresh_database: str, services: Services,
) -> None:
    require_embedded(services, "postgres")
    pg_server = services.postgres
    assert pg_server is not None
    async with billing_servers(redis_url, fresh_database, 12) as env:
        srv, admin = env.start()
        tenant = admin.tenant(funded=FUNDED)
        async with streaming(srv, tenant, 3) as streams:
            lives = streams.lives
            before = [len(live.of("usage")) for live in lives]
            await asyncio.to_thread(pg_server.stop)
            try:
                await asyncio.sleep(30)
                during = [len(live.of("usage")) for live in lives]
                assert not any(live.closed.is_set() for live in lives)
            finally:
                await asyncio.to_thread(pg_server.start)
            await asyncio.sleep(2)
            await streams.halt()
            summaries = [await live.close() for live in lives]
        for live, b, d in zip(lives, before, during, strict=True):
            assert errors_of(live) == []
            assert d - b >= 40, (b, d)  # every 0.5 s, from the lease, while Postgres was down
            assert live.sent_ms >= 32_000
        for s in summaries:
            assert s["audio_ms"] >= 32_000 and s["dropped_ms"] == 0
        expected = sum(s["cost_micros"] for s in summaries)
        pg = await assert_books_balance(env.dsn, env.redis_url, tenant.tenant_id,
                                        expected_usage=expected, timeout=30)
        assert pg.balance == FUNDED - expected


# --- d. Redis restarted (all data lost) ---------------------------------------------------------


async def test_redis_restart_sessions_go_on_and_reports_are_replayed(
    redis_url: str, fresh_database: str, services: Services,
) -> None:
    require_embedded(services, "redis")
    redis_server = services.redis
    assert redis_server is not None
    async with billing_servers(redis_url, fresh_database, 13) as env:
        srv, admin = env.start()
        tenant = admin.tenant(funded=FUNDED)
        async with streaming(srv, tenant, 3) as streams:
            lives = streams.lives
            # Some events already in Postgres: their replays must conflict and be refunded.
            deadline = time.monotonic() + 10
            while (await pg_state(env.dsn, tenant.tenant_id)).events < 3:
                assert time.monotonic() < deadline, "nothing flushed"
                await asyncio.sleep(0.1)
            before = [len(live.of("usage")) for live in lives]
            await asyncio.to_thread(redis_server.restart)
            await asyncio.sleep(4)
            after = [len(live.of("usage")) for live in lives]
            await streams.halt()
            summaries = [await live.close() for live in lives]
        for live, b, a in zip(lives, before, after, strict=True):
            assert errors_of(live) == []
            assert a - b >= 4, (b, a)
        expected = sum(s["cost_micros"] for s in summaries)
        pg = await assert_books_balance(env.dsn, env.redis_url, tenant.tenant_id,
                                        expected_usage=expected, timeout=30)
        assert pg.balance == FUNDED - expected
        assert any("replay=1" in s for s in pg.sources), "no replayed event reached Postgres"
        # Replays of events Postgres had before the restart conflicted and were refunded.
        r = aioredis.from_url(env.redis_url)
        try:
            refunded = {e.decode() for e in await r.smembers(keys.refunds_key(tenant.tenant_id))}
        finally:
            await r.aclose()
        assert refunded and refunded <= set(pg.events_by_id), refunded
        sessions = {live.session_id for live in lives}
        assert {e.rsplit(":", 1)[0] for e in pg.events_by_id} == sessions
        # Re-seeded from Postgres: the cache is back and agrees with it.
        assert admin.balance(tenant.tenant_id)["spendable_micros"] == FUNDED - expected
