"""Redis and PostgreSQL for the test suite.

CI may provide servers through REDIS_URL and DATABASE_URL. Otherwise the suite starts its own
on free ports under a temporary directory: never the well-known 6379/5432, which a developer's
machine may not run, or may run with data that tests must not touch.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.infra.embedded import EmbeddedPostgres, EmbeddedRedis, Services

__all__ = ["embedded_services", "test_services"]


def test_services(tmp_root: Path) -> Services:
    """Services for one test session; call `.stop()` at the end of the session.

    Both REDIS_URL and DATABASE_URL set: those, and `.redis` / `.postgres` are None (fault tests
    that restart servers must skip). Otherwise a fresh EmbeddedRedis and EmbeddedPostgres of our
    own (a partial configuration is ignored rather than mixing a shared server with ours).
    Their PostgreSQL cluster is deleted on stop(); its log stays in `tmp_root/postgres/`.
    """
    redis_url = os.environ.get("REDIS_URL")
    database_url = os.environ.get("DATABASE_URL")
    if redis_url and database_url:
        return Services(redis_url, database_url)
    return embedded_services(tmp_root)


def embedded_services(tmp_root: Path) -> Services:
    """A fresh EmbeddedRedis and EmbeddedPostgres of our own, whatever REDIS_URL/DATABASE_URL
    say: for a test that stops its servers. Call `.stop()` at the end."""
    redis = EmbeddedRedis(tmp_root / "redis", port=0)
    postgres = EmbeddedPostgres(tmp_root / "postgres", port=0)
    services = Services(redis.url, postgres.url, redis, postgres, discard_data=True)
    try:
        redis.start()
        postgres.start()
    except BaseException:
        services.stop()  # no orphans when the second server fails to start
        raise
    return services


# Not a test, despite the name the lead asked for: keep pytest from collecting it wherever it is
# imported into a test module.
test_services.__test__ = False  # type: ignore[attr-defined]
