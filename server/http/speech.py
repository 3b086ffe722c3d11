"""Speech over HTTP: `POST /v1/asr/transcribe` and `POST /v1/tts/synthesize`.

Both run the very session machinery of the WebSocket endpoints (admission, leases, VAD, engines,
credit) behind `HttpWire`, a stand-in for the socket: a long recording streams through the same
bounded pipeline as a live session (the body is read only as fast as the pipeline drains), and
synthesized audio streams back as it is produced, paced by what the HTTP response has written.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from tempfile import SpooledTemporaryFile
from typing import Annotated, Final, Protocol, runtime_checkable

import msgspec
from aiohttp import BodyPartReader, web

from server.audio.containers import (
    SNIFF_BYTES,
    AudioFormat,
    BadAudio,
    ConflictingFormat,
    MediaType,
    UnsupportedMediaType,
    refuse_unsupported,
    resolve_format,
)
from server.billing.auth import Principal
from server.flow_control.http_upload import (
    FORM_FILE_MEMORY_BYTES,
    MAX_FORM_FIELD_BYTES,
    MAX_FORM_FILE_BYTES,
    MAX_FORM_PARTS,
)
from server.flow_control.idempotency import MAX_ANSWER_BYTES
from server.flow_control.json_depth import MAX_JSON_DEPTH, nests_deeper_than
from server.http.auth import api_error, principal
from server.http.errors import ApiError
from server.http.openapi import components, error_responses, ref, register
from server.idempotency import IdempotencyCache, IdempotencyRefused, ReplyStores
from server.models.base import EngineError
from server.protocol.errors import Rejected, http_status_of_close
from server.sessions.asr_params import BadParams
from server.sessions.asr_runner import AsrEndpoint
from server.sessions.tts import EndInput, GrantCredit, SubmitText, tts_params
from server.sessions.tts_runner import TtsEndpoint
from server.sessions.upgrade import UpgradeRequest
from streamgate_protocol import messages as m
from streamgate_protocol.audio import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioFormatError,
    StreamDecoder,
)

FRAME = 32 * 1024  # body chunks fed to the pipeline: well under the WebSocket frame limit
TEXT_LIMIT = 100_000
REPLAY_LIMIT = MAX_ANSWER_BYTES  # synthesized audio kept for an Idempotency-Key replay
# A response, and what an Idempotency-Key replay answers ("<content type>\n<body>"), if kept.
Answer = tuple[web.StreamResponse, bytes | None]


class HttpWire:
    """The part of WsConnection a session runner uses, for a request instead of a socket."""

    def __init__(self) -> None:
        self.messages: list[m.AsrServerMessage] = []  # an ASR session's, typed (its on_events)
        self.audio: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.reading_paused = False
        self.write_paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()

    def send_text(self, data: bytes) -> None:
        # Sessions on a request hand their messages over typed (on_events): none is encoded.
        raise RuntimeError("HttpWire carries no text frames")

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


def query_upgrade(query: dict[str, str]) -> UpgradeRequest:
    return UpgradeRequest(path="", query=query, api_key=None)


def final_error(messages: list[m.AsrServerMessage]) -> m.Error | None:
    errors = [e for e in messages if isinstance(e, m.Error)]
    return errors[-1] if errors else None


class UploadAudio:
    """An upload's bytes: the first ones read ahead (to tell what they are before a session is
    admitted), then the rest as the pipeline takes them."""

    def __init__(self, source: AsyncGenerator[bytes, None]) -> None:
        self._source = source
        self._head = bytearray()

    async def head(self, size: int) -> bytes:
        """At least `size` bytes from the start (fewer only if the upload is shorter)."""
        while len(self._head) < size:
            chunk = await anext(self._source, None)
            if chunk is None:
                break
            self._head += chunk
        return bytes(self._head)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        head, self._head = bytes(self._head), bytearray()
        for start in range(0, len(head), FRAME):
            yield head[start:start + FRAME]
        async for chunk in self._source:
            yield chunk

    async def aclose(self) -> None:
        await self._source.aclose()


@dataclass
class Upload:
    """What a transcription request says about its audio, and the audio."""

    media_type: MediaType
    filename: str | None
    fields: dict[str, str]  # form fields (the query string is the request's)
    audio: UploadAudio


async def _raw_chunks(request: web.Request) -> AsyncGenerator[bytes, None]:
    async for chunk in request.content.iter_chunked(FRAME):
        yield chunk


async def spooled_chunks(spool: SpooledTemporaryFile[bytes]
                          ) -> AsyncGenerator[bytes, None]:
    # A page-cache (or in-memory) read of one frame: short enough for the event loop.
    spool.seek(0)
    while chunk := spool.read(FRAME):
        yield chunk


async def _read_form(request: web.Request, spool: SpooledTemporaryFile[bytes]) -> Upload:
    """Read the whole form: the `file` part into `spool`, every other part as a parameter. A
    parameter may follow the file (curl's usual order), so nothing starts before the end."""
    if request.content_length is not None and \
            request.content_length > MAX_FORM_FILE_BYTES + MAX_FORM_PARTS * MAX_FORM_FIELD_BYTES:
        raise _form_too_large()
    reader = await request.multipart()
    fields: dict[str, str] = {}
    file_part: tuple[MediaType, str | None] | None = None
    parts = 0
    while (part := await reader.next()) is not None:
        parts += 1
        if parts > MAX_FORM_PARTS:
            raise ApiError(400, "bad_request", f"more than {MAX_FORM_PARTS} form parts")
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "bad_request", "nested multipart bodies are not supported")
        name = part.name
        if not name:
            raise ApiError(400, "bad_request", "a form part without a name")
        if name in fields or (name == "file" and file_part is not None):
            raise ApiError(400, "bad_request", f"form field {name!r} is given more than once")
        transfer = part.headers.get("Content-Transfer-Encoding", "binary").lower()
        if transfer not in ("binary", "8bit", "7bit") or \
                part.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise ApiError(400, "bad_request", f"form part {name!r}: send it unencoded")
        if name == "file":
            file_part = (MediaType.parse(part.headers.get("Content-Type")), part.filename)
            refuse_unsupported_http(file_part[0])
            size = 0
            while chunk := await part.read_chunk(FRAME):
                size += len(chunk)
                if size > MAX_FORM_FILE_BYTES:
                    raise _form_too_large()
                spool.write(chunk)
            continue
        value = bytearray()
        while chunk := await part.read_chunk(FRAME):
            value += chunk
            if len(value) > MAX_FORM_FIELD_BYTES:
                raise ApiError(400, "bad_request",
                               f"form field {name!r} is longer than {MAX_FORM_FIELD_BYTES} bytes")
        try:
            fields[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_request", f"form field {name!r} is not UTF-8") from None
    if file_part is None:
        raise ApiError(400, "bad_request", "multipart body without a `file` part")
    return Upload(file_part[0], file_part[1], fields, UploadAudio(spooled_chunks(spool)))


def _form_too_large() -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"a form's `file` part may hold at most {MAX_FORM_FILE_BYTES} bytes; "
                    "send a longer recording as the raw body (it is streamed)")


