"""Messages waiting for the wire, bounded by coalescing what a newer message makes stale.

Two kinds of message go in, and the caller says which:

- `push(msg)`: a message that must reach the client (errors, finals, credit, usage, summary).
  Never dropped, never reordered.
- `push_latest(key, msg)`: a message that only matters until a newer one with the same key
  exists (an interim transcript of one utterance). The older one waiting is dropped and the new
  one goes to the end, so at most one per key waits.

Sans-I/O: nothing here writes. The owner drains it when the wire can take more. The bound:
`overflowing` becomes true once more than `capacity` messages wait (a client that stopped
reading while the session keeps producing what cannot be dropped); the owner then ends the
session. What it pushes after that (the error, the close) is still kept, in order: the reason
a session ended is never lost to the bound that ended it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

M = TypeVar("M")


class Outbox(Generic[M]):
    __slots__ = ("_keys", "_messages", "capacity", "held", "push")

    push: Callable[[M], None]
    held: list[M]  # what waits, oldest first: read it, never change it (use push / drain)

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        # One list for the outbox's life: `push` is its bound `append` (a session pushes a
        # `credit` per frame; a Python-level method would cost a call each time).
        self._messages: list[M] = []
        self.held = self._messages
        self.push = self._messages.append
        # key -> the message waiting under it (identity, to find it in _messages).
        self._keys: dict[Hashable, M] = {}

    def push_latest(self, key: Hashable, msg: M) -> None:
        stale = self._keys.get(key)
        if stale is not None:
            messages = self._messages
            # Identity, not equality: an equal control message must never be the one removed.
            for i, held in enumerate(messages):
                if held is stale:
                    del messages[i]
                    break
        self._keys[key] = msg
        self._messages.append(msg)

    def drain(self) -> list[M]:
        """Everything waiting, oldest first; the outbox is empty after."""
        messages = self._messages
        if not messages:
            return []
        drained = messages.copy()
        messages.clear()
        if self._keys:
            self._keys.clear()
        return drained

    def __len__(self) -> int:
        return len(self._messages)

    def __bool__(self) -> bool:
        return bool(self._messages)

    @property
    def overflowing(self) -> bool:
        return len(self._messages) > self.capacity
