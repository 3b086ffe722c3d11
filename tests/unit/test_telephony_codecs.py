"""Wire-format tests for the telephony provider codecs (server/telephony).

Sample messages are copied from, or faithfully reconstructed after, each provider's
published documentation; the page is named above each group. Audio payloads the docs
abbreviate ("no+JhoaJjpz...") are replaced with valid base64 of known bytes.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.telephony.providers import (
    PROVIDERS,
    CallStarted,
    CallStopped,
    ClearAudio,
    Connected,
    Dtmf,
    Event,
    ExotelCodec,
    InboundAudio,
    MarkAcknowledged,
    PlayAudio,
    PlivoCodec,
    ProviderCodec,
    ProviderError,
    SendMark,
    TelnyxCodec,
    TwilioCodec,
    codec_for,
    detect_provider,
)
from server.telephony.providers.base import FrameTemplate, encode_json

AUDIO = bytes(range(160))
B64 = base64.b64encode(AUDIO).decode()


def dumps(message: dict[str, Any]) -> str:
    return json.dumps(message)


# ----------------------------------------------------------------------------- Twilio
# Twilio Docs, "Media Streams - WebSocket Messages" (twilio.com/docs/voice/media-streams/
# websocket-messages). Numbers are strings on the wire.
TW_SID = "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
TW_CONNECTED: dict[str, Any] = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
TW_START: dict[str, Any] = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
        "streamSid": TW_SID,
        "callSid": "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"},
    },
    "streamSid": TW_SID,
}
TW_MEDIA: dict[str, Any] = {
    "event": "media",
    "sequenceNumber": "4",
    "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": B64},
    "streamSid": TW_SID,
}
TW_STOP: dict[str, Any] = {
    "event": "stop",
    "sequenceNumber": "5",
    "stop": {"accountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "callSid": "CAXXXX"},
    "streamSid": TW_SID,
}
TW_DTMF: dict[str, Any] = {
    "event": "dtmf",
    "streamSid": TW_SID,
    "sequenceNumber": "5",
    "dtmf": {"track": "inbound_track", "digit": "1"},
}
TW_MARK: dict[str, Any] = {
    "event": "mark",
    "sequenceNumber": "4",
    "streamSid": TW_SID,
    "mark": {"name": "my label"},
}


def test_twilio_decodes_every_inbound_message() -> None:
    codec = TwilioCodec()
    assert codec.decode(dumps(TW_CONNECTED)) == [Connected()]
    assert codec.decode(dumps(TW_START).encode()) == [
        CallStarted(
            stream_id=TW_SID,
            call_id="CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            account_id="ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            tracks=("inbound",),
            custom_parameters={"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"},
            encoding="mulaw",
            sample_rate=8000,
            channels=1,
        )
    ]
    assert codec.call is not None and codec.call.stream_id == TW_SID
    assert codec.decode(dumps(TW_MEDIA)) == [InboundAudio(AUDIO, "inbound", 5, 4)]
    assert codec.decode(dumps(TW_DTMF)) == [Dtmf("1")]
    assert codec.decode(dumps(TW_MARK)) == [MarkAcknowledged("my label")]
    assert codec.decode(dumps(TW_STOP)) == [CallStopped(None)]


def test_twilio_encodes_exact_documented_json() -> None:
    codec = TwilioCodec()
    with pytest.raises(ProviderError, match="before the 'start'"):
        codec.encode(ClearAudio())
    codec.decode(dumps(TW_START))
    assert codec.encode(PlayAudio(b"\x01\x02\x03")) == [
        b'{"event":"media","streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX","media":{"payload":"AQID"}}'
    ]
    assert codec.encode(SendMark("my label")) == [
        b'{"event":"mark","streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",'
        b'"mark":{"name":"my label"}}'
    ]
    assert codec.encode(ClearAudio()) == [
        b'{"event":"clear","streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"}'
    ]
    # A PlayAudio with a mark is media then mark; an empty one is just the mark.
    frames = [json.loads(f) for f in codec.encode(PlayAudio(b"\x01", mark="m1"))]
    assert [f["event"] for f in frames] == ["media", "mark"]
    assert frames[1]["mark"] == {"name": "m1"}
    assert [json.loads(f)["event"] for f in codec.encode(PlayAudio(b"", mark="m2"))] == ["mark"]


def test_twilio_protocol_violations() -> None:
    codec = TwilioCodec()
    with pytest.raises(ProviderError, match="media before the 'start'"):
        codec.decode(dumps(TW_MEDIA))
    l16 = json.loads(dumps(TW_START))
    l16["start"]["mediaFormat"]["encoding"] = "audio/L16"
    with pytest.raises(ProviderError, match=r"unsupported mediaFormat\.encoding 'audio/L16'"):
        codec.decode(dumps(l16))
    codec.decode(dumps(TW_START))
    with pytest.raises(ProviderError, match="second 'start'"):
        codec.decode(dumps(TW_START))


# ----------------------------------------------------------------------------- Exotel
# Exotel, "WebSocket protocol" (developer.exotel.com/docs/agentstream/websocket-protocol)
# and "Working with the Stream and Voicebot Applet". The stop example is reconstructed from
# the applet guide (stop {call_sid, account_sid, reason}).
EX_SID = "MZxxxxxxxxxxxxxxxxxxxxxxxx"
EX_START: dict[str, Any] = {
    "event": "start",
    "sequence_number": "1",
    "stream_sid": EX_SID,
    "start": {
        "stream_sid": EX_SID,
        "call_sid": "CAxxxxxxxxxxxxxxxxxxxxxxxx",
        "account_sid": "ACxxxxxxxxxxxxxxxxxxxxxxxx",
        "from": "+919876543210",
        "to": "+918047491899",
        "custom_parameters": {"key1": "value1"},
        "media_format": {"encoding": "audio/x-raw", "sample_rate": "16000", "bit_rate": "16"},
    },
}
EX_MEDIA: dict[str, Any] = {
    "event": "media",
    "sequence_number": "3",
    "stream_sid": EX_SID,
    "media": {"chunk": "2", "timestamp": "200", "payload": B64},
}
EX_DTMF: dict[str, Any] = {
    "event": "dtmf",
    "sequence_number": "7",
    "stream_sid": EX_SID,
    "dtmf": {"digit": "5", "duration": "100"},
}
EX_MARK: dict[str, Any] = {
    "event": "mark",
    "sequence_number": "15",
    "stream_sid": EX_SID,
    "mark": {"name": "m-1"},
}
EX_STOP: dict[str, Any] = {
    "event": "stop",
    "sequence_number": "20",
    "stream_sid": EX_SID,
    "stop": {"call_sid": "CAx", "account_sid": "ACx", "reason": "callended"},
}


def test_exotel_decodes_every_inbound_message() -> None:
    codec = ExotelCodec()
    assert codec.decode('{ "event": "connected" }') == [Connected()]
    (call,) = codec.decode(dumps(EX_START))
    assert call == CallStarted(
        stream_id=EX_SID,
        call_id="CAxxxxxxxxxxxxxxxxxxxxxxxx",
        account_id="ACxxxxxxxxxxxxxxxxxxxxxxxx",
        tracks=("inbound",),
        custom_parameters={"key1": "value1"},
        encoding="pcm_s16le",
        sample_rate=16000,
        channels=1,
    )
    assert codec.decode(dumps(EX_MEDIA)) == [InboundAudio(AUDIO, "inbound", 200, 3)]
    assert codec.decode(dumps(EX_DTMF)) == [Dtmf("5")]
    assert codec.decode(dumps(EX_MARK)) == [MarkAcknowledged("m-1")]
    assert codec.decode(dumps(EX_STOP)) == [CallStopped("callended")]
    # A stop without its body, and a start without a media_format (the documented default:
    # 8 kHz raw PCM) or custom parameters, are still understood.
    assert codec.decode('{"event": "stop"}') == [CallStopped(None)]
    bare = json.loads(dumps(EX_START))
    del bare["start"]["media_format"], bare["start"]["custom_parameters"]
    (call,) = ExotelCodec().decode(dumps(bare))
    assert isinstance(call, CallStarted)
    assert (call.encoding, call.sample_rate, call.custom_parameters) == ("pcm_s16le", 8000, {})


def test_exotel_encodes_exact_json_and_checks_format() -> None:
    codec = ExotelCodec()
    codec.decode(dumps(EX_START))
    assert codec.encode(PlayAudio(b"\x01\x00", mark="m")) == [
        b'{"event":"media","stream_sid":"MZxxxxxxxxxxxxxxxxxxxxxxxx","media":{"payload":"AQA="}}',
        b'{"event":"mark","stream_sid":"MZxxxxxxxxxxxxxxxxxxxxxxxx","mark":{"name":"m"}}',
    ]
    assert codec.encode(ClearAudio()) == [
        b'{"event":"clear","stream_sid":"MZxxxxxxxxxxxxxxxxxxxxxxxx"}'
    ]
    with pytest.raises(ProviderError, match="not whole 16-bit samples"):
        codec.encode(PlayAudio(b"\x01\x00\x02"))
    # Older docs spelled the raw PCM encoding "base64"; 44.1 kHz is not an Exotel rate.
    legacy = json.loads(dumps(EX_START))
    legacy["start"]["media_format"] = {"encoding": "base64", "sample_rate": "8000"}
    (call,) = ExotelCodec().decode(dumps(legacy))
    assert isinstance(call, CallStarted)
    assert (call.encoding, call.sample_rate) == ("pcm_s16le", 8000)
    legacy["start"]["media_format"]["sample_rate"] = 44100
    with pytest.raises(ProviderError, match="sample_rate 44100"):
        ExotelCodec().decode(dumps(legacy))


# ------------------------------------------------------------------------------ Plivo
# Plivo, "Stream Event Protocol" / "Audio Streaming Protocol Reference" (start, media,
# dtmf, playedStream, clearedAudio) and "Play audio event", "Checkpoint event", "Clear
# audio stream" for the outbound side.
PL_STREAM = "87654321-4321-4321-4321-cba987654321"
PL_START: dict[str, Any] = {
    "event": "start",
    "sequenceNumber": 1,
    "start": {
        "callId": "12345678-1234-1234-1234-123456789abc",
        "streamId": PL_STREAM,
        "accountId": "MAXXXXXXXXXXXXXXXXXX",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
    },
    "extra_headers": "userId=12345;sessionId=abc-xyz",
}
PL_MEDIA: dict[str, Any] = {
    "event": "media",
    "sequenceNumber": 42,
    "streamId": PL_STREAM,
    "media": {"track": "inbound", "timestamp": "1705312200000", "chunk": 41, "payload": B64},
    "extra_headers": "userId=12345;sessionId=abc-xyz",
}
PL_DTMF: dict[str, Any] = {
    "event": "dtmf",
    "sequenceNumber": 50,
    "streamId": PL_STREAM,
    "dtmf": {"track": "inbound", "digit": "5", "timestamp": "1705312250000"},
}
PL_PLAYED: dict[str, Any] = {
    "event": "playedStream",
    "sequenceNumber": 75,
    "streamId": PL_STREAM,
    "name": "c1",
}
PL_CLEARED: dict[str, Any] = {"sequenceNumber": 0, "event": "clearedAudio", "streamId": PL_STREAM}


def test_plivo_decodes_every_inbound_message() -> None:
    codec = PlivoCodec()
    assert codec.decode(dumps(PL_START)) == [
        CallStarted(
            stream_id=PL_STREAM,
            call_id="12345678-1234-1234-1234-123456789abc",
            account_id="MAXXXXXXXXXXXXXXXXXX",
            tracks=("inbound",),
            custom_parameters={"userId": "12345", "sessionId": "abc-xyz"},
            encoding="mulaw",
            sample_rate=8000,
            channels=1,
        )
    ]
    assert codec.decode(dumps(PL_MEDIA)) == [InboundAudio(AUDIO, "inbound", 1705312200000, 42)]
    assert codec.decode(dumps(PL_DTMF)) == [Dtmf("5")]
    assert codec.decode(dumps(PL_PLAYED)) == [MarkAcknowledged("c1")]
    # Plivo's support article spells the checkpoint ack "played".
    assert codec.decode(dumps({**PL_PLAYED, "event": "played"})) == [MarkAcknowledged("c1")]
    assert codec.decode(dumps(PL_CLEARED)) == []
    with pytest.raises(ProviderError, match="unknown event 'connected'"):
        codec.decode(dumps(TW_CONNECTED))  # Plivo sends no connected message


def test_plivo_encodes_exact_documented_json() -> None:
    codec = PlivoCodec()
    codec.decode(dumps(PL_START))
    assert codec.encode(PlayAudio(b"\xff\x7f", mark="customer greeting audio")) == [
        b'{"event":"playAudio","media":{"contentType":"audio/x-mulaw","sampleRate":8000,'
        b'"payload":"/38="}}',
        b'{"event":"checkpoint","streamId":"87654321-4321-4321-4321-cba987654321",'
        b'"name":"customer greeting audio"}',
    ]
    assert codec.encode(ClearAudio()) == [
        b'{"event":"clearAudio","streamId":"87654321-4321-4321-4321-cba987654321"}'
    ]
    l16 = json.loads(dumps(PL_START))
    l16["start"]["mediaFormat"] = {"encoding": "audio/x-l16", "sampleRate": 16000}
    codec = PlivoCodec()
    (call,) = codec.decode(dumps(l16))
    assert isinstance(call, CallStarted)
    assert (call.encoding, call.sample_rate) == ("pcm_s16le", 16000)
    assert json.loads(codec.encode(PlayAudio(b"\x01\x00"))[0])["media"] == {
        "contentType": "audio/x-l16",
        "sampleRate": 16000,
        "payload": "AQA=",
    }
    l16["start"]["mediaFormat"] = {"encoding": "audio/x-mulaw", "sampleRate": 16000}
    with pytest.raises(ProviderError, match="sampleRate 16000 for audio/x-mulaw"):
        PlivoCodec().decode(dumps(l16))


# ----------------------------------------------------------------------------- Telnyx
# Telnyx, "Stream call media over WebSocket" (developers.telnyx.com/api-reference/
# websockets/stream-call-media-over-websocket) and "Media Streaming over Websockets".
TX_STREAM = "32DE0DEA-53CB-4B21-89A4-9E1819C043BC"
TX_CALL = "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ"
TX_CONNECTED: dict[str, Any] = {"event": "connected", "version": "1.0.0"}
TX_START: dict[str, Any] = {
    "event": "start",
    "sequence_number": "1",
    "stream_id": TX_STREAM,
    "start": {
        "user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
        "call_control_id": TX_CALL,
        "call_session_id": "ff55a038-6f5d-11ef-9692-02420aeffb1f",
        "from": "+13122010094",
        "to": "+13122123456",
        "tags": ["TAG1", "TAG2"],
        "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
        "custom_parameters": {"customer_id": "customer_123"},
        "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
    },
}
TX_STOP: dict[str, Any] = {
    "event": "stop",
    "sequence_number": "5",
    "stop": {"user_id": "3E6F995F-85F7-4705-9741-53B116D28237", "call_control_id": TX_CALL},
    "stream_id": TX_STREAM,
}
TX_ERROR: dict[str, Any] = {
    "stream_id": TX_STREAM,
    "event": "error",
    "sequence_number": "3",
    "error": {"title": "rate_limit_reached", "code": "100005", "detail": "Too many requests"},
}


def tx_media(seq: int, payload: bytes = AUDIO) -> str:
    media = {
        "track": "inbound",
        "chunk": str(seq - 1),
        "timestamp": str(20 * seq),
        "payload": base64.b64encode(payload).decode(),
    }
    return dumps(
        {"event": "media", "sequence_number": str(seq), "media": media, "stream_id": TX_STREAM}
    )


def tx_event(event: str, seq: int, body: dict[str, Any]) -> str:
    return dumps({"event": event, "sequence_number": str(seq), "stream_id": TX_STREAM, event: body})


def sequences(events: list[Event]) -> list[int | None]:
    return [e.sequence for e in events if isinstance(e, InboundAudio)]


def test_telnyx_decodes_every_inbound_message() -> None:
    codec = TelnyxCodec()
    assert codec.decode(dumps(TX_CONNECTED)) == [Connected()]
    assert codec.decode(dumps(TX_START)) == [
        CallStarted(
            stream_id=TX_STREAM,
            call_id=TX_CALL,
            account_id="3E6F995F-85F7-4705-9741-53B116D28237",
            tracks=(),
            custom_parameters={"customer_id": "customer_123"},
            encoding="mulaw",
            sample_rate=8000,
            channels=1,
        )
    ]
    assert codec.decode(tx_media(2)) == [InboundAudio(AUDIO, "inbound", 40, 2)]
    assert codec.decode(tx_event("dtmf", 3, {"digit": "#"})) == [Dtmf("#")]
    assert codec.decode(tx_event("mark", 4, {"name": "m"})) == [MarkAcknowledged("m")]
    assert codec.decode(dumps(TX_STOP)) == [CallStopped()]


def test_telnyx_encodes_exact_json_and_swaps_l16() -> None:
    codec = TelnyxCodec()
    codec.decode(dumps(TX_START))
    assert codec.encode(PlayAudio(b"\x01\x02", mark="m")) == [
        b'{"event":"media","media":{"payload":"AQI="}}',
        b'{"event":"mark","mark":{"name":"m"}}',
    ]
    assert codec.encode(ClearAudio()) == [b'{"event":"clear"}']
    # L16 is an RTP payload (network byte order); the gateway sees pcm_s16le both ways.
    l16 = json.loads(dumps(TX_START))
    l16["start"]["media_format"] = {"encoding": "L16", "sample_rate": 16000, "channels": 1}
    codec = TelnyxCodec()
    assert codec.decode(tx_media(2, b"\x12\x34\x56\x78")) == []  # held until start
    (call, early) = codec.decode(dumps(l16))
    assert isinstance(call, CallStarted) and call.encoding == "pcm_s16le"
    assert early == InboundAudio(b"\x34\x12\x78\x56", "inbound", 40, 2)
    assert codec.decode(tx_media(3, b"\x00\x01")) == [InboundAudio(b"\x01\x00", "inbound", 60, 3)]
    assert json.loads(codec.encode(PlayAudio(b"\x01\x00"))[0])["media"]["payload"] == "AAE="
    l16["start"]["media_format"]["encoding"] = "OPUS"
    with pytest.raises(ProviderError, match=r"unsupported media_format\.encoding 'OPUS'"):
        TelnyxCodec().decode(dumps(l16))


def test_telnyx_reorders_shuffled_media_within_the_window() -> None:
    codec = TelnyxCodec(reorder_window=8)
    codec.decode(dumps(TX_START))
    order = list(range(2, 42))
    rng = random.Random(7)
    for block in range(0, len(order), 6):  # shuffle within blocks smaller than the window
        chunk = order[block : block + 6]
        rng.shuffle(chunk)
        order[block : block + 6] = chunk
    assert order != sorted(order)
    out: list[Event] = []
    for seq in order:
        out += codec.decode(tx_media(seq))
    assert sequences(out) == list(range(2, 42))
    assert codec.skipped == 0


def test_telnyx_skips_a_lost_message_after_the_window() -> None:
    codec = TelnyxCodec(reorder_window=4)
    codec.decode(dumps(TX_START))
    assert sequences(codec.decode(tx_media(2))) == [2]
    # 3 is lost: 4, 5, 6 wait behind the gap; the 4th waiting message gives it up.
    for seq in (4, 5, 6):
        assert codec.decode(tx_media(seq)) == []
    assert sequences(codec.decode(tx_media(7))) == [4, 5, 6, 7]
    assert codec.skipped == 1
    assert codec.decode(tx_media(3)) == []  # too late: would be out of order
    # A late control message is still delivered (a lost mark ack would leak credit).
    assert codec.decode(tx_event("mark", 3, {"name": "late"})) == [MarkAcknowledged("late")]
    # Non-media messages fill their own slots, so they never look like gaps.
    assert codec.decode(tx_event("dtmf", 8, {"digit": "1"})) == [Dtmf("1")]
    assert sequences(codec.decode(tx_media(9))) == [9]
    # stop releases what is held, in order, before itself.
    assert codec.decode(tx_media(11)) == []
    stop = dumps({**TX_STOP, "sequence_number": "12"})
    assert codec.decode(stop) == [InboundAudio(AUDIO, "inbound", 220, 11), CallStopped()]
    assert codec.skipped == 2  # 3, then 10 (never arrived before stop)
    assert codec.decode(tx_media(10)) == []  # after stop: dropped


def test_telnyx_error_frame_raises_without_stalling_the_window() -> None:
    codec = TelnyxCodec()
    codec.decode(dumps(TX_START))
    assert codec.decode(tx_media(4)) == []  # waits for 2 and 3
    assert sequences(codec.decode(tx_media(2))) == [2]
    with pytest.raises(ProviderError, match="100005 rate_limit_reached: Too many requests"):
        codec.decode(dumps(TX_ERROR))  # seq 3: fills the gap, releasing 4
    assert sequences(codec.decode(tx_media(5))) == [4, 5]
    assert codec.skipped == 0


# --------------------------------------------------------------------- all providers
STARTS: dict[str, dict[str, Any]] = {
    "twilio": TW_START,
    "exotel": EX_START,
    "plivo": PL_START,
    "telnyx": TX_START,
}
MEDIA: dict[str, Any] = {
    "twilio": lambda p: dumps({**TW_MEDIA, "media": {**TW_MEDIA["media"], "payload": p}}),
    "exotel": lambda p: dumps({**EX_MEDIA, "media": {**EX_MEDIA["media"], "payload": p}}),
    "plivo": lambda p: dumps({**PL_MEDIA, "media": {**PL_MEDIA["media"], "payload": p}}),
    "telnyx": lambda p: tx_media(2, base64.b64decode(p)),
}


def started(provider: str) -> ProviderCodec:
    codec = codec_for(provider)
    codec.decode(dumps(STARTS[provider]))
    return codec


@pytest.mark.parametrize("provider", PROVIDERS)
def test_audio_payload_round_trips_through_base64(provider: str) -> None:
    payload = random.Random(provider).randbytes(3200)  # even length: valid PCM16 too
    codec = started(provider)
    (frame, *_) = codec.encode(PlayAudio(payload))
    wire = json.loads(frame)
    media = wire["media"]
    assert base64.b64decode(media["payload"], validate=True) == payload
    (audio,) = codec.decode(MEDIA[provider](base64.b64encode(payload).decode()))
    assert isinstance(audio, InboundAudio) and audio.payload == payload


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("frame", "match"),
    [
        ('{"event": "media", ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"streamSid": "x"}', "no 'event' field"),
        ('{"event": "hangup"}', "unknown event 'hangup'"),
        ('{"event": "dtmf", "dtmf": {}}', r"malformed 'dtmf' message: .*`digit`"),
        ('{"event": "media", "media": {"payload": "***"}}', "Invalid base64"),
    ],
)
def test_malformed_messages_raise_helpful_errors(provider: str, frame: str, match: str) -> None:
    for wire in (frame, frame.encode()):  # tests write str; the socket hands over bytes
        with pytest.raises(ProviderError, match=f"^{provider}: .*{match}"):
            started(provider).decode(wire)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_missing_start_fields_and_oversized_messages(provider: str) -> None:
    start = json.loads(dumps(STARTS[provider]))
    required = {"twilio": "mediaFormat", "plivo": "mediaFormat", "exotel": "call_sid"}
    del start["start"][required.get(provider, "call_control_id")]
    with pytest.raises(ProviderError, match="malformed 'start' message: Object missing"):
        codec_for(provider).decode(dumps(start))
    small = codec_for(provider, max_message_bytes=512)
    with pytest.raises(ProviderError, match="exceeds the 512-byte limit"):
        small.decode(dumps(STARTS[provider]) + " " * 512)
    with pytest.raises(ProviderError, match="exceeds the 65536-byte limit"):
        started(provider).decode(MEDIA[provider](base64.b64encode(bytes(60_000)).decode()))
    with pytest.raises(ProviderError, match="exceeds the 512-byte limit"):
        small.decode((dumps(STARTS[provider]) + " " * 512).encode())
    media = MEDIA[provider](B64).encode()
    if provider == "telnyx":
        assert codec_for(provider).decode(media) == []  # held for reordering until start
    else:
        with pytest.raises(ProviderError, match="media before the 'start' message"):
            codec_for(provider).decode(media)


def test_codec_factory_and_provider_detection() -> None:
    assert isinstance(codec_for(" Twilio "), TwilioCodec)
    assert [codec_for(p).name for p in PROVIDERS] == ["twilio", "exotel", "plivo", "telnyx"]
    with pytest.raises(ProviderError, match="unknown telephony provider 'vonage'"):
        codec_for("vonage")
    firsts: dict[str, list[dict[str, Any]]] = {
        "twilio": [TW_CONNECTED, TW_START],
        "exotel": [{"event": "connected"}, EX_START],
        "plivo": [PL_START],
        "telnyx": [TX_CONNECTED, TX_START, {**TX_CONNECTED, "x-telnyx-streaming-auth-token": "t"}],
    }
    for provider, messages in firsts.items():
        for message in messages:
            assert detect_provider(dumps(message)) == provider, message
            assert detect_provider(dumps(message).encode()) == provider
    for junk in ("", "nope", "[]", '{"event": "media"}', '{"event": "connected", "x": 1}'):
        assert detect_provider(junk) is None
    assert detect_provider(" " * 70_000 + dumps(TW_START)) is None


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# Deeper than msgspec descends on any Python we support (~1,000 levels on 3.11, ~10,000 on
# 3.13), and under the 64 KiB message limit.
TOO_DEEP = 30_000


@pytest.mark.parametrize("provider", PROVIDERS)
def test_deep_nesting_is_a_provider_error_not_a_recursion_error(provider: str) -> None:
    """msgspec recurses per level, even into a field it skips; at the interpreter's limit that
    was an uncaught RecursionError, which killed the call's socket. Now it is one more
    malformed message (the session logs and ignores it) and the call goes on."""
    codec = started(provider)
    deep = nested(TOO_DEEP)
    media = MEDIA[provider](B64)
    for frame in (media[:-1] + f', "x": {deep}}}',  # in a field the codec skips
                  f'{{"x": {deep}, "event": "dtmf"}}',
                  f'{{"event": "hangup", "x": {deep}}}'):  # found while explaining the error
        for wire in (frame, frame.encode()):
            with pytest.raises(ProviderError, match=f"^{provider}: JSON nested too deeply"):
                codec.decode(wire)
    with pytest.raises(ProviderError, match="expected a JSON object"):
        codec.decode(deep.encode())
    (audio,) = codec.decode(media)
    assert isinstance(audio, InboundAudio) and audio.payload == AUDIO
    assert detect_provider(deep) is None
    assert detect_provider(dumps(STARTS[provider])[:-1] + f', "x": {deep}}}') is None


@settings(max_examples=300, deadline=None)
@given(stream_id=st.text(min_size=1, max_size=40), name=st.text(max_size=40),
       payload=st.binary(max_size=400))
def test_outbound_frames_equal_a_full_encode(stream_id: str, name: str, payload: bytes) -> None:
    """The per-call templates give byte for byte what encoding the whole message gives, for
    any stream id and mark name (quotes, backslashes, control and non-ASCII characters)."""
    call = CallStarted(stream_id=stream_id, call_id="CA", account_id=None, tracks=(),
                       custom_parameters={}, encoding="mulaw", sample_rate=8000, channels=1)
    for codec in (TwilioCodec(), ExotelCodec(), TelnyxCodec(), PlivoCodec()):
        codec._call = call
        media, mark = codec.encode(PlayAudio(payload, mark=name)) if payload else (
            None, *codec.encode(SendMark(name)))
        if isinstance(codec, PlivoCodec):
            want_media = {"event": "playAudio", "media": {
                "contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": payload}}
            want_mark: dict[str, object] = {"event": "checkpoint", "streamId": stream_id,
                                            "name": name}
        else:
            sid = {"streamSid": stream_id} if isinstance(codec, TwilioCodec) else \
                {"stream_sid": stream_id} if isinstance(codec, ExotelCodec) else {}
            want_media = {"event": "media", **sid, "media": {"payload": payload}}
            want_mark = {"event": "mark", **sid, "mark": {"name": name}}
        if media is not None:
            assert media == encode_json(want_media)
        assert mark == encode_json(want_mark)
        assert json.loads(mark) == json.loads(encode_json(want_mark))


def test_a_stream_id_that_spells_the_hole_is_encoded_whole() -> None:
    """A start event's stream id is the client's: one equal to the template's hole (the same
    characters, not the constant) must not break the call's frames (it raised ValueError)."""
    spelled = "".join(list(FrameTemplate.HOLE))  # equal, not the same object
    call = CallStarted(stream_id=spelled, call_id="CA", account_id=None, tracks=(),
                       custom_parameters={}, encoding="mulaw", sample_rate=8000, channels=1)
    for codec in (TwilioCodec(), ExotelCodec(), PlivoCodec()):
        codec._call = call
        media, mark = codec.encode(PlayAudio(b"\x01\x02", mark="m1"))
        sent = json.loads(mark)
        assert spelled in sent.values()
        assert sent.get("name", sent.get("mark", {}).get("name")) == "m1"
        body = json.loads(media)
        assert body["event"] in ("media", "playAudio")
        assert base64.b64decode(body["media"]["payload"]) == b"\x01\x02"


def test_frame_template_needs_one_hole() -> None:
    with pytest.raises(ValueError, match="exactly one hole"):
        FrameTemplate({"event": "media"})
    with pytest.raises(ValueError, match="exactly one hole"):
        FrameTemplate({"a": FrameTemplate.HOLE, "b": FrameTemplate.HOLE})
