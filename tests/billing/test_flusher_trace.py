"""The usage flusher's span (issue 17): one `billing.flush` per batch of a tenant's entries,
naming the sessions it charged, against real Redis streams and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.billing.flusher import UsageFlusher
from server.billing.store import BillingStore
from server.telemetry.tracing import TRACING
from tests.billing.test_flusher import add_tenant, xadd


async def test_a_flushed_batch_is_one_span_naming_its_sessions(
    billing_store: BillingStore, redis_client: aioredis.Redis, tenants_key: str,
    new_tenant_id: Callable[[], str],
) -> None:
    tenant = new_tenant_id()
    await add_tenant(billing_store, redis_client, tenants_key, tenant)
    for seq in range(1, 4):
        await xadd(redis_client, tenant, "s1", seq, 10)
    await xadd(redis_client, tenant, "s2", 1, 10)
    exporter = InMemorySpanExporter()
    TRACING.configure(enabled=True, span_exporter=exporter)
    try:
        flusher = UsageFlusher(redis_client, billing_store, consumer="c1",
                               tenants_key=tenants_key)
        assert await flusher.flush_once() == 4
        assert await flusher.flush_once() == 0  # an idle round makes no span
    finally:
        TRACING.shutdown()
    (span,) = exporter.get_finished_spans()
    assert span.name == "billing.flush" and span.parent is None
    assert span.attributes is not None
    assert span.attributes["streamgate.tenant_id"] == tenant
    assert span.attributes["streamgate.entries"] == 4
    assert span.attributes["streamgate.acknowledged"] == 4
    assert span.attributes["streamgate.session_ids"] == ("s1", "s2")
