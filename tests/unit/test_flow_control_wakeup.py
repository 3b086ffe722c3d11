"""Wakeup: asyncio.Event's semantics, with the running loop asked for once, not per wait."""

from __future__ import annotations

import asyncio

import pytest

from server.flow_control.wakeup import Wakeup


async def test_it_behaves_as_an_event() -> None:
    event = Wakeup()
    assert isinstance(event, asyncio.Event) and not event.is_set()
    event.set()
    assert await event.wait() is True  # set before the wait: no suspension
    event.clear()
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    event.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    event.clear()
    cancelled = asyncio.ensure_future(event.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    event.set()  # a cancelled waiter is no obstacle
    assert await event.wait()


async def test_the_loop_is_asked_for_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    asked: list[asyncio.AbstractEventLoop] = []

    def running_loop() -> asyncio.AbstractEventLoop:
        asked.append(loop)
        return loop

    monkeypatch.setattr(asyncio, "get_running_loop", running_loop)
    event = Wakeup()
    for _ in range(5):
        event.clear()
        loop.call_soon(event.set)
        await event.wait()
    assert len(asked) == 1
