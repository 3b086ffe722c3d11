"""Twilio Media Streams (bidirectional ``<Connect><Stream>``).

Wire format per Twilio's "Media Streams - WebSocket Messages" page
(twilio.com/docs/voice/media-streams/websocket-messages):

inbound   connected {protocol, version}
          start {sequenceNumber, streamSid, start {streamSid, accountSid, callSid, tracks,
                 customParameters, mediaFormat {encoding, sampleRate, channels}}}
          media {sequenceNumber, streamSid, media {track, chunk, timestamp, payload}}
          mark {sequenceNumber, streamSid, mark {name}}
          dtmf {sequenceNumber, streamSid, dtmf {track, digit}}
          stop {sequenceNumber, streamSid, stop {accountSid, callSid}}
outbound  media {streamSid, media {payload}} / mark {streamSid, mark {name}} /
          clear {streamSid}

Numbers (sequenceNumber, chunk, timestamp) arrive as JSON strings; audio is always
base64 ``audio/x-mulaw`` at 8 kHz mono, and outbound audio must be the same.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec

from server.telephony.providers.base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DigitBody,
    MediaBody,
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
    Event,
    InboundAudio,
    MarkAcknowledged,
    ProviderError,
)

__all__ = ["TwilioCodec"]


class _Inbound(msgspec.Struct, tag_field="event", rename="camel", kw_only=True):
    """Fields common to every Twilio message (absent on ``connected``)."""

    sequence_number: int | None = None
    stream_sid: str | None = None


class _Connected(_Inbound, tag="connected"):
    protocol: str | None = None
    version: str | None = None


class _MediaFormat(msgspec.Struct, rename="camel", kw_only=True):
    encoding: str
    sample_rate: int
    channels: int = 1


class _StartBody(msgspec.Struct, rename="camel", kw_only=True):
    stream_sid: str
    call_sid: str
    account_sid: str | None = None
    tracks: list[str] = []
    custom_parameters: dict[str, Scalar] = {}
    media_format: _MediaFormat


class _Start(_Inbound, tag="start"):
    start: _StartBody


class _Media(_Inbound, tag="media"):
    media: MediaBody


class _Mark(_Inbound, tag="mark"):
    mark: NameBody


class _Dtmf(_Inbound, tag="dtmf"):
    dtmf: DigitBody


class _Stop(_Inbound, tag="stop"):
    pass


_Message: TypeAlias = _Connected | _Start | _Media | _Mark | _Dtmf | _Stop
_EVENTS: Final = ("connected", "start", "media", "mark", "dtmf", "stop")
_DECODER: Final[msgspec.json.Decoder[_Message]] = msgspec.json.Decoder(_Message, strict=False)


class TwilioCodec(TwilioStyleCodec[_Message]):
    name = "twilio"
    stream_id_field = "streamSid"

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(_DECODER, _EVENTS, max_message_bytes=max_message_bytes)

    def _on_message(self, message: _Message) -> list[Event]:
        if isinstance(message, _Media):
            if self._call is None:  # tested inline: one media message per 20 ms per call
                self._require_call_for("media")
            m = message.media
            return [InboundAudio(m.payload, m.track, m.timestamp, message.sequence_number)]
        if isinstance(message, _Mark):
            return [MarkAcknowledged(message.mark.name)]
        if isinstance(message, _Start):
            body = message.start
            fmt = body.media_format
            # Twilio documents exactly one format; anything else means a different product
            # (or a Twilio-compatible clone) whose audio we would misinterpret.
            if fmt.encoding != "audio/x-mulaw":
                raise ProviderError(
                    f"twilio: unsupported mediaFormat.encoding {fmt.encoding!r} "
                    "(expected 'audio/x-mulaw')"
                )
            call = CallStarted(
                stream_id=body.stream_sid,
                call_id=body.call_sid,
                account_id=body.account_sid,
                tracks=tuple(body.tracks),
                custom_parameters=_params(body.custom_parameters),
                encoding="mulaw",
                sample_rate=fmt.sample_rate,
                channels=fmt.channels,
            )
            return [self._set_call(call)]
        if isinstance(message, _Dtmf):
            return [Dtmf(message.dtmf.digit)]
        if isinstance(message, _Stop):
            return [CallStopped()]
        return [Connected()]
