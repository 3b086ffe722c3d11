"""`POST /v1/asr/transcribe` input types against a real server process (issue 11, items 1-2).

A recording is what its bytes and headers say it is: a WAV is decoded as WAV (its header is not
billed as PCM, its rate is its own) whether it comes with a WAV type, no type or a generic one,
in a form part or as the raw body; form fields count in any order; a type we do not decode is
refused before anything is leased or charged.

The WAV files are real espeak-ng speech at 22,050 Hz (espeak's own rate), written by the stdlib
`wave` module, so the expected duration comes from an independent reader, not from our codecs.
"""

from __future__ import annotations

import http.client
import io
import json
import uuid
import wave
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import TEST_KEY, ServerProcess
from tests.e2e.test_billing_e2e import (
    Admin,
    Tenant,
    assert_books_balance,
    billing_server,
    cost,
    pg_state,
    wait_settled_and_flushed,
)
from tests.e2e.test_speech_http import post
from tests.speech import espeak_pcm16, silence

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
RATE = 22050
INPUT_TYPES_REDIS_DB = 15  # this module's billing server's Redis logical database
# ID3v2 tag then an MPEG-1 layer III frame header: the start of any MP3 file.
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + bytes(range(256)) * 8


def espeak_wav(text: str = "hello, this recording is billed for exactly its length") -> bytes:
    pcm = silence(300, RATE) + espeak_pcm16(text, RATE) + silence(600, RATE)
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(pcm)
    return out.getvalue()


