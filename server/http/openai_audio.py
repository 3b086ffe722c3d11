"""The OpenAI audio API as a dialect of ours: `POST /v1/audio/transcriptions`,
`POST /v1/audio/translations`, `POST /v1/audio/speech` and `GET /v1/models`.

A codec only: requests become the query of an ASR or TTS session admitted by the very
endpoints the WebSocket routes and server/http/speech.py use (same keys, rate limits, leases,
metering, engines), driven through the same `HttpWire`; answers and errors are spelled the way
the official `openai` SDK parses them. What is supported, ignored and refused: docs/compat.md.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Awaitable, Callable, Collection
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile
from typing import Annotated, Any, Final, Literal

import msgspec
from aiohttp import BodyPartReader, web

from server.audio.containers import MediaType
from server.audio.encoders import CONTENT_TYPES, EncoderError, StreamEncoder
from server.flow_control.http_upload import (
    FORM_FILE_MEMORY_BYTES,
    MAX_FORM_FIELD_BYTES,
    MAX_FORM_FILE_BYTES,
    MAX_FORM_PARTS,
)
from server.flow_control.openai_speech import MAX_SPEECH_BODY_BYTES, MAX_SPEECH_TEXT_CHARS
from server.http.auth import principal
from server.http.errors import ApiError
from server.http.llm import SSE_EVENT_SCHEMA, read_body
from server.http.openapi import components, ref, register
from server.http.speech import (
    FRAME,
    HttpWire,
    Upload,
    UploadAudio,
    audio_format,
    final_error,
    query_upgrade,
    refuse_unknown_voice,
    refuse_unsupported_http,
    spooled_chunks,
)
from server.protocol.admission import Principal
from server.protocol.errors import Rejected, http_status_of_close
from server.sessions.asr_runner import AsrEndpoint, AsrSessionRunner, StartSession
from server.sessions.tts import EndInput, GrantCredit, SubmitText
from server.sessions.tts_runner import TtsEndpoint
from streamgate_protocol import messages as m

# OpenAI's model names, served by our default model of the kind, so a client keeps its code
# (Pipecat's OpenAISTTService and OpenAITTSService send these by default).
ASR_ALIASES: Final = frozenset({"whisper-1", "gpt-transcribe", "gpt-4o-transcribe",
                                "gpt-4o-mini-transcribe"})  # gpt-transcribe: Pipecat 1.14
TTS_ALIASES: Final = frozenset({"tts-1", "tts-1-hd", "gpt-4o-mini-tts"})
# OpenAI's voices: the engine's default voice speaks for them.
OPENAI_VOICES: Final = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova",
                                  "onyx", "sage", "shimmer", "verse", "marin", "cedar"})
TRANSCRIPT_FORMATS: Final = ("json", "text", "srt", "verbose_json", "vtt")
STREAMABLE_FORMATS: Final = ("json", "text")
SPEECH_RATE: Final = 24000  # OpenAI's `pcm` is 24 kHz 16-bit mono; its other formats too
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                      "X-Accel-Buffering": "no"}


class OpenAiError(ApiError):
    """An error answered in OpenAI's shape, naming the request field at fault."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, code, message, headers)
        self.param = param


def _bad(message: str, param: str | None = None, code: str = "bad_request") -> OpenAiError:
    return OpenAiError(400, code, message, param=param)


def _model_not_found(model: str) -> OpenAiError:
    return OpenAiError(404, "model_not_found",
                       f"The model `{model[:80]}` does not exist or you do not have access "
                       "to it.", param="model")


