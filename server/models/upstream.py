"""Upstream ASR over an OpenAI-compatible HTTP API (faster-whisper servers, vLLM, hosted APIs).

Whole-utterance only: feed() buffers PCM (bounded), finish() posts one WAV to
POST {url}/v1/audio/transcriptions and maps `text` + `words` to a Hypothesis. Around the call:
a per-attempt timeout, bounded retries with exponential backoff for failures that may pass
(connection errors, timeouts, 429, 5xx; never other 4xx), a concurrency bound, and a circuit
breaker so a dead upstream costs callers nothing but an immediate EngineUnavailable.

Error messages reach clients (the ASR `error` frame): they name the model and a cause from
server/models/upstream_errors.py; hosts, ports, exceptions and upstream bodies are logged only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct

import aiohttp
import msgspec

from server.config import UpstreamModelConfig
from server.models.base import (
    EngineError,
    EngineUnavailable,
    Hypothesis,
    TranscriptionStream,
    WordTiming,
)
from server.models.breaker import BreakerState, CircuitBreaker
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
from server.telemetry.tracing import TRACING

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MAX_UTTERANCE_S = 30
MAX_UTTERANCE_BYTES = MAX_UTTERANCE_S * SAMPLE_RATE * 2
# A transcript of 30 s of audio is a few kB; anything near this is not a transcript.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Upstreams that do not report per-word confidence (OpenAI does not) get this value.
DEFAULT_WORD_CONFIDENCE = 1.0


def wav_bytes(pcm: bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM wrapped in the canonical 44-byte RIFF/WAVE header."""
    if len(pcm) % 2:
        pcm = pcm[:-1]
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(pcm),
        b"WAVE",
        b"fmt ",
        16,  # fmt chunk size
        1,  # PCM
        1,  # channels
        sample_rate,
        sample_rate * 2,  # byte rate
        2,  # block align
        16,  # bits per sample
        b"data",
        len(pcm),
    )
    return header + pcm


