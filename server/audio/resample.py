"""Per-session streaming resampler (int16 mono) on top of soxr's ResampleStream.

One Resampler per session keeps the filter state across frames, so chunk boundaries leave no
clicks and the output equals a one-shot resample of the whole stream.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

__all__ = ["QUALITIES", "Resampler", "UtteranceResampler"]

Int16Array = npt.NDArray[np.int16]

QUALITIES: Final = frozenset({"QQ", "LQ", "MQ", "HQ", "VHQ"})

# Zero-length arrays cannot be mutated, so one shared instance is safe to hand out.
_EMPTY: Final[Int16Array] = np.empty(0, dtype=np.int16)
# A dtype object, passed positionally: numpy 2 spends ~0.5 us per call turning `dtype=np.int16`
# (a keyword and a type) into this.
_INT16: Final = np.dtype(np.int16)


class Resampler:
    """Stateful int16 mono resampler; a no-op pass-through when the rates are equal.

    Its soxr stream is built at the first chunk: an HQ stream holds ~80 KiB once it has run,
    and a resampler often waits for audio (a phone call's TTS between replies, where a fresh
    one is made for every chunk of text)."""

    __slots__ = ("_finished", "_in_rate", "_out_rate", "_quality", "_stream")

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if quality not in QUALITIES:
            raise ValueError(
                f"unknown soxr quality {quality!r}; expected one of {sorted(QUALITIES)}"
            )
        self._in_rate = in_rate
        self._out_rate = out_rate
        self._quality = quality
        self._finished = False
        # Equal rates skip soxr entirely: no filter delay and no per-session C state.
        self._stream: soxr.ResampleStream | None = None

    @property
    def in_rate(self) -> int:
        return self._in_rate

    @property
    def out_rate(self) -> int:
        return self._out_rate

    @property
    def quality(self) -> str:
        return self._quality

    @property
    def passthrough(self) -> bool:
        return self._in_rate == self._out_rate

    @property
    def finished(self) -> bool:
        return self._finished

    def process(self, x: npt.ArrayLike) -> Int16Array:
        """Resample the next chunk. Output lags input by the filter delay until ``flush``."""
        if self._finished:
            raise RuntimeError("Resampler.process() called after flush()")
        # soxr insists on an exact ndarray of the stream dtype; this is a no-op for the
        # contiguous int16 arrays the decoder produces.
        arr = np.ascontiguousarray(x, dtype=np.int16)
        if arr.ndim != 1:
            raise ValueError(f"expected a 1-D mono array, got shape {arr.shape}")
        if arr.shape[0] == 0:
            return _EMPTY
        return self._resample(arr)

    def _resample(self, arr: Int16Array) -> Int16Array:
        """`process` of a non-empty 1-D contiguous int16 array (what `process` makes of its
        input; np.frombuffer of PCM16 bytes is one already)."""
        if self._finished:
            raise RuntimeError("Resampler.process() called after flush()")
        stream = self._stream
        if stream is None:
            if self._in_rate == self._out_rate:
                return arr
            stream = self._stream = soxr.ResampleStream(
                self._in_rate, self._out_rate, 1, dtype="int16", quality=self._quality)
        out: Int16Array = stream.resample_chunk(arr)
        return out

    def reset(self) -> None:
        """Forget the stream (filter state, finished): ready for an unrelated one, keeping the
        filter tables (cheaper than a new soxr stream, and no allocator churn)."""
        if self._stream is not None:
            self._stream.clear()
        self._finished = False

    def flush(self) -> Int16Array:
        """Drain the filter tail; the resampler is finished afterwards (idempotent)."""
        if self._finished:
            return _EMPTY
        self._finished = True
        stream = self._stream
        if stream is None:
            return _EMPTY
        out: Int16Array = stream.resample_chunk(_EMPTY, last=True)
        return out


class UtteranceResampler:
    """Utterances' speech audio (PCM16 bytes) -> engine-rate PCM in chunks of >= chunk_ms.

    The VAD runs at the client's rate, so only speech is ever resampled, and in chunks: soxr
    costs ~5 us per call whatever the chunk size, which per 20 ms frame was the biggest item
    of the ingest path. Each utterance is a stream of its own, flushed at its end (`finish`),
    so no part of its last syllable is left inside a filter when the engine is asked for the
    final. Its soxr stream lives while the utterance does: a soxr HQ stream holds ~90 KiB once
    it has run, a large part of a phone call's memory, and a caller is silent much of the time
    (a new stream costs ~20-30 us, once per utterance). An utterance abandoned without
    `finish` leaves its stream to the next one, reset.
    """

    __slots__ = ("_dirty", "_in_rate", "_min_bytes", "_out_rate", "_parts", "_quality",
                 "_resampler", "_size")

    def __init__(self, in_rate: int, out_rate: int, quality: str, chunk_ms: int) -> None:
        self._in_rate, self._out_rate, self._quality = in_rate, out_rate, quality
        # Built here so bad rates or quality fail at once, then per utterance (start).
        self._resampler: Resampler | None = Resampler(in_rate, out_rate, quality)
        self._min_bytes = max(2, in_rate * chunk_ms // 1000 * 2)
        self._parts: list[bytes] = []
        self._size = 0
        self._dirty = False  # holds audio or state of an utterance

    def start(self) -> None:
        """A new utterance; whatever an abandoned one left behind is dropped."""
        if self._resampler is None:
            self._resampler = Resampler(self._in_rate, self._out_rate, self._quality)
        elif self._dirty:
            self._parts = []
            self._size = 0
            self._resampler.reset()
            self._dirty = False

    def feed(self, pcm: bytes) -> bytes:
        """Add speech audio; return engine-rate PCM once a chunk is complete, else b""."""
        self._dirty = True
        self._parts.append(pcm)
        self._size += len(pcm)
        if self._size < self._min_bytes:
            return b""
        return self._convert()

    def finish(self) -> bytes:
        """The utterance ended: everything still buffered or inside the filter."""
        head = self._convert() if self._size else b""
        resampler = self._resampler
        tail = resampler.flush() if resampler is not None else _EMPTY
        self._resampler = None  # its memory is free until the next utterance starts
        self._dirty = False
        return head + tail.tobytes() if len(tail) else head

    def _convert(self) -> bytes:
        parts = self._parts
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._parts = []
        self._size = 0
        resampler = self._resampler
        if resampler is None:  # fed outside an utterance (a caller's bug): one of its own
            resampler = self._resampler = Resampler(self._in_rate, self._out_rate,
                                                    self._quality)
        n = len(data) // 2  # PCM16 from the endpointer is always whole samples
        if not n:
            return resampler.process(_EMPTY).tobytes()  # raises after flush, like any chunk
        # frombuffer's array is what Resampler.process would make of it: skip the checks.
        return resampler._resample(np.frombuffer(data, _INT16, n)).tobytes()
