"""Getting the money ready: migrate, make sure every configured model has a price, and in
development create a funded dev tenant whose key is printed once and kept in a file. Where
Redis/PostgreSQL are (and starting embedded ones) is the composition root's business
(server/infra/stores.py); billing is handed the URLs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from server.billing.auth import key_digest
from server.billing.migrate import migrate
from server.billing.service import AUDIO_UNIT, BillingService
from server.billing.store import BillingStore, UnknownTenant
from server.config import Config

log = logging.getLogger("streamgate.billing")
DEV_TENANT = "dev"


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


async def ensure_dev_tenant(cfg: Config, billing: BillingService, key_file: Path) -> str:
    """The dev tenant's API key: reused from `key_file` while still valid."""
    store = billing.store
    assert store is not None
    if await store.tenant(DEV_TENANT) is None:
        await store.create_tenant(DEV_TENANT, "development tenant")
    await billing.topup(DEV_TENANT, cfg.billing.dev_topup_micros, "dev-initial-funding")
    key = await asyncio.to_thread(_read_key, key_file)
    if key is not None:
        record = await store.lookup_key(key_digest(key))
        if record is not None and not record.revoked and record.tenant_id == DEV_TENANT:
            return key
    issued = await store.issue_key(DEV_TENANT)
    await asyncio.to_thread(_write_key, key_file, issued.key)
    return issued.key


def _read_key(key_file: Path) -> str | None:
    return key_file.read_text().strip() if key_file.exists() else None


def _write_key(key_file: Path, key: str) -> None:
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")


__all__ = ["DEV_TENANT", "UnknownTenant", "ensure_dev_tenant", "prepare_database"]
