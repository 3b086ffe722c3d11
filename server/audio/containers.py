"""Which audio an upload carries: its declared media type, its file name and its first bytes.

Sans-I/O: `resolve_format` is given what a request says about its audio and the bytes it starts
with, and either names the session encoding (and the rate the media type implies) or refuses the
upload, before any session is admitted, leased or charged. The rules (docs/protocol.md,
"HTTP model APIs"; docs/decisions/0101-transcribe-input-types.md):

- A declared type we decode is used; its bytes must agree with it (a WAV type needs a RIFF/WAVE
  header, a headerless type must not carry a known container's header).
- A missing or generic type (`application/octet-stream`, or the `x-www-form-urlencoded` that
  curl and urllib put on any body) is settled by a RIFF/WAVE header, else by the file name's
  extension, else by the request's `encoding` parameter; failing all three it is refused.
- Any other type (MP3, Ogg, JSON, text, ...) is refused as unsupported.
"""

from __future__ import annotations

import email.message
import email.utils
import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

# The RIFF/WAVE header's first 12 bytes decide what it is; the rest is the decoder's business.
SNIFF_BYTES: Final = 12

GENERIC_TYPES: Final = frozenset({
    "",
    "application/octet-stream",
    "binary/octet-stream",
    # What curl --data-binary and urllib send when the caller set no type: says nothing.
    "application/x-www-form-urlencoded",
})
# Media type -> session encoding.
DECODED_TYPES: Final = {
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
    "audio/x-pn-wav": "wav",
    "audio/basic": "mulaw", "audio/pcmu": "mulaw", "audio/x-mulaw": "mulaw",
    "audio/mulaw": "mulaw", "audio/x-ulaw": "mulaw",
    "audio/pcma": "alaw", "audio/x-alaw": "alaw", "audio/alaw": "alaw",
    "audio/l16": "pcm_s16le",
}
# G.711 is 8 kHz unless said otherwise (RFC 2046 audio/basic, RFC 3551 PCMU/PCMA).
G711_RATE: Final = 8000
# File extensions the stdlib's table does not know, or maps to something we would refuse.
_EXTENSIONS: Final = {
    "wav": "audio/wav", "wave": "audio/wav",
    "ul": "audio/pcmu", "ulaw": "audio/pcmu", "mulaw": "audio/pcmu", "pcmu": "audio/pcmu",
    "al": "audio/pcma", "alaw": "audio/pcma", "pcma": "audio/pcma",
    # A Sun .au file has a header: it is not the headerless audio/basic the table says.
    "au": "audio/x-au", "snd": "audio/x-au",
    # Headerless PCM says nothing about itself: the `encoding` parameter has to.
    "pcm": "", "raw": "", "l16": "", "s16": "", "s16le": "", "bin": "", "dat": "",
    "ogg": "audio/ogg", "oga": "audio/ogg", "flac": "audio/flac", "m4a": "audio/mp4",
    "amr": "audio/amr", "weba": "audio/webm", "mka": "audio/x-matroska", "caf": "audio/x-caf",
}
# The stdlib's built-in table only: the host's /etc/mime.types must not change the answer.
_STDLIB_TYPES: Final = mimetypes.MimeTypes()


class UnsupportedMediaType(ValueError):
    """The upload is not audio we decode (or does not say which audio it is): 415."""


class BadAudio(ValueError):
    """The bytes contradict what the request says they are: 400 `bad_audio`."""


class ConflictingFormat(ValueError):
    """The request's own parameters contradict each other: 400 `bad_request`."""


@dataclass(frozen=True, slots=True)
class MediaType:
    essence: str  # "audio/wav": lower case, no parameters; "" when none was declared
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, header: str | None) -> MediaType:
        if not header or not header.strip():
            return cls("")
        msg = email.message.Message()
        msg["Content-Type"] = header
        essence = header.split(";", 1)[0].strip().lower()
        pairs = msg.get_params() or []
        params = {name.lower(): email.utils.collapse_rfc2231_value(value)
                  for name, value in pairs[1:]}
        return cls(essence, params)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    encoding: str
    # The rate and channels the media type implies; None: the request's parameters decide.
    sample_rate: int | None = None
    channels: int | None = None


def sniff_container(head: bytes) -> str | None:
    """The container format a stream's first bytes announce, or None (headerless or unknown).

    Only signatures that headerless PCM or G.711 cannot plausibly start with are listed (no bare
    MPEG frame sync: 0xFFFx is an ordinary pair of PCM16 samples)."""
    if head[:4] == b"RIFF":
        return "WAV" if head[8:12] == b"WAVE" else f"RIFF/{head[8:12].decode('latin-1')}"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if head[4:8] == b"ftyp":
        return "MP4/M4A"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


