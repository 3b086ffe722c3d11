"""Incremental text/event-stream parsing: bytes as they arrive in, complete events' data out.

Only `data:` fields matter for chat completions; `event:`, `id:`, `retry:` and comments
(`: keep-alive`) are skipped. Events are bounded, so an upstream that never sends a blank line
cannot make the gateway buffer without limit.
"""

from __future__ import annotations


class SseError(Exception):
    """The byte stream is not a well-formed event stream (or an event is too large)."""


class SseParser:
    __slots__ = ("_buf", "_data", "_data_len", "max_event_bytes")

    def __init__(self, max_event_bytes: int = 1024 * 1024) -> None:
        self.max_event_bytes = max_event_bytes
        self._buf = bytearray()
        self._data: list[bytes] = []
        self._data_len = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event completed by `chunk` (multi-line data joined with \\n)."""
        self._buf += chunk
        events: list[bytes] = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[: end + 1]
            self._line(line, events)
        if len(self._buf) + self._data_len > self.max_event_bytes:
            raise SseError(f"event larger than {self.max_event_bytes} bytes")
        return events

    def close(self) -> list[bytes]:
        """At end of stream: an event not terminated by a blank line still counts (some
        servers end with `data: [DONE]\\n` and close)."""
        events: list[bytes] = []
        if self._buf:
            line = bytes(self._buf).rstrip(b"\r")
            self._buf.clear()
            self._line(line, events)
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
                self._data_len = 0
            return
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            self._data.append(value)
            self._data_len += len(value) + 1
