"""Telnyx Media Streaming over WebSockets (Call Control / TeXML ``<Stream>``).

Wire format per Telnyx's "Stream call media over WebSocket" (AsyncAPI reference) and
"Media Streaming over Websockets" guide (developers.telnyx.com): Twilio's message set with
snake_case fields and ``stream_id``.

inbound   connected {version}
          start {sequence_number, stream_id, start {user_id, call_control_id, call_session_id,
                 from, to, client_state, custom_parameters,
                 media_format {encoding, sample_rate, channels}}}
          media {sequence_number, stream_id, media {track, chunk, timestamp, payload}}
          dtmf {sequence_number, stream_id, dtmf {digit}}
          mark {sequence_number, stream_id, mark {name}}
          stop {sequence_number, stream_id, stop {user_id, call_control_id}}
          error {sequence_number, stream_id, error {code, title, detail}}
outbound  media {media {payload}} / mark {mark {name}} / clear {}   (no stream id: the
          socket identifies the stream, and Telnyx's examples carry none)

Ordering: Telnyx states that media frame order is not guaranteed and points at
``sequence_number`` (message-wide: start is 1, every later message takes the next number).
This codec therefore releases sequenced messages in ``sequence_number`` order through a
bounded reorder window (``_Reorderer``): a message ahead of a gap is held; once ``window``
messages are waiting behind a gap the gap is given up (logged in ``skipped``) and what is
held is released in order. Media arriving after its slot was given up is dropped - it
would be out of order - but marks, DTMF and stop are never dropped, since losing a mark
ack would leak outbound credit. ``stop`` flushes everything held, in order, before it.

Audio: ``PCMU``/``PCMA`` pass through; ``L16`` is an RTP payload, i.e. network byte order
(RFC 3551), and is swapped to/from ``pcm_s16le`` so the rest of the gateway sees one PCM
layout. Outbound audio must use the stream's bidirectional codec, which this codec assumes
equals the inbound ``media_format`` (Telnyx configures them separately).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Final, TypeAlias

import msgspec

from server.telephony.providers.base import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DigitBody,
    MediaBody,
    NameBody,
    Scalar,
    TwilioStyleCodec,
    string_params,
    swap16,
)
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

__all__ = ["DEFAULT_REORDER_WINDOW", "TelnyxCodec"]

# 8 x 20 ms: a lost frame costs at most ~160 ms of extra latency before it is skipped.
DEFAULT_REORDER_WINDOW: Final = 8

# Current docs say "PCMU"; older Call Control docs showed "audio/x-mulaw". G722, OPUS and
# AMR-WB are refused: nothing downstream decodes them.
_ENCODINGS: Final[dict[str, Encoding]] = {
    "pcmu": "mulaw",
    "audio/x-mulaw": "mulaw",
    "pcma": "alaw",
    "audio/x-alaw": "alaw",
    "l16": "pcm_s16le",
}


class _Inbound(msgspec.Struct, tag_field="event", kw_only=True):
    sequence_number: int | None = None
    stream_id: str | None = None


class _Connected(_Inbound, tag="connected"):
    pass


class _MediaFormat(msgspec.Struct, kw_only=True):
    encoding: str
    sample_rate: int = 8000
    channels: int = 1


class _StartBody(msgspec.Struct, kw_only=True):
    call_control_id: str
    user_id: str | None = None
    stream_id: str | None = None
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


class _ErrorBody(msgspec.Struct):
    code: str | int | None = None
    title: str | None = None
    detail: str | None = None


class _Error(_Inbound, tag="error"):
    error: _ErrorBody | None = None
    payload: _ErrorBody | None = None  # the shape some SDK docs show instead of "error"


_Message: TypeAlias = _Connected | _Start | _Media | _Mark | _Dtmf | _Stop | _Error
_EVENTS: Final = ("connected", "start", "media", "mark", "dtmf", "stop", "error")
_DECODER: Final[msgspec.json.Decoder[_Message]] = msgspec.json.Decoder(_Message, strict=False)


class _Reorderer:
    """Release events in sequence-number order through a bounded hold buffer.

    Before ``start`` the origin is unknown, so sequenced messages are held (up to the
    window) until ``start`` fixes it; a ``start`` without a number lets the first later
    message fix it instead.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._started = False
        self._next: int | None = None
        # sequence number -> (events, may be dropped if it arrives too late)
        self._held: dict[int, tuple[list[Event], bool]] = {}
        self.skipped = 0  # sequence numbers given up on (never arrived in time)

    def start(self, seq: int | None, events: list[Event]) -> list[Event]:
        self._started = True
        out = list(events)
        if seq is not None:
            self._next = seq + 1
            out += self._release_stale()
        elif self._held:
            self._next = min(self._held)
        return out + self._drain()

    def push(self, seq: int, events: list[Event], *, droppable: bool) -> list[Event]:
        if self._next is None and self._started:
            self._next = seq
        if self._next is not None and seq < self._next:
            # Its slot was given up on (or it is a duplicate): media would now be out of
            # order, control events are still worth delivering.
            return [] if droppable else events
        if seq in self._held:
            return []  # duplicate of a message already waiting
        self._held[seq] = (events, droppable)
        if self._next is None:
            if len(self._held) > self._window:
                raise ProviderError(
                    f"telnyx: {len(self._held)} sequenced messages arrived without a 'start'"
                )
            return []
        out = self._drain()
        if len(self._held) >= self._window:
            first = min(self._held)
            self.skipped += first - self._next
            self._next = first
            out += self._drain()
        return out

    def rewrite_held(self, fn: Callable[[Event], Event]) -> None:
        """Apply ``fn`` to every held event (format fix-ups once ``start`` is known)."""
        for seq, (events, droppable) in self._held.items():
            self._held[seq] = ([fn(e) for e in events], droppable)

    def flush(self, until: int | None) -> list[Event]:
        """Release everything held, in order (the stream is ending)."""
        out: list[Event] = []
        held = sorted(self._held)
        for seq in held:
            out += self._held[seq][0]
        if held and self._next is not None:
            self.skipped += held[-1] - self._next + 1 - len(held)  # gaps never filled
        last = max([*held, until if until is not None else -1])
        if last >= 0:
            self._next = max(self._next or 0, last + 1)
        self._held.clear()
        return out

    def _drain(self) -> list[Event]:
        out: list[Event] = []
        while self._next is not None and self._next in self._held:
            out += self._held.pop(self._next)[0]
            self._next += 1
        return out

    def _release_stale(self) -> list[Event]:
        # Held before start with a number at or below start's: impossible per the docs,
        # but if it happens keep control events and drop media, as for late messages.
        out: list[Event] = []
        assert self._next is not None
        for seq in sorted(s for s in self._held if s < self._next):
            events, droppable = self._held.pop(seq)
            if not droppable:
                out += events
        return out