def duration_ms(wav_bytes: bytes) -> int:
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        return int(wav.getnframes() * 1000 // wav.getframerate())


def form(*parts: tuple[str, bytes, dict[str, str]]) -> tuple[bytes, str]:
    """multipart/form-data of (name, value, extra headers) in the given order; a `filename`
    header becomes the Content-Disposition's filename."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for name, value, headers in parts:
        extra = dict(headers)
        disposition = f'form-data; name="{name}"'
        if "filename" in extra:
            disposition += f'; filename="{extra.pop("filename")}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        for header, header_value in extra.items():
            body += f"{header}: {header_value}\r\n".encode()
        body += b"\r\n" + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def file_part(data: bytes, content_type: str | None, filename: str = "hello.wav"
              ) -> tuple[str, bytes, dict[str, str]]:
    headers = {"filename": filename}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return ("file", data, headers)


def post_form(base: str, auth: dict[str, str], *parts: tuple[str, bytes, dict[str, str]],
              query: str = "") -> tuple[int, dict[str, Any]]:
    body, ctype = form(*parts)
    status, _, raw = post(f"{base}/v1/asr/transcribe{query}", body,
                          {**auth, "Content-Type": ctype})
    return status, json.loads(raw)


def post_untyped(base: str, auth: dict[str, str], body: bytes, query: str = ""
                 ) -> tuple[int, dict[str, Any]]:
    """A raw body with no Content-Type header at all (urllib would add one)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    try:
        conn.request("POST", f"/v1/asr/transcribe{query}", body=body,
                     headers={**auth, "Content-Length": str(len(body))})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def field(name: str, value: str) -> tuple[str, bytes, dict[str, str]]:
    return (name, value.encode(), {})


@pytest.mark.parametrize("part_type", ["audio/wav", "audio/x-wav", None,
                                       "application/octet-stream"])
def test_a_wav_form_part_is_decoded_as_wav_and_billed_its_duration(
        server: ServerProcess, part_type: str | None) -> None:
    wav = espeak_wav()
    # curl's order: the file first, the parameters after it.
    status, result = post_form(server.http, AUTH, file_part(wav, part_type),
                               field("model", "synthetic"), field("vad", "medium"))
    assert status == 200, result
    assert result["audio_ms"] == duration_ms(wav)
    assert result["text"] and len(result["utterances"]) == 1


def test_fields_after_the_file_part_are_honoured(server: ServerProcess) -> None:
    wav = espeak_wav()
    status, result = post_form(server.http, AUTH, file_part(wav, None), field("model", "nope"))
    assert status == 400 and result["error"]["code"] == "bad_request"
    assert "nope" in result["error"]["message"]
    status, result = post_form(server.http, AUTH, file_part(wav, "application/octet-stream"),
                               field("model", "synthetic"), field("encoding", "mulaw"))
    assert status == 400 and result["error"]["code"] == "bad_request"
    assert "encoding=mulaw" in result["error"]["message"]
    # A later field wins over the query string, as one before the file does.
    status, result = post_form(server.http, AUTH, file_part(wav, None),
                               field("model", "synthetic"), query="?model=nope")
    assert status == 200 and result["audio_ms"] == duration_ms(wav)


def test_raw_wav_body_without_a_content_type_is_sniffed(server: ServerProcess) -> None:
    wav = espeak_wav()
    status, result = post_untyped(server.http, AUTH, wav, "?model=synthetic")
    assert status == 200, result
    assert result["audio_ms"] == duration_ms(wav) and result["text"]
    # urllib and curl --data-binary label an untyped body x-www-form-urlencoded: no type either.
    status, _, body = post(f"{server.http}/v1/asr/transcribe?model=synthetic", wav, AUTH)
    assert status == 200 and json.loads(body)["audio_ms"] == duration_ms(wav)


def test_headerless_audio_still_needs_its_type_or_encoding(server: ServerProcess) -> None:
    pcm8k = silence(300, 8000) + espeak_pcm16("telephone call", 8000) + silence(800, 8000)
    status, _, body = post(f"{server.http}/v1/asr/transcribe?model=synthetic",
                           pcm8k, {**AUTH, "Content-Type": "audio/L16;rate=8000"})
    assert status == 200 and json.loads(body)["audio_ms"] == len(pcm8k) // 16
    status, result = post_untyped(server.http, AUTH, pcm8k,
                                  "?model=synthetic&encoding=pcm_s16le&sample_rate=8000")
    assert status == 200 and result["audio_ms"] == len(pcm8k) // 16
    status, result = post_untyped(server.http, AUTH, pcm8k, "?model=synthetic")
    assert status == 415 and result["error"]["code"] == "unsupported_media_type"


def test_form_bounds(server: ServerProcess) -> None:
    wav = espeak_wav()
    cases = [
        [file_part(wav, None), field("model", "synthetic"), field("model", "synthetic")],
        [file_part(wav, None), file_part(wav, None)],
        [file_part(wav, None), field("language", "x" * 2000)],
        [file_part(wav, None), *[field(f"f{i}", "1") for i in range(40)]],
        [field("model", "synthetic")],
        [("file", wav, {"filename": "a.wav", "Content-Transfer-Encoding": "base64"})],
    ]
    for parts in cases:
        status, result = post_form(server.http, AUTH, *parts)
        assert status == 400 and result["error"]["code"] == "bad_request", result


REFUSED: list[tuple[str, int, str]] = [
    # (case, status, error code)
    ("raw audio/mpeg", 415, "unsupported_media_type"),
    ("raw application/json", 415, "unsupported_media_type"),
    ("raw untyped MP3", 415, "unsupported_media_type"),
    ("raw audio/wav that is an MP3", 400, "bad_audio"),
    ("raw audio/basic that is a WAV", 400, "bad_audio"),
    ("raw 32-bit float WAV", 400, "bad_audio"),
    ("form part audio/mpeg", 415, "unsupported_media_type"),
    ("form part without type named .mp3", 415, "unsupported_media_type"),
    ("form part text/plain", 415, "unsupported_media_type"),
]


def send_refused(base: str, auth: dict[str, str], case: str) -> tuple[int, dict[str, Any]]:
    url = f"{base}/v1/asr/transcribe?model=synthetic"

    def raw(body: bytes, ctype: str) -> tuple[int, dict[str, Any]]:
        status, _, answer = post(url, body, {**auth, "Content-Type": ctype})
        return status, json.loads(answer)

    wav = espeak_wav()
    if case == "raw audio/mpeg":
        return raw(MP3, "audio/mpeg")
    if case == "raw application/json":
        return raw(json.dumps({"audio": "hello"}).encode(), "application/json")
    if case == "raw untyped MP3":
        return post_untyped(base, auth, MP3, "?model=synthetic")
    if case == "raw audio/wav that is an MP3":
        return raw(MP3, "audio/wav")
    if case == "raw audio/basic that is a WAV":
        return raw(wav, "audio/basic")
    if case == "raw 32-bit float WAV":
        float_wav = bytearray(wav)
        float_wav[20:22] = (3).to_bytes(2, "little")  # WAVE_FORMAT_IEEE_FLOAT
        float_wav[34:36] = (32).to_bytes(2, "little")
        return raw(bytes(float_wav), "audio/wav")
    if case == "form part audio/mpeg":
        return post_form(base, auth, file_part(MP3, "audio/mpeg", "song.mp3"),
                         field("model", "synthetic"))
    if case == "form part without type named .mp3":
        return post_form(base, auth, file_part(MP3[10:], None, "song.mp3"),
                         field("model", "synthetic"))
    if case == "form part text/plain":
        return post_form(base, auth, file_part(b"hello there", "text/plain", "a.txt"),
                         field("model", "synthetic"))
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "status", "code"), REFUSED)
def test_unsupported_or_mislabelled_audio_is_refused(server: ServerProcess, case: str,
                                                     status: int, code: str) -> None:
    got, result = send_refused(server.http, AUTH, case)
    assert (got, result["error"]["code"]) == (status, code), result


