"""Where the billing stores are: the configured URLs, else $REDIS_URL/$DATABASE_URL, else the
embedded development servers, started here. Development tooling: only the composition roots
(server/app.py for `serve`, server/__main__.py for `streamgate billing ...`) call it; the billing
package is handed the URLs and knows nothing of how they were found."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from server.config import Config
from server.infra.embedded import Services, default_data_dir, ensure_services


@dataclass(frozen=True, slots=True)
class BillingUrls:
    redis_url: str
    database_url: str
    services: Services | None  # embedded servers we may have started


def data_dir(cfg: Config) -> Path:
    return Path(cfg.billing.data_dir) if cfg.billing.data_dir else default_data_dir()


def dev_key_file(cfg: Config) -> Path:
    """Where the dev tenant's API key is kept between runs."""
    return data_dir(cfg) / "dev-api-key"


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