class TelnyxCodec(TwilioStyleCodec[_Message]):
    name = "telnyx"  # outbound frames carry no stream id (stream_id_field stays None)

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        reorder_window: int = DEFAULT_REORDER_WINDOW,
    ) -> None:
        if reorder_window < 1:
            raise ValueError("reorder_window must be at least 1")
        super().__init__(_DECODER, _EVENTS, max_message_bytes=max_message_bytes)
        self._order = _Reorderer(reorder_window)
        self._swap = False  # L16: network byte order on the wire
        # Events released while handling a message that then raised (an error frame);
        # returned first by the next decode so nothing released is lost.
        self._ready: list[Event] = []

    @property
    def skipped(self) -> int:
        """Sequence numbers given up on so far (lost, or arrived after the window)."""
        return self._order.skipped

    def decode(self, text: str | bytes) -> list[Event]:
        events = self._on_message(self._parse(text))
        if self._ready:
            events, self._ready = self._ready + events, []
        return events

    def _on_message(self, message: _Message) -> list[Event]:
        seq = message.sequence_number
        if isinstance(message, _Media):
            m = message.media
            payload = swap16(m.payload, self.name) if self._swap else m.payload
            audio: list[Event] = [InboundAudio(payload, m.track, m.timestamp, seq)]
            if seq is None:  # unsequenced: nothing to order it by
                self._require_call_for("media")
                return audio
            return self._order.push(seq, audio, droppable=True)
        if isinstance(message, _Start):
            call = self._set_call(self._call_from(message))
            if self._swap:  # media held before start was not yet byte-swapped
                self._order.rewrite_held(self._swap_audio)
            return self._order.start(seq, [call])
        if isinstance(message, _Stop):
            return [*self._order.flush(seq), CallStopped()]
        if isinstance(message, _Error):
            if seq is not None:  # fill its slot so it does not stall the window
                self._ready += self._order.push(seq, [], droppable=False)
            body = message.error or message.payload or _ErrorBody()
            raise ProviderError(
                f"telnyx: error frame {body.code} {body.title}: {body.detail} "
                "(Telnyx rejected a frame we sent)"
            )
        event: Event
        if isinstance(message, _Mark):
            event = MarkAcknowledged(message.mark.name)
        elif isinstance(message, _Dtmf):
            event = Dtmf(message.dtmf.digit)
        else:
            return [Connected()]  # connected is never sequenced
        if seq is None:
            return [event]
        return self._order.push(seq, [event], droppable=False)

    def _swap_audio(self, event: Event) -> Event:
        if isinstance(event, InboundAudio):
            return replace(event, payload=swap16(event.payload, self.name))
        return event

    def _call_from(self, message: _Start) -> CallStarted:
        body = message.start
        stream_id = message.stream_id or body.stream_id
        if not stream_id:
            raise ProviderError("telnyx: malformed 'start' message: no stream_id")
        fmt = body.media_format
        encoding = _ENCODINGS.get(fmt.encoding.lower())
        if encoding is None:
            raise ProviderError(
                f"telnyx: unsupported media_format.encoding {fmt.encoding!r} "
                "(expected PCMU, PCMA or L16)"
            )
        self._swap = encoding == "pcm_s16le"
        return CallStarted(
            stream_id=stream_id,
            call_id=body.call_control_id,
            account_id=body.user_id,
            tracks=(),  # not announced: it is the stream_track chosen at streaming_start
            custom_parameters=string_params(body.custom_parameters),
            encoding=encoding,
            sample_rate=fmt.sample_rate,
            channels=fmt.channels,
        )

    def _encode_play(self, call: CallStarted, payload: bytes) -> list[bytes]:
        wire = swap16(payload, self.name) if self._swap else payload
        return super()._encode_play(call, wire)
