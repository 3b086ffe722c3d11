"""Where the money lives: resolve Redis/PostgreSQL (configured, from the environment, or
embedded), migrate, make sure every configured model has a price, and in development create a
funded dev tenant whose key is printed once and kept in the data directory."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from server.billing.auth import key_digest
from server.billing.migrate import migrate
from server.billing.service import AUDIO_UNIT, BillingService
from server.billing.store import BillingStore, UnknownTenant
from server.config import Config
from server.infra.embedded import Services, default_data_dir, ensure_services

log = logging.getLogger("streamgate.billing")
DEV_TENANT = "dev"


@dataclass(frozen=True, slots=True)
class BillingUrls:
    redis_url: str
    database_url: str
    services: Services | None  # embedded servers we may have started


def data_dir(cfg: Config) -> Path:
    return Path(cfg.billing.data_dir) if cfg.billing.data_dir else default_data_dir()


async def resolve_urls(cfg: Config) -> BillingUrls:
    b = cfg.billing
    redis_url = b.redis_url or os.environ.get("REDIS_URL", "")
    database_url = b.database_url or os.environ.get("DATABASE_URL", "")
    if redis_url and database_url:
        return BillingUrls(redis_url, database_url, None)
    services = await ensure_services(
        data_dir(cfg), redis_port=b.embedded_redis_port, pg_port=b.embedded_postgres_port,
        redis_url=redis_url or None, database_url=database_url or None,
    )
    return BillingUrls(services.redis_url, services.database_url, services)


async def prepare_database(cfg: Config, database_url: str) -> None:
    """Migrate, then give every configured model a price plan unless it already has one
    (prices in Postgres win: the config only provides defaults)."""
    applied = await migrate(database_url)
    if applied:
        log.info("migrations applied", extra={"migrations": ",".join(applied)})
    store = await BillingStore.connect(database_url, max_size=2)
    try:
        prices = await store.prices()
        for name, model in cfg.asr.models.items():
            if (name, AUDIO_UNIT) not in prices:
                await store.set_price(name, AUDIO_UNIT, model.price_micros_per_minute, 60_000)
        for name, tts in cfg.tts.models.items():
            if (name, "characters") not in prices:
                await store.set_price(name, "characters", tts.price_micros_per_1k_chars, 1000)
        for name, micros in cfg.llm.price_micros_per_1k_tokens.items():
            if (name, "tokens") not in prices:
                await store.set_price(name, "tokens", micros, 1000)
    finally:
        await store.close()


async def ensure_dev_tenant(cfg: Config, billing: BillingService) -> str:
    """The dev tenant's API key: reused from <data_dir>/dev-api-key while still valid."""
    store = billing.store
    assert store is not None
    if await store.tenant(DEV_TENANT) is None:
        await store.create_tenant(DEV_TENANT, "development tenant")
    await billing.topup(DEV_TENANT, cfg.billing.dev_topup_micros, "dev-initial-funding")
    key_file = data_dir(cfg) / "dev-api-key"
    if key_file.exists():
        key = key_file.read_text().strip()
        record = await store.lookup_key(key_digest(key))
        if record is not None and not record.revoked and record.tenant_id == DEV_TENANT:
            return key
    issued = await store.issue_key(DEV_TENANT)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(issued.key + "\n")
    return issued.key


__all__ = ["DEV_TENANT", "BillingUrls", "UnknownTenant", "data_dir", "ensure_dev_tenant",
           "prepare_database", "resolve_urls"]
