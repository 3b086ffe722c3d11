"""IngestQueue (the ASR ingest stage's queue): under `drop` the bound holds by shedding the oldest
audio and only as much as needed, a control message is never dropped, nothing is reordered, and
every byte is either drained or counted as dropped; under `block` nothing is ever dropped and
`full` / `resumable` say when to stop and resume reading.

The expected outcome of each put is written from the contract in the module docstring and
docs/protocol.md ("Flow control as implemented"), not from the implementation: drop the fewest
of the oldest droppable audio frames (never the newest frame, never the protected head) that
bring the audio back within capacity."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server.flow_control.ingest_queue import ControlLaneFull, IngestQueue

# Audio frames carry their own serial number, so drained frames can be told apart by content.
SERIAL = struct.Struct(">I")


def frame(serial: int, size: int) -> bytes:
    return SERIAL.pack(serial) + b"\x00" * (size - SERIAL.size)


@dataclass(frozen=True)
class Control:
    """A control message (finalize, close, ...): any non-bytes item."""

    serial: int


Item = bytes | Control


def audio_size(items: list[Item]) -> int:
    return sum(len(i) for i in items if isinstance(i, bytes))


class DropQueueModel(RuleBasedStateMachine):
    """The queue against a plain list of what it should hold."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: IngestQueue[Control] = IngestQueue(1, "drop", 1)
        self.model: list[Item] = []
        self.serial = 0
        self.put_total = 0  # audio bytes put since the start
        self.out_total = 0  # audio bytes drained
        self.dropped_total = 0  # audio bytes the queue said it dropped
        # Frames (by identity) holding header bytes: these frames are not RIFF, so the header
        # is "pending" until max_header_bytes have been put, as a stream cut inside its header.
        self.header_left = 0
        self.header_frames: list[bytes] = []

    @initialize(capacity=st.integers(1, 200), max_control=st.integers(1, 4),
                protect_head=st.booleans(), max_header=st.integers(1, 300))
    def configure(self, capacity: int, max_control: int, protect_head: bool,
                  max_header: int) -> None:
        self.queue = IngestQueue(capacity, "drop", max_control, max_header_bytes=max_header)
        self.queue.protect_head = protect_head
        self.header_left = max_header if protect_head else 0

    def _next(self) -> int:
        self.serial += 1
        return self.serial

    def _expected_after_drop(self) -> list[Item]:
        """The contract: shed the oldest droppable audio (not the protected head, not the newest
        frame) one frame at a time, and stop as soon as the audio fits."""
        items = list(self.model)
        kept = {id(f) for f in self.header_frames}
        droppable = [i for i in items[:-1] if isinstance(i, bytes) and id(i) not in kept]
        for victim in droppable:
            if audio_size(items) <= self.queue.capacity:
                break
            items.remove(victim)
        return items

    @rule(size=st.integers(SERIAL.size, 90))
    def put_audio(self, size: int) -> None:
        data = frame(self._next(), size)
        self.model.append(data)
        if self.header_left > 0:
            self.header_frames.append(data)
            self.header_left -= size
        self.put_total += size
        expected = self._expected_after_drop()
        dropped = self.queue.put_audio(data)
        assert dropped == audio_size(self.model) - audio_size(expected)
        self.dropped_total += dropped
        self.model = expected

    @precondition(lambda self: self.queue.control_count < self.queue.max_control)
    @rule()
    def put_control(self) -> None:
        item = Control(self._next())
        self.queue.put_control(item)
        self.model.append(item)

    @precondition(lambda self: self.queue.control_count >= self.queue.max_control)
    @rule()
    def control_lane_full_is_refused_and_changes_nothing(self) -> None:
        with pytest.raises(ControlLaneFull):
            self.queue.put_control(Control(-1))

    @rule()
    def drain(self) -> None:
        out = self.queue.drain()
        assert out == self.model
        self.header_frames = []
        self.out_total += audio_size(out)
        self.model = []

    @precondition(lambda self: self.queue.control_count == 0)
    @rule()
    def drain_audio(self) -> None:
        out = self.queue.drain_audio()
        assert out == self.model
        self.header_frames = []
        self.out_total += audio_size(list(out))
        self.model = []

    @invariant()
    def accounting(self) -> None:
        q = self.queue
        assert q.audio_bytes == audio_size(self.model)
        assert q.control_count == sum(isinstance(i, Control) for i in self.model)
        assert len(q) == len(self.model)
        # Every byte put is still queued, was drained, or was reported dropped.
        assert self.put_total == q.audio_bytes + self.out_total + self.dropped_total

    @invariant()
    def bound_holds(self) -> None:
        q = self.queue
        if q.audio_bytes <= q.capacity:
            return
        # Over the bound only when nothing droppable is left: the newest frame, and the head.
        audio = [i for i in self.model if isinstance(i, bytes)]
        keep = {id(audio[-1])} | {id(f) for f in self.header_frames}
        assert all(id(a) in keep for a in audio), (q.capacity, [len(a) for a in audio])

    @invariant()
    def flags_follow_the_bytes(self) -> None:
        q = self.queue
        assert q.full == (q.audio_bytes >= q.capacity)
        assert q.resumable == (q.audio_bytes <= q.capacity // 2)


TestDropQueueModel = DropQueueModel.TestCase
TestDropQueueModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


ops = st.lists(st.one_of(st.integers(SERIAL.size, 90), st.just("control"), st.just("drain")),
               max_size=60)


@given(ops, st.integers(1, 300))
def test_block_never_drops_or_reorders_and_a_reader_that_stops_when_full_stays_bounded(
    script: list[int | str], capacity: int,
) -> None:
    """`block` drops nothing: the reader stops reading while `full` and resumes at `resumable`,
    so the queue holds at most capacity - 1 bytes plus the one frame that filled it."""
    queue: IngestQueue[Control] = IngestQueue(capacity, "block", max_control=len(script) + 1)
    sent: list[Item] = []
    received: list[Item] = []
    reading = True
    for serial, op in enumerate(script):
        if op == "drain" or not reading:
            received.extend(queue.drain())
            assert queue.resumable
            reading = True
            continue
        if op == "control":
            control = Control(serial)
            queue.put_control(control)
            sent.append(control)
        else:
            assert isinstance(op, int)
            audio = frame(serial, op)
            assert queue.put_audio(audio) == 0
            assert queue.audio_bytes < capacity + op
            reading = not queue.full
            sent.append(audio)
    received.extend(queue.drain())
    assert received == sent


@given(st.lists(st.integers(SERIAL.size, 90), min_size=2, max_size=30), st.integers(1, 100))
def test_drop_keeps_a_protected_head_and_the_newest_frame(sizes: list[int], capacity: int) -> None:
    """A WAV stream's first frame (its header) and the frame just received are never shed."""
    queue: IngestQueue[Control] = IngestQueue(capacity, "drop", max_control=1)
    queue.protect_head = True
    frames = [frame(i, size) for i, size in enumerate(sizes)]
    for data in frames:
        queue.put_audio(data)
    out = queue.drain_audio()
    assert out[0] == frames[0] and out[-1] == frames[-1]
    assert out == [f for f in frames if f in out]  # what survives keeps its order


def test_controls_are_never_shed_even_when_audio_overflows_around_them() -> None:
    queue: IngestQueue[Control] = IngestQueue(10, "drop", max_control=2)
    a, b, c = frame(1, 8), frame(2, 8), frame(3, 8)
    queue.put_audio(a)
    queue.put_control(Control(10))
    assert queue.put_audio(b) == 8  # a goes, the control before b stays
    queue.put_control(Control(11))
    assert queue.put_audio(c) == 8  # b goes
    assert queue.drain() == [Control(10), Control(11), c]


def test_the_control_lane_bound_resets_when_drained() -> None:
    queue: IngestQueue[Control] = IngestQueue(10, "drop", max_control=1)
    queue.put_control(Control(1))
    with pytest.raises(ControlLaneFull):
        queue.put_control(Control(2))
    assert queue.drain() == [Control(1)]
    queue.put_control(Control(3))
    assert queue.drain() == [Control(3)]


# --- a WAV stream's header --------------------------------------------------------------------

def wav_bytes(audio_size: int, extra_chunk: int = 0) -> bytes:
    """A streaming WAV header (optionally with a LIST chunk before `data`) and its audio."""
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 16000, 32000, 2, 16)
    extra = struct.pack("<4sI", b"LIST", extra_chunk) + b"\x00" * (extra_chunk + extra_chunk % 2)
    data = struct.pack("<4sI", b"data", 0xFFFFFFFF)
    body = fmt + (extra if extra_chunk else b"") + data
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + body + b"\x01" * audio_size