def openai_error(exc: ApiError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """`{"error": {"message", "type", "param", "code"}}` with the status the SDK maps to its
    exception: 400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429
    RateLimitError, 5xx InternalServerError (docs/decisions/14D2-openai-errors.md)."""
    status, kind, code = exc.status, "invalid_request_error", exc.code
    headers = dict(exc.headers or {})
    if code in ("unauthorized", "key_revoked"):
        code = "invalid_api_key"
    elif code == "insufficient_balance":
        # OpenAI's own answer to an exhausted balance; no retry can help it.
        status, kind, code = 429, "insufficient_quota", "insufficient_quota"
        headers["x-should-retry"] = "false"
    elif code == "rate_limited":
        kind, code = "requests", "rate_limit_exceeded"
    elif status == 415:
        status, code = 400, "unsupported_file_format"  # OpenAI: 400 for a file it cannot read
    elif status >= 500:
        kind = "server_error"
    param = exc.param if isinstance(exc, OpenAiError) else None
    body = {"error": {"message": exc.message, "type": kind, "param": param, "code": code}}
    return status, body, headers


def openai_error_response(exc: ApiError) -> web.Response:
    status, body, headers = openai_error(exc)
    return web.json_response(body, status=status, headers=headers or None)


def _error_event(exc: ApiError) -> bytes:
    """An error after a stream started: the SDK raises APIError on a data `error` object."""
    return _sse(openai_error(exc)[1])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _in_openai_shape(handler: Handler) -> Handler:
    """The route's errors (ours, from admission, metering and the shared upload code, and
    aiohttp's) answered in OpenAI's shape rather than by the API error middleware."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return openai_error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return openai_error_response(ApiError(exc.status, f"http_{exc.status}",
                                                  exc.text or exc.reason))

    return answer


def _refusal(refused: Rejected) -> OpenAiError:
    return OpenAiError(refused.status, refused.code, refused.message,
                       headers=refused.headers or None)


# --- the form ------------------------------------------------------------------------------


@dataclass
class _Form:
    fields: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)  # `name[]` parts, repeated


async def _read_form(request: web.Request, spool: SpooledTemporaryFile[bytes]
                     ) -> tuple[Upload, _Form]:
    """The whole multipart form under the bounds of flow_control/http_upload: the `file` part
    into `spool`, other parts as fields; `name[]` parts (the SDK's arrays) may repeat."""
    if not request.content_type.startswith("multipart/"):
        raise _bad("send the audio as multipart/form-data with a `file` part", "file")
    if request.content_length is not None and \
            request.content_length > MAX_FORM_FILE_BYTES + MAX_FORM_PARTS * MAX_FORM_FIELD_BYTES:
        raise _too_large()
    try:
        return await _parse_form(request, spool)
    except ApiError:
        raise
    except Exception as exc:  # aiohttp's parser raises assorted errors on bad input
        raise _bad(f"malformed multipart body: {exc}"[:200]) from None


async def _parse_form(request: web.Request, spool: SpooledTemporaryFile[bytes]
                      ) -> tuple[Upload, _Form]:
    reader = await request.multipart()
    form = _Form()
    file_part: tuple[MediaType, str | None] | None = None
    parts = 0
    while (part := await reader.next()) is not None:
        parts += 1
        if parts > MAX_FORM_PARTS:
            raise _bad(f"more than {MAX_FORM_PARTS} form parts")
        if not isinstance(part, BodyPartReader) or not part.name:
            raise _bad("every form part needs a name (no nested multipart bodies)")
        name = part.name
        repeated = name.endswith("[]")
        if (name in form.fields) or (name == "file" and file_part is not None):
            raise _bad(f"form field {name!r} is given more than once", name)
        if name == "file":
            file_part = (MediaType.parse(part.headers.get("Content-Type")), part.filename)
            refuse_unsupported_http(file_part[0])
            size = 0
            while chunk := await part.read_chunk(FRAME):
                size += len(chunk)
                if size > MAX_FORM_FILE_BYTES:
                    raise _too_large()
                spool.write(chunk)
            continue
        value = bytearray()
        while chunk := await part.read_chunk(FRAME):
            value += chunk
            if len(value) > MAX_FORM_FIELD_BYTES:
                raise _bad(f"form field {name!r} is longer than {MAX_FORM_FIELD_BYTES} bytes",
                           name)
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"form field {name!r} is not UTF-8", name) from None
        if repeated:
            form.lists.setdefault(name[:-2], []).append(text)
        else:
            form.fields[name] = text
    if file_part is None:
        raise _bad("multipart body without a `file` part", "file")
    upload = Upload(file_part[0], file_part[1], {}, UploadAudio(spooled_chunks(spool)))
    return upload, form


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the `file` part may hold at most {MAX_FORM_FILE_BYTES} bytes")


# --- transcription parameters ----------------------------------------------------------------


@dataclass(frozen=True)
class _TranscriptionAsk:
    model: str  # ours
    language: str | None
    response_format: str
    temperature: float
    words: bool
    segments: bool
    stream: bool


def _flag(form: _Form, name: str) -> bool:
    raw = form.fields.get(name, "false").strip().lower()
    if raw in ("true", "1"):
        return True
    if raw in ("false", "0", ""):
        return False
    raise _bad(f"`{name}` must be true or false", name)


def _transcription_ask(form: _Form, asr: AsrEndpoint) -> _TranscriptionAsk:
    model = form.fields.get("model", "").strip()
    if not model:
        raise _bad("`model` is required", "model")
    ours = asr.config.asr.session.default_model if model in ASR_ALIASES else model
    if ours not in asr.engines:
        raise _model_not_found(model)
    response_format = form.fields.get("response_format", "json")
    if response_format not in TRANSCRIPT_FORMATS:
        raise _bad(f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}",
                   "response_format")
    try:
        temperature = float(form.fields.get("temperature", "0"))
    except ValueError:
        raise _bad("`temperature` must be a number", "temperature") from None
    if not 0.0 <= temperature <= 1.0:
        raise _bad("`temperature` must be between 0 and 1", "temperature")
    granularities = form.lists.get("timestamp_granularities", [])
    if any(g not in ("word", "segment") for g in granularities):
        raise _bad("timestamp_granularities[] takes word and segment",
                   "timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise _bad("timestamp_granularities[] needs response_format verbose_json",
                   "timestamp_granularities")
    stream = _flag(form, "stream")
    if stream and response_format not in STREAMABLE_FORMATS:
        raise _bad("a streamed transcription answers json or text events", "response_format")
    language = form.fields.get("language", "").strip() or None
    return _TranscriptionAsk(
        model=ours, language=language, response_format=response_format,
        temperature=temperature, words="word" in granularities,
        segments="segment" in granularities or not granularities, stream=stream)


