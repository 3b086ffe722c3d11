"""Provider-neutral telephony events (decoded from a provider) and commands (encoded to it).

Every provider codec in this package turns its own JSON dialect into these types and back,
so the session layer above never sees a provider field name. They are slotted dataclasses,
frozen but for InboundAudio (see there): cheap to build at 50 media messages a second per
call, safe to hand across tasks, and comparable in tests.

Audio stays in the call's wire encoding on both sides (``CallStarted.encoding``): the
codec only strips or adds base64 (and, for Telnyx L16, byte order - see ``telnyx.py``);
transcoding and resampling belong to ``server.audio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "CallStarted",
    "CallStopped",
    "ClearAudio",
    "Command",
    "Connected",
    "Dtmf",
    "Encoding",
    "Event",
    "InboundAudio",
    "MarkAcknowledged",
    "PlayAudio",
    "ProviderError",
    "SendMark",
]

# The names match streamgate_protocol.audio.ENCODINGS so the session can hand them straight over.
Encoding: TypeAlias = Literal["mulaw", "alaw", "pcm_s16le"]


class ProviderError(ValueError):
    """A provider message (or a command for it) that cannot be handled.

    Raised for malformed JSON, unknown events, missing or mistyped fields, oversized
    messages, unsupported audio formats and protocol-order violations (media before
    ``start``, encoding before ``start``). The message names the provider and the field so
    it can go straight into a log line. Subclasses ValueError so generic input-validation
    handlers catch it.
    """


# ---------------------------------------------------------------------------- inbound
@dataclass(frozen=True, slots=True)
class Connected:
    """The provider opened the stream (Twilio/Exotel/Telnyx ``connected``); no call data yet."""


@dataclass(frozen=True, slots=True)
class CallStarted:
    """The ``start`` message: identifies the call and fixes the audio format both ways.

    ``tracks`` is what the provider announced (``()`` when it does not say, e.g. Telnyx).
    ``custom_parameters`` is where an API key may arrive (docs/protocol.md, "Telephony as
    implemented"), as strings whatever type the provider used.
    """

    stream_id: str
    call_id: str
    account_id: str | None
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    encoding: Encoding
    sample_rate: int
    channels: int


# Not frozen, alone of these: one is built per media message (50 a second per call), and a
# frozen dataclass sets each field through object.__setattr__ (0.46 -> 0.13 us). Nothing
# changes one after it is built.
@dataclass(slots=True)
class InboundAudio:
    """One media message: ``payload`` is base64-decoded but still in ``CallStarted.encoding``.

    ``timestamp_ms`` is the provider's own clock and is not comparable across providers:
    Twilio, Exotel and Telnyx count from the stream start, Plivo sends Unix epoch ms.
    ``sequence`` is the provider's message sequence number (gaps mean lost messages).
    """

    payload: bytes
    track: str
    timestamp_ms: int | None = None
    sequence: int | None = None


@dataclass(frozen=True, slots=True)
class MarkAcknowledged:
    """A mark (Plivo: checkpoint) we sent came back.

    Twilio and Telnyx also echo pending marks when a ``clear`` empties their buffer, so an
    ack means "audio before it is done" (played *or* cleared), not necessarily "heard".
    Plivo documents no acks for checkpoints discarded by ``clearAudio``.
    """

    name: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class CallStopped:
    """The provider ended the stream. ``reason`` only where the provider gives one (Exotel)."""

    reason: str | None = None


Event: TypeAlias = Connected | CallStarted | InboundAudio | MarkAcknowledged | Dtmf | CallStopped


# --------------------------------------------------------------------------- outbound
@dataclass(frozen=True, slots=True)
class PlayAudio:
    """Queue audio for playback; ``payload`` must already be in the call's encoding/rate.

    With ``mark`` set, a mark follows the audio so its acknowledgement tells when this
    chunk has finished playing (the credit signal for outbound pacing).
    """

    payload: bytes
    mark: str | None = None


@dataclass(frozen=True, slots=True)
class SendMark:
    name: str


@dataclass(frozen=True, slots=True)
class ClearAudio:
    """Drop all audio queued at the provider (barge-in)."""


Command: TypeAlias = PlayAudio | SendMark | ClearAudio
