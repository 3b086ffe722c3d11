"""Plivo Audio Streams (``<Stream bidirectional="true">``).

Wire format per Plivo's "Stream Event Protocol" / "Audio Streaming Protocol Reference"
pages and the per-event pages "Play audio event", "Checkpoint event" and "Clear audio
stream" (plivo.com/docs/voice/...):

inbound   start {sequenceNumber, start {callId, streamId, accountId, tracks,
                 mediaFormat {encoding, sampleRate}}, extra_headers}
          media {sequenceNumber, streamId, media {track, timestamp, chunk, payload}}
          dtmf {sequenceNumber, streamId, dtmf {track, digit, timestamp}}
          playedStream {sequenceNumber, streamId, name}     (checkpoint reached)
          clearedAudio {sequenceNumber, streamId}           (clearAudio done)
outbound  playAudio {media {contentType, sampleRate, payload}}
          checkpoint {streamId, name} / clearAudio {streamId}

Differences from Twilio that matter above this layer: there is no ``connected`` and no
``stop`` message (the stream ends when the socket closes; Plivo reports stop through the
HTTP status callback), numbers are JSON numbers, ``media.timestamp`` is Unix epoch ms, and
custom parameters arrive as one ``extra_headers`` string. Checkpoints discarded by
``clearAudio`` are not acknowledged, unlike Twilio marks.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

import msgspec

from server.telephony.providers.base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DigitBody,
    FrameTemplate,
    MediaBody,
    TemplatedCodec,
    encode_json,
)
from server.telephony.providers.events import (
    CallStarted,
    Dtmf,
    Encoding,
    Event,
    InboundAudio,
    MarkAcknowledged,
    ProviderError,
)

__all__ = ["PlivoCodec"]

# Plivo's three documented formats: audio/x-l16 at 8 or 16 kHz, audio/x-mulaw at 8 kHz.
_RATES: Final[dict[Encoding, frozenset[int]]] = {
    "pcm_s16le": frozenset({8000, 16000}),
    "mulaw": frozenset({8000}),
}
_CONTENT_TYPES: Final[dict[Encoding, str]] = {"pcm_s16le": "audio/x-l16", "mulaw": "audio/x-mulaw"}
_ENCODINGS: Final[dict[str, Encoding]] = {v: k for k, v in _CONTENT_TYPES.items()}
# The protocol page shows "userId=12345;sessionId=abc-xyz", the <Stream> XML page
# "test1=12,test2=123": accept either separator.
_HEADER_SPLIT: Final = re.compile(r"[;,]")


class _Inbound(msgspec.Struct, tag_field="event", rename="camel", kw_only=True):
    sequence_number: int | None = None
    stream_id: str | None = None


class _MediaFormat(msgspec.Struct, rename="camel", kw_only=True):
    encoding: str
    sample_rate: int


class _StartBody(msgspec.Struct, rename="camel", kw_only=True):
    call_id: str
    stream_id: str
    account_id: str | None = None
    tracks: list[str] = []
    media_format: _MediaFormat


class _Start(_Inbound, tag="start"):
    start: _StartBody
    extra_headers: str | None = msgspec.field(default=None, name="extra_headers")


class _Media(_Inbound, tag="media"):
    media: MediaBody


class _Dtmf(_Inbound, tag="dtmf"):
    dtmf: DigitBody


class _PlayedStream(_Inbound, tag="playedStream"):
    name: str


class _Played(_PlayedStream, tag="played"):
    """Plivo's support article on checkpoints shows the ack as "played"."""


class _ClearedAudio(_Inbound, tag="clearedAudio"):
    pass


_Message: TypeAlias = _Start | _Media | _Dtmf | _PlayedStream | _Played | _ClearedAudio
_EVENTS: Final = ("start", "media", "dtmf", "playedStream", "played", "clearedAudio")
_DECODER: Final[msgspec.json.Decoder[_Message]] = msgspec.json.Decoder(_Message, strict=False)


def parse_extra_headers(raw: str | None) -> dict[str, str]:
    """``"a=1;b=2"`` (or comma-separated) -> ``{"a": "1", "b": "2"}``; bare keys map to ""."""
    params: dict[str, str] = {}
    for item in _HEADER_SPLIT.split(raw or ""):
        key, _, value = item.partition("=")
        if key.strip():
            params[key.strip()] = value.strip()
    return params


class PlivoCodec(TemplatedCodec[_Message]):
    name = "plivo"

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(_DECODER, _EVENTS, max_message_bytes=max_message_bytes)

    def _on_message(self, message: _Message) -> list[Event]:
        if isinstance(message, _Media):
            if self._call is None:  # tested inline: one media message per 20 ms per call
                self._require_call_for("media")
            m = message.media
            return [InboundAudio(m.payload, m.track, m.timestamp, message.sequence_number)]
        if isinstance(message, _PlayedStream):  # also the "played" spelling (subclass)
            return [MarkAcknowledged(message.name)]
        if isinstance(message, _Start):
            return [self._set_call(self._call_from(message))]
        if isinstance(message, _Dtmf):
            return [Dtmf(message.dtmf.digit)]
        # clearedAudio: the provider-neutral layer has no event for it (Twilio and Telnyx
        # have no such ack); the session already knows it asked for the clear.
        return []

    def _call_from(self, message: _Start) -> CallStarted:
        body = message.start
        fmt = body.media_format
        # Tolerate the "audio/x-l16;rate=16000" spelling used in <Stream contentType>.
        mime = fmt.encoding.split(";", 1)[0].strip().lower()
        encoding = _ENCODINGS.get(mime)
        if encoding is None:
            raise ProviderError(
                f"plivo: unsupported mediaFormat.encoding {fmt.encoding!r} "
                "(expected 'audio/x-mulaw' or 'audio/x-l16')"
            )
        if fmt.sample_rate not in _RATES[encoding]:
            raise ProviderError(
                f"plivo: unsupported mediaFormat.sampleRate {fmt.sample_rate} for {mime}"
            )
        return CallStarted(
            stream_id=body.stream_id,
            call_id=body.call_id,
            account_id=body.account_id,
            tracks=tuple(body.tracks),
            custom_parameters=parse_extra_headers(message.extra_headers),
            encoding=encoding,
            sample_rate=fmt.sample_rate,
            channels=1,
        )

    def _encode_clear(self, call: CallStarted) -> bytes:
        return encode_json({"event": "clearAudio", "streamId": call.stream_id})

    def _templates(self, call: CallStarted) -> tuple[FrameTemplate, FrameTemplate]:
        # Plivo's playAudio example carries no streamId (the socket identifies the stream).
        # contentType/sampleRate repeat the call's format: Plivo advises against switching
        # codecs between playAudio events.
        media = {
            "contentType": _CONTENT_TYPES[call.encoding],
            "sampleRate": call.sample_rate,
            "payload": FrameTemplate.HOLE,
        }
        return (FrameTemplate({"event": "playAudio", "media": media}),
                FrameTemplate({"event": "checkpoint", "streamId": call.stream_id,
                               "name": FrameTemplate.HOLE}))
