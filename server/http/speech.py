"""Speech over HTTP: `POST /v1/asr/transcribe` and `POST /v1/tts/synthesize`.

Both run the very session machinery of the WebSocket endpoints (admission, leases, VAD, engines,
credit) behind `HttpWire`, a stand-in for the socket: a long recording streams through the same
bounded pipeline as a live session (the body is read only as fast as the pipeline drains), and
synthesized audio streams back as it is produced, paced by what the HTTP response has written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web
from websockets.datastructures import Headers

from server.http.auth import principal
from server.http.errors import ApiError
from server.http.openapi import error_responses, register
from server.llm.idempotency import IdempotencyCache, IdempotencyConflict
from server.sessions.asr_runner import AsrEndpoint
from server.sessions.tts_runner import TtsEndpoint
from server.ws.connection import SessionHandler
from server.ws.handshake import Rejected, UpgradeRequest

FRAME = 32 * 1024  # body chunks fed to the pipeline: well under the WebSocket frame limit
RAW_TYPES = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav",
             "audio/basic": "mulaw", "audio/x-mulaw": "mulaw", "audio/pcmu": "mulaw",
             "audio/x-alaw": "alaw", "audio/pcma": "alaw", "audio/l16": "pcm_s16le"}
TEXT_LIMIT = 100_000
REPLAY_LIMIT = 8 * 1024 * 1024  # synthesized audio kept for an Idempotency-Key replay
# A response, and what an Idempotency-Key replay answers ("<content type>\n<body>"), if kept.
Answer = tuple[web.StreamResponse, bytes | None]


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


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= 255:
        raise ApiError(400, "bad_request", "Idempotency-Key must be 1-255 characters")
    return key


def _fingerprint(request: web.Request, extra: bytes = b"") -> str:
    """What identifies a retry of a streamed upload without reading it first: the route, its
    parameters, the declared type and length (a client reusing a key promises the same body)."""
    digest = hashlib.sha256(request.path_qs.encode())
    for header in ("Content-Type", "Content-Length"):
        digest.update(b"\x00" + request.headers.get(header, "").encode())
    digest.update(b"\x00" + extra)
    return digest.hexdigest()


def add_speech_routes(app: web.Application, *, asr: AsrEndpoint, tts: TtsEndpoint,
                      replies: IdempotencyCache | None = None) -> None:
    cache = replies or IdempotencyCache(ttl_s=3600.0, max_entries=1024)

    async def idempotent(request: web.Request, run: Callable[[], Awaitable[Answer]],
                         extra: bytes = b"") -> web.StreamResponse:
        """Idempotency-Key: a retry gets the first answer back and is not charged again; a
        concurrent duplicate waits for it. Only charged successes are kept."""
        key = _idempotency_key(request)
        if key is None:
            return (await run())[0]
        caller = await principal(request)
        try:
            async with cache.claim((caller.tenant_id, request.path, key),
                                   _fingerprint(request, extra)) as claim:
                if claim.replay is not None:
                    ctype, _, body = claim.replay.body.partition(b"\n")
                    return web.Response(status=claim.replay.status, body=body,
                                        content_type=ctype.decode(),
                                        headers={"Idempotent-Replayed": "true"})
                response, kept = await run()
                if response.status == 200 and kept is not None:
                    claim.store(200, kept)
                return response
        except IdempotencyConflict:
            raise ApiError(409, "idempotency_conflict",
                           "this Idempotency-Key was used with a different request") from None

    async def transcribe_route(request: web.Request) -> web.StreamResponse:
        return await idempotent(request, lambda: transcribe(request))

    async def synthesize_route(request: web.Request) -> web.StreamResponse:
        body = await request.read()  # small JSON: part of the fingerprint
        return await idempotent(request, lambda: synthesize(request, body), body)

    async def transcribe(request: web.Request) -> Answer:
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
        response = web.json_response({
            "text": " ".join(f["text"] for f in finals if f["text"]).strip(),
            "utterances": [{k: f[k] for k in ("utterance_id", "text", "start_ms", "end_ms",
                                              "words")} for f in finals],
            "audio_ms": summary.get("audio_ms", 0),
            "cost_micros": summary.get("cost_micros", 0),
        })
        assert isinstance(response.body, bytes)
        return response, b"application/json\n" + response.body

    async def synthesize(request: web.Request, raw: bytes) -> Answer:
        caller = await principal(request)
        try:
            body = json.loads(raw)
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
        kept: list[bytes] | None = []  # for Idempotency-Key replays, up to REPLAY_LIMIT
        size = 0
        try:
            while (chunk := await wire.audio.get()) is not None:
                if not started:
                    await response.prepare(request)
                    started = True
                await response.write(chunk)
                size += len(chunk)
                if kept is not None and size <= REPLAY_LIMIT:
                    kept.append(chunk)
                else:
                    kept = None
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
        if kept is None or error is not None:
            return response, None
        return response, content_type.encode() + b"\n" + b"".join(kept)

    app.router.add_post("/v1/asr/transcribe", transcribe_route)
    app.router.add_post("/v1/tts/synthesize", synthesize_route)
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
