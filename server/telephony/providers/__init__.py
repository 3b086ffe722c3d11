"""Telephony provider codecs: provider JSON dialects <-> provider-neutral events/commands.

Sans-I/O (no sockets, no clock): feed each inbound WebSocket text frame to
``codec.decode`` and send every frame ``codec.encode`` returns (a text frame's UTF-8 bytes).
See docs/protocol.md, "Telephony as implemented", for how the session uses marks (credit),
``clear`` (barge-in) and the API key in the start event's custom parameters.

    codec = codec_for(detect_provider(first_frame) or "twilio")
    for event in codec.decode(first_frame): ...
    for frame in codec.encode(PlayAudio(mulaw_bytes, mark="reply-1#3")): ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from server.telephony.providers.base import DEFAULT_MAX_MESSAGE_BYTES, ProviderCodec
from server.telephony.providers.events import (
    CallStarted,
    CallStopped,
    ClearAudio,
    Command,
    Connected,
    Dtmf,
    Encoding,
    Event,
    InboundAudio,
    MarkAcknowledged,
    PlayAudio,
    ProviderError,
    SendMark,
)
from server.telephony.providers.exotel import ExotelCodec
from server.telephony.providers.plivo import PlivoCodec
from server.telephony.providers.telnyx import TelnyxCodec
from server.telephony.providers.twilio import TwilioCodec

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PROVIDERS",
    "CallStarted",
    "CallStopped",
    "ClearAudio",
    "Command",
    "Connected",
    "Dtmf",
    "Encoding",
    "Event",
    "ExotelCodec",
    "InboundAudio",
    "MarkAcknowledged",
    "PlayAudio",
    "PlivoCodec",
    "ProviderCodec",
    "ProviderError",
    "SendMark",
    "TelnyxCodec",
    "TwilioCodec",
    "codec_for",
    "detect_provider",
]

_FACTORIES: Final[dict[str, Callable[..., ProviderCodec]]] = {
    "twilio": TwilioCodec,
    "exotel": ExotelCodec,
    "plivo": PlivoCodec,
    "telnyx": TelnyxCodec,
}
PROVIDERS: Final = tuple(_FACTORIES)


def codec_for(name: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ProviderCodec:
    """A fresh codec (one per call: codecs hold per-stream state) for provider ``name``."""
    factory = _FACTORIES.get(name.strip().lower())
    if factory is None:
        raise ProviderError(
            f"unknown telephony provider {name!r} (expected one of: {', '.join(PROVIDERS)})"
        )
    return factory(max_message_bytes=max_message_bytes)


def detect_provider(
    first_message: str | bytes, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> str | None:
    """Guess the provider from the first frame on a socket; ``None`` if it is not clear.

    The field spelling is the tell: ``streamSid`` (Twilio), ``stream_sid`` (Exotel),
    ``stream_id``/``call_control_id`` (Telnyx), ``streamId``/``callId`` (Plivo, whose first
    message is ``start``: it sends no ``connected``). The bare ``connected`` messages differ
    too: Twilio's has ``protocol``, Telnyx's only ``version``, Exotel's nothing at all.
    Prefer an explicit provider (e.g. from the URL path) where there is one: a
    Twilio-compatible clone will be detected as Twilio.
    """
    if len(first_message) > max_message_bytes:
        return None
    try:
        message = msgspec.json.decode(first_message)
    except (msgspec.DecodeError, RecursionError):  # the codec says why (RecursionError: depth)
        return None
    if not isinstance(message, dict):
        return None
    start = message.get("start")
    fields: Mapping[str, Any] = start if isinstance(start, dict) else {}
    keys = message.keys() | fields.keys()
    if keys & {"streamSid", "callSid", "accountSid"}:
        return "twilio"
    if keys & {"stream_sid", "call_sid", "account_sid"}:
        return "exotel"
    if keys & {"stream_id", "call_control_id", "call_session_id"}:
        return "telnyx"
    if keys & {"streamId", "callId"} or message.get("event") in ("playedStream", "clearedAudio"):
        return "plivo"
    if message.get("event") == "connected":
        if "protocol" in message:
            return "twilio"
        if "version" in message:
            return "telnyx"
        if message.keys() == {"event"}:
            return "exotel"
    return None
