"""G.711 tables against CPython's audioop, and the streaming decoder across arbitrary splits."""

from __future__ import annotations

import io
import itertools
import struct
import warnings
import wave
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from streamgate_protocol.audio import (
    AudioFormatError,
    StreamDecoder,
    alaw_to_pcm16,
    pcm16_to_alaw,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
    wav_header,
)

with warnings.catch_warnings():
    # audioop is the reference implementation here; it is deprecated (removed in 3.13).
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_CODES = bytes(range(256))
ALL_PCM = np.arange(-32768, 32768, dtype=np.int16)


def _pcm(n: int, seed: int = 0, channels: int = 1) -> npt.NDArray[np.int16]:
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32768, size=n * channels, dtype=np.int16)


def _riff(*chunks: bytes, riff_size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def _chunk(cid: bytes, body: bytes, size: int | None = None) -> bytes:
    pad = b"\x00" if len(body) % 2 else b""
    return cid + struct.pack("<I", len(body) if size is None else size) + body + pad


def _fmt(code: int, channels: int, rate: int, bits: int, extra: bytes = b"") -> bytes:
    align = channels * bits // 8
    return _chunk(
        b"fmt ", struct.pack("<HHIIHH", code, channels, rate, rate * align, align, bits) + extra
    )


def _extensible(subformat: int, channels: int = 1, rate: int = 16000) -> bytes:
    guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    extra = struct.pack("<HHI", 22, 16, 0x4) + struct.pack("<H", subformat) + guid_tail
    return _fmt(0xFFFE, channels, rate, 16, extra)


def _decode_pieces(dec: StreamDecoder, data: bytes, cuts: list[int]) -> npt.NDArray[np.int16]:
    bounds = [0, *cuts, len(data)]
    parts = [dec.decode(data[a:b]) for a, b in itertools.pairwise(bounds)]
    return np.concatenate(parts) if parts else np.empty(0, np.int16)


# --- G.711 tables -------------------------------------------------------------------------


def test_ulaw_decode_matches_audioop_for_all_codes() -> None:
    expected = np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), dtype="<i2")
    got = ulaw_to_pcm16(ALL_CODES)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, expected)


def test_alaw_decode_matches_audioop_for_all_codes() -> None:
    expected = np.frombuffer(audioop.alaw2lin(ALL_CODES, 2), dtype="<i2")
    np.testing.assert_array_equal(alaw_to_pcm16(ALL_CODES), expected)


def test_ulaw_encode_matches_audioop_over_int16_range() -> None:
    assert pcm16_to_ulaw(ALL_PCM) == audioop.lin2ulaw(ALL_PCM.astype("<i2").tobytes(), 2)


def test_alaw_encode_matches_audioop_over_int16_range() -> None:
    assert pcm16_to_alaw(ALL_PCM) == audioop.lin2alaw(ALL_PCM.astype("<i2").tobytes(), 2)


def test_encode_decode_is_stable() -> None:
    # Each code decodes to a level that re-encodes to a code with the same level
    # (mu-law has two codes for zero, so the code itself may change).
    for dec, enc in ((ulaw_to_pcm16, pcm16_to_ulaw), (alaw_to_pcm16, pcm16_to_alaw)):
        levels = dec(ALL_CODES)
        np.testing.assert_array_equal(dec(enc(levels)), levels)


def test_encode_accepts_non_contiguous_and_lists() -> None:
    x = _pcm(400)
    assert pcm16_to_ulaw(x[::2]) == pcm16_to_ulaw(x[::2].copy())
    assert pcm16_to_alaw([0, 1000, -1000]) == pcm16_to_alaw(np.array([0, 1000, -1000], np.int16))


def test_empty_inputs() -> None:
    assert ulaw_to_pcm16(b"").shape == (0,)
    assert pcm16_to_alaw(np.empty(0, np.int16)) == b""


