"""The ingest stage's bounded queue: a data lane bounded in bytes and a small control lane.

Audio and control items keep their arrival order (a `finalize` applies to the audio sent before
it), but only audio counts against the bound and only audio is ever dropped: a full queue never
refuses or loses a control message.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Literal, TypeVar, cast

C = TypeVar("C")


class ControlLaneFull(Exception):
    pass


class IngestQueue(Generic[C]):
    __slots__ = ("_items", "audio_bytes", "capacity", "control_count", "max_control", "policy",
                 "protect_head")

    def __init__(self, capacity: int, policy: Literal["block", "drop"], max_control: int) -> None:
        self.capacity = capacity
        self.policy = policy
        self.max_control = max_control
        self._items: deque[bytes | C] = deque()
        self.audio_bytes = 0
        self.control_count = 0
        # A WAV stream's first bytes hold its header: dropping them would garble the rest.
        self.protect_head = False

    def put_audio(self, data: bytes) -> int:
        """Queue audio; with the drop policy return the bytes dropped (oldest first) to fit."""
        self._items.append(data)
        self.audio_bytes += len(data)
        if self.policy == "block" or self.audio_bytes <= self.capacity:
            return 0
        return self._drop_oldest()

    def _drop_oldest(self) -> int:
        dropped = 0
        items = self._items
        start = 1 if self.protect_head else 0
        i = start
        # The newest item always stays: it is the freshest audio and the one just admitted.
        while self.audio_bytes > self.capacity and i < len(items) - 1:
            item = items[i]
            if isinstance(item, bytes):
                del items[i]
                self.audio_bytes -= len(item)
                dropped += len(item)
            else:
                i += 1
        return dropped

    def put_control(self, item: C) -> None:
        if self.control_count >= self.max_control:
            raise ControlLaneFull(f"more than {self.max_control} control messages pending")
        self._items.append(item)
        self.control_count += 1

    def drain(self) -> list[bytes | C]:
        items = list(self._items)
        self._items.clear()
        self.audio_bytes = 0
        self.control_count = 0
        return items

    def drain_audio(self) -> list[bytes]:
        """drain() when control_count is 0: every item is audio."""
        items = cast(list[bytes], list(self._items))
        self._items.clear()
        self.audio_bytes = 0
        return items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return self.audio_bytes >= self.capacity

    @property
    def resumable(self) -> bool:
        """Low-water mark for `block`: resume reading the socket at half capacity."""
        return self.audio_bytes <= self.capacity // 2
