"""Schema-driven extraction: a vision model first, OCR text + a text model as the fallback.

For each model the harness asks for JSON matching the schema (in the prompt and, where the
upstream supports it, as response_format json_schema), validates the answer with msgspec
(server/vision/schema.py) and, when it does not validate, asks again with the validation error
appended to the conversation, up to `extraction_attempts` answers. The text model is used when
the vision model is not configured, not reachable (errors, timeouts, open breaker) or never
produced a valid answer. Every answer is recorded in `attempts`, for the response.

Outcome: the data with per-field provenance; ExtractionFailed (-> 422) when some model answered
but no answer ever satisfied the schema; ExtractionUnavailable (-> 502/503) when no model could
answer at all.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from server.config import VisionConfig
from server.vision.chat import ChatUpstream, UpstreamError
from server.vision.ocr import OcrWord
from server.vision.provenance import FieldSource, provenance
from server.vision.schema import CompiledSchema, InvalidAnswer

ModelRole = Literal["vlm", "text_model"]
Outcome = Literal["ok", "invalid", "upstream_error"]

SYSTEM_VLM = (
    "You read document images and extract data as JSON. Reply with exactly one JSON object "
    "that conforms to the JSON Schema the user gives, and nothing else. Copy values as they "
    "are printed; leave out optional fields the document does not show."
)
SYSTEM_TEXT = (
    "You extract data as JSON from the text of a document, read by OCR (it may contain "
    "recognition errors). Reply with exactly one JSON object that conforms to the JSON Schema "
    "the user gives, and nothing else. Copy values as they appear in the text; leave out "
    "optional fields the text does not show."
)


@dataclass(frozen=True, slots=True)
class PageEvidence:
    number: int
    png: bytes
    text: str
    words: Sequence[OcrWord]  # in reading order, for provenance


@dataclass(frozen=True, slots=True)
class Attempt:
    model: ModelRole
    outcome: Outcome
    detail: str = ""


@dataclass(slots=True)
class Extraction:
    data: dict[str, Any]
    provenance: dict[str, FieldSource]
    attempts: list[Attempt] = field(default_factory=list)


class ExtractionFailed(Exception):
    """Answers came back, but none satisfied the schema."""

    def __init__(self, message: str, attempts: list[Attempt]) -> None:
        super().__init__(message)
        self.attempts = attempts


class ExtractionUnavailable(Exception):
    """No model could answer; `unavailable`: none was reachable (503), else one misbehaved."""

    def __init__(self, message: str, attempts: list[Attempt], *, unavailable: bool) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.unavailable = unavailable


class Extractor:
    def __init__(self, cfg: VisionConfig, vlm: ChatUpstream | None,
                 text_model: ChatUpstream | None) -> None:
        self.cfg = cfg
        self.vlm = vlm
        self.text_model = text_model

    @property
    def enabled(self) -> bool:
        return self.vlm is not None or self.text_model is not None

    async def extract(self, schema: CompiledSchema, pages: Sequence[PageEvidence]
                      ) -> Extraction:
        attempts: list[Attempt] = []
        upstream_errors: list[UpstreamError] = []
        located = [(p.number, p.words) for p in pages]
        plan: list[tuple[ModelRole, ChatUpstream, list[dict[str, Any]]]] = []
        if self.vlm is not None:
            plan.append(("vlm", self.vlm, self._vlm_messages(schema, pages)))
        if self.text_model is not None:
            plan.append(("text_model", self.text_model, self._text_messages(schema, pages)))
        for role, model, messages in plan:
            try:
                result = await self._ask(role, model, schema, messages, attempts)
            except UpstreamError as exc:
                upstream_errors.append(exc)
                attempts.append(Attempt(role, "upstream_error", str(exc)))
                continue
            if result is not None:
                data, repaired = result
                source = "text_model" if role == "text_model" else (
                    "vlm_repaired" if repaired else "vlm")
                return Extraction(data, provenance(data, source, located), attempts)
        if any(a.outcome == "invalid" for a in attempts):
            raise ExtractionFailed(
                "no answer satisfied the schema after "
                f"{sum(1 for a in attempts if a.outcome == 'invalid')} invalid answer(s)",
                attempts)
        if not plan:
            raise ExtractionUnavailable("structured extraction is not configured", attempts,
                                        unavailable=True)
        raise ExtractionUnavailable(
            "; ".join(str(e) for e in upstream_errors), attempts,
            unavailable=all(e.unavailable for e in upstream_errors))

    async def _ask(self, role: ModelRole, model: ChatUpstream, schema: CompiledSchema,
                   messages: list[dict[str, Any]], attempts: list[Attempt]
                   ) -> tuple[dict[str, Any], bool] | None:
        """(data, repaired) from the first valid answer, None when every answer was invalid."""
        conversation = list(messages)
        for n in range(self.cfg.extraction_attempts):
            content = await model.complete(conversation, schema.schema)
            try:
                data = schema.parse(content)
            except InvalidAnswer as exc:
                attempts.append(Attempt(role, "invalid", str(exc)))
                # The model sees its own answer and what is wrong with it: a targeted repair
                # converges faster than asking the same question again.
                # Every error of the answer, not only the first (issue 16).
                listed = "\n".join(f"- {e}" for e in exc.errors)
                conversation += [
                    {"role": "assistant", "content": content[:8000]},
                    {"role": "user", "content": (
                        f"That answer is not valid ({len(exc.errors)} error(s)):\n{listed}\n"
                        "Reply again with only the corrected JSON object, conforming to the "
                        "schema.")},
                ]
                continue
            attempts.append(Attempt(role, "ok"))
            return data, n > 0
        return None

    def _schema_text(self, schema: CompiledSchema) -> str:
        return json.dumps(schema.schema, ensure_ascii=False, indent=1)

    def _vlm_messages(self, schema: CompiledSchema, pages: Sequence[PageEvidence]
                      ) -> list[dict[str, Any]]:
        shown = pages[: self.cfg.max_vlm_pages]
        parts: list[dict[str, Any]] = [{"type": "text", "text": (
            f"JSON Schema:\n{self._schema_text(schema)}\n\nExtract the data from this document "
            f"({len(shown)} page image(s), in page order).")}]
        for page in shown:
            url = "data:image/png;base64," + base64.b64encode(page.png).decode("ascii")
            parts.append({"type": "image_url", "image_url": {"url": url, "detail": "high"}})
        return [{"role": "system", "content": SYSTEM_VLM}, {"role": "user", "content": parts}]

    def _text_messages(self, schema: CompiledSchema, pages: Sequence[PageEvidence]
                       ) -> list[dict[str, Any]]:
        text = "\n\n".join(f"--- page {p.number} ---\n{p.text}" for p in pages)
        text = text[: self.cfg.max_text_chars]
        return [{"role": "system", "content": SYSTEM_TEXT},
                {"role": "user", "content": (
                    f"JSON Schema:\n{self._schema_text(schema)}\n\nDocument text:\n<<<\n{text}"
                    "\n>>>")}]
