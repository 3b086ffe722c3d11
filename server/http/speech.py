"""Speech over HTTP: `POST /v1/asr/transcribe` and `POST /v1/tts/synthesize`.

Both run the very session machinery of the WebSocket endpoints (admission, leases, VAD, engines,
credit) behind `HttpWire`, a stand-in for the socket: a long recording streams through the same
bounded pipeline as a live session (the body is read only as fast as the pipeline drains), and
synthesized audio streams back as it is produced, paced by what the HTTP response has written.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web
from websockets.datastructures import Headers

from server.http.auth import principal
from server.http.errors import ApiError
from server.http.openapi import error_responses, register
from server.sessions.asr_runner import AsrEndpoint
from server.sessions.tts_runner import TtsEndpoint
from server.ws.connection import SessionHandler
from server.ws.handshake import Rejected, UpgradeRequest

FRAME = 32 * 1024  # body chunks fed to the pipeline: well under the WebSocket frame limit
RAW_TYPES = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav",
             "audio/basic": "mulaw", "audio/x-mulaw": "mulaw", "audio/pcmu": "mulaw",
             "audio/x-alaw": "alaw", "audio/pcma": "alaw", "audio/l16": "pcm_s16le"}
TEXT_LIMIT = 100_000


class HttpWire:
    """The part of WsConnection a session runner uses, for a request instead of a socket."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.audio: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.reading_paused = False
        self.write_paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()

    def send_text(self, data: bytes) -> None:
        self.messages.append(json.loads(data))

    def send_binary(self, data: bytes) -> None:
        self.audio.put_nowait(data)

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code
            self.closed.set()
            self.audio.put_nowait(None)

    def pause_reading(self) -> None:
        self.reading_paused = True
        self._resumed.clear()

    def resume_reading(self) -> None:
        self.reading_paused = False
        self._resumed.set()

    async def readable(self) -> None:
        await self._resumed.wait()


def _rejection(decision: Rejected) -> ApiError:
    return ApiError(decision.status, decision.code, decision.message, decision.headers)


def _upgrade(query: dict[str, str]) -> UpgradeRequest:
    return UpgradeRequest(path="", query=query, api_key=None, headers=Headers())


