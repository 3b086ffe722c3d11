"""The wire's audio encodings (docs/protocol.md `encoding`, `sample_rate`): PCM16, G.711
mu-law/A-law and (streamed) WAV, for the server's ingest path and for clients alike.

Sans-I/O: bytes in, int16 numpy arrays out. G.711 is done with lookup tables built once at
import so the per-frame cost is one numpy take(), never a per-sample Python loop. The
tables reproduce the ITU G.711 reference (Sun g711.c), which is what CPython's ``audioop``
implements. The live ingest path (``StreamDecoder.decode_pcm``) uses audioop's C decoder where
it is available (stdlib to 3.12, the audioop-lts package from 3.13): it is ten times cheaper
per 20 ms frame than a numpy call.
"""

from __future__ import annotations

import struct
import sys
import warnings
from collections.abc import Callable
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = [
    "ENCODINGS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "AudioFormatError",
    "BytesLike",
    "StreamDecoder",
    "alaw_to_pcm16",
    "pcm16_to_alaw",
    "pcm16_to_ulaw",
    "ulaw_to_pcm16",
    "wav_header",
]

Int16Array = npt.NDArray[np.int16]
# What socket layers hand over; a memoryview must be byte-formatted (memoryview.cast("B")).
BytesLike: TypeAlias = bytes | bytearray | memoryview

MIN_SAMPLE_RATE: Final = 8000
MAX_SAMPLE_RATE: Final = 48000
MAX_CHANNELS: Final = 8
ENCODINGS: Final = frozenset({"pcm_s16le", "mulaw", "alaw", "wav"})

_WAVE_FORMAT_PCM: Final = 0x0001
_WAVE_FORMAT_ALAW: Final = 0x0006
_WAVE_FORMAT_MULAW: Final = 0x0007
_WAVE_FORMAT_EXTENSIBLE: Final = 0xFFFE
# 0 is what writers that cannot seek back put in the size fields; 0xFFFFFFFF is the other
# common convention for "open-ended" (e.g. ffmpeg/sox writing to a pipe).
_STREAMING_SIZES: Final = (0, 0xFFFFFFFF)


class AudioFormatError(ValueError):
    """The input audio (or its declared format) cannot be decoded."""


def _build_ulaw_decode() -> Int16Array:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    t = ((mantissa << 3) + 0x84) << exponent
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _build_alaw_decode() -> Int16Array:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _segment(mag: npt.NDArray[np.int32], seg_end: tuple[int, ...]) -> npt.NDArray[np.int32]:
    # Index of the first segment whose end >= mag (8 when above all of them), as g711.c's search().
    return np.searchsorted(np.array(seg_end, dtype=np.int32), mag, side="left").astype(np.int32)


def _build_ulaw_encode() -> npt.NDArray[np.uint8]:
    # Indexed by the int16 sample reinterpreted as uint16, so encode is a single take().
    pcm = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)
    val = pcm >> 2  # G.711 mu-law works on 14-bit magnitudes
    mask = np.where(val < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(val), 8159) + (0x84 >> 2)
    seg = _segment(mag, (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF))
    code = (seg << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _build_alaw_encode() -> npt.NDArray[np.uint8]:
    pcm = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)
    val = pcm >> 3  # A-law works on 13-bit values
    mask = np.where(val >= 0, 0xD5, 0x55)
    mag = np.where(val >= 0, val, -val - 1)
    seg = _segment(mag, (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF))
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    code = (seg << 4) | ((mag >> shift) & 0x0F)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


_ULAW_DEC: Final = _build_ulaw_decode()
_ALAW_DEC: Final = _build_alaw_decode()
_ULAW_ENC: Final = _build_ulaw_encode()
_NATIVE_LE: Final = sys.byteorder == "little"

# audioop's G.711 decoders (the same ITU reference as the tables above; the tests hold them to
# it) cost ~0.2 us per 20 ms frame against ~2 us for the numpy table lookup. audioop is in the
# standard library up to 3.12 (deprecated) and in the audioop-lts package from 3.13; without
# it the tables do the work.
_g711_decode: tuple[Callable[[BytesLike, int], bytes], Callable[[BytesLike, int], bytes]] | None
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    _g711_decode = (audioop.ulaw2lin, audioop.alaw2lin)  # indexed by "is A-law"
except ImportError:
    _g711_decode = None
_ALAW_ENC: Final = _build_alaw_encode()
for _lut in (_ULAW_DEC, _ALAW_DEC, _ULAW_ENC, _ALAW_ENC):
    _lut.flags.writeable = False  # shared by every session: guard against accidental writes
