"""Exotel AgentStream: Voicebot applet (bidirectional) and Stream applet (inbound only).

Wire format per Exotel's "WebSocket protocol" page
(developer.exotel.com/docs/agentstream/websocket-protocol) and "Working with the Stream and
Voicebot Applet": Twilio's message set with snake_case fields.

inbound   connected {}
          start {sequence_number, stream_sid, start {stream_sid, call_sid, account_sid, from,
                 to, custom_parameters, media_format {encoding, sample_rate, bit_rate}}}
          media {sequence_number, stream_sid, media {chunk, timestamp, payload}}
          dtmf {sequence_number, stream_sid, dtmf {digit, duration}}
          mark {sequence_number, stream_sid, mark {name}}
          stop {sequence_number, stream_sid, stop {call_sid, account_sid, reason}}
outbound  media {stream_sid, media {payload}} / mark {stream_sid, mark {name}} /
          clear {stream_sid}

Audio is raw 16-bit little-endian mono PCM ("raw/slin"), base64, ~100 ms per message, at
the 8/16/24 kHz chosen with the applet's ``sample-rate`` URL parameter and echoed as
``media_format.sample_rate`` (a string in the docs). Only inbound audio is streamed, so
media messages carry no track. Exotel asks for outbound chunks in multiples of 320 bytes
between 3.2 KB and 100 KB; sizing chunks is the pacing layer's job, not this codec's.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec

from server.telephony.providers.base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DigitBody,
    NameBody,
    Scalar,
    TwilioStyleCodec,
)
from server.telephony.providers.base import string_params as _params
from server.telephony.providers.events import (
    CallStarted,
    CallStopped,
    Connected,
    Dtmf,
    Encoding,
    Event,
    InboundAudio,
    MarkAcknowledged,
    ProviderError,
)

__all__ = ["ExotelCodec"]

# The current docs say "audio/x-raw"; an older revision of the applet guide said "base64".
# Both mean the default raw PCM16. The CPaaS Legs API can request mu-law instead.
_ENCODINGS: Final[dict[str, Encoding]] = {
    "audio/x-raw": "pcm_s16le",
    "base64": "pcm_s16le",
    "raw": "pcm_s16le",
    "slin": "pcm_s16le",
    "audio/x-l16": "pcm_s16le",
    "audio/x-mulaw": "mulaw",
    "audio/x-alaw": "alaw",
}
_RATES: Final = frozenset({8000, 16000, 24000})


class _Inbound(msgspec.Struct, tag_field="event", kw_only=True):
    sequence_number: int | None = None
    stream_sid: str | None = None


class _Connected(_Inbound, tag="connected"):
    pass


class _MediaFormat(msgspec.Struct, kw_only=True):
    encoding: str = "audio/x-raw"
    sample_rate: int = 8000
    # bit_rate is not read: "16" (bits/sample) now, "128kbps" in older docs.


_DEFAULT_FORMAT: Final = _MediaFormat()


class _StartBody(msgspec.Struct, kw_only=True):
    stream_sid: str | None = None
    call_sid: str
    account_sid: str | None = None
    custom_parameters: dict[str, Scalar] = {}
    # Documented default is 8 kHz raw PCM, so a start without it is still usable (None: the
    # default; a plain default, not a default_factory, which mypyc-compiled modules refuse).
    media_format: _MediaFormat | None = None


class _Start(_Inbound, tag="start"):
    start: _StartBody


class _MediaBody(msgspec.Struct, kw_only=True):
    payload: bytes
    timestamp: int | None = None


class _Media(_Inbound, tag="media"):
    media: _MediaBody


class _Mark(_Inbound, tag="mark"):
    mark: NameBody


class _Dtmf(_Inbound, tag="dtmf"):
    dtmf: DigitBody


class _StopBody(msgspec.Struct):
    reason: str | None = None


class _Stop(_Inbound, tag="stop"):
    stop: _StopBody | None = None


_Message: TypeAlias = _Connected | _Start | _Media | _Mark | _Dtmf | _Stop
_EVENTS: Final = ("connected", "start", "media", "mark", "dtmf", "stop")
_DECODER: Final[msgspec.json.Decoder[_Message]] = msgspec.json.Decoder(_Message, strict=False)


class ExotelCodec(TwilioStyleCodec[_Message]):
    name = "exotel"
    stream_id_field = "stream_sid"

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(_DECODER, _EVENTS, max_message_bytes=max_message_bytes)

    def _on_message(self, message: _Message) -> list[Event]:
        if isinstance(message, _Media):
            if self._call is None:  # tested inline: one media message per 20 ms per call
                self._require_call_for("media")
            m = message.media
            return [InboundAudio(m.payload, "inbound", m.timestamp, message.sequence_number)]
        if isinstance(message, _Mark):
            return [MarkAcknowledged(message.mark.name)]
        if isinstance(message, _Start):
            return [self._set_call(self._call_from(message))]
        if isinstance(message, _Dtmf):
            return [Dtmf(message.dtmf.digit)]
        if isinstance(message, _Stop):
            return [CallStopped(message.stop.reason if message.stop is not None else None)]
        return [Connected()]

    def _call_from(self, message: _Start) -> CallStarted:
        body = message.start
        # The sid is documented both at the top level and inside start; either will do.
        stream_sid = body.stream_sid or message.stream_sid
        if not stream_sid:
            raise ProviderError("exotel: malformed 'start' message: no stream_sid")
        fmt = body.media_format if body.media_format is not None else _DEFAULT_FORMAT
        encoding = _ENCODINGS.get(fmt.encoding.lower())
        if encoding is None:
            raise ProviderError(
                f"exotel: unsupported media_format.encoding {fmt.encoding!r} "
                f"(expected one of: {', '.join(_ENCODINGS)})"
            )
        if encoding == "pcm_s16le" and fmt.sample_rate not in _RATES:
            raise ProviderError(
                f"exotel: unsupported media_format.sample_rate {fmt.sample_rate} "
                "(expected 8000, 16000 or 24000)"
            )
        return CallStarted(
            stream_id=stream_sid,
            call_id=body.call_sid,
            account_id=body.account_sid,
            tracks=("inbound",),
            custom_parameters=_params(body.custom_parameters),
            encoding=encoding,
            sample_rate=fmt.sample_rate,
            channels=1,
        )