# --- StreamDecoder: raw encodings ---------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "channels"),
    [("pcm_s16le", 1), ("pcm_s16le", 2), ("mulaw", 1), ("alaw", 1), ("mulaw", 3)],
)
def test_split_at_every_byte_boundary_equals_one_shot(encoding: str, channels: int) -> None:
    if encoding == "pcm_s16le":
        data = _pcm(101, channels=channels).astype("<i2").tobytes()
    else:
        data = bytes(np.random.default_rng(1).integers(0, 256, 101 * channels, dtype=np.uint8))
    one_shot = StreamDecoder(encoding, 8000, channels).decode(data)
    assert len(one_shot) == 101
    for cut in range(len(data) + 1):
        dec = StreamDecoder(encoding, 8000, channels)
        np.testing.assert_array_equal(_decode_pieces(dec, data, [cut]), one_shot)
        assert dec.samples_decoded == 101
    dec = StreamDecoder(encoding, 8000, channels)
    np.testing.assert_array_equal(_decode_pieces(dec, data, list(range(1, len(data)))), one_shot)


def test_pcm16_mono_values_and_properties() -> None:
    x = _pcm(160)
    dec = StreamDecoder("pcm_s16le", 16000)
    assert dec.header_complete and dec.bytes_per_sample_frame == 2
    out = dec.decode(x.astype("<i2").tobytes())
    np.testing.assert_array_equal(out, x)
    assert out.flags.writeable
    assert dec.samples_decoded == 160 and dec.sample_rate == 16000 and dec.channels == 1


def test_decoded_array_does_not_alias_caller_buffer() -> None:
    buf = bytearray(_pcm(10).astype("<i2").tobytes())
    out = StreamDecoder("pcm_s16le", 8000).decode(buf)
    before = out.copy()
    buf[:] = bytes(len(buf))
    np.testing.assert_array_equal(out, before)


def test_accepts_bytearray_and_memoryview_pieces() -> None:
    x = _pcm(100, channels=2)
    data = wav_header(16000, 2) + x.astype("<i2").tobytes()
    dec = StreamDecoder("wav", 8000)
    got = np.concatenate(
        [
            dec.decode(memoryview(data)[:30]),
            dec.decode(bytearray(data[30:201])),
            dec.decode(data[201:]),
        ]
    )
    np.testing.assert_array_equal(got, StreamDecoder("wav", 8000).decode(data))


def test_stereo_downmix_is_floor_mean() -> None:
    frames = np.array([[1000, 3000], [-1, 0], [32767, 32767], [-32768, -32768]], np.int16)
    dec = StreamDecoder("pcm_s16le", 8000, channels=2)
    assert dec.bytes_per_sample_frame == 4
    out = dec.decode(frames.astype("<i2").tobytes())
    np.testing.assert_array_equal(out, [2000, -1, 32767, -32768])


