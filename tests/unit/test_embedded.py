"""Embedded Redis and PostgreSQL: real servers on free ports in temporary directories."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from server.infra.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    MissingBinaryError,
    ServiceStartError,
    ensure_services,
    find_pg_bin,
    free_port,
)

pytestmark = pytest.mark.timeout(60)


def _processes(*, needle: str | None = None, pgid: int | None = None) -> list[int]:
    """Live (non-zombie) processes whose command line contains `needle` or in group `pgid`.

    Reads /proc rather than running pgrep: procps is not installed everywhere. Matches
    `pgrep -f needle` / `pgrep -g pgid`.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        state, group = fields[0], int(fields[2])
        if state == "Z":
            continue
        if (needle is not None and needle in cmdline) or (pgid is not None and group == pgid):
            found.append(int(entry.name))
    return found


def _assert_gone(*needles: str | Path, pgid: int | None = None) -> None:
    """No process mentions a needle, and none is left in the server's process group.

    A data directory alone is not enough of a needle: redis-server rewrites its title to
    "redis-server 127.0.0.1:PORT", and PostgreSQL backends to "postgres: streamgate-PORT: ..."
    (and leave the postmaster's process group: they call setsid()).
    """
    leftovers: set[int] = set()
    for _ in range(100):  # SIGKILLed processes take a moment to finish exiting
        leftovers = {pid for n in needles for pid in _processes(needle=str(n))}
        if pgid is not None:
            leftovers |= set(_processes(pgid=pgid))
        if not leftovers:
            return
        time.sleep(0.02)
    pytest.fail(f"processes left behind: {sorted(leftovers)}")


def _pg_needles(server: EmbeddedPostgres) -> list[str]:
    # The postmaster's command line names the cluster; every other process has the title.
    return [str(server.pgdata), f"postgres: streamgate-{server.port}:"]


def _redis_title(server: EmbeddedRedis) -> str:
    return f"redis-server 127.0.0.1:{server.port}"


