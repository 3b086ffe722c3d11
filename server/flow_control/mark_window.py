"""Audio at a telephony provider that it has not acknowledged yet (sans-I/O).

Every outbound audio frame is followed by a named mark; the provider echoes the mark once the
audio before it has played. The window holds the marks in flight, in the order they were sent,
with each one's bytes: an echo releases them (they return to the credit that lets the next
frame go), a barge-in `clear` releases them all at once (the provider dropped that audio, and
Plivo, for one, never echoes checkpoints it discarded). Its size is bounded by the credit
window: a frame is only sent, and its mark added, while credit covers it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class MarkWindow(Generic[T]):
    """Marks in flight with their bytes and what the sender wants back with the echo
    (`info`: duration, chunk attribution)."""

    __slots__ = ("_marks", "capacity", "in_flight_bytes")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # bytes: the credit window of the provider's buffer
        self._marks: dict[str, tuple[int, T]] = {}
        self.in_flight_bytes = 0

    def sent(self, name: str, nbytes: int, info: T) -> None:
        """A frame of `nbytes` and its mark `name` went out."""
        if self.in_flight_bytes + nbytes > self.capacity:
            raise OverflowError(f"{self.in_flight_bytes + nbytes} bytes in flight, more than "
                                f"the window of {self.capacity}")
        if name in self._marks:
            raise ValueError(f"mark {name!r} is already in flight")
        self._marks[name] = (nbytes, info)
        self.in_flight_bytes += nbytes

    def acknowledged(self, name: str) -> tuple[int, T] | None:
        """The provider echoed `name`: its (bytes, info); None for a mark not in flight (one
        sent before a `clear`, a duplicate, or not ours): it releases nothing."""
        mark = self._marks.pop(name, None)
        if mark is not None:
            self.in_flight_bytes -= mark[0]
        return mark

    def clear(self) -> int:
        """The provider's buffer was cleared: every mark is void. Returns the bytes released."""
        released, self.in_flight_bytes = self.in_flight_bytes, 0
        self._marks.clear()
        return released

    def __len__(self) -> int:
        return len(self._marks)

    def __bool__(self) -> bool:
        return bool(self._marks)

    def names(self) -> list[str]:
        """The marks in flight, oldest first."""
        return list(self._marks)
