"""The tracing switch (server/telemetry/tracing.py): off builds nothing, on exports the spans
the sampling says, a client's `traceparent` is the parent, log lines carry the ids."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from server.config import ConfigError, load_config
from server.telemetry import tracing
from server.telemetry.logging import JsonFormatter
from server.telemetry.tracing import TRACING

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


def test_off_by_default_and_makes_no_span() -> None:
    cfg = load_config(environ={})
    assert cfg.tracing.enabled is False
    tracing.configure_from(cfg.tracing)
    assert TRACING.on is False
    span = tracing.start_span("x")
    assert not span.is_recording()  # the no-op tracer: nothing is built or exported


def test_sample_ratio_is_checked() -> None:
    with pytest.raises(ConfigError, match="sample_ratio"):
        load_config(environ={"STREAMGATE_TRACING__SAMPLE_RATIO": "1.5"})


def test_client_traceparent_is_the_parent(spans: InMemorySpanExporter) -> None:
    parent = tracing.parent_from_headers({"Traceparent": CLIENT_PARENT})
    span = tracing.start_span("ws.upgrade", parent=parent)
    assert tracing.trace_id_of(span) == CLIENT_TRACE
    span.end()
    (done,) = spans.get_finished_spans()
    assert done.parent is not None and done.parent.span_id == 0x00F067AA0BA902B7
    assert tracing.parent_from_headers({"traceparent": "garbage"}) is None
    assert tracing.parent_from_headers({}) is None


def test_inject_carries_the_current_span(spans: InMemorySpanExporter) -> None:
    headers: dict[str, str] = {}
    with tracing.child("upstream.asr") as span:
        tracing.inject(headers)
    ctx = span.get_span_context()
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled


def test_ratio_zero_still_exports_errors() -> None:
    exporter = InMemorySpanExporter()
    TRACING.configure(enabled=True, sample_ratio=0.0, always_sample_errors=True,
                      span_exporter=exporter)
    try:
        ok = tracing.start_span("fine")
        ok.end()
        bad = tracing.start_span("broken", parent=ok)
        tracing.error(bad, "engine failed")
        bad.end()
        assert [s.name for s in exporter.get_finished_spans()] == ["broken"]
    finally:
        TRACING.shutdown()
    exporter = InMemorySpanExporter()
    TRACING.configure(enabled=True, sample_ratio=0.0, always_sample_errors=False,
                      span_exporter=exporter)
    try:
        bad = tracing.start_span("broken")
        tracing.error(bad, "engine failed")
        bad.end()
        assert exporter.get_finished_spans() == ()
    finally:
        TRACING.shutdown()


def _line(message: str) -> dict[str, object]:
    record = logging.LogRecord("streamgate.test", logging.INFO, __file__, 1, message, None, None)
    out: dict[str, object] = json.loads(JsonFormatter().format(record))
    return out


def test_log_lines_carry_trace_and_span_ids(spans: InMemorySpanExporter) -> None:
    assert "trace_id" not in _line("outside any span")
    with tracing.child("asr.session") as span:
        line = _line("inside")
    ctx = span.get_span_context()
    assert line["trace_id"] == f"{ctx.trace_id:032x}"
    assert line["span_id"] == f"{ctx.span_id:016x}"


# --- a client's trace headers: anything, from anyone (before the key is checked) -------------


def test_trace_headers_the_client_may_send_never_refuse_and_never_echo(
        spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture) -> None:
    """Review of issue 17: two `traceparent` headers made websockets' Headers raise and the
    upgrade answered 500; a malformed `tracestate` was logged verbatim at WARNING by the SDK."""
    values = tracing.parent_from_values
    assert values([CLIENT_PARENT, CLIENT_PARENT], []) is None  # ambiguous: a trace of our own
    assert values([CLIENT_PARENT + "-" + "f" * 200], []) is None  # over the W3C size
    assert values(["\x00\xff not a traceparent"], ["\x00"]) is None
    kept = values([CLIENT_PARENT], ["vendor=abc", "other@sys=1"])  # two headers: joined
    assert kept is not None
    state = trace.get_current_span(kept).get_span_context().trace_state
    assert dict(state) == {"vendor": "abc", "other@sys": "1"}
    junk = "x" * 7000 + " <script>"
    with caplog.at_level(logging.DEBUG):
        for bad in (junk, "=", ",".join(f"k{i}=v" for i in range(33))):
            ctx = values([CLIENT_PARENT], [bad])
            assert ctx is not None  # the parent is followed, the state dropped
            assert not trace.get_current_span(ctx).get_span_context().trace_state
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


def test_a_cancelled_outgoing_call_is_not_an_error(spans: InMemorySpanExporter) -> None:
    """A call cut off by its caller (the client went, a barge-in) is marked cancelled: an
    ERROR span would be exported even from an unsampled trace."""
    span = tracing.client_span("upstream.asr", "http://model")
    tracing.end_client_span(span, failure=asyncio.CancelledError())
    (done,) = spans.get_finished_spans()
    assert done.attributes is not None and done.attributes["streamgate.cancelled"] is True
    assert done.status.status_code is not StatusCode.ERROR


@pytest.mark.parametrize("follow", [False, True])
def test_a_clients_sampled_flag_decides_only_when_told_to(follow: bool) -> None:
    """The sampled flag comes from anyone: by default the ratio decides a client's trace too
    (ratio 0 here: nothing sampled); `follow_client_sampled` makes the flag decide."""
    exporter = InMemorySpanExporter()
    TRACING.configure(enabled=True, sample_ratio=0.0, follow_client_sampled=follow,
                      always_sample_errors=False, span_exporter=exporter)
    try:
        span = tracing.start_span("ws.upgrade",
                                  parent=tracing.parent_from_headers({"traceparent":
                                                                      CLIENT_PARENT}))
        span.end()
    finally:
        TRACING.shutdown()
    assert len(exporter.get_finished_spans()) == (1 if follow else 0)
