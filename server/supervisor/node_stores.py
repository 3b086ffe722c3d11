"""The billing stores of a node, prepared once by the supervisor rather than once per worker:
embedded Redis/PostgreSQL started (when no URLs are configured), migrations and prices applied,
the dev tenant's key made. Workers are handed the URLs, so none of them starts a store or races
another for the dev key."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from server.billing.bootstrap import ensure_dev_tenant, prepare_database
from server.billing.service import BillingService
from server.config import Config
from server.infra.stores import BillingUrls, dev_key_file, resolve_urls


@dataclass(frozen=True, slots=True)
class NodeStores:
    urls: BillingUrls
    dev_key: str | None  # issued for the embedded dev tenant, printed once by the supervisor

    async def stop(self) -> None:
        """Stop the embedded servers this node started (after every worker has flushed)."""
        if self.urls.services is not None:
            await asyncio.to_thread(self.urls.services.stop)


async def prepare_node_stores(cfg: Config) -> NodeStores:
    urls = await resolve_urls(cfg)
    try:
        await prepare_database(cfg, urls.database_url)
        dev_key: str | None = None
        if urls.services is not None and cfg.billing.dev_tenant:
            billing = BillingService(cfg.billing,
                                     report_interval_s=cfg.asr.session.usage_interval_s)
            await billing.start(urls.redis_url, urls.database_url, background=False)
            try:
                dev_key = await ensure_dev_tenant(cfg, billing, dev_key_file(cfg))
            finally:
                await billing.stop()
    except BaseException:
        if urls.services is not None:
            await asyncio.to_thread(urls.services.stop)
        raise
    return NodeStores(urls, dev_key)