del _lut


def ulaw_to_pcm16(data: BytesLike) -> Int16Array:
    """Decode G.711 mu-law bytes to int16 samples (same values as ``audioop.ulaw2lin(d, 2)``)."""
    return _ULAW_DEC.take(np.frombuffer(data, dtype=np.uint8))


def alaw_to_pcm16(data: BytesLike) -> Int16Array:
    """Decode G.711 A-law bytes to int16 samples (same values as ``audioop.alaw2lin(d, 2)``)."""
    return _ALAW_DEC.take(np.frombuffer(data, dtype=np.uint8))


def pcm16_to_ulaw(pcm: npt.ArrayLike) -> bytes:
    """Encode int16 samples to G.711 mu-law (same bytes as ``audioop.lin2ulaw(b, 2)``)."""
    return _ULAW_ENC.take(np.asarray(pcm, dtype=np.int16).view(np.uint16)).tobytes()


def pcm16_to_alaw(pcm: npt.ArrayLike) -> bytes:
    """Encode int16 samples to G.711 A-law (same bytes as ``audioop.lin2alaw(b, 2)``)."""
    return _ALAW_ENC.take(np.asarray(pcm, dtype=np.int16).view(np.uint16)).tobytes()


def _check_rate(sample_rate: int) -> None:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioFormatError(
            f"sample rate {sample_rate} Hz is outside the supported range "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioFormatError(f"channel count {channels} is outside 1..{MAX_CHANNELS}")


class StreamDecoder:
    """Stateful decoder from one client's byte stream to int16 mono samples.

    Frames may split anywhere (mid-sample, mid-header); leftovers are carried to the next
    ``decode`` call. Multi-channel input is downmixed by the floor of the channel mean.
    Returned arrays are fresh and writable: they never alias the caller's buffer.
    """

    __slots__ = (
        "_carry",
        "_channels",
        "_data_remaining",
        "_direct",
        "_encoding",
        "_frame_bytes",
        "_g711",
        "_header",
        "_header_complete",
        "_lut",
        "_max_header_bytes",
        "_sample_rate",
        "samples_decoded",
    )

    def __init__(
        self,
        encoding: str,
        sample_rate: int,
        channels: int = 1,
        *,
        max_header_bytes: int = 4096,
    ) -> None:
        if encoding not in ENCODINGS:
            raise AudioFormatError(
                f"unknown encoding {encoding!r}; expected one of {sorted(ENCODINGS)}"
            )
        _check_rate(sample_rate)
        _check_channels(channels)
        self._encoding = encoding
        self._sample_rate = sample_rate
        self._channels = channels
        self._max_header_bytes = max_header_bytes
        self._carry = b""
        self._header = bytearray()
        # None: no limit (raw encodings, or a streaming WAV whose data size is unknown).
        self._data_remaining: int | None = None
        self.samples_decoded = 0
        self._lut: Int16Array | None = None
        self._g711: Callable[[BytesLike, int], bytes] | None = None
        self._frame_bytes = 0
        self._header_complete = encoding != "wav"
        if self._header_complete:
            self._set_payload(encoding, channels)
        # Raw mono G.711 (a phone call's audio): every byte is a whole sample and there is no
        # header or data bound, so decode_pcm hands each frame straight to the C decoder.
        self._direct = self._g711 if encoding != "wav" and channels == 1 and _NATIVE_LE \
            else None

    @property
    def encoding(self) -> str:
        return self._encoding

    @property
    def sample_rate(self) -> int:
        """Input sample rate; for WAV, the header's rate once the header has been parsed."""
        return self._sample_rate

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def header_complete(self) -> bool:
        return self._header_complete

    @property
    def bytes_per_sample_frame(self) -> int:
        """Bytes per input sample frame (all channels); 0 while a WAV header is still pending."""
        return self._frame_bytes

    def _set_payload(self, payload: str, channels: int) -> None:
        if payload == "pcm_s16le":
            self._lut = None
            self._frame_bytes = 2 * channels
        else:
            self._lut = _ULAW_DEC if payload == "mulaw" else _ALAW_DEC
            self._frame_bytes = channels
        self._channels = channels
        # decode_pcm's C decoder, chosen once per stream rather than per frame.
        self._g711 = (None if _g711_decode is None or self._lut is None
                      else _g711_decode[self._lut is _ALAW_DEC])

    def decode(self, data: BytesLike) -> Int16Array:
        """Decode the next piece of the stream; returns the mono samples completed so far."""
        payload = self._whole_frames(data)
        if not payload:
            return np.empty(0, dtype=np.int16)
        out = self._to_array(payload)
        self.samples_decoded += out.shape[0]
        return out

    def decode_pcm(self, data: BytesLike) -> bytes:
        """decode() as PCM16 bytes (native order, mono): what webrtcvad and the engines take.

        The ingest path's form: mono G.711 goes through audioop's C decoder and mono PCM
        through untouched, so a 20 ms frame costs no numpy call (each one is ~1 us of fixed
        overhead, more than the work on 160 samples)."""
        direct = self._direct
        if direct is not None:
            self.samples_decoded += len(data)
            return direct(data, 2)
        payload = self._whole_frames(data)
        if not payload:
            return b""
        g711 = self._g711
        if self._channels != 1 or not _NATIVE_LE:
            pcm = self._to_array(payload).tobytes()
        elif self._lut is None:
            pcm = bytes(payload)
        elif g711 is not None:
            pcm = g711(payload, 2)
        else:
            pcm = self._to_array(payload).tobytes()
        self.samples_decoded += len(pcm) // 2
        return pcm

    def _whole_frames(self, data: BytesLike) -> BytesLike:
        """Header, data-chunk bound and carry handled: the whole sample frames of the payload."""
        if not self._header_complete:
            data = self._feed_header(data)
            if not self._header_complete:
                return b""
        if self._data_remaining is not None:
            if len(data) > self._data_remaining:
                # Bytes after the data chunk are trailing chunks (LIST, id3, ...), not audio.
                data = data[: self._data_remaining]
            self._data_remaining -= len(data)
        if self._carry:
            data = self._carry + data
        fb = self._frame_bytes
        usable = len(data) - len(data) % fb
        if usable != len(data):
            self._carry = bytes(data[usable:])
            return data[:usable]
        self._carry = b""
        return data

    def _to_array(self, data: BytesLike) -> Int16Array:
        lut = self._lut
        if lut is None:
            # astype copies (and byte-swaps on big-endian hosts), so the result never aliases data.
            out = np.frombuffer(data, dtype="<i2").astype(np.int16)
        else:
            out = lut.take(np.frombuffer(data, dtype=np.uint8))
        ch = self._channels
        if ch > 1:
            out = (out.reshape(-1, ch).sum(axis=1, dtype=np.int32) // ch).astype(np.int16)
        return out

    def _feed_header(self, data: BytesLike) -> BytesLike:
        """Buffer header bytes; once complete, return whatever followed it (audio payload)."""
        hdr = self._header
        hdr += data
        if len(hdr) >= 4 and hdr[:4] != b"RIFF":
            raise AudioFormatError(f"not a RIFF/WAVE stream (starts with {bytes(hdr[:4])!r})")
        if len(hdr) >= 12 and hdr[8:12] != b"WAVE":
            raise AudioFormatError(f"RIFF form type is {bytes(hdr[8:12])!r}, expected b'WAVE'")
        fmt: tuple[int, int, int] | None = None  # (payload code, channels, rate)
        pos = 12
        while len(hdr) >= pos + 8:
            chunk_id = bytes(hdr[pos : pos + 4])
            (size,) = struct.unpack_from("<I", hdr, pos + 4)
            body = pos + 8
            if chunk_id == b"data":
                if body > self._max_header_bytes:
                    self._header_too_long()
                if fmt is None:
                    raise AudioFormatError("WAV data chunk appears before the fmt chunk")
                self._start_payload(fmt, size)
                rest = bytes(hdr[body:])
                self._header = bytearray()
                return rest
            end = body + size + (size & 1)  # RIFF chunks are word-aligned
            if end > self._max_header_bytes:
                self._header_too_long()
            if len(hdr) < end:
                break
            if chunk_id == b"fmt ":
                fmt = self._parse_fmt(bytes(hdr[body : body + size]))
            pos = end
        if len(hdr) > self._max_header_bytes:
            self._header_too_long()
        return b""

    def _header_too_long(self) -> None:
        raise AudioFormatError(
            f"WAV header not complete within {self._max_header_bytes} bytes (no data chunk found)"
        )

    @staticmethod
    def _parse_fmt(body: bytes) -> tuple[int, int, int]:
        if len(body) < 16:
            raise AudioFormatError(f"WAV fmt chunk too short ({len(body)} bytes)")
        code, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", body)
        if code == _WAVE_FORMAT_EXTENSIBLE:
            if len(body) < 40:
                raise AudioFormatError("WAVE_FORMAT_EXTENSIBLE fmt chunk too short")
            # The SubFormat GUID starts with the classic format code.
            (code,) = struct.unpack_from("<H", body, 24)
            if code != _WAVE_FORMAT_PCM:
                raise AudioFormatError(
                    f"WAVE_FORMAT_EXTENSIBLE subformat 0x{code:04x} is not supported (PCM only)"
                )
        if code == _WAVE_FORMAT_PCM:
            if bits != 16:
                raise AudioFormatError(f"WAV PCM with {bits} bits per sample; only 16 supported")
        elif code in (_WAVE_FORMAT_ALAW, _WAVE_FORMAT_MULAW):
            if bits != 8:
                raise AudioFormatError(f"WAV G.711 with {bits} bits per sample; expected 8")
        else:
            raise AudioFormatError(
                f"WAV format code 0x{code:04x} is not supported (PCM 16-bit, A-law, mu-law only)"
            )
        _check_channels(channels)
        _check_rate(rate)
        return code, channels, rate

    def _start_payload(self, fmt: tuple[int, int, int], data_size: int) -> None:
        code, channels, rate = fmt
        payload = {_WAVE_FORMAT_PCM: "pcm_s16le", _WAVE_FORMAT_ALAW: "alaw"}.get(code, "mulaw")
        self._set_payload(payload, channels)
        self._sample_rate = rate
        self._data_remaining = None if data_size in _STREAMING_SIZES else data_size
        self._header_complete = True


def wav_header(
    sample_rate: int,
    channels: int = 1,
    num_frames: int | None = None,
    fmt: str = "pcm_s16le",
) -> bytes:
    """Build a RIFF/WAVE header; ``num_frames=None`` writes streaming (0xFFFFFFFF) sizes.

    PCM gives the canonical 44-byte header. G.711 ("mulaw"/"alaw") follows the WAVEFORMATEX
    rules for non-PCM data: an 18-byte fmt chunk (cbSize=0) plus a fact chunk, 58 bytes total.
    """
    _check_rate(sample_rate)
    _check_channels(channels)
    if fmt == "pcm_s16le":
        code, width = _WAVE_FORMAT_PCM, 2
    elif fmt in ("mulaw", "alaw"):
        code, width = (_WAVE_FORMAT_MULAW if fmt == "mulaw" else _WAVE_FORMAT_ALAW), 1
    else:
        raise AudioFormatError(f"cannot write WAV with format {fmt!r}")
    align = width * channels
    fmt_body = struct.pack(
        "<HHIIHH", code, channels, sample_rate, sample_rate * align, align, 8 * width
    )
    extra = b""
    if code != _WAVE_FORMAT_PCM:
        fmt_body += b"\x00\x00"
        fact = 0xFFFFFFFF if num_frames is None else num_frames
        extra = b"fact" + struct.pack("<II", 4, fact)
    head_len = 4 + 8 + len(fmt_body) + len(extra) + 8  # "WAVE" + chunks + data chunk header
    if num_frames is None:
        data_size = riff_size = 0xFFFFFFFF
    else:
        if num_frames < 0:
            raise ValueError("num_frames must be >= 0")
        data_size = num_frames * align
        riff_size = head_len + data_size + (data_size & 1)
        if riff_size > 0xFFFFFFFF:
            raise ValueError(f"{num_frames} frames do not fit in a RIFF file (4 GiB limit)")
    return b"".join(
        (
            b"RIFF",
            struct.pack("<I", riff_size),
            b"WAVE",
            b"fmt ",
            struct.pack("<I", len(fmt_body)),
            fmt_body,
            extra,
            b"data",
            struct.pack("<I", data_size),
        )
    )


class StreamEncoder:
    """Mono PCM16 samples -> a session's output encoding. For `wav` the first bytes carry a
    streaming header (data size 0xFFFFFFFF: the length is unknown while audio is produced)."""

    def __init__(self, encoding: str, sample_rate: int) -> None:
        if encoding not in ENCODINGS:
            raise AudioFormatError(f"unsupported encoding {encoding!r}")
        _check_rate(sample_rate)
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.bytes_per_sample = 1 if encoding in ("mulaw", "alaw") else 2
        self._header_pending = encoding == "wav"

    def encode(self, pcm: npt.NDArray[np.int16]) -> bytes:
        if self.encoding == "mulaw":
            return pcm16_to_ulaw(pcm)
        if self.encoding == "alaw":
            return pcm16_to_alaw(pcm)
        data = pcm.astype("<i2", copy=False).tobytes()
        if self._header_pending:
            self._header_pending = False
            return wav_header(self.sample_rate, 1, None) + data
        return data
