"""Hostile input on the WebSocket port: generated upgrade requests, raw frames and JSON
messages for /v1/asr/stream, /v1/tts/stream and /v1/telephony/twilio, each case checked
against the harness invariants (tests/hostile/conftest.py) and the close rule of
docs/protocol.md: every close other than 1000 on our own protocol follows an `error` frame."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.hostile.conftest import Harness, case_timeout, hostile_settings, start_harness
from tests.hostile.strategies import (
    MAX_FRAME,
    WS_PATHS,
    FrameSpec,
    Mutation,
    Raw,
    apply_mutations,
    asr_messages,
    deep_json,
    encode,
    frame_specs,
    methods,
    mutations,
    paths,
    tts_messages,
    twilio_messages,
    versions,
)
from tests.hostile.wire import (
    Outcome,
    RawClient,
    close_frame,
    frame,
    good_upgrade_headers,
    open_session,
    text,
    upgrade_request,
)

pytestmark = pytest.mark.e2e
REDIS_DB = 14  # a Redis logical database no other test module uses
OWN_PROTOCOL = ("/v1/asr/stream", "/v1/tts/stream")
VALID_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                     *range(3000, 5000)}


@pytest.fixture(scope="module")
def harness(redis_url: str, database_url: str) -> Iterator[Harness]:
    yield from start_harness(redis_url, database_url, REDIS_DB)


def assert_close_explained(out: Outcome, case: str, *, own_protocol: bool,
                           echoed: int | None = None) -> None:
    """The server ended the connection with a close frame (never a silent drop or a hang); on
    our own protocol any close other than 1000 (or the echo of the client's own valid close)
    follows an `error` frame."""
    assert not out.timed_out, f"no close within the timeout: {case}: {out.describe()}"
    assert out.close_code is not None, f"connection dropped without a close frame: {case}: " \
        f"{out.describe()}"
    if out.close_code in (1000, echoed):
        return
    if own_protocol:
        msgs = out.messages()
        assert msgs and msgs[-1]["type"] == "error", \
            f"close {out.close_code} without an error frame before it: {case}: {out.describe()}"
        assert msgs[-1]["code"] and msgs[-1]["message"], msgs[-1]
    else:
        assert out.close_code not in (1006, 1011), f"{case}: {out.describe()}"


def assert_json_refusal(out: Outcome, case: str) -> None:
    """docs/protocol.md: rejections are plain HTTP responses with a JSON body
    `{"error":{"code","message"}}`, whatever refused the upgrade."""
    try:
        body = json.loads(out.response_body)
    except ValueError:
        body = None
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), \
        f"refusal {out.status} without a JSON error body: {case}: {out.response_body[:200]!r}"
    assert body["error"].get("code") and body["error"].get("message"), (case, body)


def valid_client_close(payload: bytes) -> int | None:
    """The code of a close frame the server must echo (RFC 6455 5.5.1, 7.4), else None."""
    if not payload:
        # A close without a body is valid; its echo has none either, which reads as 1005
        # ("no status code", RFC 6455 7.1.5): the client's own close, not one of ours.
        return 1005
    if len(payload) < 2 or len(payload) > 125:
        return None
    code = int.from_bytes(payload[:2], "big")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return code if code in VALID_CLOSE_CODES else None


# --- upgrades --------------------------------------------------------------------------------


@case_timeout(120)
@hostile_settings(60)
@given(path=paths(), method=methods, version=versions,
       muts=st.lists(mutations, max_size=3), key_in=st.sampled_from(
           ["header", "header", "subprotocol", "query", "none", "wrong"]))
@example(path="/v1/asr/stream", method="GET", version="HTTP/1.1",
         muts=[Mutation("duplicate", "Authorization")], key_in="header")  # issue 11 item 6
@example(path="/v1/tts/stream", method="GET", version="HTTP/1.1",
         muts=[Mutation("duplicate", "Authorization")], key_in="header")
@example(path="/v1/asr/stream?sample_rate=99999999999999999999&endpointing_ms=1e3",
         method="GET", version="HTTP/1.1", muts=[], key_in="header")
def test_hostile_upgrades(harness: Harness, path: str, method: str, version: str,
                          muts: list[Mutation], key_in: str) -> None:
    harness.begin()
    port = harness.server.ws_port
    key = harness.free.key
    headers = good_upgrade_headers(port, key if key_in == "header" else None)
    if key_in == "subprotocol":
        headers.append(("Sec-WebSocket-Protocol", f"token, {key}"))
    elif key_in == "query":
        path += ("&" if "?" in path else "?") + f"api_key={key}"
    elif key_in == "wrong":
        headers.append(("Authorization", "Bearer sg_wrong"))
    headers = apply_mutations(headers, muts)
    case = f"{method} {path[:200]} {version} {muts} key={key_in}"
    before = harness.baseline()
    calls = harness.calls_ended()
    with RawClient(port) as client:
        client.send(upgrade_request(path, headers, method, version))
        out = client.read_response()
        assert not out.timed_out, f"no answer to the upgrade: {case}"
        if out.status is not None:
            assert out.status < 500, (case, out.response_head, out.response_body)
        if out.status == 101:
            if "telephony" not in path:
                client.read_frames(until_type="ready")
            client.send(close_frame(1000))
            client.read_frames()
            assert out.close_code == 1000, (case, out.describe())
            if "telephony" in path:
                harness.wait_call_ended(calls)
        elif out.status is not None:
            assert_json_refusal(out, case)
    harness.check(case, before, refused=out.status != 101)


# --- raw frames ------------------------------------------------------------------------------


@case_timeout(120)
@hostile_settings(40)
@given(path=st.sampled_from(WS_PATHS), specs=st.lists(frame_specs(), min_size=1, max_size=3))
@example(path="/v1/asr/stream", specs=[FrameSpec(1, b'{"type":"keepalive","x":"\xff"}')])
@example(path="/v1/tts/stream", specs=[FrameSpec(8, b"\x03\xe8\xff")])  # issue 11 item 9
@example(path="/v1/asr/stream", specs=[FrameSpec(2, b"", claimed_length=2**63 - 1)])
@example(path="/v1/asr/stream", specs=[FrameSpec(2, b"\x00" * 64, mask=False)])
def test_hostile_frames(harness: Harness, path: str, specs: list[FrameSpec]) -> None:
    # Audio frames on ASR (and media on telephony) are billable input: those cases run on the
    # paid tenant; every other one must cost the free tenant nothing.
    harness.begin()
    billable = "telephony" in path or (path == "/v1/asr/stream" and any(
        s.opcode in (0, 2) for s in specs))
    tenant = harness.paid if billable else harness.free
    before = None if billable else harness.baseline()
    case = f"{path} {specs}"
    echoed: int | None = None
    with open_session(harness.server.ws_port, path, tenant.key) as client:
        for spec in specs:
            if spec.opcode == 8 and echoed is None:
                echoed = valid_client_close(spec.payload) if spec.fin and spec.mask and \
                    not spec.rsv and spec.claimed_length is None else None
            client.send(frame(spec.opcode, spec.payload, fin=spec.fin, rsv=spec.rsv,
                              mask=spec.mask, claimed_length=spec.claimed_length))
        if "telephony" in path:
            client.send(text({"event": "stop", "streamSid": "MZ1"}))
        else:
            client.send(text({"type": "close"}))
        out = client.read_frames()
    assert_close_explained(out, case, own_protocol=path in OWN_PROTOCOL, echoed=echoed)
    harness.check(case, before)


# --- JSON messages -----------------------------------------------------------------------------


def run_messages(harness: Harness, path: str, msgs: list[Any], *, key: str) -> Outcome:
    with open_session(harness.server.ws_port, path, key) as client:
        for msg in msgs:
            if not client.send(frame(0x1, encode(msg))):
                break
        client.send(text({"type": "close"}))
        return client.read_frames()


def assert_session_went_on(out: Outcome, case: str) -> None:
    """Refused messages leave the session running: our `close` still gets its `summary`."""
    assert_close_explained(out, case, own_protocol=True)
    if out.close_code == 1000:
        types = [m["type"] for m in out.messages()]
        assert "summary" in types, f"close 1000 without a summary: {case}: {out.describe()}"


@case_timeout(120)
@hostile_settings(40)
@given(msgs=st.lists(asr_messages, min_size=1, max_size=4))
@example(msgs=[Raw(deep_json(30_000).encode())])  # issue 11 item 5
@example(msgs=[Raw(deep_json(2_000, "{").encode()), {"type": "keepalive"}])
def test_hostile_asr_messages(harness: Harness, msgs: list[Any]) -> None:
    # No audio: a session fed only messages is billed nothing.
    harness.begin()
    before = harness.baseline()
    case = f"/v1/asr/stream {msgs!r}"[:2000]
    out = run_messages(harness, "/v1/asr/stream", msgs, key=harness.free.key)
    assert_session_went_on(out, case)
    harness.check(case, before)


@case_timeout(120)
@hostile_settings(40)
@given(msgs=st.lists(tts_messages, min_size=1, max_size=4))
@example(msgs=[Raw(deep_json(30_000).encode())])  # issue 11 item 5
@example(msgs=[{"type": "credit", "bytes": 10**30}, {"type": "flush"}])
def test_hostile_tts_messages(harness: Harness, msgs: list[Any]) -> None:
    # No valid `text` (tts_messages never makes one): nothing is synthesized, nothing billed.
    harness.begin()
    before = harness.baseline()
    case = f"/v1/tts/stream {msgs!r}"[:2000]
    out = run_messages(harness, "/v1/tts/stream", msgs, key=harness.free.key)
    assert_session_went_on(out, case)
    harness.check(case, before)


STREAM_SID = "MZ00000000000000000000000000000000"


def twilio_start(stream_sid: str = STREAM_SID) -> dict[str, Any]:
    return {"event": "start", "streamSid": stream_sid, "start": {
        "streamSid": stream_sid, "callSid": "CA0", "tracks": ["inbound"], "customParameters": {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


@case_timeout(120)
@hostile_settings(30)
@given(before_start=st.lists(twilio_messages(STREAM_SID), max_size=2),
       after_start=st.lists(twilio_messages(STREAM_SID), max_size=4))
@example(before_start=[Raw(deep_json(30_000).encode())], after_start=[])  # issue 11 item 5
@example(before_start=[], after_start=[Raw(deep_json(30_000).encode())])
def test_hostile_twilio_messages(harness: Harness, before_start: list[Any],
                                 after_start: list[Any]) -> None:
    """Provider sockets: malformed messages are logged and ignored (no `error` frames there),
    the call still ends with close 1000 at our `stop`."""
    harness.begin()
    case = f"/v1/telephony/twilio {before_start!r} start {after_start!r}"[:2000]
    sent = [*before_start, {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            twilio_start(), *after_start, {"event": "stop", "streamSid": STREAM_SID}]
    # A message over the frame limit is not a malformed message but a frame the WebSocket layer
    # refuses: docs/protocol.md closes a provider socket 1009 for it (no `error` frame there).
    too_big = any(len(encode(msg)) > MAX_FRAME for msg in sent)
    with open_session(harness.server.ws_port, "/v1/telephony/twilio",
                      harness.paid.key) as client:
        for msg in sent:
            if not client.send(frame(0x1, encode(msg))):
                break
        out = client.read_frames()
    assert not out.timed_out and out.close_code is not None, (case, out.describe())
    # (A `stop` the provider codec accepts before the big frame ends the call 1000 first.)
    assert out.close_code in ((1000, 1009) if too_big else (1000,)), (case, out.describe())
    assert all("event" in m for m in out.messages()), (case, out.messages())
    harness.check(case)

