"""Traces (OpenTelemetry), off by default and free when off (docs/observability.md).

Every call site guards its span work with one attribute check, `if TRACING.on:`, so a server
with tracing off builds no span, no context and no attribute dict: the hot path pays one
attribute load per guarded place, which loadtest/tracing_cost.py measures against a build of
the same path with the guard removed.

The parent of everything a connection does is the client's W3C `traceparent` (on the WebSocket
upgrade or the HTTP request) when it sent one; every upstream HTTP call carries ours on, so a
model server that traces joins the same trace. Spans of a session are parented explicitly
(`parent=`), never through whatever context the loop's callbacks happen to run in; inside a
session's own tasks its span is made current once (`activate`), so log lines and upstream calls
made from them find it.

Sampling: `sample_ratio` of traces, a client's too (its sampled flag is followed only with
`follow_client_sampled`: otherwise any client could have every session traced), and with
`always_sample_errors` the others are still recorded (not exported) so that a span that ends in
error is exported on its own. Decision 17T1 says why the SDK and not a hand-rolled tracer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import TracebackType
from typing import Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from server.config import TracingConfig

log = logging.getLogger("streamgate.tracing")

ExporterName = Literal["none", "console", "otlp"]
_propagator = TraceContextTextMapPropagator()

__all__ = ["TRACING", "ClientCall", "Context", "Span", "SpanKind", "Tracing", "activate", "child",
           "current_context", "error", "inject", "maybe_child", "parent_from_headers",
           "parent_from_values", "start_span", "trace_id_of", "wall_ns_at"]


class _RecordOnly(Sampler):
    """Records what the ratio left out, without exporting it: its error spans can still be
    exported (`_SampledOrErrors`)."""

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[trace.Link] | None = None,
                      trace_state: trace.TraceState | None = None) -> SamplingResult:
        return SamplingResult(Decision.RECORD_ONLY, attributes, trace_state)

    def get_description(self) -> str:
        return "RecordOnly"


class _RatioOrRecord(Sampler):
    def __init__(self, ratio: float) -> None:
        self._ratio = TraceIdRatioBased(ratio)
        self._record = _RecordOnly()

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[trace.Link] | None = None,
                      trace_state: trace.TraceState | None = None) -> SamplingResult:
        result = self._ratio.should_sample(parent_context, trace_id, name, kind, attributes,
                                           links, trace_state)
        if result.decision is Decision.DROP:
            return self._record.should_sample(parent_context, trace_id, name, kind, attributes,
                                              links, trace_state)
        return result

    def get_description(self) -> str:
        return f"RatioOrRecord{{{self._ratio.get_description()}}}"


def _as_sampled(span: ReadableSpan) -> ReadableSpan:
    ctx = span.context
    assert ctx is not None
    sampled = trace.SpanContext(ctx.trace_id, ctx.span_id, ctx.is_remote,
                                trace.TraceFlags(trace.TraceFlags.SAMPLED), ctx.trace_state)
    return ReadableSpan(name=span.name, context=sampled, parent=span.parent,
                        resource=span.resource, attributes=span.attributes, events=span.events,
                        links=span.links, kind=span.kind, status=span.status,
                        start_time=span.start_time, end_time=span.end_time,
                        instrumentation_scope=span.instrumentation_scope)


class _SampledOrErrors(SpanProcessor):
    """Exports sampled spans, and the error spans of traces the ratio did not sample."""

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: trace.Span, parent_context: Context | None = None) -> None:
        return

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is not None and ctx.trace_flags.sampled:
            self._inner.on_end(span)
        elif span.status.status_code is StatusCode.ERROR:
            self._inner.on_end(_as_sampled(span))

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class Tracing:
    """The process's tracing switch and tracer. `on` is the one attribute every call site
    checks; the rest is only touched when it is true."""

    __slots__ = ("_provider", "on", "tracer")

    def __init__(self) -> None:
        self.on = False
        self._provider: TracerProvider | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()

    def configure(self, *, enabled: bool, sample_ratio: float = 1.0,
                  follow_client_sampled: bool = False, always_sample_errors: bool = True,
                  exporter: ExporterName = "none",
                  endpoint: str = "", service_name: str = "streamgate",
                  span_exporter: SpanExporter | None = None) -> None:
        """Switch tracing on (or off) for the process. `span_exporter` (tests: the SDK's
        InMemorySpanExporter) is exported to synchronously instead of `exporter`."""
        self.shutdown()
        if not enabled:
            return
        ratio = min(1.0, max(0.0, sample_ratio))
        if ratio >= 1.0:
            root: Sampler = ALWAYS_ON
        elif always_sample_errors:
            root = _RatioOrRecord(ratio)
        else:
            root = TraceIdRatioBased(ratio)
        # A client's sampled flag is a wish, from anyone: by default the ratio decides (by
        # trace id: a client's trace is kept or left out whole, on every node alike).
        client_sampled = ALWAYS_ON if follow_client_sampled else root
        if always_sample_errors:
            # A parent that was not sampled (ours, or a client's `traceparent` with flag 0):
            # recorded too, so its error spans are exported.
            sampler: Sampler = ParentBased(root, remote_parent_sampled=client_sampled,
                                           remote_parent_not_sampled=_RecordOnly(),
                                           local_parent_not_sampled=_RecordOnly())
        else:
            sampler = ParentBased(root, remote_parent_sampled=client_sampled)
        provider = TracerProvider(sampler=sampler,
                                  resource=Resource.create({"service.name": service_name}))
        processor = _processor(span_exporter, exporter, endpoint)
        if processor is not None:
            provider.add_span_processor(_SampledOrErrors(processor))
        self._provider = provider
        self.tracer = provider.get_tracer("streamgate")
        self.on = True

    def shutdown(self) -> None:
        """Flush and stop the exporter; tracing is off afterwards."""
        self.on = False
        self.tracer = trace.NoOpTracer()
        provider, self._provider = self._provider, None
        if provider is not None:
            provider.shutdown()

    def force_flush(self) -> None:
        if self._provider is not None:
            self._provider.force_flush()


def _processor(span_exporter: SpanExporter | None, name: ExporterName,
               endpoint: str) -> SpanProcessor | None:
    if span_exporter is not None:
        return SimpleSpanProcessor(span_exporter)
    if name == "none":
        return None  # spans are made (ids in logs and `ready`) but go nowhere
    if name == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    return BatchSpanProcessor(_otlp_exporter(endpoint))


def _otlp_exporter(endpoint: str) -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise RuntimeError("tracing.exporter = \"otlp\" needs the OTLP exporter: "
                           "pip install 'streamgate[otlp]'") from exc
    exporter: SpanExporter = OTLPSpanExporter(endpoint=endpoint) if endpoint \
        else OTLPSpanExporter()
    return exporter


TRACING = Tracing()


# --- helpers for call sites (only called when TRACING.on) ------------------------------------


def parent_from_headers(headers: Mapping[str, str]) -> Context | None:
    """The context a client's `traceparent` header names, or None (a new trace)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    parent, state = lowered.get("traceparent"), lowered.get("tracestate")
    return parent_from_values([parent] if parent is not None else [],
                              [state] if state is not None else [])


