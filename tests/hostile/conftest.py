"""The hostile-input harness: one real billing server per test module, a canary session beside
it, and the invariants every generated case is checked against (issue 11 item 19).

After each case (`Harness.check`):
- the server process is up and answers /healthz;
- no new server log line carries a traceback (an `exc` field, "Traceback", uvloop's "Fatal
  error on transport");
- the canary (an ASR session of its own tenant, streaming real speech at real time in a thread
  of its own for the whole module) is still open and has had no `error`;
- nothing was charged: the case ran on the `free` tenant, whose every request must cost nothing
  (refused upgrades, refused HTTP requests, sessions fed only refused input): its Redis
  spendable balance, its PostgreSQL balance and its usage events are those of before the case.
  Cases that may legitimately be billed (audio frames on /v1/asr/stream, media on telephony) run
  on the `paid` tenant, whose books must only add up at the end of the module.

The case-level checks (no `error`-less non-1000 close, no HTTP 5xx) are in the test modules.

Size of a run: the default is a fixed, small, seed-stable set of examples per test (about a
minute for the whole package on a loaded 2-core machine, run by ./scripts/test.sh);
STREAMGATE_HOSTILE_EXAMPLES=N turns every test into N randomly seeded examples (pytest prints
the seed to reproduce a failure with --hypothesis-seed). See docs/testing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, settings
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.infra.embedded import create_database, drop_database
from tests.e2e.conftest import ServerProcess, espeak_pcm16, silence, start_server
from tests.e2e.test_billing_e2e import (
    Admin,
    Tenant,
    assert_books_balance,
    billing_env,
    cleanup_redis,
    redis_state,
    run_sync,
    with_redis_db,
)

EXAMPLES_ENV = "STREAMGATE_HOSTILE_EXAMPLES"
LONG_EXAMPLES = int(os.environ.get(EXAMPLES_ENV, "0") or 0)
FUNDS = 50_000_000  # micros per tenant: far more than any case may cost
SETTLE_TIMEOUT_S = 5.0  # a closed session's lease is released within this
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Fatal error on transport")


def hostile_settings(default_examples: int) -> settings:
    """Seed-stable and small by default; N random examples with STREAMGATE_HOSTILE_EXAMPLES=N."""
    long_run = LONG_EXAMPLES > 0
    return settings(
        max_examples=LONG_EXAMPLES if long_run else default_examples,
        derandomize=not long_run,
        database=None,
        deadline=None,
        # A real server is slow next to Hypothesis' expectations; that is not a test bug.
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate, Phase.shrink) if long_run
        else (Phase.explicit, Phase.generate),
        print_blob=long_run,
    )


def case_timeout(default_s: float, per_example_s: float = 1.0) -> pytest.MarkDecorator:
    """pytest-timeout for one hostile test: the suite's 120 s unless a long run needs more."""
    return pytest.mark.timeout(max(default_s, LONG_EXAMPLES * per_example_s + 60))


# --- the canary ----------------------------------------------------------------------------------


@dataclass
class CanaryReport:
    rounds: int = 0  # speech clips sent in full
    finals: list[str] = field(default_factory=list)  # texts of final transcripts
    errors: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    close_code: int | None = None
    sent_ms: int = 0
    failure: str | None = None  # an exception of the canary's own thread


class Canary:
    """An ASR session streaming real speech at real time, on a thread and loop of its own, from
    the start of the module to its end. Hostile cases must leave it untouched."""

    CHUNK_MS = 100

    def __init__(self, server: ServerProcess, key: str) -> None:
        self.server, self.key = server, key
        clip = silence(300) + espeak_pcm16("hello world, this is the canary speaking") \
            + silence(900)
        chunk = 32 * self.CHUNK_MS  # 16 kHz PCM16
        self.chunks = [clip[i:i + chunk].ljust(chunk, b"\0") for i in range(0, len(clip), chunk)]
        self.report = CanaryReport()
        self.open = threading.Event()
        self.closed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-canary", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self.open.wait(30):
            raise AssertionError(f"canary did not open: {self.report}")

    def alive(self) -> str | None:
        """None while the canary is well, else what went wrong."""
        r = self.report
        if r.failure:
            return r.failure
        if r.errors:
            return f"canary got an error: {r.errors}"
        if self.closed.is_set():
            return f"canary session closed (code {r.close_code})"
        return None

    def finish(self) -> CanaryReport:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "canary did not finish"
        return self.report

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # the test thread reads it from the report
            self.report.failure = f"canary failed: {exc!r}"
        finally:
            self.open.set()
            self.closed.set()

    async def _main(self) -> None:
        r = self.report
        credit = 0
        more = asyncio.Event()
        async with connect(f"{self.server.ws}/v1/asr/stream", open_timeout=20,
                           additional_headers={"Authorization": f"Bearer {self.key}"}) as ws:

            async def read() -> None:
                nonlocal credit
                with contextlib.suppress(ConnectionClosed):
                    async for raw in ws:
                        if not isinstance(raw, str):
                            continue
                        msg = json.loads(raw)
                        kind = msg["type"]
                        if kind in ("ready", "credit"):
                            credit += int(msg["credit_bytes" if kind == "ready" else "bytes"])
                            more.set()
                        elif kind == "transcript" and msg["is_final"]:
                            r.finals.append(msg["text"])
                        elif kind == "error":
                            r.errors.append(msg)
                        elif kind == "summary":
                            r.summary = msg
                r.close_code = ws.close_code
                self.closed.set()
                more.set()

            reader = asyncio.create_task(read())
            try:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                self.open.set()
                while not self._stop.is_set() and not self.closed.is_set():
                    for chunk in self.chunks:
                        while credit < len(chunk) and not self.closed.is_set():
                            more.clear()
                            await asyncio.wait_for(more.wait(), 15)
                        if self.closed.is_set():
                            break
                        await ws.send(chunk)
                        credit -= len(chunk)
                        r.sent_ms += self.CHUNK_MS
                        await asyncio.sleep(max(0.0, t0 + r.sent_ms / 1000 - loop.time()))
                    else:
                        r.rounds += 1
                if not self.closed.is_set():
                    await ws.send(json.dumps({"type": "close"}))
                await asyncio.wait_for(reader, 20)
            finally:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader


def assert_canary_unaffected(report: CanaryReport) -> None:
    assert report.failure is None, report.failure
    assert report.errors == [], report.errors
    assert report.close_code == 1000, report
    assert report.summary is not None, report
    assert report.summary["audio_ms"] == report.sent_ms, (report.summary, report.sent_ms)
    # Every clip is one utterance of speech: each one sent in full has its final transcript.
    assert report.rounds >= 1, report
    assert len([t for t in report.finals if t]) >= report.rounds, report


# --- the harness ---------------------------------------------------------------------------------


@dataclass
class Wallet:
    tenant_id: str
    spendable: int | None
    balance: int
    events: int
    charged_events: int  # usage events with a cost
    usage: int
    event_ids: frozenset[str] = frozenset()


@dataclass
class Harness:
    server: ServerProcess
    admin: Admin
    redis_url: str
    dsn: str
    canary: Canary
    free: Tenant  # every request of this tenant must cost nothing
    paid: Tenant  # cases that may be billed: only the books must add up
    log_pos: int = 0
    cases: int = 0
    # Tenants with a session or a charge since their last baseline: usage events reach
    # PostgreSQL asynchronously, through the flusher.
    dirty: set[str] = field(default_factory=set)

    def begin(self) -> None:
        """A case starts: log lines before it belong to earlier cases (a failed case leaves its
        lines unchecked; the end of the module scans the whole log again)."""
        self.new_log_lines()

    def new_log_lines(self) -> list[str]:
        lines = self.server.stderr_lines
        end = len(lines)
        out, self.log_pos = lines[self.log_pos:end], end
        return out

    def wallet(self, tenant: Tenant | str) -> Wallet:
        return run_sync(self._wallet(tenant if isinstance(tenant, str) else tenant.tenant_id))

    async def _wallet(self, tenant_id: str) -> Wallet:
        rs = await redis_state(self.redis_url, tenant_id)
        conn = await asyncpg.connect(self.dsn)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(*) FILTER (WHERE cost_micros > 0) AS charged,"
                " coalesce(sum(cost_micros), 0) AS usage FROM usage_events"
                " WHERE tenant_id = $1", tenant_id)
            ids = await conn.fetch("SELECT event_id FROM usage_events WHERE tenant_id = $1",
                                   tenant_id)
            balance = await conn.fetchval(
                "SELECT balance_micros FROM wallets WHERE tenant_id = $1", tenant_id)
        finally:
            await conn.close()
        assert row is not None
        return Wallet(tenant_id, rs.spendable, int(balance), int(row["n"]), int(row["charged"]),
                      int(row["usage"]), frozenset(str(r["event_id"]) for r in ids))

    def baseline(self, tenant: Tenant | None = None) -> Wallet:
        """A tenant's wallet (default: the free tenant's) before a case, once everything before
        it is settled and flushed (so a usage event that appears during the case is its own)."""
        tenant = tenant or self.free
        if tenant.tenant_id in self.dirty:
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while True:
                rs = run_sync(redis_state(self.redis_url, tenant.tenant_id))
                # Only the canary is live, nothing is held, nothing is left to flush.
                if self.live_sessions() <= 1 and rs.leases == 0 and rs.stream_len == 0 \
                        and rs.pending == 0:
                    break
                assert time.monotonic() < deadline, \
                    f"sessions of {tenant.tenant_id} not settled and flushed in time: {rs}"
                time.sleep(0.05)
            self.dirty.discard(tenant.tenant_id)
        return self.wallet(tenant)

    def calls_ended(self) -> int:
        return sum(1 for line in list(self.server.stderr_lines) if '"msg":"call ended"' in line)

    def wait_call_ended(self, before: int) -> None:
        """A call settles its two usages after its socket closed; "call ended" comes after."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S * 3
        while self.calls_ended() <= before:
            assert time.monotonic() < deadline, "no 'call ended' log line"
            time.sleep(0.02)

    def live_sessions(self) -> float:
        with urllib.request.urlopen(f"{self.server.http}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("streamgate_sessions_active{"))

    def settled_wallet(self, tenant_id: str) -> Wallet:
        """The wallet once no lease of the tenant is open (sessions release theirs as they end)
        and the flusher has moved every usage event to PostgreSQL: an event still in the Redis
        stream would be missed here and blamed on the next case."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            rs = run_sync(redis_state(self.redis_url, tenant_id))
            settled = rs.leases == 0 and rs.stream_len == 0 and rs.pending == 0
            if settled or time.monotonic() > deadline:
                return self.wallet(tenant_id)
            time.sleep(0.02)

    def check(self, case: str, before: Wallet | None = None, *, refused: bool = False) -> None:
        """The invariants after one case; `before` = the wallet (of the tenant the case ran
        as) before it, when the case must have cost nothing (None: it may have been billed).
        `refused`: nothing was accepted at all (not even a session), so not even an uncharged
        usage event may appear."""
        self.cases += 1
        srv = self.server
        assert srv.proc.poll() is None, f"server died after {case}: " + "\n".join(
            srv.stderr_lines[-20:])
        status = http_status(f"{srv.http}/healthz")
        assert status == 200, f"/healthz answered {status} after {case}"
        tracebacks = [line for line in self.new_log_lines() if is_traceback(line)]
        assert not tracebacks, f"traceback in the server log after {case}:\n" + "\n".join(
            tracebacks)[-4000:]
        sick = self.canary.alive()
        assert sick is None, f"after {case}: {sick}"
        if before is not None:
            after = self.settled_wallet(before.tenant_id)
            assert after.spendable == before.spendable, ("charged (Redis)", case, before, after)
            assert after.balance == before.balance, ("charged (PostgreSQL)", case, before, after)
            assert after.usage == before.usage and \
                after.charged_events == before.charged_events, ("usage events", case, before,
                                                                 after)
            if not refused:
                self.dirty.add(before.tenant_id)
            if refused:
                assert after.events == before.events, ("usage event of a refused request",
                                                     case, after.event_ids - before.event_ids)