# --- transcript documents -------------------------------------------------------------------


def _clock(ms: int, separator: str) -> str:
    hours, rest = divmod(max(0, ms), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{millis:03d}"


def srt(finals: list[m.Transcript]) -> str:
    cues = [f"{i}\n{_clock(f.start_ms, ',')} --> {_clock(f.end_ms, ',')}\n{f.text}\n"
            for i, f in enumerate((f for f in finals if f.text), start=1)]
    return "\n".join(cues)


def vtt(finals: list[m.Transcript]) -> str:
    cues = [f"{_clock(f.start_ms, '.')} --> {_clock(f.end_ms, '.')}\n{f.text}\n"
            for f in finals if f.text]
    return "WEBVTT\n\n" + "\n".join(cues)


def _avg_logprob(words: list[m.Word]) -> float:
    if not words:
        return 0.0
    return sum(math.log(max(w.confidence, 1e-6)) for w in words) / len(words)


def verbose_json(finals: list[m.Transcript], ask: _TranscriptionAsk, audio_ms: int,
                 text: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "transcribe", "language": ask.language or "en", "duration": audio_ms / 1000,
        "text": text, "usage": {"type": "duration", "seconds": audio_ms / 1000}}
    if ask.segments:
        body["segments"] = [
            {"id": i, "seek": 0, "start": f.start_ms / 1000, "end": f.end_ms / 1000,
             "text": f.text, "tokens": [], "temperature": ask.temperature,
             "avg_logprob": _avg_logprob(f.words), "compression_ratio": 1.0,
             "no_speech_prob": 0.0}
            for i, f in enumerate(finals)]
    if ask.words:
        body["words"] = [{"word": w.word, "start": w.start_ms / 1000, "end": w.end_ms / 1000}
                         for f in finals for w in f.words]
    return body


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(event) + b"\n\n"


# --- speech ---------------------------------------------------------------------------------


class SpeechRequest(msgspec.Struct):
    """The body of POST /v1/audio/speech (OpenAI's fields; see docs/compat.md)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SPEECH_TEXT_CHARS)]
    voice: str | dict[str, str] | None = None
    instructions: str | None = None  # accepted, not applied: no engine takes directions
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0  # accepted, not applied
    stream_format: Literal["audio", "sse"] = "audio"


_SPEECH_BODY: Final = msgspec.json.Decoder(SpeechRequest)


def _speech_body(raw: bytes) -> SpeechRequest:
    try:
        body = _SPEECH_BODY.decode(raw)
    except msgspec.ValidationError as exc:
        raise _bad(str(exc), _field_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise _bad(f"body must be JSON: {exc}") from None
    if not body.input.strip():
        raise _bad("`input` must not be blank", "input")
    if body.response_format in ("aac", "flac"):
        raise _bad(f"response_format {body.response_format} is not served here; use mp3, "
                   "opus, wav or pcm", "response_format")
    return body


def _field_of(message: str) -> str | None:
    # msgspec: "... - at `$.voice`"
    _, found, path = message.partition("at `$.")
    return path.split("`", 1)[0].split(".", 1)[0].split("[", 1)[0] if found else None


def _voice(voice: str | dict[str, str] | None) -> str | None:
    if isinstance(voice, dict):  # OpenAI's custom voice object: {"id": ...}
        voice = voice.get("id")
    if voice is None or voice.lower() in OPENAI_VOICES:
        return None
    return voice


# --- routes ---------------------------------------------------------------------------------


class ModelCard(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "streamgate"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class DurationUsage(msgspec.Struct):
    seconds: float
    type: str = "duration"


class TranscriptionJson(msgspec.Struct):
    """`response_format=json`; `usage.seconds` is the audio charged."""

    text: str
    usage: DurationUsage


def add_openai_audio_routes(app: web.Application, *, asr: AsrEndpoint, tts: TtsEndpoint,
                            llm_models: Collection[str] = ()) -> None:

    def model_ids() -> list[str]:
        return sorted({*asr.engines, *tts.engines, *llm_models})

    async def models(request: web.Request) -> web.StreamResponse:
        await principal(request)
        body = ModelList([ModelCard(name) for name in model_ids()])
        return web.Response(body=msgspec.json.encode(body), content_type="application/json")

    async def model(request: web.Request) -> web.StreamResponse:
        await principal(request)
        name = request.match_info["model"]
        if name not in model_ids():
            raise _model_not_found(name)
        return web.Response(body=msgspec.json.encode(ModelCard(name)),
                            content_type="application/json")

    async def transcriptions(request: web.Request) -> web.StreamResponse:
        return await transcribe(request, translate=False)

    async def translations(request: web.Request) -> web.StreamResponse:
        return await transcribe(request, translate=True)

    async def transcribe(request: web.Request, *, translate: bool) -> web.StreamResponse:
        caller = await principal(request)
        with SpooledTemporaryFile(max_size=FORM_FILE_MEMORY_BYTES) as spool:
            upload, form = await _read_form(request, spool)
            try:
                ask = _transcription_ask(form, asr)
                if translate:
                    # No engine of ours translates speech: refused before any lease.
                    raise _bad(f"model {form.fields['model'][:80]!r} cannot translate speech; "
                               "no model served here can", "model", "translation_unsupported")
                query = {"model": ask.model, "interim_results": "false"}
                if ask.language is not None:
                    query["language"] = ask.language
                fmt = await audio_format(upload, {},
                                          asr.config.asr.session.max_wav_header_bytes)
                query["encoding"] = fmt.encoding
                if fmt.sample_rate is not None:
                    query["sample_rate"] = str(fmt.sample_rate)
                if fmt.channels is not None:
                    query["channels"] = str(fmt.channels)
                decision = await asr.open_session(query_upgrade(query), caller)
                if isinstance(decision, Rejected):
                    raise _refusal(decision)
                if ask.stream:
                    return await stream_transcript(request, decision.start, upload.audio)
                wire = HttpWire()
                handler = decision.start(wire, wire.messages.extend)
                await feed(wire, handler, upload.audio)
            finally:
                await upload.audio.aclose()
        return transcript_answer(wire, ask)

    async def feed(wire: HttpWire, handler: AsrSessionRunner, audio: UploadAudio) -> None:
        """The upload through the session as fast as it drains; the session's end awaited."""
        try:
            async with aclosing(audio.chunks()) as chunks:
                async for chunk in chunks:
                    await wire.readable()  # the pipeline is full: stop reading
                    if wire.closed.is_set():
                        break
                    handler.on_binary(chunk)
                    handler.on_read_done()
            handler.on_text(b'{"type":"close"}')
            handler.on_read_done()
            await wire.closed.wait()
        finally:
            if not wire.closed.is_set():
                handler.on_connection_closed(1006)  # the request went away: settle as such

    def transcript_answer(wire: HttpWire, ask: _TranscriptionAsk) -> web.Response:
        error = final_error(wire.messages)
        if wire.close_code != 1000 and error is not None:
            raise ApiError(http_status_of_close(wire.close_code), error.code, error.message)
        finals = [e for e in wire.messages if isinstance(e, m.Transcript) and e.is_final]
        summary = next((e for e in wire.messages if isinstance(e, m.Summary)), None)
        audio_ms = summary.audio_ms if summary is not None else 0
        text = " ".join(f.text for f in finals if f.text).strip()
        fmt = ask.response_format
        if fmt == "text":
            return web.Response(text=text + "\n", content_type="text/plain")
        if fmt == "srt":
            return web.Response(text=srt(finals), content_type="text/plain")
        if fmt == "vtt":
            return web.Response(text=vtt(finals), content_type="text/vtt")
        document: dict[str, Any] | TranscriptionJson = (
            verbose_json(finals, ask, audio_ms, text) if fmt == "verbose_json"
            else TranscriptionJson(text, DurationUsage(audio_ms / 1000)))
        return web.Response(body=msgspec.json.encode(document), content_type="application/json")

    async def stream_transcript(request: web.Request, start: StartSession, audio: UploadAudio
                                ) -> web.StreamResponse:
        """`transcript.text.delta` per final utterance as the session produces it, then
        `transcript.text.done`; a session that fails midway ends with an `error` event."""
        events: asyncio.Queue[list[m.AsrServerMessage] | None] = asyncio.Queue()
        wire = HttpWire()
        handler = start(wire, events.put_nowait)

        async def run() -> None:
            try:
                await feed(wire, handler, audio)
            finally:
                events.put_nowait(None)

        feeding = asyncio.create_task(run())
        response = web.StreamResponse(headers=SSE_HEADERS)
        texts: list[str] = []
        error: m.Error | None = None
        try:
            await response.prepare(request)
            while (batch := await events.get()) is not None:
                for event in batch:
                    if isinstance(event, m.Transcript) and event.is_final and event.text:
                        delta = event.text if not texts else " " + event.text
                        texts.append(event.text)
                        await response.write(_sse({"type": "transcript.text.delta",
                                                   "delta": delta}))
                    elif isinstance(event, m.Error):
                        error = event
            await feeding
            if wire.close_code != 1000 and error is not None:
                status = http_status_of_close(wire.close_code)
                await response.write(_error_event(ApiError(status, error.code, error.message)))
            else:
                await response.write(_sse({"type": "transcript.text.done",
                                           "text": " ".join(texts)}))
            await response.write_eof()
        finally:
            if not feeding.done():
                feeding.cancel()
                with suppress(asyncio.CancelledError):
                    await feeding
        return response

    async def synthesize(request: web.Request) -> web.StreamResponse:
        caller = await principal(request)
        body = _speech_body(await read_body(request, MAX_SPEECH_BODY_BYTES))
        model = tts.config.tts.session.default_model if body.model in TTS_ALIASES \
            else body.model
        if model not in tts.engines:
            raise _model_not_found(body.model)
        fmt = body.response_format
        query = {"model": model, "encoding": "wav" if fmt == "wav" else "pcm_s16le",
                 "sample_rate": str(SPEECH_RATE)}
        if (voice := _voice(body.voice)) is not None:
            query["voice"] = voice
        refuse_unknown_voice(tts, query)
        encoder: StreamEncoder | None = None
        if fmt in CONTENT_TYPES:
            try:
                encoder = StreamEncoder(fmt, SPEECH_RATE)
            except EncoderError as exc:
                raise _bad(str(exc), "response_format") from None
        try:
            return await speak(request, caller, body, query, encoder)
        finally:
            if encoder is not None:
                encoder.close()

    async def speak(request: web.Request, caller: Principal, body: SpeechRequest,
                    query: dict[str, str], encoder: StreamEncoder | None
                    ) -> web.StreamResponse:
        errors: list[m.Error] = []

        def on_events(events: list[m.TtsServerMessage]) -> None:
            errors.extend(ev for ev in events if isinstance(ev, m.Error))

        decision = await tts.open_session(query_upgrade(query), caller)
        if isinstance(decision, Rejected):
            raise _refusal(decision)
        wire = HttpWire()
        handler = decision.start(wire, on_events=on_events)
        handler.handle(SubmitText(body.input))
        handler.handle(EndInput())
        sse = body.stream_format == "sse"
        content_type = "text/event-stream" if sse else (
            encoder.content_type if encoder is not None
            else "audio/wav" if body.response_format == "wav" else "audio/pcm")
        response = web.StreamResponse(headers={**(SSE_HEADERS if sse else {}),
                                               "Content-Type": content_type})
        started = False

        async def send(audio: bytes) -> None:
            nonlocal started
            if not started:
                await response.prepare(request)
                started = True
            if not audio:
                return
            if sse:
                await response.write(_sse({"type": "speech.audio.delta",
                                           "audio": base64.b64encode(audio).decode()}))
            else:
                await response.write(audio)

        try:
            while (chunk := await wire.audio.get()) is not None:
                out = chunk if encoder is None else \
                    await asyncio.to_thread(encoder.encode, chunk)
                await send(out)
                # Written: the client took it, so the session may produce that much more.
                handler.handle(GrantCredit(len(chunk)))
        finally:
            if not wire.closed.is_set():
                handler.on_connection_closed(1006)  # the client went away mid-stream
        error = errors[-1] if errors else None
        if not started and error is not None:
            status = http_status_of_close(wire.close_code,
                                          default=502 if error.retryable else 400)
            raise ApiError(status, error.code, error.message)
        if encoder is not None and error is None:
            await send(await asyncio.to_thread(encoder.finish))
        await send(b"")
        if sse and error is None:
            chars = len(body.input)
            await response.write(_sse({"type": "speech.audio.done", "usage": {
                "input_tokens": chars, "output_tokens": 0, "total_tokens": chars}}))
        elif sse and error is not None:
            await response.write(_error_event(ApiError(502, error.code, error.message)))
        await response.write_eof()
        return response

    app.router.add_get("/v1/models", _in_openai_shape(models))
    app.router.add_get(r"/v1/models/{model:[\s\S]+}",  # any name, slashes too
                       _in_openai_shape(model))
    app.router.add_post("/v1/audio/transcriptions", _in_openai_shape(transcriptions))
    app.router.add_post("/v1/audio/translations", _in_openai_shape(translations))
    app.router.add_post("/v1/audio/speech", _in_openai_shape(synthesize))
    _register_openapi(app)


# --- OpenAPI --------------------------------------------------------------------------------

_OPENAI_ERROR: Final = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": "string", "nullable": True},
        "code": {"type": "string", "nullable": True}}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "error in OpenAI's shape",
                     "content": {"application/json": {"schema": _OPENAI_ERROR}}}
            for s in statuses}


