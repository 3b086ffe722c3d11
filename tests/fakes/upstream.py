"""A fake OpenAI-compatible upstream (transcription and speech): a real aiohttp app on 127.0.0.1.

Behaviour is scripted per test: queue replies with `script(...)` (consumed in order, whichever
route they answer), and `default` (transcriptions) or `speech_default` (speech) answers once
the script is empty. Every request is recorded, with its multipart fields or JSON body parsed,
so tests can assert what the engine sent.

    async with FakeUpstream() as fake:
        fake.script(FakeReply(status=500), FakeReply.transcription("hi", [("hi", 0.0, 0.4)]))
        ... UpstreamModelConfig(url=fake.url) ...

A speech reply can stream its body in pieces (`chunks`, `chunk_delay_s`) and drop the
connection part-way (`abort_after`), to test engines that consume audio as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import BodyPartReader, web


@dataclass
class FakeReply:
    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    # Streamed body (speech): these pieces in order with chunk_delay_s between them; with
    # abort_after=n the connection is dropped after n pieces (a mid-stream failure).
    chunks: list[bytes] | None = None
    chunk_delay_s: float = 0.0
    abort_after: int | None = None

    @classmethod
    def speech(
        cls,
        audio: bytes,
        *,
        chunk_bytes: int = 4800,
        content_type: str = "audio/pcm",
        **extra: Any,
    ) -> FakeReply:
        pieces = [audio[i : i + chunk_bytes] for i in range(0, len(audio), chunk_bytes)]
        return cls(chunks=pieces, content_type=content_type, **extra)

    @classmethod
    def transcription(
        cls,
        text: str,
        words: list[tuple[str, float, float]] | None = None,
        **extra: Any,
    ) -> FakeReply:
        payload: dict[str, Any] = {"task": "transcribe", "language": "english", "text": text}
        if words is not None:
            payload["words"] = [{"word": w, "start": s, "end": e} for w, s, e in words]
        return cls(body=json.dumps(payload).encode(), **extra)

    @classmethod
    def error(cls, status: int, message: str = "fake error", **extra: Any) -> FakeReply:
        body = json.dumps({"error": {"message": message, "type": "fake"}}).encode()
        return cls(status=status, body=body, **extra)


@dataclass
class FakeChat:
    """One chat completion: the reply's tokens, sent one SSE event each (`delay_s` apart)."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", " there", "."])
    status: int = 200
    delay_s: float = 0.0


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    fields: dict[str, str]
    files: dict[str, tuple[str | None, str | None, bytes]]  # name -> (filename, type, data)
    json: dict[str, Any] | None = None  # the decoded body of a JSON request (speech)


