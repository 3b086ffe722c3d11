"""Compressed audio out, encoded as it is produced: MP3 (LAME) and Ogg Opus through
libsndfile (the `soundfile` wheel bundles it with its codecs; docs/decisions/14D1-*.md).

An encoder takes 16-bit mono PCM in pieces and hands back whatever encoded bytes those pieces
completed, so a response can stream them before the whole text is synthesized. libsndfile
writes into `_Sink`, a write-only file: it never seeks back (the header fields it would fill in
at the end stay "unknown", which every decoder accepts for a stream).
"""

from __future__ import annotations

import threading
from typing import Final, Literal

import numpy as np
import soundfile

CompressedFormat = Literal["mp3", "opus"]
COMPRESSED_FORMATS: Final[tuple[CompressedFormat, ...]] = ("mp3", "opus")
CONTENT_TYPES: Final[dict[CompressedFormat, str]] = {
    "mp3": "audio/mpeg", "opus": "audio/ogg"}
# (libsndfile major format, subtype)
_LIBSNDFILE: Final[dict[CompressedFormat, tuple[str, str]]] = {
    "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
# Not FLAC: a FLAC stream without its STREAMINFO length (filled in by seeking back) reads as
# endless in libsndfile itself.
# Opus codes only these rates; the TTS session is asked for one of them. An Ogg page (about
# 1 s of Opus) is the unit that streams.
OPUS_RATES: Final = (8000, 12000, 16000, 24000, 48000)
# Constant bitrate: a stream has no Xing frame count, and a decoder estimates a VBR stream's
# length from its first frame (libsndfile's own reader stops early on one). 0.5 is about
# 80 kbit/s at 24 kHz mono.
MP3_COMPRESSION: Final = 0.5


class EncoderError(ValueError):
    """The format cannot encode audio as asked (an Opus rate it does not code)."""


class _Sink:
    """What libsndfile writes into: bytes collected until taken. It reports its end on every
    seek, so libsndfile's end-of-file header updates are skipped rather than misplaced."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._size += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._size

    def tell(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class StreamEncoder:
    """PCM16 mono in, encoded bytes out as they are completed; `finish` flushes the rest.

    Thread-safe: a request encodes in a worker thread (libsndfile releases the GIL), and its
    cleanup may `close` while a cancelled request's last `encode` still runs there."""

    def __init__(self, fmt: CompressedFormat, sample_rate: int) -> None:
        if fmt == "opus" and sample_rate not in OPUS_RATES:
            raise EncoderError(f"Opus codes {OPUS_RATES} Hz, not {sample_rate}")
        major, subtype = _LIBSNDFILE[fmt]
        self.format = fmt
        self.content_type = CONTENT_TYPES[fmt]
        self._sink = _Sink()
        extra: dict[str, object] = {}
        if fmt == "mp3":
            extra = {"compression_level": MP3_COMPRESSION, "bitrate_mode": "CONSTANT"}
        self._file = soundfile.SoundFile(self._sink, mode="w", samplerate=sample_rate,
                                         channels=1, format=major, subtype=subtype, **extra)
        self._pending = b""  # an odd byte left over between pieces
        self._lock = threading.Lock()

    def encode(self, pcm: bytes) -> bytes:
        with self._lock:
            if self._file.closed:
                return b""
            data = self._pending + pcm
            whole = len(data) - len(data) % 2
            self._pending = data[whole:]
            if whole:
                self._file.write(np.frombuffer(data[:whole], dtype="<i2"))
            return self._sink.take()

    def finish(self) -> bytes:
        with self._lock:
            if not self._file.closed:
                self._file.close()
            return self._sink.take()

    def close(self) -> None:
        """Release the encoder without wanting its tail (the client went away)."""
        with self._lock:
            if not self._file.closed:
                self._file.close()
