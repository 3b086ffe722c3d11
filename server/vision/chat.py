"""A minimal OpenAI-compatible chat/completions client for the extraction harness.

Same conventions as server/models/upstream.py: one aiohttp session per upstream, a per-attempt
timeout, bounded retries with jittered exponential backoff for failures that may pass
(connection errors, timeouts, 429, 5xx; never other 4xx), a concurrency bound, and a circuit
breaker so a dead upstream costs a request nothing but an immediate fallback.

Error messages reach clients (the 502/503 of /v1/vision/extract, its `attempts`): they name the
model and a cause from server/models/upstream_errors.py; hosts, ports, exceptions and upstream
bodies are logged only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any

import aiohttp
import msgspec

from server.config import VisionUpstreamConfig
from server.models.breaker import CircuitBreaker
from server.models.retry import Retryable, retry_after_seconds
from server.models.upstream_errors import (
    BAD_RESPONSE,
    CIRCUIT_OPEN,
    NOT_RUNNING,
    REQUEST_FAILED,
    TIMEOUT,
    bad_status,
    rejected,
    transport_cause,
    unavailable,
)
from server.telemetry import tracing
from server.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # a structured answer is kilobytes


class UpstreamError(Exception):
    """The model could not give an answer; `unavailable` when it was not reachable at all,
    `healthy` when it answered properly but refused our request (4xx: not its fault)."""

    def __init__(self, message: str, *, unavailable: bool, healthy: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.healthy = healthy


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message


class _Completion(msgspec.Struct):
    choices: list[_Choice]


_decoder = msgspec.json.Decoder(_Completion)


class ChatUpstream:
    def __init__(self, name: str, cfg: VisionUpstreamConfig, metrics: Metrics | None = None
                 ) -> None:
        self.name = name
        self.cfg = cfg
        self.endpoint = cfg.url.rstrip("/") + "/v1/chat/completions"
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s)
        self._metrics = metrics
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._jitter = random.Random()

    async def start(self) -> None:
        if self._session is not None:
            return
        headers: dict[str, str] = {}
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                # Fail at start-up like any other bad config, not as 401s in every request.
                raise RuntimeError(f"{self.name}: environment variable "
                                   f"{self.cfg.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s,
                                          sock_connect=self.cfg.connect_timeout_s),
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def body(self, messages: list[dict[str, Any]], schema: dict[str, Any] | None
             ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages,
                                "max_tokens": self.cfg.max_tokens,
                                "temperature": self.cfg.temperature}
        if schema is not None and self.cfg.json_schema_format:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "extraction", "schema": schema, "strict": False}}
        return body

    async def complete(self, messages: list[dict[str, Any]],
                       schema: dict[str, Any] | None = None) -> str:
        """The assistant's message content; UpstreamError when there is none to be had."""
        payload = msgspec.json.encode(self.body(messages, schema))
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            if self.breaker.state == "open":
                raise UpstreamError(unavailable(self.name, CIRCUIT_OPEN),
                                    unavailable=True) from last
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last))
            async with self._sem:
                if not self.breaker.allow():
                    raise UpstreamError(unavailable(self.name, CIRCUIT_OPEN),
                                        unavailable=True) from last
                started = time.perf_counter()
                try:
                    content = await self._attempt(payload)
                except Retryable as exc:
                    self._failed()
                    last = exc
                    log.warning("%s: attempt %d at %s failed: %s (%r)", self.name, attempt + 1,
                                self.endpoint, exc, exc.__cause__)
                    continue
                except UpstreamError as exc:
                    if exc.healthy:
                        self.breaker.record_success()
                    else:
                        self._failed()
                    raise
                self.breaker.record_success()
                if self._metrics is not None:
                    self._metrics.engine_seconds.labels(model=self.name, op="chat").observe(
                        time.perf_counter() - started)
                return content
        raise UpstreamError(f"{unavailable(self.name, str(last))} after "
                            f"{self.cfg.retries + 1} attempts", unavailable=True) from last

    def _failed(self) -> None:
        self.breaker.record_failure()
        if self._metrics is not None:
            self._metrics.engine_errors.labels(model=self.name).inc()

    def _backoff(self, attempt: int, last: Exception | None) -> float:
        delay = self.cfg.backoff_s * 2.0 ** (attempt - 1)
        delay *= 0.5 + self._jitter.random() / 2  # spread the retries of many requests
        if isinstance(last, Retryable) and last.retry_after is not None:
            delay = max(delay, last.retry_after)
        return min(delay, self.cfg.timeout_s)

    async def _attempt(self, payload: bytes) -> str:
        # One span per attempt; its `traceparent` goes to the model server (docs/observability.md).
        headers = {"Content-Type": "application/json"}
        with tracing.ClientCall("upstream.vlm", self.endpoint, headers,
                                {"streamgate.provider": self.name}) as call:
            content = await self._post(payload, headers)
            call.status = 200
        return content

    async def _post(self, payload: bytes, headers: dict[str, str]) -> str:
        session = self._session
        if session is None:
            raise UpstreamError(unavailable(self.name, NOT_RUNNING), unavailable=True)
        try:
            async with session.post(self.endpoint, data=payload, headers=headers) as resp:
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError as exc:
            raise Retryable(TIMEOUT) from exc  # the retry loop logs the cause's details
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise Retryable(transport_cause(exc)) from exc
        except aiohttp.ClientError as exc:
            log.warning("%s: request to %s failed: %r", self.name, self.endpoint, exc)
            raise UpstreamError(unavailable(self.name, REQUEST_FAILED),
                                unavailable=False) from exc
        if status == 429 or status >= 500:
            raise Retryable(bad_status(status), retry_after_seconds(retry_after))
        if status != 200:
            log.warning("%s: %s answered HTTP %d: %s", self.name, self.endpoint, status,
                        body[:200].decode("utf-8", "replace"))
            raise UpstreamError(rejected(self.name, status), unavailable=False, healthy=True)
        if len(body) > MAX_RESPONSE_BYTES:
            raise self._bad_response(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            completion = _decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise self._bad_response(f"not a chat completion: {exc}") from None
        if not completion.choices:
            raise self._bad_response("a completion without choices")
        return completion.choices[0].message.content or ""

    def _bad_response(self, detail: str) -> UpstreamError:
        log.warning("%s: %s sent a bad response: %s", self.name, self.endpoint, detail)
        return UpstreamError(unavailable(self.name, BAD_RESPONSE), unavailable=False)


