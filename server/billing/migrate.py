"""Apply `server/billing/migrations/NNN_name.sql` in order, each once, each in its own transaction.

Concurrency: every runner takes one session-level advisory lock before it looks at
`schema_migrations`, so two processes started at once (N workers of `streamgate serve`, a deploy
hook and a CLI) apply each file exactly once; the second one waits, then finds nothing to do.
A session lock (not a transaction lock) because it must span several transactions; it is
released explicitly, and by Postgres if the connection dies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# An arbitrary constant shared by every runner: "streamgate billing migrations".
_LOCK_KEY = 0x5347_4D49_4752
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file stem, e.g. "001_init"
    path: Path


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in version order; refuses badly named files and duplicate versions."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file name must be NNN_name.sql: {path.name}")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations with version {version}: "
                                 f"{found[version].path.name}, {path.name}")
        found[version] = Migration(version, path.stem, path)
    return [found[v] for v in sorted(found)]


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; returns the names (file stems) applied by this call."""
    migrations = discover(directory)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _apply_locked(conn, migrations)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _apply_locked(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    # Under the lock, so IF NOT EXISTS never races another runner's CREATE.
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY,"
        " name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    rows = await conn.fetch("SELECT version, name FROM schema_migrations")
    applied = {int(r["version"]): str(r["name"]) for r in rows}
    done: list[str] = []
    for m in migrations:
        if m.version in applied:
            if applied[m.version] != m.name:
                # A renamed or replaced file would silently never run; make it loud.
                raise MigrationError(f"version {m.version} was applied as "
                                     f"{applied[m.version]!r} but the file is {m.name!r}")
            continue
        sql = m.path.read_text(encoding="utf-8")
        async with conn.transaction():
            # No arguments: asyncpg uses the simple protocol, which runs multi-statement files.
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name
            )
        done.append(m.name)
    return done
