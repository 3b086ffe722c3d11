"""The ingest stage's bounded queue: a data lane bounded in bytes and a small control lane.

Audio and control items keep their arrival order (a `finalize` applies to the audio sent before
it), but only audio counts against the bound and only audio is ever dropped: a full queue never
refuses or loses a control message.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Generic, Literal, TypeVar, cast

C = TypeVar("C")


class ControlLaneFull(Exception):
    pass


class IngestQueue(Generic[C]):
    __slots__ = ("_header", "_header_frames", "_items", "audio_bytes", "capacity", "control_count",
                 "max_control", "max_header_bytes", "policy", "protect_head")

    def __init__(self, capacity: int, policy: Literal["block", "drop"], max_control: int,
                 max_header_bytes: int = 4096) -> None:
        self.capacity = capacity
        self.policy = policy
        self.max_control = max_control
        # A deque: an overflowing `drop` queue removes its oldest frame per put, which a list
        # pays for with a move of every item (a client choosing 2-byte frames: 16x the CPU).
        self._items: deque[bytes | C] = deque()
        self.audio_bytes = 0
        self.control_count = 0
        # Set by the caller for a WAV stream: its header, which may span several frames, must
        # never be dropped (that would garble the rest). Cleared here once the frame holding the
        # end of the header (its `data` chunk's start) has been queued: later frames are audio.
        self.protect_head = False
        # The header's bytes seen so far (RIFF chunk walk), kept only while protect_head is set.
        self._header = bytearray()
        # How many audio frames at the front of the queue hold header bytes (the oldest ones).
        self._header_frames = 0
        # A header not complete within this many bytes closes the session (the decoder's limit,
        # asr.session.max_wav_header_bytes): protection stops there so the bound still holds.
        self.max_header_bytes = max_header_bytes

    def put_audio(self, data: bytes) -> int:
        """Queue audio; with the drop policy return the bytes dropped (oldest first) to fit."""
        self._items.append(data)
        self.audio_bytes += len(data)
        if self.protect_head:
            self._note_header(data)
        if self.policy == "block" or self.audio_bytes <= self.capacity:
            return 0
        return self._drop_oldest()

    def _note_header(self, data: bytes) -> None:
        """`data` holds header bytes: protect it, and end protection once the header is whole."""
        self._header_frames += 1
        header = self._header
        header += data
        if _header_length(header) is not None or len(header) >= self.max_header_bytes:
            self.protect_head = False
            self._header = bytearray()

    def _drop_oldest(self) -> int:
        dropped = 0
        items = self._items
        protected = self._header_frames
        i = 0
        # The newest item always stays: it is the freshest audio and the one just admitted.
        while self.audio_bytes > self.capacity and i < len(items) - 1:
            item = items[i]
            if not isinstance(item, bytes):
                i += 1
            elif protected:
                protected -= 1
                i += 1
            else:
                del items[i]
                self.audio_bytes -= len(item)
                dropped += len(item)
        return dropped

    def put_control(self, item: C) -> None:
        if self.control_count >= self.max_control:
            raise ControlLaneFull(f"more than {self.max_control} control messages pending")
        self._items.append(item)
        self.control_count += 1

    def drain(self) -> list[bytes | C]:
        items = list(self._items)  # each item copied once in its life: O(1) a frame
        self._items.clear()  # emptied in place: a new deque per step cost more than the copy
        self.audio_bytes = 0
        self.control_count = 0
        self._header_frames = 0
        return items

    def drain_audio(self) -> list[bytes]:
        """drain() when control_count is 0: every item is audio."""
        # A quoted cast: `list[bytes]` unquoted builds a GenericAlias on every call (per frame).
        items = cast("list[bytes]", list(self._items))
        self._items.clear()
        self.audio_bytes = 0
        self._header_frames = 0
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


_CHUNK = struct.Struct("<4sI")


def _header_length(header: bytearray) -> int | None:
    """Where a RIFF/WAVE stream's audio starts (just past the `data` chunk's id and size), or
    None while that is not in `header` yet. Only finds the boundary: the decoder validates."""
    pos = 12
    while len(header) >= pos + 8:
        chunk_id, size = _CHUNK.unpack_from(header, pos)
        if chunk_id == b"data":
            return pos + 8
        pos += 8 + size + (size & 1)  # RIFF chunks are word-aligned
    return None
