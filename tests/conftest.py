"""Suite-wide checks: no async test may leave an asyncio task running behind it."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest


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
