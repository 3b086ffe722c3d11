"""What a resumable session keeps for a client that lost its connection: the finals of its
newest utterances, so a resume can replay those the client never received. Bounded in
utterances (their text is bounded by the engine), stored with the session's resume point."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Generic, TypeVar

T = TypeVar("T")

# A client is told every final is durable with a `checkpoint` a few seconds after it (at the next
# quiet point or usage report); one that stays away longer than this many utterances' worth
# of finals cannot resume (`resume_not_found`).
REPLAY_UTTERANCES: Final = 32


class FinalsReplay(Generic[T]):
    """(utterance_id, message) pairs of the newest `capacity` utterances, oldest first."""

    __slots__ = ("_capacity", "_items")

    def __init__(self, items: Iterable[tuple[int, T]] = (),
                 capacity: int = REPLAY_UTTERANCES) -> None:
        self._capacity = capacity
        self._items: list[tuple[int, T]] = []
        for utterance_id, message in items:
            self.add(utterance_id, message)

    def add(self, utterance_id: int, message: T) -> None:
        self._items.append((utterance_id, message))
        ids = {u for u, _ in self._items}
        if len(ids) > self._capacity:
            oldest = min(ids)
            self._items = [(u, msg) for u, msg in self._items if u != oldest]

    def after(self, utterance_id: int) -> list[T]:
        """The messages of every utterance after `utterance_id`, in order."""
        return [msg for u, msg in self._items if u > utterance_id]

    def oldest_id(self) -> int | None:
        return self._items[0][0] if self._items else None

    def items(self) -> list[tuple[int, T]]:
        return list(self._items)
