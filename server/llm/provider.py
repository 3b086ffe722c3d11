"""One OpenAI-compatible chat upstream: its HTTP session, timeouts, concurrency bound and
circuit breaker, and the check that what it answered is a chat completion.

An attempt either returns a validated answer or raises AttemptFailed saying what kind of
failure it was; the router decides what to do next (retry here, fail over, give up). The
breaker is fed by the router, not here, so one place owns the policy. A failure carries a
`cause` from the fixed vocabulary of server/models/upstream_errors.py (what a client may be
told) and a `detail` (host, port, exception, upstream body: for the server log only).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import msgspec

from server.config import LlmProviderConfig
from server.llm.schema import UpstreamChunk, UpstreamCompletion
from server.llm.sse import SseError, SseParser
from server.models.breaker import CircuitBreaker
from server.models.retry import retry_after_seconds
from server.models.upstream_errors import (
    BAD_RESPONSE,
    CONNECTION_LOST,
    NOT_RUNNING,
    PROVIDER_ERROR,
    SATURATED,
    TIMEOUT,
    bad_status,
    transport_cause,
)
from server.telemetry import tracing
from server.telemetry.tracing import TRACING

# A chat completion is kilobytes; an upstream sending this much is not answering the question.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024

# retryable: may pass on another attempt (connection, timeout, 429, 5xx, error event)
# malformed: 200 with garbage; the same request would get the same garbage: fail over
# unusable:  the provider refuses us (401, 403, 404...): a configuration problem, fail over
# busy:      no free slot in time; the provider is not unhealthy, only saturated: fail over
# client:    the request itself was rejected (400, 413, 422): relayed, nobody else tried
FailureKind = Literal["retryable", "malformed", "unusable", "busy", "client"]


class AttemptFailed(Exception):
    def __init__(self, kind: FailureKind, cause: str, detail: str = "", *,
                 timeout: bool = False, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.kind = kind
        self.cause = cause  # for clients: a fixed phrase, never host, port or exception text
        self.detail = detail  # for the server log
        self.timeout = timeout
        self.retry_after = retry_after
        self.status = status


@dataclass(slots=True)
class StreamChunk:
    data: dict[str, Any]  # the event as sent (re-encoded for the client after edits)
    chunk: UpstreamChunk  # its validated view


def parse_completion(body: bytes) -> tuple[dict[str, Any], UpstreamCompletion]:
    try:
        data = msgspec.json.decode(body)
        if not isinstance(data, dict) or "error" in data:
            raise AttemptFailed("malformed", BAD_RESPONSE,
                                "answer is not a chat completion object")
        return data, msgspec.convert(data, UpstreamCompletion)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AttemptFailed("malformed", BAD_RESPONSE, f"malformed chat completion: {exc}"
                            ) from None


def parse_chunk(raw: bytes) -> StreamChunk:
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise AttemptFailed("malformed", BAD_RESPONSE, f"malformed stream event: {exc}"
                            ) from None
    if isinstance(data, dict) and "error" in data:
        # Upstreams report trouble after a 200 this way (overloaded, crashed worker).
        raise AttemptFailed("retryable", PROVIDER_ERROR,
                            f"error event: {str(data['error'])[:200]}")
    try:
        if not isinstance(data, dict):
            raise msgspec.ValidationError("not an object")
        return StreamChunk(data, msgspec.convert(data, UpstreamChunk))
    except msgspec.ValidationError as exc:
        raise AttemptFailed("malformed", BAD_RESPONSE, f"malformed stream chunk: {exc}"
                            ) from None


class Provider:
    def __init__(self, cfg: LlmProviderConfig, index: int = 0) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.index = index  # config order breaks priority ties
        base = cfg.url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else (
            base + "/chat/completions" if base.endswith("/v1") else base + "/v1/chat/completions")
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s)
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                # Fail at start-up like any bad config, not as a 502 on every request.
                raise RuntimeError(f"llm provider {self.name}: environment variable "
                                   f"{self.cfg.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        # Only the connect phase is timed by aiohttp; first byte and total are per attempt
        # (they depend on the request's remaining deadline).
        timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s,
                                        sock_connect=self.cfg.connect_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _slot(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time()
                                              + self.cfg.first_byte_timeout_s)):
                await self._sem.acquire()
        except TimeoutError:
            raise AttemptFailed("busy", SATURATED, "no free slot in time") from None

    async def _post(self, payload: bytes) -> aiohttp.ClientResponse:
        """Send and wait for the response headers (callers bound the wait by the first-byte
        timeout). Statuses other than 200 become AttemptFailed."""
        if self._session is None:
            raise AttemptFailed("unusable", NOT_RUNNING, "provider is not running")
        if not TRACING.on:
            return await self._send(self._session, payload, None)
        # To the response's headers (the first byte): where a slow provider shows.
        headers: dict[str, str] = {}
        span = tracing.client_span("upstream.llm", self.endpoint, headers=headers,
                                   attributes={"streamgate.provider": self.name})
        try:
            resp = await self._send(self._session, payload, headers)
        except AttemptFailed as exc:
            tracing.end_client_span(span, status=exc.status, failure=exc)
            raise
        except BaseException as exc:
            tracing.end_client_span(span, failure=exc)
            raise
        tracing.end_client_span(span, status=resp.status)
        return resp

    async def _send(self, session: aiohttp.ClientSession, payload: bytes,
                    headers: dict[str, str] | None) -> aiohttp.ClientResponse:
        try:
            resp = await session.post(self.endpoint, data=payload, headers=headers)
        except TimeoutError as exc:
            raise AttemptFailed("retryable", TIMEOUT, f"no response from {self.endpoint} in "
                                f"time: {exc!r}", timeout=True) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise AttemptFailed("retryable", transport_cause(exc),
                                f"{self.endpoint}: {exc!r}") from None
        except aiohttp.ClientError as exc:
            raise AttemptFailed("unusable", transport_cause(exc),
                                f"{self.endpoint}: {exc!r}") from None
        if resp.status == 200:
            return resp
        try:
            detail = (await resp.content.read(2000)).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError):
            detail = ""
        finally:
            resp.close()
        status, retry_after = resp.status, retry_after_seconds(resp.headers.get("Retry-After"))
        cause, detail = bad_status(status), f"HTTP {status}: {detail[:300]}"
        if status == 429 or status >= 500:
            raise AttemptFailed("retryable", cause, detail, retry_after=retry_after,
                                status=status)
        if status in (400, 413, 422):
            raise AttemptFailed("client", cause, detail, status=status)
        raise AttemptFailed("unusable" if status >= 400 else "malformed", cause, detail,
                            status=status)

    async def complete(self, payload: bytes, deadline: float
                       ) -> tuple[dict[str, Any], UpstreamCompletion]:
        await self._slot(deadline)
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            end = min(deadline, start + self.cfg.timeout_s)
            try:
                async with asyncio.timeout_at(min(end, start + self.cfg.first_byte_timeout_s)
                                              ) as phase:
                    resp = await self._post(payload)
                    phase.reschedule(end)  # the body may take as long as the attempt may
                    try:
                        body = await _read_limited(resp, MAX_RESPONSE_BYTES)
                    finally:
                        resp.release()  # back to the pool when read to the end, else closed
            except TimeoutError:
                raise AttemptFailed("retryable", TIMEOUT, "no complete answer in time",
                                    timeout=True) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                raise AttemptFailed("retryable", transport_cause(exc),
                                    f"reading the answer: {exc!r}") from None
            return parse_completion(body)
        finally:
            self._sem.release()

    async def open_stream(self, payload: bytes, deadline: float) -> UpstreamStream:
        """Connected, answered 200 and sent a first valid chunk: only then is the stream
        handed over (and the client committed to this provider)."""
        await self._slot(deadline)
        loop = asyncio.get_running_loop()
        end = min(deadline, loop.time() + self.cfg.timeout_s)
        stream: UpstreamStream | None = None
        try:
            try:
                async with asyncio.timeout_at(min(end, loop.time()
                                                  + self.cfg.first_byte_timeout_s)):
                    resp = await self._post(payload)
            except TimeoutError:
                raise AttemptFailed("retryable", TIMEOUT, "no response headers in time",
                                    timeout=True) from None
            if resp.content_type != "text/event-stream":
                resp.close()
                raise AttemptFailed("malformed", BAD_RESPONSE, "answered a stream request "
                                    f"with {resp.content_type}")
            stream = UpstreamStream(self, resp, end)
            first = await stream.next()
            if first is None:
                raise AttemptFailed("malformed", BAD_RESPONSE, "stream ended before any chunk")
            stream.pending.appendleft(first)
            return stream
        except BaseException:
            if stream is not None:
                stream.close()  # releases the slot too
            else:
                self._sem.release()
            raise


class UpstreamStream:
    """An open upstream SSE stream; `next()` gives validated chunks until [DONE] (None).

    It remembers how it ended (`failure`, `completed`) so that whoever opened it can judge the
    attempt when it is closed (`on_close`): a stream is only a success once it reached [DONE].
    """

    def __init__(self, provider: Provider, resp: aiohttp.ClientResponse, end: float) -> None:
        self.provider = provider
        self.pending: deque[StreamChunk] = deque()
        self.failure: AttemptFailed | None = None
        self.on_close: Callable[[UpstreamStream], None] | None = None
        self._resp = resp
        self._end = end
        self._parser = SseParser(MAX_EVENT_BYTES)
        self._raw: deque[bytes] = deque()
        self._eof = False
        self._done = False
        self._closed = False

    @property
    def completed(self) -> bool:
        """[DONE] arrived: the upstream answered in full."""
        return self._done

    async def next(self) -> StreamChunk | None:
        if self.failure is not None:
            raise self.failure  # a broken stream stays broken
        try:
            return await self._next()
        except AttemptFailed as exc:
            self.failure = exc
            raise

    async def _next(self) -> StreamChunk | None:
        if self.pending:
            return self.pending.popleft()
        while not self._done:
            if self._raw:
                raw = self._raw.popleft()
                if raw.strip() == b"[DONE]":
                    self._done = True
                    break
                return parse_chunk(raw)
            if self._eof:
                # Closed without [DONE]: the answer may be cut short; do not pass it as whole.
                raise AttemptFailed("retryable", CONNECTION_LOST,
                                    "stream ended without [DONE]")
            await self._read()
        return None

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        # Each wait for more bytes is bounded by the first-byte timeout (an upstream that
        # stalls mid-answer) and the attempt's end.
        limit = min(self._end, loop.time() + self.provider.cfg.first_byte_timeout_s)
        try:
            async with asyncio.timeout_at(limit):
                data = await self._resp.content.readany()
        except TimeoutError:
            raise AttemptFailed("retryable", TIMEOUT, "stream stalled", timeout=True) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise AttemptFailed("retryable", transport_cause(exc), f"stream broke: {exc!r}"
                                ) from None
        try:
            if data:
                self._raw.extend(self._parser.feed(data))
            else:
                self._eof = True
                self._raw.extend(self._parser.close())
        except SseError as exc:
            raise AttemptFailed("malformed", BAD_RESPONSE, str(exc)) from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A stream left before [DONE] must not go back to the pool half-read.
        self._resp.close()
        self.provider._sem.release()
        if self.on_close is not None:
            self.on_close(self)


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    buf = bytearray()
    while chunk := await resp.content.readany():
        buf += chunk
        if len(buf) > limit:
            raise AttemptFailed("malformed", BAD_RESPONSE, f"answer larger than {limit} bytes")
    return bytes(buf)