def is_traceback(line: str) -> bool:
    if any(marker in line for marker in TRACEBACK_MARKERS):
        return True
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "exc" in record


def http_status(url: str, timeout: float = 10.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def warm_up(srv: ServerProcess, tenant: Tenant) -> None:
    """One session opened and closed: the tenant's wallet is cached in Redis from here on, so
    a case's before/after compare like with like."""
    from tests.hostile.wire import close_frame, open_session

    with open_session(srv.ws_port, "/v1/asr/stream", tenant.key) as client:
        client.send(close_frame(1000))
        assert client.read_frames().close_code == 1000


def start_harness(redis_url: str, database_url: str, redis_db: int,
                  extra_env: dict[str, str] | None = None) -> Iterator[Harness]:
    """A billing server on a database and a Redis logical database of its own, three funded
    tenants (canary, free, paid) and the canary; at the end: canary unaffected, the books of
    every tenant add up, the free tenant was charged nothing, the server exits cleanly."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = run_sync(create_database(database_url, name))
    rurl = with_redis_db(redis_url, redis_db)
    limits = {"requests_per_second": 10_000, "burst": 10_000, "max_concurrent_sessions": 1000}
    srv = start_server({**billing_env(rurl, dsn), **(extra_env or {})})
    admin = Admin(srv.http)
    code: int | None = None
    try:
        canary_tenant = admin.tenant(funded=FUNDS, prefix="canary", **limits)
        free = admin.tenant(funded=FUNDS, prefix="free", **limits)
        paid = admin.tenant(funded=FUNDS, prefix="paid", **limits)
        for tenant in (free, paid):
            warm_up(srv, tenant)
        canary = Canary(srv, canary_tenant.key)
        canary.start()
        harness = Harness(srv, admin, rurl, dsn, canary, free, paid,
                          dirty={free.tenant_id, paid.tenant_id})
        harness.new_log_lines()  # start-up lines are not a case's
        yield harness
        assert_canary_unaffected(canary.finish())
        free_pg = run_sync(assert_books_balance(dsn, rurl, free.tenant_id))
        assert free_pg.usage == 0 and free_pg.balance == FUNDS, free_pg
        run_sync(assert_books_balance(dsn, rurl, paid.tenant_id))
        run_sync(assert_books_balance(dsn, rurl, canary_tenant.tenant_id))
        tracebacks = [line for line in srv.stderr_lines if is_traceback(line)]
        assert not tracebacks, "\n".join(tracebacks)[-4000:]
    finally:
        try:
            if srv.proc.poll() is None:
                code = srv.stop()
            else:
                code = srv.proc.returncode
        finally:
            run_sync(cleanup_redis(rurl, admin.tenants, admin.key_ids))
            run_sync(drop_database(database_url, name))
    tail = "\n".join(srv.stderr_lines[-40:])
    # Exit code 3: the server found leaked asyncio tasks at shutdown.
    assert code == 0, f"server exited with {code}:\n{tail}"


__all__ = ["Harness", "Wallet", "case_timeout", "hostile_settings", "start_harness"]