async def _pg_scalar(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _redis_ping(url: str) -> bool:
    client = aioredis.Redis.from_url(url)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """One cluster for the module: initdb once. Tests that stop it start it again."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "cluster", port=0)
    try:
        server.start()
        needles = _pg_needles(server)
        pgdata = server.pgdata
        yield server
    finally:
        pid = server.pid
        server.destroy()
    _assert_gone(server.data_dir, *needles, pgid=pid)
    assert not pgdata.exists()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", port=0)
    try:
        server.start()
        yield server
    finally:
        pid = server.pid  # restart() changes it
        server.stop()
    _assert_gone(server.data_dir, _redis_title(server), pgid=pid)


def test_find_pg_bin() -> None:
    for name in ("postgres", "initdb", "pg_isready"):
        assert os.access(find_pg_bin(name), os.X_OK)
    with pytest.raises(MissingBinaryError, match="package `postgresql`"):
        find_pg_bin("no-such-pg-program")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_redis_ping_and_config(redis_server: EmbeddedRedis) -> None:
    assert redis_server.running and not redis_server.reused
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await client.ping()
        assert await client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert await client.config_get("save") == {"save": ""}
        assert await client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        await client.aclose()


async def test_redis_stop_ends_process(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=0)
    server.start()
    pid = server.pid
    assert pid is not None and _processes(pgid=pid) == [pid]
    assert _processes(needle=_redis_title(server)) == [pid]
    server.stop()
    server.stop()  # idempotent
    assert not server.running
    _assert_gone(_redis_title(server), pgid=pid)
    assert not await _redis_ping_or_false(server.url)


async def _redis_ping_or_false(url: str) -> bool:
    try:
        return await _redis_ping(url)
    except RedisConnectionError:
        return False


async def test_redis_restart_loses_data(redis_server: EmbeddedRedis) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set("k", "v")
    finally:
        await client.aclose()
    old_pid = redis_server.pid
    redis_server.restart()
    assert redis_server.running and redis_server.pid != old_pid
    # A fresh client: a pooled connection to the old server fails its next command with
    # ConnectionError (redis-py 8 defaults), which is the application's problem, not ours.
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.get("k") is None
    finally:
        await client.aclose()


async def test_redis_reuses_running_server(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    other = EmbeddedRedis(tmp_path / "other", port=redis_server.port)
    other.start()
    assert other.reused and other.pid is None
    assert not (tmp_path / "other").exists()
    with pytest.raises(RuntimeError, match="not started by us"):
        other.restart()
    other.stop()
    assert redis_server.running
    assert await _redis_ping(redis_server.url)


def test_redis_port_taken_by_something_else(tmp_path: Path) -> None:
    # A listener that never answers: not a Redis to reuse, so redis-server fails to bind.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = EmbeddedRedis(tmp_path, port=squatter.getsockname()[1])
        with pytest.raises(ServiceStartError, match="exited with status") as info:
            server.start()
    assert "redis.log" in str(info.value)
    assert not server.running
    _assert_gone(_redis_title(server))


async def test_postgres_select_1_and_settings(pg: EmbeddedPostgres) -> None:
    assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    conn = await asyncpg.connect(pg.url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        for name in ("fsync", "synchronous_commit", "full_page_writes"):
            assert await conn.fetchval("SELECT current_setting($1)", name) == "off"
        assert await conn.fetchval("SELECT current_setting('listen_addresses')") == "127.0.0.1"
        assert await conn.fetchval("SHOW server_encoding") == "UTF8"
    finally:
        await conn.close()


async def test_postgres_create_and_drop_database(pg: EmbeddedPostgres) -> None:
    name = 'sg test "db"'  # needs quoting both in SQL and in the DSN
    dsn = await pg.create_database(name)
    held = await asyncpg.connect(dsn)
    try:
        assert await held.fetchval("SELECT current_database()") == name
        with pytest.raises(asyncpg.DuplicateDatabaseError):
            await pg.create_database(name)
        assert await pg.create_database(name, exist_ok=True) == dsn
        await pg.drop_database(name)  # WITH (FORCE): disconnects `held`
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await held.fetchval("SELECT 1")
    finally:
        await held.close()
        await pg.drop_database(name)  # IF EXISTS: also fine when already dropped
    query = "SELECT count(*) FROM pg_database WHERE datname = $1"
    conn = await asyncpg.connect(pg.url)
    try:
        assert await conn.fetchval(query, name) == 0
    finally:
        await conn.close()


async def test_postgres_stop_then_start_keeps_data(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg.url)
    try:
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('stop')")
    finally:
        await conn.close()
    old_pid = pg.pid
    # Checkpointer, WAL writer, ... carry the title: the leftover check below would see them.
    assert len(_processes(needle=_pg_needles(pg)[1])) >= 3
    pg.stop()
    assert not pg.running
    _assert_gone(*_pg_needles(pg), pgid=old_pid)
    with pytest.raises(OSError):
        await asyncpg.connect(pg.url, timeout=2)
    pg.start()
    assert not pg.reused and pg.pid != old_pid

    conn = await asyncpg.connect(pg.url)
    try:
        assert await conn.fetchval("SELECT v FROM kept") == "stop"
        # synchronous_commit=off may lose the last ~0.6 s of commits on a crash; this one
        # waits for its WAL to reach the kernel, so it must survive kill().
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = on")
            await conn.execute("INSERT INTO kept VALUES ('kill')")
    except BaseException:
        await conn.close()
        raise
    # Killed with a client connected: its backend must die too, not linger as an orphan.
    old_pid = pg.pid
    pg.kill()
    conn.terminate()
    _assert_gone(*_pg_needles(pg), pgid=old_pid)
    pg.start()  # crash recovery
    conn = await asyncpg.connect(pg.url)
    try:
        rows = await conn.fetch("SELECT v FROM kept ORDER BY v")
        assert [r["v"] for r in rows] == ["kill", "stop"]
        await conn.execute("DROP TABLE kept")
    finally:
        await conn.close()


async def test_postgres_reuses_running_server(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    other = EmbeddedPostgres(tmp_path / "other", port=pg.port)
    other.start()
    assert other.reused and other.pid is None
    assert not (tmp_path / "other").exists()  # no second initdb
    other.stop()
    other.destroy()
    assert pg.running
    assert await _pg_scalar(pg.url, "SELECT 1") == 1


def test_postgres_runs_unprivileged(pg: EmbeddedPostgres) -> None:
    assert pg.pid is not None
    status = Path(f"/proc/{pg.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid != 0
    assert pg.pgdata.stat().st_uid == uid
    assert pg.pgdata.stat().st_mode & 0o077 == 0
    if os.geteuid() != 0:
        assert uid == os.geteuid() and not pg.relocated


def test_postgres_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a cluster")
    server = EmbeddedPostgres(tmp_path, port=0)
    # As root, pytest's tmp_path (under the 0700 /tmp/pytest-of-root) is out of the postgres
    # account's reach: a non-empty directory there is refused rather than relocated.
    unreachable = os.geteuid() == 0 and str(tmp_path).startswith("/tmp/pytest-of-root/")
    message = "cannot reach it" if unreachable else "neither empty nor a PostgreSQL cluster"
    try:
        with pytest.raises(ServiceStartError, match=message):
            server.start()
    finally:
        server.destroy()
    assert not server.running
    assert (tmp_path / "notes.txt").read_text() == "not a cluster"


async def test_ensure_services_stops_only_what_it_started(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    services = await ensure_services(tmp_path, redis_port=0, pg_port=pg.port)
    try:
        assert services.redis is not None and services.redis.running
        assert services.postgres is not None and services.postgres.reused
        assert services.database_url == pg.url
        assert await _redis_ping(services.redis_url)
        assert await _pg_scalar(services.database_url, "SELECT 1") == 1
    finally:
        services.stop()
    assert not services.redis.running
    _assert_gone(_redis_title(services.redis))
    assert pg.running  # reused, so left alone
    assert await _pg_scalar(pg.url, "SELECT 1") == 1


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory every account can traverse (unlike pytest's tmp_path when we are root)."""
    scratch = Path(tempfile.mkdtemp(prefix="streamgate-test-"))
    try:
        scratch.chmod(0o755)
        yield scratch
    finally:
        shutil.rmtree(scratch)


@pytest.mark.skipif(os.geteuid() != 0, reason="root only: the cluster changes owner")
async def test_postgres_as_root_in_reachable_directory(reachable_dir: Path) -> None:
    # The module's cluster is relocated (tmp_path is unreachable for `postgres` when we are
    # root); this one is in a directory that account can reach, so it is used in place.
    server = EmbeddedPostgres(reachable_dir / "pg", port=0)
    try:
        server.start()
        assert not server.relocated and server.pgdata == reachable_dir / "pg"
        assert server.pgdata.stat().st_uid != 0
        assert await _pg_scalar(server.url, "SELECT 1") == 1
        needles = _pg_needles(server)
    finally:
        pid = server.pid
        server.destroy()
    _assert_gone(*needles, pgid=pid)
