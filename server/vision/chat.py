"""A minimal OpenAI-compatible chat/completions client for the extraction harness.

Same conventions as server/models/upstream.py: one aiohttp session per upstream, a per-attempt
timeout, bounded retries with jittered exponential backoff for failures that may pass
(connection errors, timeouts, 429, 5xx; never other 4xx), a concurrency bound, and a circuit
breaker so a dead upstream costs a request nothing but an immediate fallback.
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
                raise UpstreamError(f"{self.name}: circuit open", unavailable=True) from last
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last))
            async with self._sem:
                if not self.breaker.allow():
                    raise UpstreamError(f"{self.name}: circuit open", unavailable=True) from last
                started = time.perf_counter()
                try:
                    content = await self._attempt(payload)
                except Retryable as exc:
                    self._failed()
                    last = exc
                    log.warning("%s: attempt %d failed: %s", self.name, attempt + 1, exc)
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
        raise UpstreamError(f"{self.name}: no answer after {self.cfg.retries + 1} attempts: "
                            f"{last}", unavailable=True) from last

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
        session = self._session
        if session is None:
            raise UpstreamError(f"{self.name}: client is not running", unavailable=True)
        try:
            async with session.post(self.endpoint, data=payload,
                                    headers={"Content-Type": "application/json"}) as resp:
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError as exc:
            raise Retryable(f"timed out after {self.cfg.timeout_s:g} s") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise Retryable(f"connection error: {exc!r}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self.name}: request failed: {exc!r}",
                                unavailable=False) from exc
        if status == 429 or status >= 500:
            raise Retryable(f"HTTP {status}", retry_after_seconds(retry_after))
        if status != 200:
            snippet = body[:200].decode("utf-8", "replace")
            raise UpstreamError(f"{self.name}: HTTP {status}: {snippet}", unavailable=False,
                                healthy=True)
        if len(body) > MAX_RESPONSE_BYTES:
            raise UpstreamError(f"{self.name}: oversized response", unavailable=False)
        try:
            completion = _decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise UpstreamError(f"{self.name}: not a chat completion: {exc}",
                                unavailable=False) from None
        if not completion.choices:
            raise UpstreamError(f"{self.name}: a completion without choices", unavailable=False)
        return completion.choices[0].message.content or ""