def test_g711_stereo_downmix() -> None:
    codes = bytes([0x00, 0x80, 0x10, 0x10])
    dec = StreamDecoder("alaw", 8000, channels=2)
    assert dec.bytes_per_sample_frame == 2
    lin = alaw_to_pcm16(codes).astype(np.int32).reshape(-1, 2)
    np.testing.assert_array_equal(dec.decode(codes), lin.sum(axis=1) // 2)


@pytest.mark.parametrize("rate", [7999, 48001, 96000, 0])
def test_rate_out_of_range(rate: int) -> None:
    with pytest.raises(AudioFormatError, match="sample rate"):
        StreamDecoder("pcm_s16le", rate)


def test_bad_encoding_and_channels() -> None:
    with pytest.raises(AudioFormatError, match="unknown encoding"):
        StreamDecoder("opus", 16000)
    with pytest.raises(AudioFormatError, match="channel"):
        StreamDecoder("pcm_s16le", 16000, channels=0)


# --- StreamDecoder: WAV -------------------------------------------------------------------


def test_wav_header_matches_stdlib_wave() -> None:
    x = _pcm(300)
    blob = wav_header(22050, 1, num_frames=300) + x.astype("<i2").tobytes()
    assert len(wav_header(22050, 1, num_frames=300)) == 44
    with wave.open(io.BytesIO(blob)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2)
        assert w.getnframes() == 300
        assert w.readframes(300) == x.astype("<i2").tobytes()


def test_wav_header_streaming_sizes() -> None:
    hdr = wav_header(16000)
    assert struct.unpack_from("<I", hdr, 4)[0] == 0xFFFFFFFF
    assert hdr[36:40] == b"data" and struct.unpack_from("<I", hdr, 40)[0] == 0xFFFFFFFF
    with pytest.raises(AudioFormatError):
        wav_header(16000, fmt="flac")


@pytest.mark.parametrize("num_frames", [None, 300])
def test_wav_split_at_every_byte_boundary(num_frames: int | None) -> None:
    x = _pcm(300, channels=2)
    data = wav_header(44100, 2, num_frames=num_frames) + x.astype("<i2").tobytes()
    one_shot = StreamDecoder("wav", 16000).decode(data)
    np.testing.assert_array_equal(one_shot, (x.reshape(-1, 2).astype(np.int32).sum(1) // 2))
    for cut in range(0, len(data) + 1, 3):
        dec = StreamDecoder("wav", 16000)
        np.testing.assert_array_equal(_decode_pieces(dec, data, [cut]), one_shot)
    dec = StreamDecoder("wav", 16000)
    got = _decode_pieces(dec, data, list(range(1, len(data))))
    np.testing.assert_array_equal(got, one_shot)


def test_wav_header_over_many_frames_sets_properties() -> None:
    x = _pcm(80)
    data = wav_header(8000, 1) + x.astype("<i2").tobytes()
    dec = StreamDecoder("wav", 16000)
    assert not dec.header_complete and dec.bytes_per_sample_frame == 0
    for i in range(0, 40, 5):  # header arrives in 5-byte frames
        assert dec.decode(data[i : i + 5]).shape == (0,)
        assert not dec.header_complete
    assert dec.sample_rate == 16000  # constructor value until the header is parsed
    out = dec.decode(data[40:])
    assert dec.header_complete and dec.sample_rate == 8000 and dec.channels == 1
    assert dec.bytes_per_sample_frame == 2 and dec.samples_decoded == 80
    np.testing.assert_array_equal(out, x)


def test_wav_skips_list_chunk_and_odd_sized_chunk() -> None:
    x = _pcm(50)
    data = _riff(
        _chunk(b"LIST", b"INFOISFT\x0e\x00\x00\x00Lavf60.16.100\x00"),
        _fmt(1, 1, 16000, 16),
        _chunk(b"junk", b"abc"),  # odd size: padded to a word boundary
        _chunk(b"data", x.astype("<i2").tobytes()),
    )
    dec = StreamDecoder("wav", 8000)
    got = _decode_pieces(dec, data, list(range(7, len(data), 7)))
    np.testing.assert_array_equal(got, x)
    assert dec.sample_rate == 16000


def test_wav_finite_data_chunk_ignores_trailing_chunks() -> None:
    x = _pcm(20)
    data = wav_header(16000, 1, num_frames=20) + x.astype("<i2").tobytes()
    data += _chunk(b"LIST", b"trailing metadata!")
    np.testing.assert_array_equal(StreamDecoder("wav", 16000).decode(data), x)


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF])
def test_wav_streaming_data_size_means_until_end(size: int) -> None:
    x = _pcm(64)
    head = _riff(_fmt(1, 1, 16000, 16), riff_size=size) + b"data" + struct.pack("<I", size)
    dec = StreamDecoder("wav", 16000)
    got = np.concatenate(
        [dec.decode(head), dec.decode(x[:32].tobytes()), dec.decode(x[32:].tobytes())]
    )
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize(("fmt", "decode"), [("mulaw", ulaw_to_pcm16), ("alaw", alaw_to_pcm16)])
def test_g711_wav(fmt: str, decode: Callable[[bytes], npt.NDArray[np.int16]]) -> None:
    codes = bytes(np.random.default_rng(3).integers(0, 256, 400, dtype=np.uint8))
    data = wav_header(8000, 1, num_frames=400, fmt=fmt) + codes
    dec = StreamDecoder("wav", 16000)
    got = _decode_pieces(dec, data, list(range(3, len(data), 11)))
    np.testing.assert_array_equal(got, decode(codes))
    assert dec.bytes_per_sample_frame == 1 and dec.sample_rate == 8000


def test_wav_extensible_pcm_accepted() -> None:
    x = _pcm(30)
    data = _riff(_extensible(1), _chunk(b"data", x.astype("<i2").tobytes()))
    np.testing.assert_array_equal(StreamDecoder("wav", 8000).decode(data), x)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"RIFX" + bytes(40), "not a RIFF"),
        (b"OggS" + bytes(40), "not a RIFF"),
        (b"RIFF\x00\x00\x00\x00AVI " + bytes(40), "expected b'WAVE'"),
        (_riff(_fmt(3, 1, 16000, 32), _chunk(b"data", b"")), "format code 0x0003"),
        (_riff(_fmt(1, 1, 16000, 8), _chunk(b"data", b"")), "8 bits"),
        (_riff(_fmt(1, 1, 16000, 24), _chunk(b"data", b"")), "24 bits"),
        (_riff(_fmt(7, 1, 8000, 16), _chunk(b"data", b"")), "expected 8"),
        (_riff(_extensible(3), _chunk(b"data", b"")), "subformat 0x0003"),
        (_riff(_fmt(1, 1, 96000, 16), _chunk(b"data", b"")), "sample rate 96000"),
        (_riff(_fmt(1, 1, 4000, 16), _chunk(b"data", b"")), "sample rate 4000"),
        (_riff(_fmt(1, 0, 16000, 16), _chunk(b"data", b"")), "channel count 0"),
        (_riff(_chunk(b"data", bytes(8))), "before the fmt chunk"),
        (_riff(_chunk(b"fmt ", bytes(8)), _chunk(b"data", b"")), "too short"),
    ],
)
def test_bad_wav_headers(data: bytes, match: str) -> None:
    with pytest.raises(AudioFormatError, match=match):
        StreamDecoder("wav", 16000).decode(data)
    dec = StreamDecoder("wav", 16000)
    with pytest.raises(AudioFormatError, match=match):  # also when it trickles in
        for i in range(len(data)):
            dec.decode(data[i : i + 1])