async def _upload(request: web.Request, spool: SpooledTemporaryFile[bytes]) -> Upload:
    if not request.content_type.startswith("multipart/"):
        declared = MediaType.parse(request.headers.get("Content-Type"))
        refuse_unsupported_http(declared)
        return Upload(declared, None, {}, UploadAudio(_raw_chunks(request)))
    try:
        return await _read_form(request, spool)
    except ApiError:
        raise
    except Exception as exc:  # aiohttp's parser raises assorted errors on bad input
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}"[:200]) from None


def refuse_unsupported_http(declared: MediaType) -> None:
    try:
        refuse_unsupported(declared)
    except UnsupportedMediaType as exc:
        raise ApiError(415, "unsupported_media_type", str(exc)) from None


async def audio_format(upload: Upload, query: dict[str, str],
                        max_wav_header_bytes: int) -> AudioFormat:
    """What the upload is, checked before any session is admitted: a refusal leases and
    charges nothing."""
    head = await upload.audio.head(SNIFF_BYTES)
    if not head:
        raise ApiError(400, "bad_request", "empty body: no audio")
    try:
        fmt = resolve_format(upload.media_type, upload.filename, query, head)
    except UnsupportedMediaType as exc:
        raise ApiError(415, "unsupported_media_type", str(exc)) from None
    except BadAudio as exc:
        raise ApiError(400, "bad_audio", str(exc)) from None
    except ConflictingFormat as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    if fmt.encoding == "wav":
        # The whole header, so an unsupported WAV (float, MP3 inside RIFF, 8-bit PCM) is
        # refused here rather than by the session after admission.
        head = await upload.audio.head(max_wav_header_bytes)
        decoder = StreamDecoder("wav", 16000, max_header_bytes=max_wav_header_bytes)
        try:
            decoder.decode(head)
        except AudioFormatError as exc:
            raise ApiError(400, "bad_audio", str(exc)) from None
        if not decoder.header_complete:
            raise ApiError(400, "bad_audio", "the WAV file ends inside its header")
    return fmt


NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class SynthesizeRequest(msgspec.Struct):
    """The body of POST /v1/tts/synthesize: it validates the request and, through
    server/http/openapi.py, documents it."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=TEXT_LIMIT)]
    model: NonEmpty | None = None
    voice: NonEmpty | None = None
    language: NonEmpty | None = None
    encoding: m.Encoding | None = None
    sample_rate: Annotated[int, msgspec.Meta(ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)] | None = None


class TranscribedUtterance(msgspec.Struct):
    utterance_id: int
    text: str
    start_ms: int
    end_ms: int
    words: list[m.Word]


class TranscribeResponse(msgspec.Struct):
    """The answer of POST /v1/asr/transcribe: the final transcripts and what they cost."""

    text: str
    utterances: list[TranscribedUtterance]
    audio_ms: int
    cost_micros: int


_SYNTHESIZE_BODY: Final = msgspec.json.Decoder(SynthesizeRequest)


def _synthesize_body(raw: bytes) -> SynthesizeRequest:
    # Unknown fields are skipped, and skipping recurses: bound the nesting before the parser.
    if nests_deeper_than(raw):
        raise ApiError(400, "bad_request",
                       f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return _SYNTHESIZE_BODY.decode(raw)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    except msgspec.DecodeError as exc:  # also text that is not valid UTF-8 or Unicode
        raise ApiError(400, "bad_request", f"body must be JSON: {exc}") from None


@runtime_checkable
class _KnowsItsVoices(Protocol):
    """An engine that can tell a voice or language it cannot speak before synthesis (espeak-ng
    reads its voice list at start); a remote engine finds out only when it is asked."""

    def resolve_voice(self, voice: str | None, language: str) -> str: ...


def refuse_unknown_voice(tts: TtsEndpoint, query: dict[str, str]) -> None:
    """The engine's refusal of the voice or language, as the session would get it at the first
    chunk, but before admission: a refused request reserves no lease and leaves no usage event."""
    try:
        params = tts_params(query, default_model=tts.config.tts.session.default_model,
                            models=tts.engines.keys())
    except BadParams:
        return  # admission refuses these itself, before any lease
    engine = tts.engines[params.model]
    if isinstance(engine, _KnowsItsVoices):
        try:
            engine.resolve_voice(params.voice, params.language)
        except EngineError as exc:
            raise ApiError(400, "engine_error", str(exc)) from None


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
                      replies: ReplyStores = IdempotencyCache) -> None:
    cache = replies(ttl_s=3600.0, max_entries=1024)

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
        except IdempotencyRefused as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.headers) from None

    async def transcribe_route(request: web.Request) -> web.StreamResponse:
        return await idempotent(request, lambda: transcribe(request))

    async def synthesize_route(request: web.Request) -> web.StreamResponse:
        body = await request.read()  # small JSON: part of the fingerprint
        return await idempotent(request, lambda: synthesize(request, body), body)

    async def transcribe(request: web.Request) -> Answer:
        caller = await principal(request)
        with SpooledTemporaryFile(max_size=FORM_FILE_MEMORY_BYTES) as spool:
            upload = await _upload(request, spool)
            try:
                wire = await transcribe_upload(request, caller, upload)
            finally:
                await upload.audio.aclose()
        error = final_error(wire.messages)
        if wire.close_code != 1000 and error is not None:
            raise ApiError(http_status_of_close(wire.close_code), error.code, error.message)
        finals = [e for e in wire.messages if isinstance(e, m.Transcript) and e.is_final]
        summary = next((e for e in wire.messages if isinstance(e, m.Summary)), None)
        body = msgspec.json.encode(TranscribeResponse(
            text=" ".join(f.text for f in finals if f.text).strip(),
            utterances=[TranscribedUtterance(f.utterance_id, f.text, f.start_ms, f.end_ms,
                                             f.words) for f in finals],
            audio_ms=summary.audio_ms if summary is not None else 0,
            cost_micros=summary.cost_micros if summary is not None else 0,
        ))
        response = web.Response(body=body, content_type="application/json", charset="utf-8")
        return response, b"application/json\n" + body

    async def transcribe_upload(request: web.Request, caller: Principal,
                                upload: Upload) -> HttpWire:
        query = {**request.query, **upload.fields}
        fmt = await audio_format(upload, query, asr.config.asr.session.max_wav_header_bytes)
        query["encoding"] = fmt.encoding
        if fmt.sample_rate is not None:
            query["sample_rate"] = str(fmt.sample_rate)
        if fmt.channels is not None:
            query["channels"] = str(fmt.channels)
        query.setdefault("interim_results", "false")
        decision = await asr.open_session(query_upgrade(query), caller)
        if isinstance(decision, Rejected):
            raise api_error(decision)
        wire = HttpWire()
        handler = decision.start(wire, wire.messages.extend)
        try:
            async with aclosing(upload.audio.chunks()) as chunks:
                async for chunk in chunks:
                    await wire.readable()  # the pipeline is full: stop reading the body
                    if wire.closed.is_set():
                        break
                    handler.on_binary(chunk)
                    handler.on_read_done()
            handler.on_text(b'{"type":"close"}')
            handler.on_read_done()
            await wire.closed.wait()
        finally:
            if not wire.closed.is_set():
                # The client went away mid-upload: the session ends and settles like a
                # vanished WebSocket client.
                handler.on_connection_closed(1006)
        return wire

    async def synthesize(request: web.Request, raw: bytes) -> Answer:
        caller = await principal(request)
        body = _synthesize_body(raw)
        if not body.text.strip():
            raise ApiError(400, "bad_request", "`text` (a non-empty string) is required")
        if len(body.text) > TEXT_LIMIT:
            raise ApiError(400, "bad_request", f"text longer than {TEXT_LIMIT} characters")
        fields = msgspec.structs.asdict(body)
        for name in ("model", "voice", "language", "encoding"):
            value = fields[name]
            if value is not None and not value.strip():
                raise ApiError(400, "bad_request", f"`{name}` must be a non-empty string")
        query = {k: str(fields[k]) for k in ("model", "voice", "language", "encoding",
                                             "sample_rate") if fields[k] is not None}
        query.setdefault("encoding", "wav")
        # The session's events come typed (never encoded to JSON and read back); the error
        # that ends it, if any, decides the HTTP status.
        errors: list[m.Error] = []

        def on_events(events: list[m.TtsServerMessage]) -> None:
            errors.extend(ev for ev in events if isinstance(ev, m.Error))

        refuse_unknown_voice(tts, query)
        decision = await tts.open_session(query_upgrade(query), caller)
        if isinstance(decision, Rejected):
            raise api_error(decision)
        wire = HttpWire()
        handler = decision.start(wire, on_events=on_events)
        handler.handle(SubmitText(body.text))
        handler.handle(EndInput())
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
                handler.handle(GrantCredit(len(chunk)))
        finally:
            if not wire.closed.is_set():
                handler.on_connection_closed(1006)  # the client went away mid-stream
        error = errors[-1] if errors else None
        if not started:
            if error is not None:
                # An engine refusing the input for good (unknown voice, text it cannot speak)
                # is the request's fault; a retryable failure is the upstream's.
                status = http_status_of_close(wire.close_code,
                                              default=502 if error.retryable else 400)
                raise ApiError(status, error.code, error.message)
            await response.prepare(request)
        await response.write_eof()
        if kept is None or error is not None:
            return response, None
        return response, content_type.encode() + b"\n" + b"".join(kept)

    app.router.add_post("/v1/asr/transcribe", transcribe_route)
    app.router.add_post("/v1/tts/synthesize", synthesize_route)
    register(app, "/v1/asr/transcribe", "post", {
        "summary": "transcribe a recording (WAV, PCM16, mu-law, A-law), streamed through VAD; "
                   "other media types are 415",
        "security": [{"bearer": []}],
        "parameters": [{"name": n, "in": "query", "required": False,
                        "schema": {"type": "string"}}
                       for n in ("model", "language", "encoding", "sample_rate", "vad")],
        "requestBody": {"required": True, "content": {
            **{ctype: {"schema": {"type": "string", "format": "binary"}}
               for ctype in ("audio/wav", "audio/basic", "audio/x-alaw", "audio/L16",
                             "application/octet-stream")},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}},
        "responses": {"200": {"description": "transcript", "content": {"application/json": {
            "schema": ref(TranscribeResponse)}}},
                      **error_responses(400, 401, 402, 413, 415, 429, 502, 503)},
    }, components(TranscribeResponse))
    register(app, "/v1/tts/synthesize", "post", {
        "summary": "synthesize text; the audio streams back as it is produced",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": ref(SynthesizeRequest)}}},
        "responses": {"200": {"description": "audio", "content": {
            ctype: {"schema": {"type": "string", "format": "binary"}}
            for ctype in ("audio/wav", "audio/l16", "audio/basic", "audio/x-alaw")}},
                      **error_responses(400, 401, 402, 413, 429, 502, 503)},
    }, components(SynthesizeRequest))
