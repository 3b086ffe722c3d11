"""Billing test fixtures: a fresh, migrated database per test and Redis isolation by tenant id.

`database_url`, `redis_url` and `fresh_database` come from tests/conftest.py: servers the test
session starts itself, or DATABASE_URL/REDIS_URL when both are set.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from server.billing import keys
from server.billing.migrate import migrate
from server.billing.redis_client import BillingRedis, connect
from server.billing.store import BillingStore
from tests.redis_cluster import session_cluster


@pytest.fixture
async def billing_store(fresh_database: str) -> AsyncIterator[BillingStore]:
    await migrate(fresh_database)
    store = await BillingStore.connect(fresh_database, min_size=1, max_size=4)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
def redis_cluster_url(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's 3-master Redis Cluster (tests/redis_cluster.py), as a `redis+cluster://`
    URL."""
    return session_cluster(request, tmp_path_factory).url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[BillingRedis]:
    client = connect(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def tenants_key(redis_client: BillingRedis) -> AsyncIterator[str]:
    """A tenants set of this test only: flushers and reconcile of this test read it instead of
    the shared `sg:tenants`, so tests of others on the same Redis are neither seen nor touched.
    Every tenant added to it has its keys deleted after the test."""
    key = f"sg:test:{uuid.uuid4().hex}:tenants"
    try:
        yield key
    finally:
        for member in await redis_client.smembers(key):
            tenant = member.decode() if isinstance(member, bytes) else member
            doomed = [k async for k in redis_client.scan_iter(match=keys.tenant_pattern(tenant))]
            if doomed:
                await redis_client.delete(*doomed)
            await redis_client.srem(keys.TENANTS_SET, tenant)
        await redis_client.delete(key)


@pytest.fixture
def new_tenant_id() -> Callable[[], str]:
    return lambda: f"t-{uuid.uuid4().hex}"
