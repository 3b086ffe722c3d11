"""A fake OpenAI-compatible transcription upstream: a real aiohttp app on 127.0.0.1.

Behaviour is scripted per test: queue replies with `script(...)` (consumed in order), and
`default` answers once the script is empty. Every request is recorded, with its multipart
fields parsed, so tests can assert what the engine sent.

    async with FakeUpstream() as fake:
        fake.script(FakeReply(status=500), FakeReply.transcription("hi", [("hi", 0.0, 0.4)]))
        ... UpstreamModelConfig(url=fake.url) ...
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
class RecordedRequest:
    path: str
    headers: dict[str, str]
    fields: dict[str, str]
    files: dict[str, tuple[str | None, str | None, bytes]]  # name -> (filename, type, data)


class FakeUpstream:
    def __init__(self, default: FakeReply | None = None) -> None:
        self.default = default or FakeReply.transcription("")
        self.requests: list[RecordedRequest] = []
        self._script: deque[FakeReply] = deque()
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()
        self.url = ""

    def script(self, *replies: FakeReply) -> None:
        self._script.extend(replies)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/audio/transcriptions", self._handle)
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
        if reply.delay_s:
            try:
                await asyncio.wait_for(self._release.wait(), reply.delay_s)
            except TimeoutError:
                pass
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers=reply.headers,
            content_type=reply.content_type,
        )
