"""Hypothesis strategies for hostile input: upgrade requests, raw frames, JSON messages per
protocol (ASR, TTS, Twilio media streams) and JSON bodies for the admin API."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

WS_PATHS = ("/v1/asr/stream", "/v1/tts/stream", "/v1/telephony/twilio")
DEEP = (100, 2_000, 30_000)  # nesting depths: harmless, enough to break recursion, issue 11's
MAX_FRAME = 65_536  # tests/e2e/server.toml [server] max_frame_bytes

# --- values ---------------------------------------------------------------------------------

huge_ints = st.sampled_from([-1, 0, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, -(10**30)])
odd_strings = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "\ud800", "é" * 3, "null", "-1", "1e309", "NaN",
                     "../../etc/passwd", "%00", "a" * 5000]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), huge_ints,
    st.floats(allow_nan=True, allow_infinity=True), odd_strings,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def deep_json(depth: int, kind: str = "[") -> str:
    close = "]" if kind == "[" else "}"
    opener = "[" if kind == "[" else '{"a":'
    return opener * depth + ("1" if kind == "{" else "") + close * depth


@dataclass(frozen=True)
class Raw:
    """A text frame payload that is not a JSON encoding of a Python value."""

    payload: bytes

    def __repr__(self) -> str:
        return f"Raw({self.payload[:80]!r}{'...' if len(self.payload) > 80 else ''}" \
               f" len={len(self.payload)})"


def encode(message: Any) -> bytes:
    if isinstance(message, Raw):
        return message.payload
    return json.dumps(message, allow_nan=True).encode("utf-8", "surrogatepass")


raw_payloads = st.one_of(
    st.sampled_from(DEEP).map(lambda d: Raw(deep_json(d).encode())),
    st.sampled_from(DEEP).map(lambda d: Raw(deep_json(d, "{").encode())),
    st.sampled_from(DEEP).map(
        lambda d: Raw(b'{"type":"keepalive","x":' + deep_json(d).encode() + b"}")),
    st.text(max_size=50).map(lambda s: Raw(s.encode())),  # not JSON at all
    st.sampled_from([b"{", b'{"type":', b"[]", b"null", b"1", b'""', b"{}", b'{"type":null}',
                     b'{"type":"close"', b'{"type":"keepalive"}garbage',
                     b'{"type":"keepalive","type":"close"}', b'{"type":"\\ud800"}',
                     b'{"type":1e99999}', b"\xef\xbb\xbf{}"]).map(Raw),
    # Right at and just over the frame limit.
    st.sampled_from([MAX_FRAME - 40, MAX_FRAME + 1]).map(
        lambda n: Raw(b'{"type":"keepalive","x":"' + b"a" * n + b'"}')),
)

# --- per-protocol messages --------------------------------------------------------------------


def messages(types: list[str], fields: dict[str, list[str]]) -> st.SearchStrategy[Any]:
    """Messages shaped like the protocol's (known types, known field names) with hostile
    values, plus unknown types, non-objects and raw payloads."""

    @st.composite
    def shaped(draw: st.DrawFn) -> dict[str, Any]:
        kind = draw(st.one_of(st.sampled_from(types), odd_strings, scalars))
        msg: dict[str, Any] = {"type": kind}
        names = fields.get(kind, []) if isinstance(kind, str) else []
        for name in draw(st.lists(st.sampled_from(names or ["x"]), max_size=3, unique=True)):
            msg[name] = draw(json_values)
        if draw(st.booleans()):
            msg[draw(st.text(max_size=6))] = draw(json_values)
        return msg

    return st.one_of(shaped(), raw_payloads, json_values)


ASR_TYPES = ["config", "finalize", "keepalive", "close"]
ASR_FIELDS = {"config": ["model", "language", "encoding", "sample_rate", "channels",
                         "interim_results", "endpointing_ms", "vad", "overflow"]}
TTS_TYPES = ["text", "flush", "clear", "credit", "close", "config"]
TTS_FIELDS = {"text": ["text"], "credit": ["bytes"],
              "config": ["voice", "language", "encoding", "sample_rate", "model"]}


def no_billable_text(message: Any) -> Any:
    """A TTS `text` message whose text is a string is valid input and is billed: keep every
    generated `text` message invalid (its text not a string) so the case must cost nothing."""
    if isinstance(message, dict) and message.get("type") == "text" and \
            isinstance(message.get("text", 0), str):
        return {**message, "text": [message.get("text")]}
    return message


asr_messages = messages(ASR_TYPES, ASR_FIELDS)
tts_messages = messages(TTS_TYPES, TTS_FIELDS).map(no_billable_text)

# --- Twilio media streams --------------------------------------------------------------------

TWILIO_EVENTS = ["connected", "start", "media", "mark", "stop", "dtmf"]


@st.composite
def twilio_messages(draw: st.DrawFn, stream_sid: str) -> Any:
    """Provider messages with wrong fields: each known event with a body of wrong types or
    missing parts, unknown events, non-objects and raw payloads."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(raw_payloads)
    if choice == 1:
        return draw(json_values)
    event = draw(st.one_of(st.sampled_from(TWILIO_EVENTS), odd_strings, scalars))
    msg: dict[str, Any] = {"event": event}
    if draw(st.booleans()):
        msg["streamSid"] = draw(st.one_of(st.just(stream_sid), json_values))
    if draw(st.booleans()):
        msg["sequenceNumber"] = draw(json_values)
    body_kind = draw(st.integers(0, 3))
    good_payload = base64.b64encode(b"\xff" * 160).decode()
    if event == "media":
        body: Any = {
            "track": draw(st.one_of(st.just("inbound"), json_values)),
            "chunk": draw(st.one_of(st.integers(0, 10), json_values)),
            "timestamp": draw(st.one_of(st.just("20"), json_values)),
            "payload": draw(st.one_of(
                st.just(good_payload), json_values,
                st.sampled_from(["!!!!", "=", "A", "AAA", "////" * 5000, "\u00ff\u00fe"]),
                st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()))),
        }
    elif event == "mark":
        body = {"name": draw(json_values)}
    elif event == "dtmf":
        body = {"digit": draw(json_values)}
    elif event == "start":
        body = {"streamSid": draw(json_values), "callSid": draw(json_values),
                "tracks": draw(json_values), "customParameters": draw(json_values),
                "mediaFormat": draw(st.one_of(json_values, st.fixed_dictionaries({
                    "encoding": json_values, "sampleRate": json_values,
                    "channels": json_values})))}
    else:
        body = draw(json_values)
    if body_kind == 0 and isinstance(body, dict) and body:
        body.pop(draw(st.sampled_from(sorted(body))))  # a required field missing
    if body_kind != 3 and isinstance(event, str):
        msg[event] = body
    return msg