# --- with billing on: what is refused costs nothing, what is served costs its duration ------


@pytest.fixture(scope="module")
def billed(redis_url: str, database_url: str) -> Iterator[tuple[ServerProcess, Admin, str, str]]:
    with billing_server(redis_url, database_url, INPUT_TYPES_REDIS_DB) as env:
        yield env.server, env.admin, env.redis_url, env.dsn


FUNDS = 1_000_000


async def test_refused_uploads_charge_nothing(
        billed: tuple[ServerProcess, Admin, str, str]) -> None:
    srv, admin, rurl, dsn = billed
    tenant: Tenant = admin.tenant(funded=FUNDS, prefix="refused")
    for case, status, code in REFUSED:
        got, result = send_refused(srv.http, tenant.auth, case)
        assert (got, result["error"]["code"]) == (status, code), (case, result)
    pg, rs = await wait_settled_and_flushed(rurl, dsn, tenant.tenant_id, expected_usage=0)
    assert pg.events == 0 and pg.balance == FUNDS and pg.topups == FUNDS
    # No lease was ever taken: the wallet was not even loaded into Redis.
    assert rs.leases == 0 and rs.spendable in (None, FUNDS), rs
    assert admin.usage_cost(tenant.tenant_id) == 0
    assert admin.balance(tenant.tenant_id)["balance_micros"] == FUNDS


@pytest.mark.parametrize("part_type", ["audio/wav", "audio/x-wav", None,
                                       "application/octet-stream"])
async def test_a_wav_is_charged_for_its_duration(
        billed: tuple[ServerProcess, Admin, str, str], part_type: str | None) -> None:
    srv, admin, rurl, dsn = billed
    tenant: Tenant = admin.tenant(funded=FUNDS, prefix="wav")
    wav = espeak_wav()
    status, result = post_form(srv.http, tenant.auth, file_part(wav, part_type),
                               field("model", "synthetic"))
    assert status == 200, result
    expected = cost(duration_ms(wav))
    assert result["audio_ms"] == duration_ms(wav) and result["cost_micros"] == expected
    pg = await assert_books_balance(dsn, rurl, tenant.tenant_id, expected_usage=expected)
    assert pg.balance == FUNDS - expected
    assert admin.usage_cost(tenant.tenant_id) == expected
    assert (await pg_state(dsn, tenant.tenant_id)).events >= 1
