"""Upstream TTS over an OpenAI-compatible HTTP API: POST {url}/v1/audio/speech.

The response body is consumed as it streams in and PCM is yielded chunk by chunk, so the
first audio goes out while the upstream is still synthesizing. `response_format` "pcm" is
OpenAI's raw 24 kHz s16le mono; "wav" is parsed incrementally (placeholder sizes accepted).

Conventions shared with the ASR upstream (server/models/upstream.py): a concurrency bound, a
circuit breaker asked before each attempt, bounded retries with jittered exponential backoff
for failures that may pass (connection errors, timeouts, 429, 5xx; never other 4xx). Retries
happen only BEFORE the first audio byte was yielded: after that the audio already went out,
and a failure is a non-retryable EngineError (the caller cannot re-send half a sentence).

Error messages reach clients (the TTS `error` frame, the 502 of /v1/tts/synthesize): they name
the model and a cause from server/models/upstream_errors.py; hosts, ports, exceptions and
upstream bodies are logged only.

Timeouts are per read, not per request (aiohttp's sock_read, which stops counting while the
consumer applies back pressure), so a long answer to a client that buffers slowly is not cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator

import aiohttp
import msgspec

from server.audio.text_chunker import count_tokens
from server.config import UpstreamTtsConfig
from server.models.base import EngineError, EngineUnavailable
from server.models.breaker import BreakerState, CircuitBreaker
from server.models.retry import Retryable, retry_after_seconds
from server.models.upstream import MalformedResponse
from server.models.upstream_errors import (
    BAD_RESPONSE,
    CIRCUIT_OPEN,
    NOT_RUNNING,
    REQUEST_FAILED,
    bad_status,
    rejected,
    transport_cause,
    unavailable,
)
from server.telemetry import tracing
from server.telemetry.tracing import TRACING
from streamgate_protocol.audio import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioFormatError,
    StreamDecoder,
)

log = logging.getLogger(__name__)

DEFAULT_BACKOFF_S = 0.2
READ_BYTES = 8192
RESPONSE_FORMATS = ("pcm", "wav")
# Failures of the transport (not of the request): another attempt may pass.
_TRANSIENT = (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


class _PcmDecoder:
    """Raw s16le: only an odd trailing byte has to be carried to the next read."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def decode(self, data: bytes) -> bytes:
        data = self._carry + data
        usable = len(data) & ~1
        self._carry = data[usable:]
        return data[:usable]