class MalformedResponse(EngineError):
    """The upstream answered 200 with something that is not a transcription."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class _Word(msgspec.Struct):
    word: str
    start: float
    end: float
    probability: float | None = None  # faster-whisper servers add it


class _Transcription(msgspec.Struct):
    text: str
    words: list[_Word] | None = None


_decoder = msgspec.json.Decoder(_Transcription)


def parse_transcription(body: bytes) -> Hypothesis:
    try:
        data = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedResponse(f"upstream sent a malformed transcription: {exc}") from exc
    words = [
        WordTiming(
            word=w.word.strip(),  # whisper prefixes words with a space
            start_ms=round(w.start * 1000),
            end_ms=round(w.end * 1000),
            confidence=(
                DEFAULT_WORD_CONFIDENCE
                if w.probability is None
                else min(1.0, max(0.0, w.probability))
            ),
        )
        for w in data.words or ()
    ]
    return Hypothesis(text=data.text.strip(), words=words)


class UpstreamTranscriber:
    def __init__(self, name: str, cfg: UpstreamModelConfig) -> None:
        if cfg.max_concurrency < 1 or cfg.retries < 0:
            raise ValueError("max_concurrency must be >= 1 and retries >= 0")
        self.name = name
        self.sample_rate = SAMPLE_RATE
        self.supports_interim = False
        self.cfg = cfg
        self.endpoint = cfg.url.rstrip("/") + "/v1/audio/transcriptions"
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s)
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {}
        self._jitter = random.Random()

    @property
    def breaker_state(self) -> BreakerState:
        return self.breaker.state

    async def start(self) -> None:
        if self._session is not None:
            return
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                # Fail at start-up, like any other bad config, not as 401s in every session.
                raise EngineError(
                    f"{self.name}: environment variable {self.cfg.api_key_env} is not set",
                    retryable=False,
                )
            self._headers = {"Authorization": f"Bearer {key}"}
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            headers=self._headers,
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def open_stream(
        self, *, language: str, session_id: str, utterance_id: int
    ) -> TranscriptionStream:
        return _UpstreamStream(self, language)

    async def transcribe(self, pcm: bytes, language: str = "") -> Hypothesis:
        """One utterance of 16 kHz PCM -> final hypothesis, with retries and the breaker."""
        if self._session is None:
            raise EngineUnavailable(unavailable(self.name, NOT_RUNNING))
        wav = wav_bytes(pcm)
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            # Cheap check first so an open circuit fails fast without queueing on the
            # semaphore (or sleeping a backoff); allow() is asked only once a slot is held,
            # because a half-open trial must not be spent while waiting for one.
            if self.breaker.state == "open":
                raise EngineUnavailable(unavailable(self.name, CIRCUIT_OPEN)) from last
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last))
            async with self._sem:
                if not self.breaker.allow():
                    raise EngineUnavailable(unavailable(self.name, CIRCUIT_OPEN)) from last
                try:
                    hyp = await self._attempt(wav, language)
                except Retryable as exc:
                    self.breaker.record_failure()
                    last = exc
                    log.warning("%s: attempt %d at %s failed: %s (%r)", self.name, attempt + 1,
                                self.endpoint, exc, exc.__cause__)
                    continue
                except MalformedResponse:
                    # Not retried (the same input would get the same answer), but it is the
                    # upstream that is broken, so it counts against the circuit.
                    self.breaker.record_failure()
                    raise
                except EngineError:
                    # 4xx: the upstream is healthy and answering; it is our request it rejects.
                    self.breaker.record_success()
                    raise
                self.breaker.record_success()
                return hyp
        raise EngineError(
            f"{unavailable(self.name, str(last))} after {self.cfg.retries + 1} attempts"
        ) from last

    def _backoff(self, attempt: int, last: Exception | None) -> float:
        delay = self.cfg.backoff_s * 2.0 ** (attempt - 1)
        # Jitter spreads the retries of many sessions that failed together.
        delay *= 0.5 + self._jitter.random() / 2
        if isinstance(last, Retryable) and last.retry_after is not None:
            delay = max(delay, last.retry_after)
        return min(delay, self.cfg.timeout_s)

    async def _attempt(self, wav: bytes, language: str) -> Hypothesis:
        if not TRACING.on:
            return await self._post(wav, language, None)
        headers: dict[str, str] = {}
        span = tracing.client_span("upstream.asr", self.endpoint, headers=headers,
                                   attributes={"streamgate.model": self.name,
                                               "streamgate.audio_bytes": len(wav)})
        try:
            hyp = await self._post(wav, language, headers)
        except BaseException as exc:
            tracing.end_client_span(span, failure=exc)
            raise
        tracing.end_client_span(span, status=200)
        return hyp

    async def _post(self, wav: bytes, language: str,
                    headers: dict[str, str] | None) -> Hypothesis:
        """One attempt; `headers` carry the trace on (`traceparent`) when tracing is on."""
        session = self._session
        if session is None:
            raise EngineUnavailable(unavailable(self.name, NOT_RUNNING))
        # FormData is single-use in aiohttp, so it is rebuilt per attempt.
        form = aiohttp.FormData()
        form.add_field("file", wav, filename="audio.wav", content_type="audio/wav")
        form.add_field("model", self.cfg.upstream_model)
        form.add_field("response_format", "verbose_json")
        form.add_field("timestamp_granularities[]", "word")
        if language:
            form.add_field("language", language.split("-")[0].lower())  # ISO 639-1
        try:
            async with session.post(self.endpoint, data=form, headers=headers) as resp:
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                status = resp.status
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise Retryable(TIMEOUT) from exc  # the retry loop logs the cause's details
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise Retryable(transport_cause(exc)) from exc
        except aiohttp.ClientError as exc:
            log.warning("%s: request to %s failed: %r", self.name, self.endpoint, exc)
            raise EngineError(unavailable(self.name, REQUEST_FAILED), retryable=False) from exc
        if status == 429 or status >= 500:
            raise Retryable(bad_status(status), retry_after)
        if status != 200:
            log.warning("%s: %s answered HTTP %d: %s", self.name, self.endpoint, status,
                        body[:200].decode("utf-8", "replace"))
            raise EngineError(rejected(self.name, status), retryable=False)
        try:
            if len(body) > MAX_RESPONSE_BYTES:
                raise MalformedResponse(f"response larger than {MAX_RESPONSE_BYTES} bytes")
            return parse_transcription(body)
        except MalformedResponse as exc:
            log.warning("%s: %s sent a bad response: %s", self.name, self.endpoint, exc)
            raise MalformedResponse(unavailable(self.name, BAD_RESPONSE)) from exc


class _UpstreamStream:
    __slots__ = ("_buf", "_closed", "_engine", "_language")

    def __init__(self, engine: UpstreamTranscriber, language: str) -> None:
        self._engine = engine
        self._language = language
        self._buf = bytearray()
        self._closed = False

    async def feed(self, pcm: bytes) -> Hypothesis | None:
        if self._closed:
            raise EngineError("stream is closed", retryable=False)
        if len(self._buf) + len(pcm) > MAX_UTTERANCE_BYTES:
            raise EngineError(
                f"utterance longer than {MAX_UTTERANCE_S} s for upstream engine", retryable=False
            )
        self._buf += pcm
        return None

    async def finish(self) -> Hypothesis:
        if self._closed:
            raise EngineError("stream is closed", retryable=False)
        self._closed = True
        pcm, self._buf = bytes(self._buf), bytearray()
        if len(pcm) < 2:
            return Hypothesis(text="")  # nothing to send; do not spend an upstream call
        return await self._engine.transcribe(pcm, self._language)

    async def aclose(self) -> None:
        self._closed = True
        self._buf = bytearray()
