"""The session recording format (docs/recording.md, decision 17R1): what a server writes for a
session opened with `record=true` and what `streamgate replay` reads. Shared by both sides, so
it lives with the wire contract and imports neither.

A recording is JSON lines: one `header`, then one line per event in the order they happened,
then `closed` and `end`. Every event carries `t_ms`, milliseconds since the session started on
the server's monotonic clock. Inbound audio is kept whole (base64, msgspec's JSON form of
`bytes`); outbound JSON is kept as the server sent it; outbound binary frames (TTS audio) are
kept as their size and CRC-32 only (decision 17R1 says why).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import msgspec

FORMAT = "streamgate-recording"
VERSION = 1


class Line(msgspec.Struct, tag_field="type", kw_only=True):
    pass


class Header(Line, tag="header"):
    recording_id: str
    kind: str  # the route's session kind: asr | tts
    path: str  # the WebSocket path the session was opened on
    query: dict[str, str]  # the upgrade's query string, without api_key
    tenant_id: str
    started_at: str  # UTC wall clock, ISO 8601, for people; t_ms is what replay uses
    max_bytes: int  # the bound this recording was written under (recording.max_bytes)
    format: str = FORMAT
    version: int = VERSION


class InText(Line, tag="in_text"):
    t_ms: float
    text: str


class InBinary(Line, tag="in_binary"):
    t_ms: float
    data: bytes


class OutText(Line, tag="out_text"):
    t_ms: float
    msg: msgspec.Raw  # the JSON message exactly as the server encoded it


class OutBinary(Line, tag="out_binary"):
    t_ms: float
    size: int
    crc32: int


class CloseSent(Line, tag="close"):
    """The server closed the session (the code it chose)."""

    t_ms: float
    code: int
    reason: str = ""


class Drain(Line, tag="drain"):
    """The node told the session to drain (SIGTERM)."""

    t_ms: float


class Truncated(Line, tag="truncated"):
    """recording.max_bytes was reached: no event after this one was recorded (the session went
    on)."""

    t_ms: float
    max_bytes: int


class Closed(Line, tag="closed"):
    """The connection ended with this close code (the client's, or the echo of the server's)."""

    t_ms: float
    code: int


class End(Line, tag="end"):
    t_ms: float
    events: int  # event lines written, header and trailer aside
    truncated: bool


Event = InText | InBinary | OutText | OutBinary | CloseSent | Drain | Truncated | Closed | End
AnyLine = Header | Event

encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(AnyLine)


class RecordingFormatError(ValueError):
    """Not a recording this version reads."""


class Recording(msgspec.Struct, kw_only=True):
    header: Header
    events: list[Event]

    @property
    def complete(self) -> bool:
        """It ends with `end` (a server that died mid-session leaves no trailer)."""
        return bool(self.events) and isinstance(self.events[-1], End)


def encode_line(line: AnyLine) -> bytes:
    return encoder.encode(line) + b"\n"


def decode_lines(lines: Iterable[bytes]) -> Recording:
    """A recording from its lines. A last line cut short (no newline: its server stopped while
    writing it) is left out; any other line that does not decode is an error."""
    raw_lines = [raw for raw in lines if raw.strip()]
    if not raw_lines:
        raise RecordingFormatError("empty recording")
    try:
        first = _line_decoder.decode(raw_lines[0])
    except msgspec.DecodeError as exc:
        raise RecordingFormatError(f"not a streamgate recording (line 1: {exc})") from None
    if not isinstance(first, Header) or first.format != FORMAT:
        raise RecordingFormatError("not a streamgate recording (no header line)")
    if first.version != VERSION:
        raise RecordingFormatError(f"recording version {first.version}; this reads {VERSION}")
    events: list[Event] = []
    last = len(raw_lines)
    for number, raw in enumerate(raw_lines[1:], start=2):
        try:
            line = _line_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            if number == last and not raw.endswith(b"\n"):
                break
            raise RecordingFormatError(f"line {number}: {exc}") from None
        if isinstance(line, Header):
            raise RecordingFormatError(f"line {number}: a second header")
        events.append(line)
    return Recording(header=first, events=events)


def read_recording(path: Path) -> Recording:
    with path.open("rb") as fh:
        return decode_lines(fh)