def _final_error(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    errors = [m for m in messages if m.get("type") == "error"]
    return errors[-1] if errors else None


async def _body_chunks(request: web.Request, query: dict[str, str]) -> AsyncIterator[bytes]:
    if request.content_type.startswith("multipart/"):
        try:
            async for chunk in _multipart_chunks(request, query):
                yield chunk
        except ApiError:
            raise
        except Exception as exc:  # aiohttp's parser raises assorted errors on bad input
            raise ApiError(400, "bad_request", f"malformed multipart body: {exc}"[:200]) from None
        return
    async for chunk in request.content.iter_chunked(FRAME):
        yield chunk


async def _multipart_chunks(request: web.Request, query: dict[str, str]
                            ) -> AsyncIterator[bytes]:
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "file":
            while chunk := await part.read_chunk(FRAME):
                yield chunk
            return
        query[part.name or ""] = (await part.text())[:100]
    raise ApiError(400, "bad_request", "multipart body without a `file` part")


def add_speech_routes(app: web.Application, *, asr: AsrEndpoint, tts: TtsEndpoint) -> None:
    async def transcribe(request: web.Request) -> web.Response:
        caller = await principal(request)
        query = dict(request.query)
        kind = RAW_TYPES.get(request.content_type.lower())
        if kind is not None and "encoding" not in query:
            query["encoding"] = kind
            params = request.headers.get("Content-Type", "").lower().split(";")[1:]
            for param in params:  # audio/L16;rate=8000
                name, _, value = param.strip().partition("=")
                if name == "rate" and kind == "pcm_s16le":
                    query.setdefault("sample_rate", value)
        wire = HttpWire()
        handler: SessionHandler | None = None
        try:
            async for chunk in _body_chunks(request, query):
                if handler is None:
                    query.setdefault("interim_results", "false")
                    decision = await asr.admit(_upgrade(query), caller)
                    if isinstance(decision, Rejected):
                        raise _rejection(decision)
                    handler = decision.start(wire)  # type: ignore[arg-type]
                await wire.readable()  # the pipeline is full: stop reading the body
                if wire.closed.is_set():
                    break
                handler.on_binary(chunk)
                handler.on_read_done()
            if handler is None:
                raise ApiError(400, "bad_request", "empty body: no audio")
            handler.on_text(b'{"type":"close"}')
            handler.on_read_done()
            await wire.closed.wait()
        finally:
            if handler is not None and not wire.closed.is_set():
                # The client went away mid-upload: the session ends and settles like a
                # vanished WebSocket client.
                handler.on_connection_closed(1006)
        error = _final_error(wire.messages)
        if wire.close_code != 1000 and error is not None:
            status = {4002: 402, 4029: 429, 4400: 400}.get(wire.close_code or 0, 502)
            raise ApiError(status, error["code"], error["message"])
        finals = [m for m in wire.messages if m["type"] == "transcript" and m["is_final"]]
        summary = next((m for m in wire.messages if m["type"] == "summary"), {})
        return web.json_response({
            "text": " ".join(f["text"] for f in finals if f["text"]).strip(),
            "utterances": [{k: f[k] for k in ("utterance_id", "text", "start_ms", "end_ms",
                                              "words")} for f in finals],
            "audio_ms": summary.get("audio_ms", 0),
            "cost_micros": summary.get("cost_micros", 0),
        })

    async def synthesize(request: web.Request) -> web.StreamResponse:
        caller = await principal(request)
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, "bad_request", "body must be JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str) \
                or not body["text"].strip():
            raise ApiError(400, "bad_request", "`text` (a non-empty string) is required")
        if len(body["text"]) > TEXT_LIMIT:
            raise ApiError(400, "bad_request", f"text longer than {TEXT_LIMIT} characters")
        try:
            body["text"].encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "bad_request", "text is not valid Unicode") from None
        for name in ("model", "voice", "language", "encoding"):
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ApiError(400, "bad_request", f"`{name}` must be a non-empty string")
        rate = body.get("sample_rate")
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool)):
            raise ApiError(400, "bad_request", "`sample_rate` must be an integer")
        query = {k: str(body[k]) for k in ("model", "voice", "language", "encoding",
                                           "sample_rate") if body.get(k) is not None}
        query.setdefault("encoding", "wav")
        decision = await tts.admit(_upgrade(query), caller)
        if isinstance(decision, Rejected):
            raise _rejection(decision)
        wire = HttpWire()
        handler = decision.start(wire)  # type: ignore[arg-type]
        handler.on_text(json.dumps({"type": "text", "text": body["text"]}).encode())
        handler.on_text(b'{"type":"close"}')
        content_type = {"wav": "audio/wav", "mulaw": "audio/basic", "alaw": "audio/x-alaw",
                        "pcm_s16le": "audio/l16"}[query["encoding"]]
        response = web.StreamResponse(headers={"Content-Type": content_type})
        started = False
        try:
            while (chunk := await wire.audio.get()) is not None:
                if not started:
                    await response.prepare(request)
                    started = True
                await response.write(chunk)
                # Written: the client took it, so the session may produce that much more.
                handler.on_text(json.dumps({"type": "credit", "bytes": len(chunk)}).encode())
        finally:
            if not wire.closed.is_set():
                handler.on_connection_closed(1006)  # the client went away mid-stream
        error = _final_error(wire.messages)
        if not started:
            if error is not None:
                # An engine refusing the input for good (unknown voice, text it cannot speak)
                # is the request's fault; a retryable failure is the upstream's.
                status = 402 if wire.close_code == 4002 else (
                    502 if error.get("retryable") else 400)
                raise ApiError(status, error["code"], error["message"])
            await response.prepare(request)
        await response.write_eof()
        return response

    app.router.add_post("/v1/asr/transcribe", transcribe)
    app.router.add_post("/v1/tts/synthesize", synthesize)
    register(app, "/v1/asr/transcribe", "post", {
        "summary": "transcribe a recording (WAV, PCM16, mu-law, A-law), streamed through VAD",
        "security": [{"bearer": []}],
        "parameters": [{"name": n, "in": "query", "required": False,
                        "schema": {"type": "string"}}
                       for n in ("model", "language", "encoding", "sample_rate", "vad")],
        "requestBody": {"required": True, "content": {
            "audio/wav": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}},
        "responses": {"200": {"description": "transcript", "content": {"application/json": {
            "schema": {"type": "object", "required": ["text", "utterances", "audio_ms",
                                                      "cost_micros"],
                       "properties": {"text": {"type": "string"},
                                      "utterances": {"type": "array", "items": {
                                          "type": "object"}},
                                      "audio_ms": {"type": "integer"},
                                      "cost_micros": {"type": "integer"}}}}}},
                      **error_responses(400, 401, 402, 413, 429, 502, 503)},
    })
    register(app, "/v1/tts/synthesize", "post", {
        "summary": "synthesize text; the audio streams back as it is produced",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["text"],
            "properties": {"text": {"type": "string", "minLength": 1, "maxLength": TEXT_LIMIT},
                           "model": {"type": "string", "minLength": 1, "nullable": True},
                           "voice": {"type": "string", "minLength": 1, "nullable": True},
                           "language": {"type": "string", "minLength": 1, "nullable": True},
                           "encoding": {"type": "string",
                                        "enum": ["wav", "pcm_s16le", "mulaw", "alaw", None],
                                        "nullable": True},
                           "sample_rate": {"type": "integer", "minimum": 8000,
                                           "maximum": 48000, "nullable": True}}}}}},
        "responses": {"200": {"description": "audio", "content": {
            ctype: {"schema": {"type": "string", "format": "binary"}}
            for ctype in ("audio/wav", "audio/l16", "audio/basic", "audio/x-alaw")}},
                      **error_responses(400, 401, 402, 413, 429, 502, 503)},
    })
