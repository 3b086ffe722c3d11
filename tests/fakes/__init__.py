"""Test doubles that are real implementations (servers, engines), not mocks."""

from __future__ import annotations

import asyncio
from typing import Any


async def leftover_tasks(settle_rounds: int = 5) -> set[asyncio.Task[Any]]:
    """Tasks still pending besides the caller, after letting the loop settle a few rounds.

    A few loop iterations are allowed because closing sockets and servers legitimately takes
    a callback or two; anything still alive after that was leaked.
    """
    current = asyncio.current_task()
    for _ in range(settle_rounds):
        pending = {t for t in asyncio.all_tasks() if t is not current and not t.done()}
        if not pending:
            return set()
        await asyncio.sleep(0)
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}
