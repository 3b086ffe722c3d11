"""The vision pipeline as the HTTP layer uses it: document -> pages -> OCR + layout -> extraction,
and the wire format of its answer.

Pages are rendered, OCRed and laid out under one process-wide semaphore (`ocr_concurrency`):
the work is CPU-bound, so more of it at once only makes every request slower; requests beyond
the bound wait for a slot (back pressure) instead of piling processes onto the cores.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
from PIL import Image

from server.config import VisionConfig
from server.telemetry.metrics import Metrics
from server.vision.chat import ChatUpstream
from server.vision.documents import Document, PageImage
from server.vision.figures import erase_rules
from server.vision.layout import PageLayout, analyze
from server.vision.ocr import OcrPage, ocr_png
from server.vision.schema import CompiledSchema
from server.vision.vlm import Attempt, Extraction, Extractor, PageEvidence

MIN_OCR_SIDE = 16  # tesseract refuses images this small ("Image too small to scale")


# --- wire format -------------------------------------------------------------------------------

class BlockOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    type: str
    bbox: list[int]
    text: str
    confidence: float
    order: int
    rows: list[list[str]] | None = None


class PageOut(msgspec.Struct, kw_only=True):
    page: int
    width: int
    height: int
    text: str
    blocks: list[BlockOut]


class FieldOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    source: str
    page: int | None = None
    bbox: list[int] | None = None


class AttemptOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    model: str
    outcome: str
    detail: str = ""


class ExtractionOut(msgspec.Struct, kw_only=True):
    data: dict[str, Any]
    provenance: dict[str, FieldOut]
    attempts: list[AttemptOut]


class UsageOut(msgspec.Struct, kw_only=True):
    pages: int
    cost_micros: int


class ExtractResponse(msgspec.Struct, omit_defaults=True, kw_only=True):
    pages: list[PageOut]
    extraction: ExtractionOut | None = None
    usage: UsageOut


class ExtractFailedResponse(msgspec.Struct, omit_defaults=True, kw_only=True):
    """422: the schema was never satisfied; the OCR (which was done and paid for) still comes
    back, with the attempts that failed."""

    error: dict[str, str]
    pages: list[PageOut]
    attempts: list[AttemptOut]
    usage: UsageOut


# --- pipeline ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PageResult:
    image: PageImage
    layout: PageLayout


def page_out(result: PageResult) -> PageOut:
    layout = result.layout
    return PageOut(
        page=result.image.number, width=layout.width, height=layout.height, text=layout.text,
        blocks=[BlockOut(type=b.type, bbox=list(b.box), text=b.text, confidence=b.confidence,
                         order=b.order, rows=b.rows) for b in layout.blocks])


def attempts_out(attempts: Sequence[Attempt]) -> list[AttemptOut]:
    return [AttemptOut(model=a.model, outcome=a.outcome, detail=a.detail[:500])
            for a in attempts]


def extraction_out(extraction: Extraction) -> ExtractionOut:
    return ExtractionOut(
        data=extraction.data,
        provenance={path: FieldOut(source=f.source, page=f.page,
                                   bbox=list(f.bbox) if f.bbox else None)
                    for path, f in extraction.provenance.items()},
        attempts=attempts_out(extraction.attempts))


class VisionService:
    def __init__(self, cfg: VisionConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._slots = asyncio.Semaphore(cfg.ocr_concurrency)
        self.vlm = ChatUpstream(f"vlm:{cfg.vlm.model}", cfg.vlm, metrics) \
            if cfg.vlm.enabled else None
        self.text_model = ChatUpstream(f"text:{cfg.text_model.model}", cfg.text_model, metrics) \
            if cfg.text_model.enabled else None
        self.extractor = Extractor(cfg, self.vlm, self.text_model)

    @property
    def upstreams(self) -> list[ChatUpstream]:
        return [u for u in (self.vlm, self.text_model) if u is not None]

    async def start(self) -> None:
        for upstream in self.upstreams:
            await upstream.start()

    async def aclose(self) -> None:
        for upstream in self.upstreams:
            await upstream.aclose()

    async def open_document(self, data: bytes) -> Document:
        return await Document.open(data, max_pages=self.cfg.max_pages,
                                   max_pixels=self.cfg.max_page_pixels, dpi=self.cfg.dpi,
                                   timeout_s=self.cfg.render_timeout_s)

    async def read_pages(self, doc: Document, languages: str) -> list[PageResult]:
        """Every page rendered, OCRed and laid out; the first failure cancels the rest."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._page(doc, n, languages))
                         for n in range(1, doc.pages + 1)]
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None  # one page's error is what the client needs
        return [t.result() for t in tasks]

    async def _page(self, doc: Document, number: int, languages: str) -> PageResult:
        async with self._slots:
            image = await doc.render(number)
            started = time.perf_counter()
            gray, ocr_input = await asyncio.to_thread(_prepare, image)
            if image.width < MIN_OCR_SIDE or image.height < MIN_OCR_SIDE:
                ocr = OcrPage(image.width, image.height)
            else:
                ocr = await ocr_png(ocr_input, languages=languages, psm=self.cfg.psm,
                                    dpi=image.dpi, timeout_s=self.cfg.ocr_timeout_s)
            # Boxes are in the pixels of the image we rendered; tesseract reports that size.
            ocr.width, ocr.height = image.width, image.height
            layout = await asyncio.to_thread(analyze, ocr, gray)
            if self.metrics is not None:
                self.metrics.engine_seconds.labels(model="tesseract", op="ocr_page").observe(
                    time.perf_counter() - started)
            return PageResult(image, layout)

    async def extract(self, schema: CompiledSchema, pages: Sequence[PageResult]) -> Extraction:
        evidence = [PageEvidence(p.image.number, p.image.png, p.layout.text, p.layout.words())
                    for p in pages]
        return await self.extractor.extract(schema, evidence)


def _prepare(image: PageImage) -> tuple[npt.NDArray[np.uint8], bytes]:
    """The page's pixels (for figures) and the PNG tesseract reads: without table rules."""
    with Image.open(io.BytesIO(image.png)) as decoded:
        gray = np.asarray(decoded.convert("L"), dtype=np.uint8)
    erased = erase_rules(gray)
    if erased is None:
        return gray, image.png
    out = io.BytesIO()
    Image.fromarray(erased).save(out, format="PNG", compress_level=1)
    return gray, out.getvalue()