def wav_queue(capacity: int) -> IngestQueue[Control]:
    queue: IngestQueue[Control] = IngestQueue(capacity, "drop", max_control=1)
    queue.protect_head = True  # what the ASR session sets for encoding=wav
    return queue


def test_a_wav_header_split_over_frames_is_kept_whole_before_the_first_drain() -> None:
    stream = wav_bytes(16000 - 4)  # 44 B header: 16 + 24 in their own frames, 4 in the third
    frames = [stream[:16], stream[16:40], stream[40:]]
    queue = wav_queue(16000)
    assert [queue.put_audio(f) for f in frames] == [0, 0, 0]
    assert queue.drain_audio() == frames


def test_once_the_header_is_through_the_oldest_frame_is_dropped_and_the_bound_holds() -> None:
    queue = wav_queue(16000)
    assert queue.put_audio(wav_bytes(0)) == 0
    assert queue.drain_audio() == [wav_bytes(0)]
    first, second = frame(1, 10000), frame(2, 10000)
    assert queue.put_audio(first) == 0
    assert queue.put_audio(second) == 10000
    assert queue.audio_bytes == 10000
    assert queue.drain_audio() == [second]


@given(st.integers(0, 120), st.lists(st.integers(1, 60), min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(SERIAL.size, 90), st.booleans()), max_size=30),
       st.integers(1, 200))
def test_a_wav_header_is_never_dropped_and_the_bound_holds_once_it_is_through(
    extra_chunk: int, cuts: list[int], audio: list[tuple[int, bool]], capacity: int,
) -> None:
    """However the header is split and drained, all its bytes come out in order; after the
    frame that ends it, the queue is back to the plain bound (only the newest frame may exceed)."""
    header = wav_bytes(0, extra_chunk)
    queue = wav_queue(capacity)
    out: list[bytes] = []
    pos = 0
    for cut in [*cuts, len(header)]:
        piece = header[pos : pos + cut]
        pos += len(piece)
        if piece:
            queue.put_audio(piece)
        if cut % 2:  # drain now and then, as the ingest stage does
            out.extend(queue.drain_audio())
    header_through = False
    for serial, (size, drain) in enumerate(audio):
        queue.put_audio(frame(serial, size))
        if header_through or len(queue) == 1:
            header_through = True
            assert queue.audio_bytes <= max(capacity, size)
        if drain:
            out.extend(queue.drain_audio())
    out.extend(queue.drain_audio())
    assert b"".join(out).startswith(header)
