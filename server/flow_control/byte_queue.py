"""A FIFO bounded by the cost of what it holds (bytes, ms, characters), not by its length.

Sans-I/O: `put`/`take` never wait. Two asyncio events, named for what a task waits on, follow
the queue's state so a consumer or producer task can sleep until it changes:

- `item_available` is set while anything waits in the queue (a consumer's wake-up);
- `space_available` is set while the total cost is within `capacity` (a producer's wake-up).

The bound is a producer contract, checked: a producer puts only while there is space, and one
`put_many` may carry the total past `capacity` by its own cost at most (a stage hands over what
one step produced in one go, so that step's work is never split or lost). A put while the queue
is over its bound raises `QueueFull`: a producer that ignored `space_available` is a bug.
Events change only on transitions (empty <-> not empty, within <-> over the bound), so the
common put/take costs no event call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from server.flow_control.wakeup import Wakeup

T = TypeVar("T")


class QueueFull(Exception):
    """A put while the queue was over its bound (the producer did not wait for space)."""


class ByteQueue(Generic[T]):
    __slots__ = ("_items", "capacity", "item_available", "space_available", "total")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.total = 0  # cost of everything queued
        self._items: deque[tuple[T, int]] = deque()
        self.item_available = Wakeup()
        self.space_available = Wakeup()
        self.space_available.set()

    # --- producer -----------------------------------------------------------------------------

    @property
    def has_space(self) -> bool:
        return self.total <= self.capacity

    def put(self, item: T, cost: int) -> None:
        self.put_many(((item, cost),))

    def put_many(self, items: Iterable[tuple[T, int]]) -> None:
        """Queue items in order; the whole batch is admitted if the queue is within its bound."""
        if self.total > self.capacity:
            raise QueueFull(f"queue over its bound ({self.total} > {self.capacity})")
        was_empty = not self._items
        append = self._items.append
        total = self.total
        for item, cost in items:
            if cost < 0:
                raise ValueError("cost must be >= 0")
            append((item, cost))
            total += cost
        self.total = total
        if was_empty and self._items:
            self.item_available.set()
        if total > self.capacity:
            self.space_available.clear()

    # --- consumer -----------------------------------------------------------------------------

    def take(self) -> T | None:
        """The oldest item, or None if the queue is empty."""
        if not self._items:
            return None
        item, cost = self._items.popleft()
        self._taken(cost)
        return item

    def take_run(self, same: Callable[[T, T], bool]) -> list[T]:
        """The oldest item and every item right after it with `same(oldest, item)`, oldest
        first (a consumer merging a run of like items into one piece of work); [] if empty."""
        items = self._items
        if not items:
            return []
        head, cost = items.popleft()
        run = [head]
        while items and same(head, items[0][0]):
            item, c = items.popleft()
            run.append(item)
            cost += c
        # _taken(cost), inlined: one engine hand-off per 100 ms of speech per session.
        was_over = self.total > self.capacity
        self.total -= cost
        if not items:
            self.item_available.clear()
        if was_over and self.total <= self.capacity:
            self.space_available.set()
        return run

    def shed_oldest(self, keep_newest: bool = True) -> list[T]:
        """Drop the oldest items until the total is within the bound (a drop-oldest policy);
        the newest stays if `keep_newest`, even when it alone is over. Returns what was dropped."""
        dropped: list[T] = []
        items = self._items
        cost = 0
        floor = 1 if keep_newest else 0
        while self.total - cost > self.capacity and len(items) > floor:
            item, c = items.popleft()
            dropped.append(item)
            cost += c
        if dropped:
            self._taken(cost)
        return dropped

    def clear(self) -> list[T]:
        dropped = [item for item, _ in self._items]
        if dropped:
            self._items.clear()
            self._taken(self.total)
        return dropped

    def _taken(self, cost: int) -> None:
        was_over = self.total > self.capacity
        self.total -= cost
        if not self._items:
            self.item_available.clear()
        if was_over and self.total <= self.capacity:
            self.space_available.set()

    # --- inspection -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def peek(self) -> T | None:
        return self._items[0][0] if self._items else None
