"""The ``ProviderCodec`` protocol and the machinery shared by every provider codec.

Sans-I/O in the style of websockets' protocol objects: a codec never touches a socket or a
clock. The transport hands it each text frame (``decode``) and sends whatever text frames
``encode`` returns. Per-call state is only what the wire format needs: the ``start`` data
(stream id for outbound messages, audio format) and, for Telnyx, a reorder buffer.

Inbound JSON is parsed once by a module-level msgspec decoder per provider into a tagged
union of Structs (``tag_field="event"``), so a media message costs one C-level parse with
base64 decoded straight into ``bytes``. ``strict=False`` lets the same Struct accept
``"1"`` and ``1`` for numeric fields: providers disagree (Twilio and Telnyx send numbers
as strings, Plivo as JSON numbers, Exotel has done both across doc revisions). Unknown
fields are ignored so providers can add fields without breaking calls.
"""

from __future__ import annotations

import binascii
from array import array
from collections.abc import Iterable, Mapping
from typing import ClassVar, Final, Generic, Protocol, TypeAlias, TypeVar

import msgspec

from server.flow_control.json_depth import TOO_DEEP
from server.telephony.providers.events import (
    CallStarted,
    ClearAudio,
    Command,
    Event,
    PlayAudio,
    ProviderError,
    SendMark,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "CodecBase",
    "DigitBody",
    "FrameTemplate",
    "MediaBody",
    "NameBody",
    "ProviderCodec",
    "Scalar",
    "TemplatedCodec",
    "TwilioStyleCodec",
    "encode_json",
    "string_params",
    "swap16",
]

# Inbound frames are small: 20 ms of mu-law is ~300 bytes of JSON and Exotel's ~100 ms of
# 24 kHz PCM16 is ~7 KB. 64 KiB leaves a wide margin while capping what a misbehaving peer
# can make us parse per frame.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024

# JSON scalars a provider may use as a custom-parameter value.
Scalar: TypeAlias = str | int | float | bool | None

M = TypeVar("M")

_ENCODER: Final = msgspec.json.Encoder()


class _Envelope(msgspec.Struct):
    """Only parsed on the error path, to say *which* event was wrong."""

    event: str | None = None


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)


# Message bodies that Twilio's dialect and those modelled on it spell the same way.
class MediaBody(msgspec.Struct, kw_only=True):
    """``media {track, chunk, timestamp, payload}``: ``chunk`` is not read."""

    payload: bytes
    track: str = "inbound"
    timestamp: int | None = None


class NameBody(msgspec.Struct):
    """``mark {name}``."""

    name: str


class DigitBody(msgspec.Struct):
    """``dtmf {digit}``."""

    digit: str


class ProviderCodec(Protocol):
    """What the telephony session needs from a provider dialect."""

    @property
    def name(self) -> str:
        """Provider name as accepted by ``codec_for`` ("twilio", "exotel", ...)."""
        ...

    @property
    def call(self) -> CallStarted | None:
        """The ``start`` data once seen; ``None`` before."""
        ...

    def decode(self, text: str | bytes) -> list[Event]:
        """Parse one inbound text frame; may return zero events (e.g. held for reordering).

        Raises ProviderError for anything malformed, unknown or oversized.
        """
        ...

    def encode(self, command: Command) -> list[bytes]:
        """The outbound text frame(s) for ``command``, as the UTF-8 bytes a WebSocket text
        frame carries; ProviderError before ``start``."""
        ...


def encode_json(message: Mapping[str, object]) -> bytes:
    """Compact JSON (UTF-8); ``bytes`` values become base64 (msgspec's encoding for bytes)."""
    return _ENCODER.encode(message)


_HOLE: Final = "\x00streamgate-hole\x00"