def test_wav_header_too_long() -> None:
    data = _riff(_chunk(b"LIST", bytes(5000)), _fmt(1, 1, 16000, 16), _chunk(b"data", bytes(4)))
    with pytest.raises(AudioFormatError, match="not complete within 4096 bytes"):
        StreamDecoder("wav", 16000).decode(data)
    # A large limit lets the same stream through.
    out = StreamDecoder("wav", 16000, max_header_bytes=8192).decode(data)
    assert out.shape == (2,)


def test_wav_header_too_long_detected_while_trickling() -> None:
    # No chunk structure to skip: only the byte count can stop it.
    dec = StreamDecoder("wav", 16000, max_header_bytes=64)
    dec.decode(b"RIFF\xff\xff\xff\xffWAVE")
    with pytest.raises(AudioFormatError, match="not complete within 64 bytes"):
        for _ in range(100):
            dec.decode(b"fmt ")


# --- StreamDecoder.decode_pcm: the ingest path's form -----------------------------------------


@pytest.mark.parametrize(
    ("encoding", "channels"),
    [("pcm_s16le", 1), ("pcm_s16le", 2), ("mulaw", 1), ("alaw", 1), ("alaw", 2)],
)
@pytest.mark.parametrize("numpy_tables", [False, True])
def test_decode_pcm_equals_decode_in_any_pieces(
    encoding: str, channels: int, numpy_tables: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamgate_protocol.audio as codecs

    if numpy_tables:  # Python 3.13+ without audioop-lts
        monkeypatch.setattr(codecs, "_g711_decode", None)
    rng = np.random.default_rng(7)
    data = bytes(rng.integers(0, 256, 2 * 3 * 97 * channels, dtype=np.uint8))
    expected = StreamDecoder(encoding, 8000, channels).decode(data).tobytes()
    for pieces in ([len(data)], [1, 2, 3, 5, 7, 11, 13, 17], [len(data) // 2 + 1]):
        dec = StreamDecoder(encoding, 8000, channels)
        out, i = [], 0
        for n in itertools.cycle(pieces):
            if i >= len(data):
                break
            piece = data[i : i + n]
            # The socket layer may hand over a memoryview; both forms decode alike.
            out.append(dec.decode_pcm(memoryview(piece) if i % 2 else piece))
            i += n
        assert b"".join(out) == expected
        assert dec.samples_decoded == len(expected) // 2


def test_decode_pcm_of_wav_skips_header_and_trailing_chunks() -> None:
    pcm = _pcm(400).astype("<i2").tobytes()
    stream = wav_header(16000, 1, 400) + pcm + b"LIST\x04\x00\x00\x00junk"
    dec = StreamDecoder("wav", 8000)
    out = b"".join(dec.decode_pcm(stream[i : i + 33]) for i in range(0, len(stream), 33))
    assert out == pcm and dec.sample_rate == 16000
