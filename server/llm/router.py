"""Which provider answers: the ones serving the model, healthy (breaker closed) first, then by
priority; bounded retries on one provider for failures that may pass, failover to the next for
the rest, all inside the request's deadline.

Outcomes the client sees (RouteError): 404 unknown_model, 503 no_upstream (nothing configured,
or every breaker open), 504 upstream_timeout (the last failure was a timeout, or the deadline
ran out), 502 upstream_error (every provider failed otherwise), 400 bad_request (an upstream
rejected the request itself: another provider would too, and retrying would bill twice).
Their messages name the provider and a cause from server/models/upstream_errors.py; what went
wrong in detail (host, port, exception, upstream body) is logged, never sent.

A stream is judged when it is closed, not when it opens: only one that reached [DONE] is a
success for the breaker and the metrics; one that broke mid-answer is a failure like any
other attempt (it cannot be retried or failed over: the client has part of the answer).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from server.config import LlmConfig
from server.llm.provider import AttemptFailed, Provider, StreamChunk, UpstreamStream
from server.llm.schema import UpstreamCompletion
from server.models.upstream_errors import unavailable
from server.telemetry.metrics import Metrics

log = logging.getLogger("streamgate.llm")
T = TypeVar("T")
BREAKER_VALUE = {"closed": 0, "half_open": 1, "open": 2}

__all__ = ["LlmRouter", "RouteError", "StreamChunk", "UpstreamStream"]


class RouteError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str] | None:
        if self.retry_after is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class LlmRouter:
    def __init__(self, cfg: LlmConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.providers = [Provider(p, i) for i, p in enumerate(cfg.providers)]
        self.models: dict[str, list[Provider]] = {}
        for provider in self.providers:
            for public in provider.cfg.models:
                self.models.setdefault(public, []).append(provider)
        self._jitter = random.Random()

    async def start(self) -> None:
        try:
            for provider in self.providers:
                await provider.start()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        for provider in self.providers:
            await provider.aclose()

    def publish_metrics(self) -> None:
        """A scrape hook: breaker states change lazily (open -> half_open on read)."""
        if self.metrics is None:
            return
        for provider in self.providers:
            value = BREAKER_VALUE[provider.breaker.state]
            self.metrics.llm_breaker_state.labels(provider.name).set(value)

    def check_model(self, model: str) -> list[Provider]:
        """The providers serving `model`, or the RouteError to answer before any charge."""
        if not self.providers:
            raise RouteError(503, "no_upstream", "no LLM upstream is configured on this gateway")
        serving = self.models.get(model)
        if not serving:
            raise RouteError(404, "unknown_model", f"model {model!r} is not served here; "
                             f"available: {', '.join(sorted(self.models))}")
        return serving

    def default_model(self) -> str:
        if self.cfg.translate_model:
            return self.cfg.translate_model
        for provider in sorted(self.providers, key=lambda p: (p.cfg.priority, p.index)):
            for public in provider.cfg.models:
                return public
        raise RouteError(503, "no_upstream", "no LLM upstream is configured on this gateway")

    def _ordered(self, model: str) -> list[Provider]:
        # Open circuits last (allow() skips them anyway). A half-open one keeps its place:
        # its breaker lets exactly one trial through, and a recovered primary must get its
        # traffic back while the secondary is still healthy.
        return sorted(self.check_model(model),
                      key=lambda p: (p.breaker.state == "open", p.cfg.priority, p.index))

    async def complete(self, model: str, payload: dict[str, Any], deadline: float
                       ) -> tuple[Provider, dict[str, Any], UpstreamCompletion]:
        async def attempt(provider: Provider, body: bytes
                          ) -> tuple[Provider, dict[str, Any], UpstreamCompletion]:
            data, parsed = await provider.complete(body, deadline)
            return provider, data, parsed

        def answered(provider: Provider, _: object) -> None:
            provider.breaker.record_success()
            self._count(provider, "ok")

        return await self._route(model, payload, deadline, attempt, answered, mode="complete")

    async def open_stream(self, model: str, payload: dict[str, Any], deadline: float
                          ) -> UpstreamStream:
        """A stream that sent its first valid chunk; the caller must `close()` it, which
        records how the attempt ended."""
        async def attempt(provider: Provider, body: bytes) -> UpstreamStream:
            return await provider.open_stream(body, deadline)

        def opened(provider: Provider, stream: UpstreamStream) -> None:
            stream.on_close = self._stream_closed

        return await self._route(model, {**payload, "stream": True}, deadline, attempt, opened,
                                 mode="stream")

    def _stream_closed(self, stream: UpstreamStream) -> None:
        provider, failure = stream.provider, stream.failure
        if failure is not None:
            provider.breaker.record_failure()
            self._count(provider, failure.kind)
            log.warning("llm upstream stream broke mid-answer: provider %s, %s", provider.name,
                        failure, extra={"provider": provider.name, "kind": failure.kind,
                                        "cause": failure.cause, "detail": failure.detail[:300]})
        elif stream.completed:
            provider.breaker.record_success()
            self._count(provider, "ok")
        else:
            # The client left first: as far as anyone saw, the upstream was answering well.
            # Recorded (not left pending) so a half-open trial does not pin the breaker.
            provider.breaker.record_success()
            self._count(provider, "client_closed")

    async def _route(self, model: str, payload: dict[str, Any], deadline: float,
                     attempt: Callable[[Provider, bytes], Awaitable[T]],
                     accepted: Callable[[Provider, T], None], *, mode: str) -> T:
        """`accepted` records an attempt that returned (a stream: once it is closed).
        `mode` labels the time to the first token (a stream's first chunk; the whole answer
        when not streamed)."""
        loop = asyncio.get_running_loop()
        last: AttemptFailed | None = None
        last_provider = ""
        for provider in self._ordered(model):
            body = msgspec.json.encode({**payload, "model": provider.cfg.models[model]})
            for n in range(provider.cfg.retries + 1):
                if n:
                    delay = self._backoff(provider, n, last)
                    if loop.time() + delay >= deadline:
                        break  # no time to wait here; the next provider may still answer
                    await asyncio.sleep(delay)
                if loop.time() >= deadline:
                    raise self._final(model, last, last_provider, deadline_passed=True)
                if not provider.breaker.allow():
                    break
                started = loop.time()
                try:
                    result = await attempt(provider, body)
                except AttemptFailed as exc:
                    self._count(provider, exc.kind)
                    # The details are for operators; clients get the cause alone.
                    log.warning("llm upstream attempt failed: provider %s, %s", provider.name,
                                exc, extra={
                                    "provider": provider.name, "model": model, "kind": exc.kind,
                                    "attempt": n + 1, "cause": exc.cause,
                                    "detail": exc.detail[:300]})
                    if exc.kind == "client":
                        provider.breaker.record_success()  # it answered, sanely
                        raise RouteError(400, "bad_request",
                                         f"provider {provider.name!r} rejected the request: "
                                         f"{exc.cause}") from None
                    if exc.kind != "busy":
                        provider.breaker.record_failure()
                    last, last_provider = exc, provider.name
                    if exc.kind == "retryable":
                        continue
                    break
                if self.metrics is not None:
                    self.metrics.llm_first_token.labels(provider.name, mode).observe(
                        loop.time() - started)
                accepted(provider, result)
                return result
        raise self._final(model, last, last_provider, deadline_passed=loop.time() >= deadline)

    def _final(self, model: str, last: AttemptFailed | None, last_provider: str, *,
               deadline_passed: bool) -> RouteError:
        if deadline_passed or (last is not None and last.timeout):
            reason = (unavailable(last_provider, last.cause) if last is not None
                      else "no attempt finished")
            return RouteError(504, "upstream_timeout",
                              f"no upstream answered for {model!r} in time ({reason})")
        if last is None:
            waits = [max(0.0, p.breaker.reset_timeout_s) for p in self.models.get(model, [])]
            return RouteError(503, "no_upstream",
                              f"every upstream for {model!r} is unavailable (circuit open)",
                              retry_after=min(waits, default=1.0))
        if last.kind == "busy":
            return RouteError(503, "no_upstream", f"every upstream for {model!r} is saturated",
                              retry_after=1.0)
        return RouteError(502, "upstream_error", f"every upstream for {model!r} failed; last: "
                          f"{unavailable(last_provider, last.cause)}")

    def _backoff(self, provider: Provider, attempt: int, last: AttemptFailed | None) -> float:
        delay = provider.cfg.backoff_s * 2.0 ** (attempt - 1)
        delay *= 0.5 + self._jitter.random() / 2  # spread the retries of requests failing together
        if last is not None and last.retry_after is not None:
            delay = max(delay, last.retry_after)
        return delay

    def _count(self, provider: Provider, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.llm_attempts.labels(provider.name, outcome).inc()
