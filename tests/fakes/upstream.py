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
import json
from collections import deque
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