class UpstreamSynthesizer:
    def __init__(
        self, name: str, cfg: UpstreamTtsConfig, *, backoff_s: float = DEFAULT_BACKOFF_S
    ) -> None:
        if cfg.max_concurrency < 1 or cfg.retries < 0 or cfg.max_chars < 1:
            raise ValueError("max_concurrency and max_chars must be >= 1 and retries >= 0")
        if cfg.response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}")
        if not MIN_SAMPLE_RATE <= cfg.sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be within {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
        self.name = name
        self.cfg = cfg
        self.sample_rate = cfg.sample_rate
        self.max_chars = cfg.max_chars
        self.max_tokens = cfg.max_tokens
        self.endpoint = cfg.url.rstrip("/") + "/v1/audio/speech"
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s)
        self._backoff_s = backoff_s
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._jitter = random.Random()

    @property
    def breaker_state(self) -> BreakerState:
        return self.breaker.state

    async def start(self) -> None:
        if self._session is not None:
            return
        headers: dict[str, str] = {}
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise EngineError(
                    f"{self.name}: environment variable {self.cfg.api_key_env} is not set",
                    retryable=False,
                )
            headers["Authorization"] = f"Bearer {key}"
        t = self.cfg.timeout_s
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
            headers=headers,
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def synthesize(
        self, text: str, *, voice: str | None, language: str
    ) -> AsyncIterator[bytes]:
        text = text.strip()
        if len(text) > self.max_chars or (
            self.max_tokens is not None and count_tokens(text) > self.max_tokens
        ):
            raise EngineError(f"{self.name}: text exceeds the model limit", retryable=False)
        if not text:
            return
        # OpenAI's speech API takes no language: the voice and the text carry it.
        body = msgspec.json.encode(
            {
                "model": self.cfg.upstream_model,
                "input": text,
                "voice": voice or self.cfg.voice,
                "response_format": self.cfg.response_format,
            }
        )
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            # As in the ASR upstream: an open circuit fails fast, before queueing for a slot;
            # allow() is asked only with a slot held so a half-open trial is not wasted.
            if self.breaker.state == "open":
                raise EngineUnavailable(unavailable(self.name, CIRCUIT_OPEN)) from last
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last))
            async with self._sem:
                if self._session is None:
                    raise EngineUnavailable(unavailable(self.name, NOT_RUNNING))
                if not self.breaker.allow():
                    raise EngineUnavailable(unavailable(self.name, CIRCUIT_OPEN)) from last
                sent = False
                try:
                    # aclosing: when our consumer stops, the response is released right away.
                    async with contextlib.aclosing(self._attempt(self._session, body)) as audio:
                        async for pcm in audio:
                            sent = True
                            yield pcm
                except Retryable as exc:
                    self.breaker.record_failure()
                    last = exc
                    log.warning("%s: attempt %d at %s failed: %s", self.name, attempt + 1,
                                self.endpoint, exc)
                    continue
                except _TRANSIENT as exc:
                    self.breaker.record_failure()
                    log.warning("%s: attempt %d at %s failed: %r", self.name, attempt + 1,
                                self.endpoint, exc)
                    if sent:
                        raise EngineError(
                            f"{unavailable(self.name, transport_cause(exc))} after audio was "
                            "sent",
                            retryable=False,
                        ) from exc
                    last = Retryable(transport_cause(exc))
                    continue
                except MalformedResponse:
                    self.breaker.record_failure()  # the upstream is what is broken
                    raise
                except EngineError:
                    self.breaker.record_success()  # 4xx: healthy upstream rejecting our request
                    raise
                except aiohttp.ClientError as exc:
                    log.warning("%s: request to %s failed: %r", self.name, self.endpoint, exc)
                    raise EngineError(
                        unavailable(self.name, REQUEST_FAILED), retryable=False
                    ) from exc
                except (GeneratorExit, asyncio.CancelledError):
                    # The consumer stopped (barge-in); not the upstream's fault. Audio flowing
                    # means it was healthy; otherwise the outcome is unknown and not recorded.
                    if sent:
                        self.breaker.record_success()
                    raise
                self.breaker.record_success()
                return
        raise EngineError(
            f"{unavailable(self.name, str(last))} after {self.cfg.retries + 1} attempts"
        ) from last

    def _backoff(self, attempt: int, last: Exception | None) -> float:
        delay = self._backoff_s * 2.0 ** (attempt - 1)
        delay *= 0.5 + self._jitter.random() / 2  # spreads retries of sessions failing together
        if isinstance(last, Retryable) and last.retry_after is not None:
            delay = max(delay, last.retry_after)
        return min(delay, self.cfg.timeout_s)

    async def _attempt(
        self, session: aiohttp.ClientSession, body: bytes
    ) -> AsyncGenerator[bytes, None]:
        headers = {"Content-Type": "application/json"}
        if not TRACING.on:
            async with session.post(self.endpoint, data=body, headers=headers) as resp, \
                    contextlib.aclosing(self._audio(resp)) as audio:
                async for pcm in audio:
                    yield pcm
            return
        # Not made current: a generator's context may be left at any yield.
        span = tracing.client_span("upstream.tts", self.endpoint, headers=headers,
                                   attributes={"streamgate.model": self.name,
                                               "streamgate.request_bytes": len(body)})
        status: int | None = None
        try:
            async with session.post(self.endpoint, data=body, headers=headers) as resp, \
                    contextlib.aclosing(self._audio(resp)) as audio:
                status = resp.status
                async for pcm in audio:
                    yield pcm
        except (GeneratorExit, asyncio.CancelledError):
            span.set_attribute("streamgate.cancelled", True)  # the consumer stopped: barge-in
            tracing.end_client_span(span, status=status)
            raise
        except BaseException as exc:
            tracing.end_client_span(span, status=status, failure=exc)
            raise
        tracing.end_client_span(span, status=status)

    async def _audio(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        """The audio of one answer, as it arrives; its failures are the attempt's."""
        if resp.status == 429 or resp.status >= 500:
            retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
            raise Retryable(bad_status(resp.status), retry_after)
        if resp.status != 200:
            snippet = (await resp.content.read(200)).decode("utf-8", "replace")
            log.warning("%s: %s answered HTTP %d: %s", self.name, self.endpoint,
                        resp.status, snippet)
            raise EngineError(rejected(self.name, resp.status), retryable=False)
        if resp.content_type in ("application/json", "text/html", "text/plain"):
            raise self._bad_response(f"200 with {resp.content_type}, not audio")
        decoder: _PcmDecoder | StreamDecoder
        if self.cfg.response_format == "pcm":
            decoder = _PcmDecoder()
        else:
            decoder = StreamDecoder("wav", self.sample_rate)
        async for data in resp.content.iter_chunked(READ_BYTES):
            pcm = self._decode(decoder, data)
            if pcm:
                yield pcm

    def _decode(self, decoder: _PcmDecoder | StreamDecoder, data: bytes) -> bytes:
        if isinstance(decoder, _PcmDecoder):
            return decoder.decode(data)
        try:
            samples = decoder.decode(data)
        except AudioFormatError as exc:
            raise self._bad_response(f"bad WAV: {exc}") from exc
        if decoder.header_complete and decoder.sample_rate != self.sample_rate:
            raise self._bad_response(
                f"WAV is {decoder.sample_rate} Hz, configured sample_rate is {self.sample_rate}"
            )
        return samples.tobytes()

    def _bad_response(self, detail: str) -> MalformedResponse:
        log.warning("%s: %s sent a bad response: %s", self.name, self.endpoint, detail)
        return MalformedResponse(unavailable(self.name, BAD_RESPONSE))
