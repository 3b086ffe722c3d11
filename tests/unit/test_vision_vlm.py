"""The extraction harness against fake OpenAI-compatible upstreams over real HTTP: validation,
the repair loop, fallback to OCR text + a text model, provenance and the circuit breaker."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.config import VisionConfig, VisionUpstreamConfig
from server.telemetry import tracing
from server.vision.chat import ChatUpstream, UpstreamError
from server.vision.ocr import OcrWord
from server.vision.schema import compile_schema
from server.vision.vlm import (
    ExtractionFailed,
    ExtractionUnavailable,
    Extractor,
    PageEvidence,
)
from tests.fakes.upstream import (
    FakeLlmUpstream,
    FakeVisionUpstream,
    LlmReply,
    closed_port_url,
    image_urls,
)

SCHEMA = compile_schema({
    "type": "object",
    "properties": {"item": {"type": "string"}, "price": {"type": "number"},
                   "qty": {"type": "integer"}},
    "required": ["item", "price"],
})
PNG = b"\x89PNG\r\n\x1a\nfake-page"
PAGE = PageEvidence(
    number=1, png=PNG, text="Item Qty Price\nPears 17 2.25",
    words=[OcrWord("Pears", 95.0, (100, 300, 190, 330)), OcrWord("17", 95.0, (520, 300, 550, 330)),
           OcrWord("2.25", 95.0, (900, 300, 960, 330))],
)


def upstream_cfg(url: str, **extra: Any) -> VisionUpstreamConfig:
    settings: dict[str, Any] = {"timeout_s": 2.0, "retries": 0, "backoff_s": 0.01, **extra}
    return VisionUpstreamConfig(enabled=True, url=url, model="m", **settings)


@pytest.fixture
async def vlm_fake() -> AsyncIterator[FakeVisionUpstream]:
    async with FakeVisionUpstream() as fake:
        yield fake


@pytest.fixture
async def text_fake() -> AsyncIterator[FakeLlmUpstream]:
    fake = FakeLlmUpstream("text")
    await fake.start()
    try:
        yield fake
    finally:
        await fake.aclose()


async def extractor(vlm_url: str | None, text_url: str | None, **extra: Any
                    ) -> tuple[Extractor, list[ChatUpstream]]:
    vlm = ChatUpstream("vlm", upstream_cfg(vlm_url, **extra)) if vlm_url else None
    text = ChatUpstream("text", upstream_cfg(text_url, **extra)) if text_url else None
    models = [m for m in (vlm, text) if m is not None]
    for m in models:
        await m.start()
    return Extractor(VisionConfig(extraction_attempts=3), vlm, text), models


async def close(models: list[ChatUpstream]) -> None:
    for m in models:
        await m.aclose()


async def test_valid_first_answer_sends_the_page_image_and_schema(
        vlm_fake: FakeVisionUpstream) -> None:
    vlm_fake.script_answers({"item": "Pears", "price": 2.25, "qty": 17})
    ex, models = await extractor(vlm_fake.url, None)
    try:
        result = await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    assert result.data == {"item": "Pears", "price": 2.25, "qty": 17}
    assert [(a.model, a.outcome) for a in result.attempts] == [("vlm", "ok")]
    body = vlm_fake.llm_requests[0]
    (url,) = image_urls(body)
    assert base64.b64decode(url.removeprefix("data:image/png;base64,")) == PNG
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA.schema
    prov = result.provenance
    assert prov["/item"].source == "vlm" and prov["/item"].bbox == (100, 300, 190, 330)
    assert prov["/price"].bbox == (900, 300, 960, 330) and prov["/qty"].page == 1


async def test_invalid_answer_is_repaired_with_the_validation_error(
        vlm_fake: FakeVisionUpstream) -> None:
    vlm_fake.script_answers({"item": "Pears", "price": "2.25"}, {"item": "Pears", "price": 2.25})
    ex, models = await extractor(vlm_fake.url, None)
    try:
        result = await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    assert result.data == {"item": "Pears", "price": 2.25}
    assert [a.outcome for a in result.attempts] == ["invalid", "ok"]
    assert {f.source for f in result.provenance.values()} == {"vlm_repaired"}
    repair = vlm_fake.llm_requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": '{"item": "Pears", "price": "2.25"}'}
    assert "got `str` - at `$.price`" in repair[-1]["content"]
    assert image_urls(vlm_fake.llm_requests[1])  # the image stays in the conversation


async def test_garbage_until_attempts_run_out_falls_back_to_the_text_model(
        vlm_fake: FakeVisionUpstream, text_fake: FakeLlmUpstream) -> None:
    vlm_fake.script_answers("<html>oops</html>", "not json", '{"item": 3}')
    text_fake.script_llm(LlmReply(content='{"item": "Pears", "price": 2.25}'))
    ex, models = await extractor(vlm_fake.url, text_fake.url)
    try:
        result = await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    assert [(a.model, a.outcome) for a in result.attempts] == [
        ("vlm", "invalid"), ("vlm", "invalid"), ("vlm", "invalid"), ("text_model", "ok")]
    assert result.provenance["/item"].source == "text_model"
    prompt = text_fake.llm_requests[0]["messages"][-1]["content"]
    assert "--- page 1 ---\nItem Qty Price\nPears 17 2.25" in prompt
    assert not image_urls(text_fake.llm_requests[0])


async def test_vlm_down_falls_back_and_the_breaker_opens(text_fake: FakeLlmUpstream) -> None:
    text_fake.llm_default = LlmReply(content='{"item": "Pears", "price": 2.25}')
    ex, models = await extractor(closed_port_url(), text_fake.url, breaker_failures=1,
                                 breaker_reset_s=60.0)
    try:
        first = await ex.extract(SCHEMA, [PAGE])
        assert ex.vlm is not None and ex.vlm.breaker.state == "open"
        second = await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    assert [(a.model, a.outcome) for a in first.attempts] == [
        ("vlm", "upstream_error"), ("text_model", "ok")]
    assert "circuit open" in second.attempts[0].detail
    assert first.provenance["/item"].source == "text_model"


async def test_schema_never_satisfied_is_extraction_failed(
        vlm_fake: FakeVisionUpstream) -> None:
    vlm_fake.llm_default = LlmReply(content='{"item": 1}')
    ex, models = await extractor(vlm_fake.url, None)
    try:
        with pytest.raises(ExtractionFailed) as info:
            await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    assert [a.outcome for a in info.value.attempts] == ["invalid"] * 3


async def test_no_model_reachable_is_unavailable() -> None:
    ex, models = await extractor(closed_port_url(), closed_port_url())
    try:
        with pytest.raises(ExtractionUnavailable) as info:
            await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    assert info.value.unavailable
    assert [a.outcome for a in info.value.attempts] == ["upstream_error"] * 2


async def test_4xx_and_malformed_envelopes_are_upstream_errors(
        vlm_fake: FakeVisionUpstream) -> None:
    vlm_fake.script_answers(LlmReply.garbage(), LlmReply.wrong_shape())
    ex, models = await extractor(vlm_fake.url, None)
    try:
        with pytest.raises(ExtractionUnavailable) as garbage:
            await ex.extract(SCHEMA, [PAGE])
        with pytest.raises(ExtractionUnavailable) as shape:
            await ex.extract(SCHEMA, [PAGE])
        # A text-only request to a vision model: refused with 400, the breaker stays closed.
        model = models[0]
        with pytest.raises(UpstreamError) as refused:
            await model.complete([{"role": "user", "content": "hi"}])
    finally:
        await close(models)
    assert not garbage.value.unavailable and "unavailable: bad response" in str(garbage.value)
    assert "unavailable: bad response" in str(shape.value)
    assert refused.value.healthy and "bad status 400" in str(refused.value)
    assert vlm_fake.refused


async def test_retryable_errors_are_retried_once(vlm_fake: FakeVisionUpstream) -> None:
    vlm_fake.script_answers(LlmReply.error(503), {"item": "Pears", "price": 2})
    ex, models = await extractor(vlm_fake.url, None, retries=1)
    try:
        result = await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    assert result.data == {"item": "Pears", "price": 2}
    assert len(vlm_fake.llm_requests) == 2


async def test_the_repair_prompt_lists_every_error_and_an_invented_value_is_unverified(
        vlm_fake: FakeVisionUpstream) -> None:
    # Three errors in one answer: a string price, a float qty, no item.
    vlm_fake.script_answers({"price": "2.25", "qty": 1.5},
                            {"item": "Quinces", "price": 2.25, "qty": 17})
    ex, models = await extractor(vlm_fake.url, None)
    try:
        result = await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    prompt = vlm_fake.llm_requests[1]["messages"][-1]["content"]
    assert "(3 error(s))" in prompt
    for part in ("missing required field `item`", "got `str` - at `$.price`", "at `$.qty`"):
        assert part in prompt
    # "Quinces" is printed nowhere on the page: returned, and flagged.
    assert result.provenance["/item"].verified is False and result.provenance["/item"].bbox is None
    assert result.provenance["/price"].verified is True


async def test_a_traced_extraction_sends_traceparent_to_the_vision_model(
        vlm_fake: FakeVisionUpstream, spans: InMemorySpanExporter) -> None:
    """Issue 17: the vision model's call is an `upstream.vlm` client span under the request's
    span, and the model server receives its `traceparent`, so its own spans join the trace."""
    vlm_fake.script_answers({"item": "Pears", "price": 2.25})
    ex, models = await extractor(vlm_fake.url, None)
    try:
        with tracing.child("http.request") as request_span:
            await ex.extract(SCHEMA, [PAGE])
    finally:
        await close(models)
    (call,) = [s for s in spans.get_finished_spans() if s.name == "upstream.vlm"]
    assert call.parent is not None
    assert call.parent.span_id == request_span.get_span_context().span_id
    assert call.attributes is not None and call.attributes["http.response.status_code"] == 200
    sent = {k.lower(): v for k, v in vlm_fake.llm_headers[0].items()}
    _, trace_id, span_id, _ = sent["traceparent"].split("-")
    assert trace_id == format(call.context.trace_id, "032x")
    assert span_id == format(call.context.span_id, "016x")
