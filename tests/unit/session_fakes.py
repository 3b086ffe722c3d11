"""Fakes of a session runner's ports (server/sessions/wire.py, server/sessions/host.py) for tests
that drive a real runner without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class RecordingWire:
    """A Wire that records what was sent: text frames through `decode` into `events`, audio as
    a byte count; `write_paused` is the client not reading."""

    def __init__(self, decode: Callable[[bytes], Any]) -> None:
        self._decode = decode
        self.write_paused = False
        self.reading_paused = False
        self.activity = False
        self.audio_bytes = 0
        self.events: list[Any] = []
        self.close_code: int | None = None
        self.pauses = 0

    def send_binary(self, data: bytes) -> None:
        self.audio_bytes += len(data)

    def send_text(self, data: bytes) -> None:
        self.events.append(self._decode(data))

    def flush(self) -> None:
        return None

    def close(self, code: int, reason: str = "") -> None:
        self.close_code = code

    def pause_reading(self) -> None:
        self.reading_paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading_paused = False


class FakeSessionHost:
    """The endpoint's SessionHost: tracked tasks and the session count."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.session_count = 0

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        return task

    def session_opened(self) -> None:
        self.session_count += 1

    def session_closed(self) -> None:
        self.session_count -= 1
