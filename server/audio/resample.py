"""Per-session streaming resampler (int16 mono) on top of soxr's ResampleStream.

One Resampler per session keeps the filter state across frames, so chunk boundaries leave no
clicks and the output equals a one-shot resample of the whole stream.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

__all__ = ["QUALITIES", "HalfbandStream", "Resampler", "UtteranceResampler"]

Int16Array = npt.NDArray[np.int16]
Float64Array = npt.NDArray[np.float64]

# soxr's qualities, and "HB": a 63-tap half-band FIR of our own for the exact 2:1 and 1:2 ratios
# of a phone call (8 <-> 16 kHz); any other ratio at "HB" is soxr MQ. A soxr stream holds
# 60-90 KiB of C memory whatever its quality (QQ 35 KiB); HalfbandStream holds ~0.5 KiB.
# docs/decisions/15R2-telephony-halfband-resampler.md.
QUALITIES: Final = frozenset({"QQ", "LQ", "MQ", "HQ", "VHQ", "HB"})
HALFBAND_FALLBACK: Final = "MQ"


def _halfband_taps(k: int = 15, beta: float = 7.5) -> Float64Array:
    """The non-zero off-centre taps (2k + 2, symmetric) of a Kaiser-windowed half-band low-pass
    of 4k + 3 taps: its centre tap is 1/2 and every other even offset from it is 0, so each
    output sample costs 2k + 2 multiplies. k = 15, beta = 7.5 (63 taps): within the telephone
    band (300-3400 Hz) it is as close to soxr HQ as MQ is (~75 dB on speech)."""
    n = 4 * k + 3
    t = np.arange(n) - (n - 1) / 2
    h = 0.5 * np.sinc(0.5 * t) * np.kaiser(n, beta)
    h /= h.sum()
    taps: Float64Array = h[0::2].copy()  # odd offsets from the centre: -(2k+1) ... 2k+1
    return taps


_TAPS: Final[Float64Array] = _halfband_taps()
_TAPS_X2: Final[Float64Array] = 2.0 * _TAPS


class HalfbandStream:
    """A streaming 2:1 or 1:2 int16 resampler with the interface Resampler uses of soxr's
    ResampleStream (`resample_chunk(x, last=False)`, `clear()`). Linear phase; its output is
    aligned with its input (the filter's delay is held back until `last`), and any chunking of
    the input gives the same output. Its state is the last ~32 input samples."""

    __slots__ = ("_emitted", "_hist", "_k", "_total", "_up")

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if out_rate == 2 * in_rate:
            self._up = True
        elif in_rate == 2 * out_rate:
            self._up = False
        else:
            raise ValueError(f"HalfbandStream takes 2:1 or 1:2 only, got {in_rate} -> {out_rate}")
        self._k = (len(_TAPS) - 2) // 2
        self.clear()

    def clear(self) -> None:
        k = self._k
        self._total = 0  # input samples
        self._emitted = 0  # output samples
        # The input the next output needs, from before it (zeros at the start): 1:2 from
        # x[n - k], 2:1 from the pair (x[2m], x[2m + 1]) with m = n - k - 1.
        self._hist: Float64Array = np.zeros(k if self._up else 2 * (k + 1))

    def resample_chunk(self, x: Int16Array, last: bool = False) -> Int16Array:
        k = self._k
        self._total += len(x)
        xf: Float64Array = x.astype(np.float64)
        if last:  # the filter's tail: zeros after the input, output cut at the exact length
            xf = np.concatenate((xf, np.zeros(k + 1 if self._up else 2 * k + 3)))
        y = self._up_chunk(xf) if self._up else self._down_chunk(xf)
        if last:
            y = y[: max(0, (2 * self._total if self._up else (self._total + 1) // 2)
                        - self._emitted)]
        self._emitted += len(y)
        # In place (np.clip's wrapper costs more than the filter on a 20-100 ms chunk).
        np.rint(y, out=y)
        np.minimum(y, 32767.0, out=y)
        np.maximum(y, -32768.0, out=y)
        out: Int16Array = y.astype(np.int16)
        return out

    def _up_chunk(self, x: Float64Array) -> Float64Array:
        # y[2n] = x[n]; y[2n+1] = sum_m 2 g[m] x[n - k + m]
        k = self._k
        b = np.concatenate((self._hist, x))
        cnt = len(b) - 2 * k - 1
        if cnt <= 0:
            self._hist = b
            return np.zeros(0)
        y = np.empty(2 * cnt)
        y[0::2] = b[k : k + cnt]
        y[1::2] = np.convolve(b, _TAPS_X2, "valid")
        self._hist = b[cnt:]
        return y

    def _down_chunk(self, x: Float64Array) -> Float64Array:
        # y[n] = x[2n] / 2 + sum_m g[m] x[2(n - k - 1 + m) + 1]: the input's odd samples
        # through the taps, its even ones through the centre tap. _hist starts at the even
        # sample of pair n - k - 1 (the oldest that the next output needs).
        k = self._k
        b = np.concatenate((self._hist, x))
        pairs = len(b) // 2
        cnt = pairs - 2 * k - 1
        if cnt <= 0:
            self._hist = b
            return np.zeros(0)
        y: Float64Array = np.convolve(b[1 : 2 * pairs : 2], _TAPS, "valid")
        y += 0.5 * b[2 * k + 2 : 2 * (k + 1 + cnt) : 2]
        self._hist = b[2 * cnt :]
        return y


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
        self._stream: soxr.ResampleStream | HalfbandStream | None = None

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
            stream = self._stream = self._new_stream()
        out: Int16Array = stream.resample_chunk(arr)
        return out

    def _new_stream(self) -> soxr.ResampleStream | HalfbandStream:
        quality = self._quality
        if quality == "HB":
            if self._out_rate == 2 * self._in_rate or self._in_rate == 2 * self._out_rate:
                return HalfbandStream(self._in_rate, self._out_rate)
            quality = HALFBAND_FALLBACK
        return soxr.ResampleStream(self._in_rate, self._out_rate, 1, dtype="int16",
                                   quality=quality)

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