# --- upgrade requests -------------------------------------------------------------------------

QUERY_NAMES = ["model", "encoding", "sample_rate", "channels", "vad", "overflow",
               "endpointing_ms", "interim_results", "language", "voice", "provider", "api_key"]
query_values = st.one_of(
    st.sampled_from(["", "0", "-1", "16000", "8000", "48001", "99999999999999999999", "1e3",
                     "nan", "true", "yes", "pcm_s16le", "wav", "mulaw", "mp3", "synthetic",
                     "nope", "%00", "%ff%fe", "a" * 3000, "twilio", "telnyx", "high"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
)


@st.composite
def paths(draw: st.DrawFn) -> str:
    base = draw(st.one_of(
        st.sampled_from(WS_PATHS),
        st.sampled_from(["/", "//v1/asr/stream", "/v1/asr/stream/", "/v1/asr/stream/../tts/stream",
                         "/v1/ASR/stream", "/v1/asr/%73tream", "*", "/v1/asr/stream#x",
                         "http://example.com/v1/asr/stream", "/v1/nope", "/" + "a" * 9000]),
    ))
    params = draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES), query_values), max_size=4))
    if not params:
        return base
    query = "&".join(f"{k}={v}" for k, v in params)
    if draw(st.booleans()):
        query += draw(st.sampled_from(["&", "&&", "&=", "&x", "&model", "&%zz=1"]))
    return f"{base}?{query}"


HEADER_JUNK = ["", " ", "\t", "x" * 9000, "ünïcode", "a,b,c", "13, 8", "0", "-1",
               "dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ", "!!!!", "websocket, h2c",
               "permessage-deflate; client_max_window_bits=99", "permessage-deflate; x=1",
               "token", "token, ", "token, not-a-key", "Bearer", "Bearer ", "Basic Zm9vOmJhcg==",
               "Bearer sg_nope"]


@dataclass(frozen=True)
class Mutation:
    kind: str  # drop | duplicate | replace | add | many | huge
    name: str
    value: str = ""


upgrade_header_names = st.sampled_from([
    "Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "Authorization", "Origin",
    "Content-Length", "Transfer-Encoding", "X-API-Key"])