class FrameTemplate:
    """An outbound message whose every field but one is fixed for the call (event name,
    stream id, audio format), encoded once: a frame is then two byte concatenations around
    the one value (base64 audio, a mark's name) instead of a dict built and encoded per
    frame. ``message`` holds ``FrameTemplate.HOLE`` where the value goes; the bytes are
    exactly what ``encode_json`` gives for the same message (the tests hold them to it)."""

    HOLE: Final = _HOLE
    __slots__ = ("_head", "_message", "_tail")

    def __init__(self, message: Mapping[str, object]) -> None:
        if _holes(message) != 1:
            raise ValueError("a frame template needs exactly one hole")
        hole = _ENCODER.encode(_HOLE)
        encoded = _ENCODER.encode(message)
        # A field from the wire (a stream id) that spells the hole makes the bytes ambiguous:
        # such a call's frames are encoded whole, as before templates.
        self._message = None if encoded.count(hole) == 1 else message
        self._head, _, self._tail = encoded.partition(hole)

    def with_bytes(self, payload: bytes) -> bytes:
        """The message with ``payload`` in the hole as a base64 JSON string."""
        if self._message is not None:
            return _ENCODER.encode(_filled(self._message, payload))
        return b"".join((self._head, b'"', binascii.b2a_base64(payload, newline=False),
                         b'"', self._tail))

    def with_text(self, value: str) -> bytes:
        """The message with ``value`` in the hole as a JSON string."""
        if self._message is not None:
            return _ENCODER.encode(_filled(self._message, value))
        return b"".join((self._head, _ENCODER.encode(value), self._tail))


def _holes(node: object) -> int:
    """How many values of `node` are the template's hole itself (the constant, by identity:
    a string from the wire that spells it is not one)."""
    if node is _HOLE:
        return 1
    if isinstance(node, Mapping):
        return sum(_holes(v) for v in node.values())
    return 0


def _filled(node: object, value: object) -> object:
    if node is _HOLE:
        return value
    if isinstance(node, Mapping):
        return {k: _filled(v, value) for k, v in node.items()}
    return node


