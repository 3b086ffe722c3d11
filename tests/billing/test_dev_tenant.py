"""The development tenant: its key is kept in the file the composition root names and reused
while it is valid (billing is handed the file; it no longer works out the data directory)."""

from __future__ import annotations

import os
from pathlib import Path

from server.billing.bootstrap import DEV_TENANT, ensure_dev_tenant, prepare_database
from server.billing.service import BillingService
from server.config import load_config


async def test_the_dev_key_is_kept_in_the_given_file_and_reused(
        fresh_database: str, redis_url: str, tmp_path: Path) -> None:
    cfg = load_config(None)
    await prepare_database(cfg, fresh_database)
    billing = BillingService(cfg.billing, report_interval_s=cfg.asr.session.usage_interval_s)
    await billing.start(redis_url, fresh_database, background=False)
    key_file = tmp_path / "nested" / "dev-api-key"
    try:
        first = await ensure_dev_tenant(cfg, billing, key_file)
        assert key_file.read_text() == first + "\n"
        assert os.stat(key_file).st_mode & 0o077 == 0  # the key is the owner's only
        assert await ensure_dev_tenant(cfg, billing, key_file) == first
        principal = await billing.authenticate(first)
        assert principal is not None and principal.tenant_id == DEV_TENANT
    finally:
        await billing.stop()
