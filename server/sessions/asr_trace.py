"""The spans of one ASR session (made only when tracing is on: the runner holds None
otherwise and checks that once per engine call).

    asr.session                       the session, ready -> closed
      asr.utterance  (one per utterance) its first audio to the engine -> its final
        asr.engine.feed / .finish     each engine call: batch size, wait in the micro-batcher
          upstream.asr                an upstream engine's HTTP call (server/models/upstream.py)

The session span's parent is whatever is current when the runner starts: the upgrade's span
(server/ws/server.py), an HTTP request's, or a phone call's.
"""

from __future__ import annotations

import time
from contextvars import Token

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context

from server.models.batcher import CallStats
from server.sessions.asr import EngineFeed, EngineRequest
from server.telemetry import tracing
from server.telemetry.tracing import Span

# Utterances whose spans are open at once; a session that opens more (an engine that never
# answers finals) ends the oldest: a trace's memory stays bounded like everything else.
MAX_OPEN_UTTERANCES = 64


class AsrTrace:
    __slots__ = ("_calls", "_utterances", "session")

    def __init__(self, session: Span) -> None:
        self.session = session
        self._utterances: dict[int, Span] = {}
        self._calls: dict[int, Token[Context]] = {}  # engine span id -> its context token

    @classmethod
    def start(cls, *, session_id: str, model: str, tenant_id: str, kind: str) -> AsrTrace:
        span = tracing.start_span(f"{kind}.session", attributes={
            "streamgate.session_id": session_id, "streamgate.model": model,
            "streamgate.tenant_id": tenant_id})
        return cls(span)

    @property
    def trace_id(self) -> str:
        return tracing.trace_id_of(self.session)

    def _utterance(self, utterance_id: int) -> Span:
        span = self._utterances.get(utterance_id)
        if span is None:
            if len(self._utterances) >= MAX_OPEN_UTTERANCES:
                oldest = next(iter(self._utterances))
                self._utterances.pop(oldest).end()
            span = self._utterances[utterance_id] = tracing.start_span(
                "asr.utterance", parent=self.session,
                attributes={"streamgate.utterance_id": utterance_id})
        return span

    def engine_call(self, req: EngineRequest) -> Span:
        """The span of one engine call, current in the calling task until `call_done` (an
        upstream engine's HTTP call is its child and carries it on in `traceparent`)."""
        op = "feed" if isinstance(req, EngineFeed) else "finish"
        attributes: dict[str, int | str] = {"streamgate.utterance_id": req.utterance_id}
        if isinstance(req, EngineFeed):
            attributes["streamgate.audio_bytes"] = len(req.pcm)
        span = tracing.start_span(f"asr.engine.{op}", parent=self._utterance(req.utterance_id),
                                  attributes=attributes)
        self._calls[id(span)] = otel_context.attach(trace.set_span_in_context(span))
        return span

    def call_done(self, span: Span, stats: CallStats) -> None:
        token = self._calls.pop(id(span), None)
        if token is not None:
            otel_context.detach(token)
        if stats.batch_size:
            span.set_attribute("streamgate.batch.size", stats.batch_size)
            span.set_attribute("streamgate.batch.wait_ms", round(stats.queue_s * 1000, 3))
        span.end()

    def final(self, utterance_id: int, *, latency_s: float, engine_s: float, queue_s: float,
              text: str) -> None:
        span = self._utterances.pop(utterance_id, None)
        if span is None:
            return
        # When the VAD ended the utterance: the part of the span after it is the turn's wait.
        ended = time.time_ns() - int(latency_s * 1e9)
        span.add_event("end_of_speech", timestamp=ended)
        span.set_attributes({
            "streamgate.end_of_speech_to_final_ms": round(latency_s * 1000),
            "streamgate.engine_ms": round(engine_s * 1000),
            "streamgate.queue_ms": round(queue_s * 1000),
            "streamgate.text_chars": len(text)})
        span.end()

    def failed(self, utterance_id: int, message: str) -> None:
        span = self._utterances.pop(utterance_id, None)
        if span is not None:
            tracing.error(span, message)
            span.end()

    def close(self, code: int, *, audio_ms: int, dropped_ms: int) -> None:
        for span in self._utterances.values():
            span.set_attribute("streamgate.abandoned", True)
            span.end()
        self._utterances.clear()
        session = self.session
        session.set_attributes({"streamgate.close_code": code, "streamgate.audio_ms": audio_ms,
                                "streamgate.dropped_ms": dropped_ms})
        if code == 1011:
            tracing.error(session, "internal error")
        session.end()