class FakeUpstream:
    def __init__(self, default: FakeReply | None = None) -> None:
        self.default = default or FakeReply.transcription("")
        # One second of 24 kHz silence in 100 ms pieces, the shape of OpenAI's "pcm" format.
        self.speech_default = FakeReply.speech(bytes(48000))
        self.requests: list[RecordedRequest] = []
        self._script: deque[FakeReply] = deque()
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()
        self.url = ""
        self.chat_default = FakeChat()
        self.chat_requests: list[dict[str, Any]] = []
        self._chat_script: deque[FakeChat] = deque()

    def script(self, *replies: FakeReply) -> None:
        self._script.extend(replies)

    def script_chat(self, *replies: FakeChat) -> None:
        self._chat_script.extend(replies)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/audio/transcriptions", self._handle)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/audio/speech", self._handle_speech)
        # handler_cancellation: a client that timed out and hung up must not leave a handler
        # sleeping in the server (it would also hold up cleanup()).
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def aclose(self) -> None:
        self._release.set()  # let any slow handler finish now
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fields: dict[str, str] = {}
        files: dict[str, tuple[str | None, str | None, bytes]] = {}
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            data = await part.read()
            if part.filename is not None:
                ctype = part.headers.get("Content-Type")
                files[part.name] = (part.filename, ctype, bytes(data))
            else:
                fields[part.name] = bytes(data).decode()
        self.requests.append(RecordedRequest(request.path, dict(request.headers), fields, files))
        reply = self._script.popleft() if self._script else self.default
        await self._delay(reply.delay_s)
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers=reply.headers,
            content_type=reply.content_type,
        )

    async def _delay(self, seconds: float) -> None:
        if seconds:
            try:
                await asyncio.wait_for(self._release.wait(), seconds)
            except TimeoutError:
                pass

    async def _handle_speech(self, request: web.Request) -> web.StreamResponse:
        payload = json.loads(await request.read())
        self.requests.append(
            RecordedRequest(request.path, dict(request.headers), {}, {}, json=payload)
        )
        reply = self._script.popleft() if self._script else self.speech_default
        await self._delay(reply.delay_s)
        if reply.chunks is None:
            return web.Response(
                status=reply.status,
                body=reply.body,
                headers=reply.headers,
                content_type=reply.content_type,
            )
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        resp.content_type = reply.content_type
        resp.enable_chunked_encoding()  # no Content-Length: the body streams as produced
        await resp.prepare(request)
        for i, piece in enumerate(reply.chunks):
            if reply.abort_after is not None and i >= reply.abort_after:
                # Drop the connection without the terminating chunk: the client sees an
                # incomplete payload, as when an upstream dies mid-answer.
                if request.transport is not None:
                    request.transport.abort()
                return resp
            if i:
                await self._delay(reply.chunk_delay_s)
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.chat_requests.append(body)
        reply = self._chat_script.popleft() if self._chat_script else self.chat_default
        if reply.status != 200:
            error = {"error": {"message": "fake chat error", "type": "fake"}}
            return web.json_response(error, status=reply.status)
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(reply.tokens)}
            return web.json_response({"object": "chat.completion",
                                      "choices": [{"index": 0, "message": message}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        # Like OpenAI: a role-only first delta, one delta per token, a finish chunk, [DONE].
        deltas: list[dict[str, Any]] = [{"role": "assistant"}]
        deltas += [{"content": token} for token in reply.tokens]
        for i, delta in enumerate(deltas):
            chunk = {"object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if reply.delay_s and i:
                try:
                    await asyncio.wait_for(self._release.wait(), reply.delay_s)
                except TimeoutError:
                    pass
        done = {"object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp


# --- LLM proxy tests: a chat upstream with scripted failures -----------------------------------


def closed_port_url() -> str:
    """A URL nothing listens on (connection refused), for an upstream that is down."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class LlmReply:
    """One scripted answer of FakeLlmUpstream's /v1/chat/completions.

    JSON or SSE follows the request's `stream`. `delay_s` is latency before the response
    headers (a slow upstream); `chunk_delay_s` is between streamed events. `drop="headers"`
    closes the connection without answering; `drop_after=n` drops a stream after n events.
    `body` (JSON) or `events` (SSE data lines) replace the generated answer: garbage, wrong
    shapes. `usage="auto"` computes one; None leaves it out (streams: no usage chunk).
    """

    content: str = "Hello there."
    status: int = 200
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    pieces: list[str] | None = None  # streamed content pieces; default: content word by word
    usage: dict[str, Any] | str | None = "auto"  # a dict: sent as it is (nested details too)
    finish_reason: str = "stop"
    body: bytes | None = None
    events: list[bytes] | None = None
    drop: str = ""  # "headers": close the connection before any response
    drop_after: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, retry_after: float | None = None) -> LlmReply:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        body = json.dumps({"error": {"message": f"fake {status}", "type": "fake"}}).encode()
        return cls(status=status, body=body, headers=headers)

    @classmethod
    def garbage(cls, body: bytes = b"<html>502 Bad Gateway (not JSON)</html>") -> LlmReply:
        return cls(body=body, events=[body])

    @classmethod
    def wrong_shape(cls) -> LlmReply:
        # Valid JSON, but not a completion: no choices.
        body = json.dumps({"object": "chat.completion", "result": "hi"}).encode()
        return cls(body=body, events=[body])

    @classmethod
    def dropped(cls) -> LlmReply:
        return cls(drop="headers")


class FakeLlmUpstream(FakeUpstream):
    """FakeUpstream whose /v1/chat/completions answers from `script_llm(...)` replies (in
    order), then `llm_responder(body)` if set, then `llm_default`. Request bodies are kept in
    `llm_requests`, their headers in `llm_headers`."""

    def __init__(self, name: str = "fake") -> None:
        super().__init__()
        self.name = name
        self.llm_default = LlmReply()
        self.llm_responder: Callable[[dict[str, Any]], LlmReply] | None = None
        self.llm_requests: list[dict[str, Any]] = []
        self.llm_headers: list[dict[str, str]] = []
        self._llm_script: deque[LlmReply] = deque()
        self._llm_release = asyncio.Event()

    def script_llm(self, *replies: LlmReply) -> None:
        self._llm_script.extend(replies)

    async def aclose(self) -> None:
        self._llm_release.set()
        await super().aclose()

    async def _llm_sleep(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._llm_release.wait(), seconds)

    def _next_llm(self, body: dict[str, Any]) -> LlmReply:
        if self._llm_script:
            return self._llm_script.popleft()
        if self.llm_responder is not None:
            return self.llm_responder(body)
        return self.llm_default

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        self.llm_requests.append(body)
        self.llm_headers.append(dict(request.headers))
        reply = self._next_llm(body)
        await self._llm_sleep(reply.delay_s)
        if reply.drop == "headers":
            if request.transport is not None:
                request.transport.abort()
            return web.Response()
        if reply.status != 200 or (reply.body is not None and not body.get("stream")):
            return web.Response(status=reply.status, body=reply.body or b"{}",
                                headers=reply.headers, content_type="application/json")
        pieces = reply.pieces if reply.pieces is not None else _words(reply.content)
        usage = _fake_usage(body, pieces) if reply.usage == "auto" else (
            reply.usage if isinstance(reply.usage, dict) else None)
        model = str(body.get("model", ""))
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces)}
            answer: dict[str, Any] = {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000,
                "model": model, "choices": [{"index": 0, "message": message,
                                             "finish_reason": reply.finish_reason}]}
            if usage is not None:
                answer["usage"] = usage
            return web.json_response(answer, headers=reply.headers)
        events = reply.events if reply.events is not None else _sse_events(
            model, pieces, reply.finish_reason,
            usage if (body.get("stream_options") or {}).get("include_usage") else None)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **reply.headers})
        await resp.prepare(request)
        for i, data in enumerate(events):
            if reply.drop_after is not None and i >= reply.drop_after:
                if request.transport is not None:
                    request.transport.abort()  # mid-answer death: no [DONE], no last chunk
                return resp
            if i:
                await self._llm_sleep(reply.chunk_delay_s)
            await resp.write(b"data: " + data + b"\n\n")
        if reply.events is None:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _fake_usage(body: dict[str, Any], pieces: list[str]) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])) // 4 + 1
    return {"prompt_tokens": prompt, "completion_tokens": len(pieces),
            "total_tokens": prompt + len(pieces)}


def _sse_events(model: str, pieces: list[str], finish: str,
                usage: dict[str, Any] | None) -> list[bytes]:
    def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
        return json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                           "created": 1700000000, "model": model,
                           "choices": [{"index": 0, "delta": delta,
                                        "finish_reason": reason}]}).encode()

    out = [chunk({"role": "assistant", "content": ""}, None)]
    out += [chunk({"content": p}, None) for p in pieces]
    out.append(chunk({}, finish))
    if usage is not None:
        out.append(json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                               "created": 1700000000, "model": model, "choices": [],
                               "usage": usage}).encode())
    return out


# --- vision extraction tests: a vision-capable chat upstream ------------------------------------


def image_urls(body: dict[str, Any]) -> list[str]:
    """The image_url parts (data URLs) of a recorded chat request."""
    urls: list[str] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            urls += [part["image_url"]["url"] for part in content
                     if isinstance(part, dict) and part.get("type") == "image_url"]
    return urls


class FakeVisionUpstream(FakeLlmUpstream):
    """A vision model: /v1/chat/completions answers scripted contents, and (like a real VLM
    endpoint) refuses a request without an image with 400 when `require_image` is set.

        fake.script_answers({"total": 12}, "not json", LlmReply.error(503))

    A dict is sent as its JSON text (a valid answer), a str as it is (invalid JSON, garbage,
    JSON of the wrong shape), an LlmReply as scripted (HTTP errors, drops, delays)."""

    def __init__(self, name: str = "fake-vlm", *, require_image: bool = True) -> None:
        super().__init__(name)
        self.require_image = require_image
        self.refused: list[dict[str, Any]] = []

    async def __aenter__(self) -> FakeVisionUpstream:
        await self.start()
        return self

    def script_answers(self, *answers: dict[str, Any] | str | LlmReply) -> None:
        for answer in answers:
            if isinstance(answer, LlmReply):
                self.script_llm(answer)
            elif isinstance(answer, dict):
                self.script_llm(LlmReply(content=json.dumps(answer), pieces=[json.dumps(answer)]))
            else:
                self.script_llm(LlmReply(content=answer, pieces=[answer]))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.require_image:
            try:
                body = json.loads(await request.read())
            except ValueError:
                body = {}
            if not image_urls(body):
                self.refused.append(body)
                error = {"error": {"message": "this model needs an image", "type": "fake"}}
                return web.json_response(error, status=400)
        return await super()._chat(request)