def _register_openapi(app: web.Application) -> None:
    form_fields: dict[str, Any] = {
        "file": {"type": "string", "format": "binary"},
        "model": {"type": "string"},
        "language": {"type": "string"},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": list(TRANSCRIPT_FORMATS)},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "timestamp_granularities[]": {"type": "array", "items": {
            "type": "string", "enum": ["word", "segment"]}},
        "stream": {"type": "boolean"},
    }
    form = {"multipart/form-data": {"schema": {"type": "object", "properties": form_fields,
                                               "required": ["file", "model"]}}}
    transcript = {"200": {"description": "the transcript (json, text, srt, vtt, verbose_json) "
                                         "or, with stream=true, server-sent events",
                          "content": {"application/json": {"schema": ref(TranscriptionJson)},
                                      "text/plain": {"schema": {"type": "string"}},
                                      "text/vtt": {"schema": {"type": "string"}},
                                      "text/event-stream": {"schema": SSE_EVENT_SCHEMA}}}}
    register(app, "/v1/audio/transcriptions", "post", {
        "summary": "OpenAI-compatible transcription (WAV, PCM16, mu-law, A-law uploads), "
                   "through the same ASR sessions as /v1/asr/transcribe; docs/compat.md",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": form},
        "responses": {**transcript, **_errors(400, 401, 404, 413, 429, 502, 503)},
    }, components(TranscriptionJson, DurationUsage))
    register(app, "/v1/audio/translations", "post", {
        "summary": "OpenAI-compatible translation: no model served here translates speech, so "
                   "a known model is 400 `translation_unsupported` (an unknown one 404)",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": form},
        "responses": _errors(400, 401, 404, 413, 429),
    })
    register(app, "/v1/audio/speech", "post", {
        "summary": "OpenAI-compatible speech: mp3, opus, wav or pcm (24 kHz), streamed as "
                   "synthesized; stream_format=sse sends speech.audio.delta events",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": ref(SpeechRequest)}}},
        "responses": {"200": {"description": "audio", "content": {
            **{ctype: {"schema": {"type": "string", "format": "binary"}}
               for ctype in ("audio/mpeg", "audio/ogg", "audio/wav", "audio/pcm")},
            "text/event-stream": {"schema": SSE_EVENT_SCHEMA}}},
                      **_errors(400, 401, 404, 413, 429, 502, 503)},
    }, components(SpeechRequest))
    register(app, "/v1/models", "get", {
        "summary": "the ASR, TTS and LLM models served here (OpenAI's list shape)",
        "security": [{"bearer": []}],
        "responses": {"200": {"description": "models", "content": {"application/json": {
            "schema": ref(ModelList)}}}, **_errors(401, 429)},
    }, components(ModelList, ModelCard))
    register(app, "/v1/models/{model}", "get", {
        "summary": "one model served here",
        "security": [{"bearer": []}],
        "parameters": [{"name": "model", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the model", "content": {"application/json": {
            "schema": ref(ModelCard)}}}, **_errors(401, 404, 429)},
    })

