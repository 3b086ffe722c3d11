"""Speech over HTTP against a real server process: batch transcription and streamed synthesis."""

from __future__ import annotations

import audioop
import io
import json
import urllib.error
import urllib.request
import uuid
import wave
from typing import Any

import pytest

from streamgate_protocol.audio import wav_header
from tests.e2e.conftest import TEST_KEY, ServerProcess
from tests.speech import espeak_pcm16, silence

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def speech_wav() -> bytes:
    pcm = silence(300) + espeak_pcm16("one two three four five") + silence(800)
    return wav_header(16000, 1, len(pcm) // 2) + pcm


def test_transcribe_a_wav_body(server: ServerProcess) -> None:
    status, _, body = post(f"{server.http}/v1/asr/transcribe?model=synthetic", speech_wav(),
                           {**AUTH, "Content-Type": "audio/wav"})
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    assert result["text"] and len(result["utterances"]) == 1
    utt = result["utterances"][0]
    assert utt["start_ms"] < utt["end_ms"] <= result["audio_ms"]
    assert result["audio_ms"] == (len(speech_wav()) - 44) // 32


def test_transcribe_multipart_and_mulaw(server: ServerProcess) -> None:
    pcm8k = silence(300, 8000) + espeak_pcm16("telephone call", 8000) + silence(800, 8000)
    ulaw = audioop.lin2ulaw(pcm8k, 2)
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nsynthetic\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"encoding\"\r\n\r\nmulaw\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"sample_rate\"\r\n\r\n8000\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.ulaw\""
            f"\r\nContent-Type: application/octet-stream\r\n\r\n").encode() + ulaw + \
        f"\r\n--{boundary}--\r\n".encode()
    status, _, body = post(f"{server.http}/v1/asr/transcribe", form,
                           {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, body
    result = json.loads(body)
    assert result["audio_ms"] == len(ulaw) // 8 and result["text"]


def test_transcribe_errors(server: ServerProcess) -> None:
    status, _, body = post(f"{server.http}/v1/asr/transcribe", speech_wav(),
                           {"Content-Type": "audio/wav"})
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    status, _, body = post(f"{server.http}/v1/asr/transcribe?model=nope", speech_wav(),
                           {**AUTH, "Content-Type": "audio/wav"})
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    status, _, body = post(f"{server.http}/v1/asr/transcribe", b"",
                           {**AUTH, "Content-Type": "audio/wav"})
    assert status == 400
    status, _, body = post(f"{server.http}/v1/asr/transcribe?model=synthetic",
                           b"RIFX" + b"\x00" * 200, {**AUTH, "Content-Type": "audio/wav"})
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_audio"


def test_aiohttp_refusals_are_json_errors(server: ServerProcess) -> None:
    """A body over the 1 MiB limit, an unknown route, a wrong method: the one JSON shape."""
    big = json.dumps({"text": "x" * (1024 * 1024 + 10)}).encode()
    status, headers, body = post(f"{server.http}/v1/tts/synthesize", big,
                                 {**AUTH, "Content-Type": "application/json"})
    assert status == 413 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    status, _, body = post(f"{server.http}/v1/nothing-here", b"{}", AUTH)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    req = urllib.request.Request(f"{server.http}/v1/tts/synthesize", headers=AUTH)
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("GET on a POST route answered 2xx")
    except urllib.error.HTTPError as err:
        assert err.code == 405 and "POST" in err.headers["Allow"]
        assert json.loads(err.read())["error"]["code"] == "method_not_allowed"


def test_synthesize_streams_a_wav(server: ServerProcess) -> None:
    text = "Hello from the gateway. This audio was streamed."
    status, headers, body = post(
        f"{server.http}/v1/tts/synthesize",
        json.dumps({"text": text, "model": "espeak-en", "sample_rate": 16000}).encode(),
        {**AUTH, "Content-Type": "application/json"},
    )
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    with _wav(body) as wav:
        assert wav.getframerate() == 16000 and wav.getnchannels() == 1
    duration_ms = (len(body) - 44) * 1000 // 32000
    assert 40 <= duration_ms / len(text) <= 120


def _wav(body: bytes) -> wave.Wave_read:
    fixed = bytearray(body)
    # A streaming header says "unknown length"; give the stdlib reader the real one.
    fixed[4:8] = (len(body) - 8).to_bytes(4, "little")
    fixed[40:44] = (len(body) - 44).to_bytes(4, "little")
    reader: wave.Wave_read = wave.open(io.BytesIO(bytes(fixed)), "rb")
    return reader


def test_synthesize_errors(server: ServerProcess) -> None:
    status, _, body = post(f"{server.http}/v1/tts/synthesize", b"{}",
                           {**AUTH, "Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    status, _, body = post(f"{server.http}/v1/tts/synthesize", b"not json",
                           {**AUTH, "Content-Type": "application/json"})
    assert status == 400
    status, _, body = post(f"{server.http}/v1/tts/synthesize",
                           json.dumps({"text": "hi", "model": "nope"}).encode(),
                           {**AUTH, "Content-Type": "application/json"})
    assert status == 400


def test_idempotency_key_replays_without_charging_again(server: ServerProcess) -> None:
    headers = {**AUTH, "Content-Type": "audio/wav", "Idempotency-Key": uuid.uuid4().hex}
    url = f"{server.http}/v1/asr/transcribe?model=synthetic"
    first = post(url, speech_wav(), headers)
    again = post(url, speech_wav(), headers)
    assert first[0] == again[0] == 200
    assert again[2] == first[2] and again[1].get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first[1]
    other = post(f"{url}&language=en-GB", speech_wav(), headers)  # same key, other request
    assert other[0] == 409 and json.loads(other[2])["error"]["code"] == "idempotency_conflict"
    tts_headers = {**AUTH, "Content-Type": "application/json", "Idempotency-Key": "tts-1"}
    body = json.dumps({"text": "Say it once.", "model": "synthetic"}).encode()
    one = post(f"{server.http}/v1/tts/synthesize", body, tts_headers)
    two = post(f"{server.http}/v1/tts/synthesize", body, tts_headers)
    assert one[0] == two[0] == 200 and one[2] == two[2] and len(one[2]) > 44
    assert two[1].get("Idempotent-Replayed") == "true"


def test_synthesize_refuses_deeply_nested_json_with_a_json_400(server: ServerProcess) -> None:
    """Issue 11 item 5: nesting deep enough to exhaust a recursive parser was a text/plain 500."""
    deep = "[" * 30000 + "]" * 30000
    bodies = [deep.encode(), json.dumps({"text": "hi"})[:-1].encode() + b', "extra": '
              + deep.encode() + b"}"]
    logged = len(server.stderr_lines)
    for body in bodies:
        status, headers, answer = post(f"{server.http}/v1/tts/synthesize", body,
                                       {**AUTH, "Content-Type": "application/json"})
        assert status == 400 and headers["Content-Type"].startswith("application/json")
        assert json.loads(answer)["error"]["code"] == "bad_request"
    assert not any("Traceback" in line or "RecursionError" in line
                   for line in server.stderr_lines[logged:])
    status, _, _ = post(f"{server.http}/v1/tts/synthesize",
                        json.dumps({"text": "still here", "model": "espeak-en"}).encode(),
                        {**AUTH, "Content-Type": "application/json"})
    assert status == 200