mutations = st.one_of(
    st.builds(Mutation, st.just("drop"), upgrade_header_names),
    st.builds(Mutation, st.just("duplicate"), upgrade_header_names),
    st.builds(Mutation, st.just("replace"), upgrade_header_names, st.sampled_from(HEADER_JUNK)),
    st.builds(Mutation, st.just("add"), upgrade_header_names, st.sampled_from(HEADER_JUNK)),
    st.builds(Mutation, st.just("many"), st.just("X-Junk"), st.sampled_from(["50", "300"])),
    st.builds(Mutation, st.just("huge"), st.just("X-Junk"), st.sampled_from(["9000", "70000"])),
)


def apply_mutations(headers: list[tuple[str, str]], muts: list[Mutation]
                    ) -> list[tuple[str, str]]:
    out = list(headers)
    for m in muts:
        present = [i for i, (k, _) in enumerate(out) if k == m.name]
        if m.kind == "drop":
            out = [(k, v) for k, v in out if k != m.name]
        elif m.kind == "duplicate":
            value = out[present[0]][1] if present else "x"
            out.append((m.name, value))
        elif m.kind == "replace":
            out = [(k, m.value if k == m.name else v) for k, v in out]
            if not present:
                out.append((m.name, m.value))
        elif m.kind == "add":
            out.append((m.name, m.value))
        elif m.kind == "many":
            out.extend((f"X-Junk-{i}", "x") for i in range(int(m.value)))
        elif m.kind == "huge":
            out.append(("X-Junk", "x" * int(m.value)))
    return out


methods = st.sampled_from(["GET", "GET", "GET", "POST", "HEAD", "OPTIONS", "CONNECT", "get",
                           "G ET", "PRI"])
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0",
                            "HTTP/9", "HTTP/1.1x"])

# --- raw frames ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSpec:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    mask: bool = True
    claimed_length: int | None = None

    def __repr__(self) -> str:
        p = self.payload
        return (f"FrameSpec(op={self.opcode:#x}, fin={self.fin}, rsv={self.rsv}, "
                f"mask={self.mask}, claimed={self.claimed_length}, "
                f"payload={p[:40]!r}{'...' if len(p) > 40 else ''} len={len(p)})")


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                b"\xc0\xaf"]
CLOSE_CODES = [0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1011, 1012, 1014,
               1015, 1016, 2999, 3000, 4000, 4999, 5000, 65535]
text_payloads = st.one_of(
    st.sampled_from([b'{"type":"keepalive"}', b'{"type":"flush"}']),
    st.tuples(st.sampled_from(INVALID_UTF8), st.sampled_from([b"", b'{"type":"keepalive"}'])
              ).map(lambda t: t[1][:-2] + b',"x":"' + t[0] + b'"}' if t[1] else t[0]),
)
close_payloads = st.one_of(
    st.tuples(st.sampled_from(CLOSE_CODES) | st.integers(0, 65535),
              st.sampled_from([b"", b"bye", b"\xff", b"\xc3\x28", b"x" * 123])
              ).map(lambda t: t[0].to_bytes(2, "big") + t[1]),
    st.sampled_from([b"\x03", b"\x03\xe8" + b"x" * 124]),  # one byte; reason over 123 bytes
)


@st.composite
def frame_specs(draw: st.DrawFn) -> FrameSpec:
    kind = draw(st.integers(0, 7))
    mask = draw(st.sampled_from([True, True, True, True, False]))
    if kind == 0:  # reserved opcodes
        return FrameSpec(draw(st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])),
                         draw(st.binary(max_size=20)), mask=mask)
    if kind == 1:  # RSV bits without an extension
        return FrameSpec(draw(st.sampled_from([1, 2])), b'{"type":"keepalive"}',
                         rsv=draw(st.integers(1, 7)), mask=mask)
    if kind == 2:  # a length over the server's limit (it refuses the header)
        return FrameSpec(draw(st.sampled_from([1, 2, 0])), b"",
                         claimed_length=draw(st.sampled_from([MAX_FRAME + 1, 2**32, 2**63 - 1])),
                         mask=mask)
    if kind == 3:  # control frames: fragmented or over 125 bytes
        op = draw(st.sampled_from([8, 9, 0xA]))
        size = draw(st.sampled_from([0, 10, 125, 126, 200]))
        return FrameSpec(op, b"\x03\xe8"[: min(size, 2)] + b"x" * max(0, size - 2),
                         fin=draw(st.booleans()), mask=mask)
    if kind == 4:
        return FrameSpec(1, draw(text_payloads), fin=draw(st.booleans()), mask=mask)
    if kind == 5:
        return FrameSpec(8, draw(close_payloads), mask=mask)
    if kind == 6:  # continuation frames out of place
        return FrameSpec(0, draw(st.binary(max_size=20)), fin=draw(st.booleans()), mask=mask)
    return FrameSpec(2, draw(st.binary(max_size=64)), fin=draw(st.booleans()), mask=mask)