_MAGIC: Final = (
    (b"ID3", "MP3 (ID3 tag)"), (b"OggS", "Ogg"), (b"fLaC", "FLAC"), (b"RF64", "RF64"),
    (b"\x1aE\xdf\xa3", "WebM/Matroska"), (b"#!AMR", "AMR"), (b".snd", "Sun AU"),
    (b"caff", "CAF"),
)


def type_of_filename(filename: str | None) -> str | None:
    """The media type a file name's extension implies: "" for one that says nothing about the
    format (.raw, .bin), None for no name or an extension nobody knows."""
    if not filename or "." not in filename:
        return None
    ext = filename.rsplit(".", 1)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    guessed, _ = _STDLIB_TYPES.guess_type("x." + ext, strict=False)
    if guessed is None:
        return None
    return "" if guessed.lower() in GENERIC_TYPES else guessed.lower()


def refuse_unsupported(declared: MediaType) -> None:
    """Refuse a declared type we do not decode: no need to read a byte of the body for that."""
    if declared.essence not in GENERIC_TYPES and declared.essence not in DECODED_TYPES:
        raise UnsupportedMediaType(_unsupported(f"Content-Type {declared.essence}"))


def _unsupported(source: str) -> str:
    return (f"{source} is not supported: send audio/wav, audio/basic (mu-law), audio/x-alaw, "
            "audio/L16;rate=N, or a WAV file as application/octet-stream")


def resolve_format(declared: MediaType, filename: str | None, params: Mapping[str, str],
                   head: bytes) -> AudioFormat:
    """The session format of an upload, or the reason it is refused (see the module doc).

    `declared` is the body's or the form part's Content-Type, `params` the request's parameters
    (query string and form fields: `encoding`, `sample_rate`), `head` the first bytes (at least
    SNIFF_BYTES unless the upload is shorter). The answer's fields override `params`."""
    encoding = params.get("encoding")
    container = sniff_container(head)
    source = f"Content-Type {declared.essence}"
    essence = declared.essence
    if essence in GENERIC_TYPES:
        if container == "WAV":
            return _checked(AudioFormat("wav"), encoding, "the body is a WAV file")
        if container is not None:
            raise UnsupportedMediaType(
                f"the audio is {container}, which is not supported: send WAV (PCM 16-bit, "
                "mu-law, A-law), raw PCM16, mu-law or A-law")
        by_name = type_of_filename(filename)
        if by_name:
            essence, source = by_name, f"file name {filename!r} ({by_name})"
        elif encoding is not None:
            return AudioFormat(encoding)  # the session checks it is a known encoding
        else:
            raise UnsupportedMediaType(
                "cannot tell the audio format: declare a Content-Type (audio/wav, audio/basic, "
                "audio/x-alaw, audio/L16;rate=N) or set `encoding`")
    kind = DECODED_TYPES.get(essence)
    if kind is None:
        raise UnsupportedMediaType(_unsupported(source))
    if kind == "wav":
        if container != "WAV":
            found = container or f"bytes starting {head[:4]!r}"
            raise BadAudio(f"{source} but the body is not a RIFF/WAVE file ({found})")
        return _checked(AudioFormat("wav"), encoding, source)
    if container is not None:
        raise BadAudio(f"{source} is headerless audio but the body is a {container} file")
    fmt = _checked(AudioFormat(kind), encoding, source)
    if essence != declared.essence:  # from the file name: no parameters
        rate, channels = None, None
    else:
        rate, channels = _int_param(declared, "rate"), _int_param(declared, "channels")
    if rate is not None:
        if params.get("sample_rate", str(rate)) != str(rate):
            raise ConflictingFormat(f"{source};rate={rate} contradicts "
                                    f"sample_rate={params['sample_rate']}")
    elif kind != "pcm_s16le" and "sample_rate" not in params:
        rate = G711_RATE
    if channels is not None and params.get("channels", str(channels)) != str(channels):
        raise ConflictingFormat(f"{source};channels={channels} contradicts "
                                f"channels={params['channels']}")
    return AudioFormat(fmt.encoding, rate, channels)


def _checked(fmt: AudioFormat, encoding: str | None, source: str) -> AudioFormat:
    if encoding is not None and encoding != fmt.encoding:
        raise ConflictingFormat(f"{source} contradicts encoding={encoding}")
    return fmt


def _int_param(declared: MediaType, name: str) -> int | None:
    value = declared.params.get(name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ConflictingFormat(f"Content-Type parameter {name}={value!r} is not a whole number")
    return int(value)
