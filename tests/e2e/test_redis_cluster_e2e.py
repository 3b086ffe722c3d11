"""A real server whose billing Redis is a 3-master Redis Cluster (`redis+cluster://`, started by
tests/redis_cluster.py): one billed ASR session end to end, charged exactly its usage, flushed to
PostgreSQL, the books and reconcile (the server's own and ours) clean."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from server.billing import keys
from server.billing.reconcile import reconcile
from server.billing.redis_client import BillingRedis, connect
from server.billing.store import BillingStore
from server.infra.embedded import create_database, drop_database
from tests.e2e.conftest import start_server
from tests.e2e.test_billing_e2e import (
    Admin,
    Billing,
    Live,
    PgState,
    billing_env,
    cost,
    pg_state,
    run_sync,
)
from tests.redis_cluster import session_cluster

pytestmark = pytest.mark.e2e


async def _cleanup(redis_url: str, tenants: list[str], key_ids: list[str]) -> None:
    r = connect(redis_url)
    try:
        for tenant in tenants:
            # SCAN on every master (redis-py's cluster scan_iter walks them all).
            doomed = [k async for k in r.scan_iter(match=keys.tenant_pattern(tenant))]
            if doomed:
                await r.delete(*doomed)
            await r.srem(keys.TENANTS_SET, tenant)
        for key_id in key_ids:
            await r.delete(keys.gcra_key(key_id))
    finally:
        await r.aclose()


@pytest.fixture(scope="module")
def cluster_billing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    database_url: str) -> Iterator[Billing]:
    redis_url = session_cluster(request, tmp_path_factory).url
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = run_sync(create_database(database_url, name))
    srv = start_server(billing_env(redis_url, dsn))
    admin = Admin(srv.http)
    code: int | None = None
    try:
        yield Billing(srv, admin, redis_url, dsn)
    finally:
        try:
            code = srv.stop()
        finally:
            run_sync(_cleanup(redis_url, admin.tenants, admin.key_ids))
            run_sync(drop_database(database_url, name))
    tail = "\n".join(srv.stderr_lines[-40:])
    assert code == 0, f"server exited with {code}:\n{tail}"


async def _settled_and_flushed(r: BillingRedis, dsn: str, tenant: str, usage: int) -> PgState:
    deadline = time.monotonic() + 20
    while True:
        pg = await pg_state(dsn, tenant)
        leases = await r.zcard(keys.leases_key(tenant))
        unflushed = await r.xlen(keys.usage_stream(tenant))
        if leases == 0 and unflushed == 0 and pg.usage == usage:
            return pg
        assert time.monotonic() < deadline, (leases, unflushed, pg.usage, usage)
        await asyncio.sleep(0.2)


async def test_a_billed_session_on_a_redis_cluster(cluster_billing: Billing) -> None:
    admin, funded = cluster_billing.admin, 1_000_000
    tenant = admin.tenant(funded=funded)
    live = await Live.open(cluster_billing.server, tenant)
    try:
        await live.send_audio(3000, speed=2.0)
        summary = await live.close()
    finally:
        await live.aclose()
    assert summary["audio_ms"] == 3000 and summary["billed_ms"] == 3000
    assert summary["cost_micros"] == cost(3000)
    assert all(u["balance_micros"] == funded - u["cost_micros"] for u in live.of("usage"))

    r = connect(cluster_billing.redis_url)
    store = await BillingStore.connect(cluster_billing.dsn, min_size=1, max_size=2)
    try:
        pg = await _settled_and_flushed(r, cluster_billing.dsn, tenant.tenant_id,
                                        summary["cost_micros"])
        assert pg.balance == funded - summary["cost_micros"] == pg.topups - pg.usage
        assert pg.duplicate_events == [] and pg.ledger_mismatches == []
        assert all(e.startswith(live.session_id + ":") for e in pg.events_by_id)
        spendable = await r.hget(keys.wallet_key(tenant.tenant_id), "spendable")
        assert spendable is not None and int(spendable) == pg.balance
        report = await reconcile(store, r)
        assert report.ok and report.redis_wallets_checked >= 1, report.render()
    finally:
        await store.close()
        await r.aclose()
    status, body = admin.reconcile()  # the server's own reconcile, through its cluster client
    assert status == 200 and body["ok"], body
    assert admin.balance(tenant.tenant_id)["spendable_micros"] == pg.balance