def string_params(params: Mapping[str, Scalar]) -> dict[str, str]:
    """Normalise custom parameters to ``str -> str`` (Twilio's own type) for every provider.

    JSON ``null`` values are dropped rather than turned into the string "None".
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):  # before int: bool is an int subclass
            out[key] = "true" if value else "false"
        else:
            out[key] = str(value)
    return out


def swap16(data: bytes, provider: str) -> bytes:
    """Swap the bytes of each 16-bit sample (network order <-> pcm_s16le)."""
    if len(data) % 2:
        raise ProviderError(f"{provider}: odd-length 16-bit PCM payload ({len(data)} bytes)")
    samples = array("h", data)
    samples.byteswap()
    return samples.tobytes()


class CodecBase(Generic[M]):
    """Size limit, JSON decoding with readable errors, ``start`` state, command dispatch.

    Subclasses pass their decoder and event names, then implement ``_on_message`` (one
    parsed message -> events) and the three ``_encode_*`` hooks.
    """

    name: str = ""

    def __init__(
        self,
        decoder: msgspec.json.Decoder[M],
        events: Iterable[str],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        self._decoder = decoder
        self._events = tuple(events)
        self._max = max_message_bytes
        self._call: CallStarted | None = None

    @property
    def call(self) -> CallStarted | None:
        return self._call

    # ------------------------------------------------------------------------ inbound
    def decode(self, text: str | bytes) -> list[Event]:
        if type(text) is bytes and len(text) <= self._max:
            # What the socket hands over, 50 times a second per call: one C-level parse.
            try:
                message = self._decoder.decode(text)
            except (RecursionError, msgspec.MsgspecError):
                message = self._parse(text)  # fails the same way, and says why
            return self._on_message(message)
        return self._on_message(self._parse(text))

    def _parse(self, text: str | bytes) -> M:
        if isinstance(text, str):
            # Checked on characters first so a huge str is refused without encoding it;
            # characters <= bytes, so this never rejects a frame the byte check would pass.
            if len(text) > self._max:
                raise self._too_large(len(text))
            data = text.encode()
        else:
            data = text
        if len(data) > self._max:
            raise self._too_large(len(data))
        try:
            return self._decoder.decode(data)
        except RecursionError:
            # msgspec recurses per level of nesting, even into a field it skips, and stops
            # cleanly at the interpreter's limit. Caught here rather than checked before every
            # message: media arrives every 20 ms per call (see MAX_JSON_DEPTH's module).
            raise ProviderError(f"{self.name}: {TOO_DEEP}") from None
        except msgspec.ValidationError as exc:
            raise ProviderError(self._explain(data, exc)) from exc
        except msgspec.DecodeError as exc:
            raise ProviderError(f"{self.name}: message is not valid JSON ({exc})") from exc

    def _too_large(self, size: int) -> ProviderError:
        return ProviderError(
            f"{self.name}: message of {size} bytes exceeds the {self._max}-byte limit"
        )

    def _explain(self, data: bytes, exc: msgspec.ValidationError) -> str:
        try:
            event = _ENVELOPE.decode(data).event
        except RecursionError:  # deep in a field the first decoder never reached
            return f"{self.name}: {TOO_DEEP}"
        except msgspec.DecodeError:
            return f"{self.name}: expected a JSON object with an 'event' field ({exc})"
        if event is None:
            return f"{self.name}: message has no 'event' field"
        if event not in self._events:
            known = ", ".join(self._events)
            return f"{self.name}: unknown event {event!r} (expected one of: {known})"
        return f"{self.name}: malformed {event!r} message: {exc}"

    def _on_message(self, message: M) -> list[Event]:
        raise NotImplementedError

    def _set_call(self, call: CallStarted) -> CallStarted:
        # One stream per socket for every provider here; a second start would silently
        # retarget outbound audio, so it is refused instead.
        if self._call is not None:
            raise ProviderError(f"{self.name}: second 'start' on stream {self._call.stream_id}")
        self._call = call
        return call

    def _require_call_for(self, what: str) -> CallStarted:
        if self._call is None:
            raise ProviderError(f"{self.name}: {what} before the 'start' message")
        return self._call

    # ----------------------------------------------------------------------- outbound
    def encode(self, command: Command) -> list[bytes]:
        call = self._require_call_for(f"cannot encode {type(command).__name__}")
        if isinstance(command, PlayAudio):
            if call.encoding == "pcm_s16le" and len(command.payload) % 2:
                raise ProviderError(
                    f"{self.name}: PlayAudio payload of {len(command.payload)} bytes is not "
                    "whole 16-bit samples"
                )
            # An empty media frame is legal JSON but pointless on the wire; the mark (if
            # any) still goes out so the caller's ack accounting stays intact.
            frames = self._encode_play(call, command.payload) if command.payload else []
            if command.mark is not None:
                frames.append(self._encode_mark(call, command.mark))
            return frames
        if isinstance(command, SendMark):
            return [self._encode_mark(call, command.name)]
        if isinstance(command, ClearAudio):
            return [self._encode_clear(call)]
        raise TypeError(f"not a telephony command: {command!r}")

    def _encode_play(self, call: CallStarted, payload: bytes) -> list[bytes]:
        raise NotImplementedError

    def _encode_mark(self, call: CallStarted, name: str) -> bytes:
        raise NotImplementedError

    def _encode_clear(self, call: CallStarted) -> bytes:
        raise NotImplementedError


class TemplatedCodec(CodecBase[M]):
    """Outbound audio and marks from the call's two `FrameTemplate`s, built at its first
    outbound frame (its format and stream id are known by then) by `_templates`."""

    _play: FrameTemplate | None = None
    _mark: FrameTemplate | None = None

    def _templates(self, call: CallStarted) -> tuple[FrameTemplate, FrameTemplate]:
        """(audio, mark) templates for `call`."""
        raise NotImplementedError

    def _built(self, call: CallStarted) -> tuple[FrameTemplate, FrameTemplate]:
        if self._play is None or self._mark is None:
            self._play, self._mark = self._templates(call)
        return self._play, self._mark

    def _encode_play(self, call: CallStarted, payload: bytes) -> list[bytes]:
        play = self._play
        if play is None:
            play = self._built(call)[0]
        return [play.with_bytes(payload)]

    def _encode_mark(self, call: CallStarted, name: str) -> bytes:
        mark = self._mark
        if mark is None:
            mark = self._built(call)[1]
        return mark.with_text(name)


class TwilioStyleCodec(TemplatedCodec[M]):
    """Outbound frames in Twilio's shape, shared by the dialects modelled on it:

        media {<id>, media {payload}} / mark {<id>, mark {name}} / clear {<id>}

    where ``<id>`` is the stream id under ``stream_id_field``, or nothing when that is ``None``
    (the socket identifies the stream).
    """

    stream_id_field: ClassVar[str | None] = None
    _clear: bytes = b""  # built with the templates

    def _message(self, call: CallStarted, event: str,
                 body: Mapping[str, object] | None = None) -> dict[str, object]:
        message: dict[str, object] = {"event": event}
        if self.stream_id_field is not None:
            message[self.stream_id_field] = call.stream_id
        if body is not None:
            message[event] = body
        return message

    def _templates(self, call: CallStarted) -> tuple[FrameTemplate, FrameTemplate]:
        hole = FrameTemplate.HOLE
        self._clear = encode_json(self._message(call, "clear"))
        return (FrameTemplate(self._message(call, "media", {"payload": hole})),
                FrameTemplate(self._message(call, "mark", {"name": hole})))

    def _encode_clear(self, call: CallStarted) -> bytes:
        if self._mark is None:
            self._built(call)
        return self._clear
