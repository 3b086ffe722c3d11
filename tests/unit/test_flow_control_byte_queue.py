"""ByteQueue: the bound holds for a producer that waits for space, nothing is lost or reordered,
and the events say what they are named for after every operation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from server.flow_control.byte_queue import ByteQueue, QueueFull

costs = st.integers(min_value=0, max_value=50)


class QueueModel(RuleBasedStateMachine):
    """A producer that puts batches only while `space_available`, a consumer taking items or
    runs, and a drop-oldest shedder, against a plain list as the model."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 100
        self.queue: ByteQueue[int] = ByteQueue(self.capacity)
        self.model: list[tuple[int, int]] = []
        self.next_id = 0
        self.largest_batch = 0

    @precondition(lambda self: self.queue.space_available.is_set())
    @rule(batch=st.lists(costs, min_size=1, max_size=5))
    def put_batch(self, batch: list[int]) -> None:
        items = []
        for cost in batch:
            items.append((self.next_id, cost))
            self.next_id += 1
        self.queue.put_many(items)
        self.model.extend(items)
        self.largest_batch = max(self.largest_batch, sum(batch))

    @precondition(lambda self: not self.queue.space_available.is_set())
    @rule(cost=costs)
    def put_without_space_is_refused(self, cost: int) -> None:
        with pytest.raises(QueueFull):
            self.queue.put(-1, cost)

    @rule()
    def take(self) -> None:
        item = self.queue.take()
        if not self.model:
            assert item is None
        else:
            assert item == self.model.pop(0)[0]

    @rule(modulus=st.integers(min_value=1, max_value=3))
    def take_run(self, modulus: int) -> None:
        def same(a: int, b: int) -> bool:
            return a % modulus == b % modulus
        run = self.queue.take_run(same)
        expected: list[int] = []
        while self.model and (not expected or same(expected[0], self.model[0][0])):
            expected.append(self.model.pop(0)[0])
        assert run == expected

    @rule()
    def shed(self) -> None:
        dropped = self.queue.shed_oldest()
        expected = []
        while sum(c for _, c in self.model) > self.capacity and len(self.model) > 1:
            expected.append(self.model.pop(0)[0])
        assert dropped == expected

    @rule()
    def clear(self) -> None:
        assert self.queue.clear() == [i for i, _ in self.model]
        self.model.clear()

    @invariant()
    def bound_holds(self) -> None:
        # Within the bound, or over it by at most the one batch that crossed it.
        assert self.queue.total <= self.capacity + self.largest_batch

    @invariant()
    def accounting_and_order(self) -> None:
        assert self.queue.total == sum(c for _, c in self.model)
        assert len(self.queue) == len(self.model)
        assert self.queue.peek() == (self.model[0][0] if self.model else None)

    @invariant()
    def events_follow_state(self) -> None:
        assert self.queue.item_available.is_set() == bool(self.model)
        assert self.queue.space_available.is_set() == (self.queue.total <= self.capacity)


TestQueueModel = QueueModel.TestCase
TestQueueModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=60))
def test_waiting_producer_never_exceeds_capacity_plus_one_item(sizes: list[int]) -> None:
    """Item by item, a producer that waits for space stays within capacity + one item."""
    queue: ByteQueue[int] = ByteQueue(64)
    for i, size in enumerate(sizes):
        while not queue.has_space:
            queue.take()
        queue.put(i, size)
        assert queue.total <= 64 + size


async def test_events_wake_waiting_tasks() -> None:
    import asyncio

    queue: ByteQueue[str] = ByteQueue(10)
    consumer = asyncio.ensure_future(queue.item_available.wait())
    await asyncio.sleep(0)
    assert not consumer.done()
    queue.put("a", 11)  # over the bound: a producer must now wait
    await asyncio.sleep(0)
    assert consumer.done()
    producer = asyncio.ensure_future(queue.space_available.wait())
    await asyncio.sleep(0)
    assert not producer.done()
    assert queue.take() == "a"
    await asyncio.sleep(0)
    assert producer.done()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        ByteQueue(0)
    with pytest.raises(ValueError):
        ByteQueue[int](5).put(1, -1)
