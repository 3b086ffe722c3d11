"""The HTTP port (aiohttp): /metrics, /healthz, /readyz, and the bounds every route's request
body is read under (server/flow_control/http_body.py). REST and admin APIs join it later."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType

from aiohttp import web
from aiohttp.helpers import BaseTimerContext
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.flow_control.http_body import (
    DEFAULT_BODY_TIMEOUT_S,
    EARLY_ANSWER_LINGER_S,
    EARLY_ANSWER_QUIET_S,
)
from server.http.errors import ApiError, error_response
from server.http.openapi import register
from server.telemetry import tracing
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import TRACING

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BodyReadTimer(BaseTimerContext):
    """Fails a request whose handler waits `timeout_s` for body bytes that do not come.

    aiohttp's StreamReader enters its timer around each wait for more bytes, and only then:
    when the buffer is empty and a handler asks to read (its client uses the same hook for
    `sock_read`). So the clock runs only while the server is waiting on the client; a handler
    that has stopped reading (back pressure) is never timed out. On expiry the body stream
    fails with a 408 ApiError, raised by the read in progress: handlers pass ApiError through
    their own error handling, and the API error middleware answers it as JSON.
    """

    __slots__ = ("_content", "_handle", "_loop", "_timeout_s", "armed", "fired")

    def __init__(self, content: StreamReader, timeout_s: float) -> None:
        self._content = content
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self.armed = True  # off once the handler is done with the body
        self.fired = False

    def __enter__(self) -> BaseTimerContext:
        if self.armed:
            self._handle = self._loop.call_later(self._timeout_s, self._expire)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._cancel()

    def assert_timeout(self) -> None:
        """Called by every non-blocking read: nothing to check (the timer raises by itself)."""

    def disarm(self) -> None:
        self.armed = False
        self._cancel()

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expire(self) -> None:
        self._handle = None
        self.fired = True
        self._content.set_exception(ApiError(
            408, "request_timeout",
            f"no request body bytes arrived for {self._timeout_s:g} s; the request is dropped"))


def body_bounds(timeout_s: float) -> Middleware:
    """The middleware that reads every request body under the bounds of flow_control/http_body:
    a read timeout (408), a bounded discard after an answer sent before its body was read, and
    503 `draining` when shutdown ends a body read. The runner sets `lingering_time=0`: aiohttp's
    own lingering would run after the request, beyond the reach of disconnects and shutdown."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        content = request.content
        timer = BodyReadTimer(content, timeout_s)
        content._timer = timer  # the StreamReader's read-timeout hook (see BodyReadTimer)
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            if not _ended_by_shutdown(content):
                raise
            # aiohttp's shutdown fails the body read of a request still waiting for its body
            # (the task itself is not cancelled): answer it rather than drop the connection.
            response = error_response(503, "draining",
                                      "the server is shutting down; retry elsewhere")
        finally:
            timer.disarm()
        if content.is_eof() and not timer.fired:
            return response
        # Answered with body bytes still to come (a refusal before reading, a timeout, a
        # shutdown): the connection cannot carry another request.
        response.force_close()
        if timer.fired or content.exception() is not None:
            return response  # the client stalled or left: nothing worth waiting for
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            return response
        await _discard_rest(content)
        return response

    return middleware


def _ended_by_shutdown(content: StreamReader) -> bool:
    task = asyncio.current_task()
    return isinstance(content.exception(), asyncio.CancelledError) and \
        task is not None and task.cancelling() == 0


async def _discard_rest(content: StreamReader) -> None:
    """Read and drop what is left of the body, for a bounded time, so the client (still
    sending) reads the answer it was already sent rather than a reset."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EARLY_ANSWER_LINGER_S
    try:
        while True:
            async with asyncio.timeout_at(min(deadline, loop.time() + EARLY_ANSWER_QUIET_S)):
                if not await content.readany():
                    return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # a real cancellation, not shutdown ending the body read
    except Exception:
        # The client went, a bound passed, or its chunked framing broke: the answer is
        # already written, so there is no one left to tell.
        return


def traced() -> Middleware:
    """An `http.request` span per request (the client's `traceparent` its parent), current
    while the handler runs: a speech route's session, an LLM route's upstream calls and every
    log line of the request are under it. Installed only when tracing is on."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        parent = tracing.parent_from_values(request.headers.getall("traceparent", ()),
                                            request.headers.getall("tracestate", ()))
        route = request.match_info.route.resource
        with tracing.child("http.request", kind=tracing.SpanKind.SERVER,
                           parent=parent, attributes={
                               "http.request.method": request.method,
                               "http.route": route.canonical if route else request.path,
                           }) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                tracing.error(span, f"HTTP {response.status}")
            return response

    return middleware


def build_http_app(metrics: Metrics, is_ready: Callable[[], tuple[bool, str]], *,
                   body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, reason = is_ready()
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "reason": reason},
            status=200 if ready else 503,
        )

    async def metrics_view(_: web.Request) -> web.Response:
        metrics.before_scrape()
        body = generate_latest(metrics.registry)
        resp = web.Response(body=body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        resp.charset = "utf-8"
        return resp

    # First in the list: the outermost middleware, so it sees the answer after the API error
    # middleware has made it JSON.
    app = web.Application(client_max_size=1024 * 1024,
                          middlewares=[body_bounds(body_timeout_s),
                                       *([traced()] if TRACING.on else [])])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    register(app, "/healthz", "get", {"summary": "liveness", "responses": {
        "200": {"description": "alive", "content": {"application/json": {"schema": status}}}}})
    register(app, "/readyz", "get", {"summary": "readiness (503 while draining)", "responses": {
        "200": {"description": "ready", "content": {"application/json": {"schema": status}}},
        "503": {"description": "not ready",
                "content": {"application/json": {"schema": status}}}}})
    return app
