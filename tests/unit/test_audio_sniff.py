"""The rules that decide what an uploaded recording is (server/audio/containers.py)."""

from __future__ import annotations

import pytest

from server.audio.containers import (
    AudioFormat,
    BadAudio,
    ConflictingFormat,
    MediaType,
    UnsupportedMediaType,
    refuse_unsupported,
    resolve_format,
    sniff_container,
    type_of_filename,
)
from streamgate_protocol.audio import wav_header

WAV = wav_header(22050, 1, 100) + b"\x01\x00" * 100
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64" + b"\x00" * 64
PCM = b"\x00\x00\x10\x00\xf0\xff" * 20


def resolve(ctype: str | None, head: bytes, filename: str | None = None,
            **params: str) -> AudioFormat:
    return resolve_format(MediaType.parse(ctype), filename, params, head)


@pytest.mark.parametrize(("head", "name"), [
    (WAV, "WAV"), (MP3, "MP3 (ID3 tag)"), (b"OggS\x00\x02" + b"\x00" * 20, "Ogg"),
    (b"fLaC\x00\x00\x00\x22" + b"\x00" * 20, "FLAC"), (b"\x00\x00\x00\x20ftypM4A ", "MP4/M4A"),
    (b"RIFF\x00\x00\x00\x00AVI LIST", "RIFF/AVI "), (b"FORM\x00\x00\x00\x00AIFFCOMM", "AIFF"),
    (b".snd\x00\x00\x00\x18", "Sun AU"), (PCM, None), (b"", None), (b"RIF", None),
])
def test_sniff_container(head: bytes, name: str | None) -> None:
    assert sniff_container(head) == name


@pytest.mark.parametrize("ctype", ["audio/wav", "audio/x-wav", "Audio/WAVE", "audio/vnd.wave",
                                   None, "", "application/octet-stream",
                                   "application/x-www-form-urlencoded"])
def test_a_wav_is_a_wav_whatever_generic_or_wav_type_it_comes_with(ctype: str | None) -> None:
    assert resolve(ctype, WAV) == AudioFormat("wav")
    assert resolve(ctype, WAV, "take 1.bin", encoding="wav") == AudioFormat("wav")


def test_a_wav_file_name_does_not_outrank_the_bytes() -> None:
    assert resolve("application/octet-stream", WAV, "notes.txt") == AudioFormat("wav")
    with pytest.raises(UnsupportedMediaType, match="not supported"):
        resolve(None, PCM, "song.mp3")
    with pytest.raises(UnsupportedMediaType, match="text/plain"):
        resolve(None, PCM, "notes.txt", encoding="pcm_s16le")


@pytest.mark.parametrize("ctype", ["audio/mpeg", "audio/ogg", "application/json", "text/plain",
                                   "image/png", "multipart/mixed", "garbage"])
def test_types_we_do_not_decode_are_refused(ctype: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        resolve(ctype, PCM)


def test_a_declared_type_we_do_not_decode_is_refused_without_its_bytes() -> None:
    for ctype in ("audio/mpeg", "application/json", "text/plain"):
        with pytest.raises(UnsupportedMediaType, match=ctype):
            refuse_unsupported(MediaType.parse(ctype))
    accepted: tuple[str | None, ...] = ("audio/wav", "audio/L16;rate=8000",
                                        "application/octet-stream", None)
    for declared in accepted:
        refuse_unsupported(MediaType.parse(declared))


def test_generic_type_needs_a_wav_header_a_file_name_or_an_encoding() -> None:
    with pytest.raises(UnsupportedMediaType, match="cannot tell"):
        resolve(None, PCM)
    with pytest.raises(UnsupportedMediaType, match="MP3"):
        resolve("application/octet-stream", MP3, encoding="pcm_s16le")
    assert resolve(None, PCM, encoding="pcm_s16le") == AudioFormat("pcm_s16le")
    assert resolve(None, PCM, "call.ulaw") == AudioFormat("mulaw", 8000)
    assert resolve(None, PCM, "call.al", sample_rate="16000") == AudioFormat("alaw")
    assert resolve(None, PCM, "take.raw", encoding="mulaw") == AudioFormat("mulaw")


def test_bytes_that_contradict_the_declared_type_are_bad_audio() -> None:
    with pytest.raises(BadAudio, match="not a RIFF/WAVE"):
        resolve("audio/wav", MP3)
    with pytest.raises(BadAudio, match="not a RIFF/WAVE"):
        resolve("audio/wav", PCM)
    with pytest.raises(BadAudio, match="WAV file"):
        resolve("audio/basic", WAV)
    with pytest.raises(BadAudio, match="MP3"):
        resolve("audio/L16;rate=16000", MP3)


def test_parameters_that_contradict_the_type_are_bad_requests() -> None:
    with pytest.raises(ConflictingFormat, match="encoding=mulaw"):
        resolve("audio/wav", WAV, encoding="mulaw")
    with pytest.raises(ConflictingFormat, match="encoding=pcm_s16le"):
        resolve(None, WAV, encoding="pcm_s16le")
    with pytest.raises(ConflictingFormat, match="sample_rate=16000"):
        resolve("audio/L16;rate=8000", PCM, sample_rate="16000")
    with pytest.raises(ConflictingFormat, match="whole number"):
        resolve("audio/L16;rate=fast", PCM)


def test_headerless_types_carry_their_rate() -> None:
    assert resolve("audio/L16; rate=8000; channels=1", PCM) == AudioFormat("pcm_s16le", 8000, 1)
    assert resolve('audio/L16;rate="44100"', PCM, sample_rate="44100") == \
        AudioFormat("pcm_s16le", 44100)
    assert resolve("audio/L16", PCM) == AudioFormat("pcm_s16le")
    # G.711 is 8 kHz unless the type or the request says otherwise.
    assert resolve("audio/basic", PCM) == AudioFormat("mulaw", 8000)
    assert resolve("audio/PCMA", PCM) == AudioFormat("alaw", 8000)
    assert resolve("audio/x-mulaw;rate=16000", PCM) == AudioFormat("mulaw", 16000)
    assert resolve("audio/basic", PCM, sample_rate="16000") == AudioFormat("mulaw")


@pytest.mark.parametrize(("filename", "expected"), [
    ("a.wav", "audio/wav"), ("A.WAV", "audio/wav"), ("a.ulaw", "audio/pcmu"),
    ("a.mp3", "audio/mpeg"), ("a.flac", "audio/flac"), ("a.au", "audio/x-au"),
    ("a.json", "application/json"), ("a.raw", ""), ("a.bin", ""), ("noext", None),
    ("a.zzzunknown", None), (None, None), ("", None),
])
def test_type_of_filename(filename: str | None, expected: str | None) -> None:
    assert type_of_filename(filename) == expected
