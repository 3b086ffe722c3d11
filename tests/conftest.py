"""Suite-wide checks: no async test may leave an asyncio task running behind it."""

from __future__ import annotations

import asyncio
import functools
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from server.infra.embedded import Services, create_database, drop_database
from tests.infra import test_services as _start_services


def _no_task_leaks(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = asyncio.all_tasks()
        result = await fn(*args, **kwargs)
        current = asyncio.current_task()
        leaked: set[asyncio.Task[Any]] = set()
        for _ in range(20):  # give tasks finishing their last step a chance to do so
            leaked = {t for t in asyncio.all_tasks() - before if t is not current and not t.done()}
            if not leaked:
                break
            await asyncio.sleep(0.01)
        if leaked:
            for task in leaked:
                task.cancel()
            pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {sorted(map(repr, leaked))}")
        return result

    return wrapper


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fn = getattr(item, "obj", None)
        if inspect.iscoroutinefunction(fn) and not item.get_closest_marker("allow_task_leaks"):
            item.obj = _no_task_leaks(fn)  # type: ignore[attr-defined]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_task_leaks: opt out of the task-leak check")


# --- real Redis and PostgreSQL -----------------------------------------------------------------
# The suite starts its own servers on free ports (a user's machine has none running), unless
# REDIS_URL and DATABASE_URL are both set.


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    started = _start_services(tmp_path_factory.mktemp("services"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    return services.redis_url


@pytest.fixture(scope="session")
def database_url(services: Services) -> str:
    return services.database_url


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """A throwaway database per test (works with externally given URLs too)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = await create_database(database_url, name)
    try:
        yield dsn
    finally:
        await drop_database(database_url, name)
