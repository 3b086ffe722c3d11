from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable

import pytest

from server.models.base import EngineError, EngineUnavailable
from server.models.batcher import MicroBatcher
from tests.fakes import leftover_tasks


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    yield
    assert await leftover_tasks() == set()


class Doubler:
    """A fake batched model: records every batch, can be held closed or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def __call__(self, reqs: list[int]) -> list[int]:
        self.batches.append(list(reqs))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [r * 2 for r in reqs]


async def started(
    model: Doubler, *, max_batch: int = 8, max_wait_ms: float = 20, max_pending: int = 100
) -> MicroBatcher[int, int]:
    b: MicroBatcher[int, int] = MicroBatcher(
        model, max_batch=max_batch, max_wait_ms=max_wait_ms, max_pending=max_pending
    )
    await b.start()
    return b


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("n", [1, 8, 9, 20, 64])
async def test_concurrent_submits_are_batched(n: int) -> None:
    model = Doubler()
    sizes: list[int] = []
    b: MicroBatcher[int, int] = MicroBatcher(
        model,
        max_batch=8,
        max_wait_ms=20,
        max_pending=1000,
        on_batch=lambda size, seconds: sizes.append(size),
    )
    await b.start()
    results = await asyncio.gather(*(b.submit(i) for i in range(n)))
    await b.aclose()
    assert results == [i * 2 for i in range(n)]
    assert len(model.batches) == math.ceil(n / 8)
    assert sizes == [len(batch) for batch in model.batches]
    assert sorted(r for batch in model.batches for r in batch) == list(range(n))


async def test_max_wait_is_honoured_for_a_lone_request() -> None:
    b = await started(Doubler(), max_wait_ms=60)
    t0 = time.perf_counter()
    assert await b.submit(21) == 42
    elapsed = time.perf_counter() - t0
    await b.aclose()
    assert 0.055 <= elapsed < 0.3


async def test_a_full_batch_does_not_wait_for_max_wait() -> None:
    b = await started(Doubler(), max_batch=4, max_wait_ms=10_000)
    t0 = time.perf_counter()
    assert await asyncio.gather(*(b.submit(i) for i in range(4))) == [0, 2, 4, 6]
    elapsed = time.perf_counter() - t0
    await b.aclose()
    assert elapsed < 0.5


async def test_pending_bound_makes_submit_wait_for_room() -> None:
    model = Doubler()
    model.gate.clear()
    b = await started(model, max_batch=1, max_wait_ms=0, max_pending=2)
    first = asyncio.create_task(b.submit(0))
    await until(lambda: len(model.batches) == 1)  # taken into the batch, now running
    queued = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
    blocked = asyncio.create_task(b.submit(3))
    await until(lambda: b.waiting_for_room == 1)
    assert b.pending == 2  # the queue did not grow past its bound
    assert not blocked.done()
    model.gate.set()
    assert await asyncio.gather(first, *queued, blocked) == [0, 2, 4, 6]
    assert model.batches == [[0], [1], [2], [3]]
    await b.aclose()


async def test_exception_of_run_batch_reaches_every_item() -> None:
    model = Doubler()
    model.fail = EngineError("model exploded")
    b = await started(model)
    results = await asyncio.gather(*(b.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, EngineError) and "exploded" in str(r) for r in results)
    model.fail = None
    assert await b.submit(1) == 2  # the worker survived
    await b.aclose()


async def test_wrong_number_of_results_is_an_engine_error() -> None:
    async def short(reqs: list[int]) -> list[int]:
        return reqs[:-1]

    b: MicroBatcher[int, int] = MicroBatcher(short, max_batch=4, max_wait_ms=5, max_pending=8)
    await b.start()
    with pytest.raises(EngineError, match="results"):
        await b.submit(1)
    await b.aclose()


async def test_cancelled_submit_does_not_break_its_batch() -> None:
    model = Doubler()
    model.gate.clear()
    b = await started(model, max_batch=8, max_wait_ms=5)
    tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
    await until(lambda: len(model.batches) == 1)
    tasks[1].cancel()
    model.gate.set()
    assert await tasks[0] == 0
    assert await tasks[2] == 4
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    await b.aclose()


async def test_submit_cancelled_while_queued_is_not_run() -> None:
    model = Doubler()
    b = await started(model, max_batch=8, max_wait_ms=50)
    keep = asyncio.create_task(b.submit(1))
    drop = asyncio.create_task(b.submit(2))
    await until(lambda: b.pending == 2)
    drop.cancel()
    assert await keep == 2
    assert model.batches == [[1]]
    assert b.pending == 0
    await b.aclose()


async def test_cancelled_room_waiter_passes_its_slot_on() -> None:
    model = Doubler()
    model.gate.clear()
    b = await started(model, max_batch=1, max_wait_ms=0, max_pending=1)
    running = asyncio.create_task(b.submit(0))
    await until(lambda: len(model.batches) == 1)
    queued = asyncio.create_task(b.submit(1))
    waiter_a = asyncio.create_task(b.submit(2))
    waiter_b = asyncio.create_task(b.submit(3))
    await until(lambda: b.waiting_for_room == 2)
    waiter_a.cancel()
    model.gate.set()
    assert list(await asyncio.gather(running, queued, waiter_b)) == [0, 2, 6]
    assert waiter_a.cancelled()
    await b.aclose()


async def test_aclose_fails_inflight_queued_and_waiting_submits() -> None:
    model = Doubler()
    model.gate.clear()
    b = await started(model, max_batch=1, max_wait_ms=0, max_pending=1)
    inflight = asyncio.create_task(b.submit(0))
    await until(lambda: len(model.batches) == 1)
    queued = asyncio.create_task(b.submit(1))
    waiting = asyncio.create_task(b.submit(2))
    await until(lambda: b.waiting_for_room == 1)
    await b.aclose()
    for task in (inflight, queued, waiting):
        with pytest.raises(EngineUnavailable):
            await task
    with pytest.raises(EngineUnavailable):
        await b.submit(3)
    await b.aclose()  # idempotent


async def test_submit_before_start_is_refused() -> None:
    b: MicroBatcher[int, int] = MicroBatcher(Doubler(), max_batch=2, max_wait_ms=1, max_pending=2)
    with pytest.raises(EngineUnavailable):
        await b.submit(1)
    await b.aclose()


async def test_failing_on_batch_callback_does_not_stop_the_worker() -> None:
    def broken(size: int, seconds: float) -> None:
        raise RuntimeError("metrics down")

    b: MicroBatcher[int, int] = MicroBatcher(
        Doubler(), max_batch=2, max_wait_ms=1, max_pending=4, on_batch=broken
    )
    await b.start()
    assert await b.submit(1) == 2
    assert await b.submit(2) == 4
    await b.aclose()
