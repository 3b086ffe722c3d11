"""Local infrastructure: embedded Redis and PostgreSQL for development and tests."""

from server.infra.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    MissingBinaryError,
    Services,
    ServiceStartError,
    create_database,
    default_data_dir,
    drop_database,
    ensure_services,
    find_pg_bin,
    find_redis_server,
    free_port,
    start_services,
)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "MissingBinaryError",
    "ServiceStartError",
    "Services",
    "create_database",
    "default_data_dir",
    "drop_database",
    "ensure_services",
    "find_pg_bin",
    "find_redis_server",
    "free_port",
    "start_services",
]