def parent_from_values(traceparent: Sequence[str], tracestate: Sequence[str]) -> Context | None:
    """The context of a client's trace headers (every value each was sent with), or None: a
    new trace of our own. Never raises: a client's headers may be anything, from anyone (this
    runs before the key is checked). One `traceparent` (two: ambiguous, ignored), of the W3C
    size; `tracestate` members joined (W3C allows several headers), dropped whole when over
    the W3C bounds or malformed (the SDK would log the client's text at WARNING)."""
    if len(traceparent) != 1 or len(traceparent[0]) > MAX_TRACEPARENT_CHARS:
        return None
    carrier = {"traceparent": traceparent[0]}
    state = ",".join(tracestate)
    if state and _valid_tracestate(state):
        carrier["tracestate"] = state
    try:
        ctx = _propagator.extract(carrier)
    except Exception:  # the propagator's own parsing: nothing a client sends may refuse it
        return None
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None  # malformed: start a trace of our own
    return ctx


# W3C trace context: version 00's traceparent is 55 characters (later versions may append);
# tracestate at most 32 members and 512 characters are what a vendor must propagate.
MAX_TRACEPARENT_CHARS = 128
MAX_TRACESTATE_CHARS = 512
MAX_TRACESTATE_MEMBERS = 32
_TRACESTATE_MEMBER = re.compile(
    r"[a-z0-9][_0-9a-z\-*/]{0,255}(@[a-z][_0-9a-z\-*/]{0,13})?="
    r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


def _valid_tracestate(state: str) -> bool:
    if len(state) > MAX_TRACESTATE_CHARS:
        return False
    members = [m.strip(" \t") for m in state.split(",")]
    members = [m for m in members if m]
    return len(members) <= MAX_TRACESTATE_MEMBERS and all(
        _TRACESTATE_MEMBER.fullmatch(m) for m in members)


def start_span(name: str, *, parent: Span | Context | None = None,
               kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes = None,
               start_ns: int | None = None) -> Span:
    """A span under `parent` (a span, a context, or None: the current context)."""
    ctx = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
    return TRACING.tracer.start_span(name, context=ctx, kind=kind, attributes=attributes,
                                     start_time=start_ns)


@contextmanager
def child(name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes = None,
          parent: Context | None = None) -> Iterator[Span]:
    """A span under the current one (or `parent`), current while the block runs, ended after
    it (an exception escaping the block marks it as an error)."""
    with TRACING.tracer.start_as_current_span(name, context=parent, kind=kind,
                                              attributes=attributes) as span:
        yield span


_NO_SPAN: AbstractContextManager[None] = nullcontext()


def maybe_child(name: str, *, kind: SpanKind = SpanKind.INTERNAL,
                attributes: Attributes = None) -> AbstractContextManager[Span | None]:
    """`child(...)` when tracing is on, else a shared do-nothing context (no span is built):
    for places that run per request or per session, not per frame."""
    if TRACING.on:
        return child(name, kind=kind, attributes=attributes)
    return _NO_SPAN


def activate(span: Span) -> None:
    """Make `span` current for the rest of the running task (its own context: the task's
    creator is not affected). Log lines and upstream calls made from the task then carry it."""
    otel_context.attach(trace.set_span_in_context(span))


def inject(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) of the current span to an outgoing request."""
    _propagator.inject(headers)


def client_span(name: str, url: str, *, attributes: Mapping[str, str | int] | None = None,
                headers: MutableMapping[str, str] | None = None) -> Span:
    """The span of one outgoing HTTP call, under the current span; with `headers`, its
    `traceparent` is added to them, so the server called makes its spans children of it. Not
    made current (the caller ends it: `end_client_span`)."""
    span = TRACING.tracer.start_span(name, kind=SpanKind.CLIENT,
                                     attributes={"url.full": url, **(attributes or {})})
    if headers is not None:
        _propagator.inject(headers, context=trace.set_span_in_context(span))
    return span


class ClientCall:
    """One outgoing HTTP call's client span, as a `with` block, made only with tracing on: its
    `traceparent` goes into `headers` (the server called joins the trace); set `status` once
    the response's status is known. The block's exception (a cancellation: `cancelled`)
    ends it as `end_client_span` says."""

    __slots__ = ("span", "status")

    def __init__(self, name: str, url: str, headers: dict[str, str],
                 attributes: Mapping[str, str | int] | None = None) -> None:
        self.span = client_span(name, url, headers=headers, attributes=attributes) \
            if TRACING.on else None
        self.status: int | None = None

    def __enter__(self) -> ClientCall:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.span is not None:
            end_client_span(self.span, status=self.status, failure=exc)


def end_client_span(span: Span, *, status: int | None = None,
                    failure: BaseException | None = None) -> None:
    """End an outgoing call's span. A call cut off by its caller (cancelled: the client went,
    a barge-in, a deadline elsewhere) is `streamgate.cancelled`, not an error: an error span
    is exported even from an unsampled trace."""
    if isinstance(failure, asyncio.CancelledError | GeneratorExit):
        span.set_attribute("streamgate.cancelled", True)
        failure = None
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if failure is not None:
        error(span, f"{type(failure).__name__}: {failure}"[:200])
    elif status is not None and status >= 400:
        error(span, f"HTTP {status}")
    span.end()


def error(span: Span, description: str) -> None:
    span.set_status(Status(StatusCode.ERROR, description))


def trace_id_of(span: Span) -> str:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def wall_ns_at(monotonic_s: float, now_monotonic_s: float) -> int:
    """The wall-clock time (ns since the epoch, what spans carry) of a moment of a monotonic
    clock, given that clock's reading now."""
    return time.time_ns() - int((now_monotonic_s - monotonic_s) * 1e9)


def current_context() -> Context:
    """The context current here (its span: what a span started later should hang under)."""
    return otel_context.get_current()


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span, for log lines; None when there is none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def configure_from(cfg: TracingConfig) -> None:
    """Tracing as the `[tracing]` section says (server start-up)."""
    TRACING.configure(enabled=cfg.enabled, sample_ratio=cfg.sample_ratio,
                      follow_client_sampled=cfg.follow_client_sampled,
                      always_sample_errors=cfg.always_sample_errors, exporter=cfg.exporter,
                      endpoint=cfg.endpoint)
    if cfg.enabled:
        log.info("tracing on", extra={"sample_ratio": cfg.sample_ratio,
                                      "exporter": cfg.exporter})
