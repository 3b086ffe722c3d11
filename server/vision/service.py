"""The vision pipeline as the HTTP layer uses it: document -> pages -> OCR + layout -> extraction,
and the wire format of its answer.

Pages are rendered, OCRed and laid out under one process-wide semaphore (`ocr_concurrency`):
the work is CPU-bound, so more of it at once only makes every request slower; requests beyond
the bound wait for a slot (back pressure) instead of piling processes onto the cores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from server.config import VisionConfig
from server.telemetry.metrics import Metrics
from server.vision.cells import apply_reread, cells_to_reread, stack, words_by_crop
from server.vision.chat import ChatUpstream
from server.vision.documents import Document, PageImage, TextLayer
from server.vision.figures import erase_rules
from server.vision.geometry import Block, mean_confidence
from server.vision.layout import PageLayout, analyze, split_words
from server.vision.ocr import (
    Box,
    OcrPage,
    OcrWord,
    Orientation,
    detect_orientation,
    ocr_png,
)
from server.vision.prepare import (
    TARGET_LINE_PX,
    PagePreparation,
    densest_band,
    lies_on_its_side,
    prepare,
    rotate_quarters,
)
from server.vision.schema import CompiledSchema
from server.vision.scripts import DEVANAGARI, looks_devanagari, page_scripts, upright_turn
from server.vision.vlm import Attempt, Extraction, Extractor, PageEvidence

MIN_OCR_SIDE = 16  # tesseract refuses images this small ("Image too small to scale")
# An orientation OSD is less sure of than this is a guess (measured on the evaluation corpus:
# upright pages score 1.5-40, so only a confident turn is applied).
MIN_ORIENTATION_CONF = 3.0
# OSD is shown the page's densest band of this many text lines (at the prepared text size):
# 0.13-0.28 s of CPU where the whole page took 0.27-0.5, the same orientation and script on
# every corpus page, upright and turned (decision 16V2).
OSD_BAND_LINES = 20
log = logging.getLogger(__name__)


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
    skew_deg: float = 0.0  # tilt measured (and corrected) before OCR, counter-clockwise
    rotation: int = 0  # degrees the page was turned (clockwise) to be upright
    languages: str = ""  # the OCR languages used ("" for a text-layer page)
    source: str = "ocr"  # ocr | text_layer
    ocr_words: int = 0  # words read on the page; every one of them is in some block


class FieldOut(msgspec.Struct, omit_defaults=True, kw_only=True):
    source: str
    page: int | None = None
    bbox: list[int] | None = None
    verified: bool | None = None  # found printed on the page (absent: booleans and null)


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
    skew_deg: float = 0.0
    rotation: int = 0
    languages: str = ""
    source: str = "ocr"


def page_out(result: PageResult) -> PageOut:
    layout = result.layout
    return PageOut(
        page=result.image.number, width=layout.width, height=layout.height, text=layout.text,
        blocks=[BlockOut(type=b.type, bbox=list(b.box), text=b.text, confidence=b.confidence,
                         order=b.order, rows=b.rows) for b in layout.blocks],
        skew_deg=result.skew_deg, rotation=result.rotation, languages=result.languages,
        source=result.source, ocr_words=layout.ocr_words)


def attempts_out(attempts: Sequence[Attempt]) -> list[AttemptOut]:
    return [AttemptOut(model=a.model, outcome=a.outcome, detail=a.detail[:500])
            for a in attempts]


def extraction_out(extraction: Extraction) -> ExtractionOut:
    return ExtractionOut(
        data=extraction.data,
        provenance={path: FieldOut(source=f.source, page=f.page,
                                   bbox=list(f.bbox) if f.bbox else None, verified=f.verified)
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

    async def read_pages(self, doc: Document, languages: list[str],
                         named: bool = True) -> list[PageResult]:
        """Every page rendered, OCRed and laid out; the first failure cancels the rest.
        `named`: the request chose the languages; otherwise each page's script (OSD) picks
        its languages out of `languages` (the server's default list)."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._page(doc, n, languages, named))
                         for n in range(1, doc.pages + 1)]
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None  # one page's error is what the client needs
        return [t.result() for t in tasks]

    async def _page(self, doc: Document, number: int, languages: list[str],
                    named: bool) -> PageResult:
        async with self._slots:
            image = await doc.render(number)
            started = time.perf_counter()
            if image.width < MIN_OCR_SIDE or image.height < MIN_OCR_SIDE:
                empty = analyze(OcrPage(image.width, image.height))
                return PageResult(image, empty, languages="+".join(languages))
            layer = await doc.text_layer(number)
            if layer is not None:
                return await self._layer_page(image, layer, languages)
            page = await asyncio.to_thread(_prepare, image)
            prepared = time.perf_counter()
            dpi = round(image.dpi * page.prep.scale) if image.dpi else None
            # Which way up, by the text lines when they settle it (0 or 180 degrees), else
            # by OSD on the densest band of the page (decision 16V2).
            osd: Orientation | None = None
            rotate = await asyncio.to_thread(_turn_by_lines, page.ocr_gray)
            if rotate is None:
                band = densest_band(page.ocr_gray, round(OSD_BAND_LINES * TARGET_LINE_PX))
                osd = await detect_orientation(_pgm(band), dpi=dpi,
                                               timeout_s=self.cfg.ocr_timeout_s)
                rotate = osd.rotate if osd and osd.orientation_conf >= MIN_ORIENTATION_CONF \
                    else 0
            oriented = time.perf_counter()
            if rotate:
                page = await asyncio.to_thread(_turn, page, (-rotate // 90) % 4)
            # The script of each text line, from the upright page's pixels (scripts.py): Hindi
            # only where Devanagari is printed, whatever OSD (one script a page) said.
            scripts = await asyncio.to_thread(page_scripts, page.ocr_gray)
            chosen = languages if named else scripts.languages(languages)
            page.languages = "+".join(chosen)
            ocr = await ocr_png(page.ocr_png, languages="+".join(chosen), psm=self.cfg.psm,
                                dpi=dpi, timeout_s=self.cfg.ocr_timeout_s)
            # Boxes are in the pixels of the prepared page; tesseract reports that size.
            ocr.height, ocr.width = page.gray.shape
            if len(chosen) > 1 and "hin" in chosen:
                await self._reread_devanagari(ocr, page)
            read = time.perf_counter()
            layout = await asyncio.to_thread(analyze, ocr, page.gray)
            await self._reread_cells(layout, page)
            layout = map_layout(layout, page.prep)
            done = time.perf_counter()
            # Degrees clockwise, all turns together (a page on its side is turned a quarter
            # while it is prepared, before the way up is settled).
            turned = (-90 * page.prep.rotation) % 360
            log.info("vision page %d (%s, %s): skew %.2f deg, scale %.2f, turned %d, %s, "
                     "%d words; prepare %.0f ms (%s), orientation %.0f ms, ocr %.0f ms, "
                     "layout %.0f ms",
                     number, scripts, osd or "way up by its lines", page.prep.skew_deg,
                     page.prep.scale, turned, "+".join(chosen),
                     layout.ocr_words, 1000 * (prepared - started), page.prep.timings_ms,
                     1000 * (oriented - prepared), 1000 * (read - oriented),
                     1000 * (done - read))
            if self.metrics is not None:
                self.metrics.engine_seconds.labels(model="tesseract", op="ocr_page").observe(
                    done - started)
            return PageResult(image, layout, skew_deg=page.prep.skew_deg, rotation=turned,
                              languages="+".join(chosen))

    async def _layer_page(self, image: PageImage, layer: TextLayer, languages: list[str]
                          ) -> PageResult:
        """A PDF page with a text layer: its own words and boxes (exact, and no OCR), laid out
        like OCR words; only regions the layout finds to be pictures are OCRed, for the text
        printed in them."""
        started = time.perf_counter()
        sx, sy = image.width / max(1.0, layer.width_pt), image.height / max(1.0, layer.height_pt)
        words = [OcrWord(w.text, 100.0, (math.floor(w.box[0] * sx), math.floor(w.box[1] * sy),
                                         math.ceil(w.box[2] * sx), math.ceil(w.box[3] * sy)))
                 for w in layer.words]
        layout = await asyncio.to_thread(analyze, OcrPage(image.width, image.height, words),
                                         image.pixels)
        for block in layout.blocks:
            if block.type == "figure" and not block.words:
                layout.ocr_words += await self._read_region(block, image.pixels, languages)
        log.info("vision page %d: text layer, %d words, %.0f ms", image.number,
                 layout.ocr_words, 1000 * (time.perf_counter() - started))
        return PageResult(image, layout, source="text_layer")

    async def _read_region(self, block: Block, pixels: npt.NDArray[np.uint8],
                           languages: list[str]) -> int:
        """OCR of one picture region of a text-layer page; its words join the block."""
        x0, y0, x1, y1 = block.box
        if x1 - x0 < MIN_OCR_SIDE or y1 - y0 < MIN_OCR_SIDE:
            return 0
        ocr = await ocr_png(_pgm(np.ascontiguousarray(pixels[y0:y1, x0:x1])),
                            languages="+".join(languages), psm=self.cfg.psm, dpi=None,
                            timeout_s=self.cfg.ocr_timeout_s)
        found, _, _ = split_words(ocr.words)
        block.words = [dataclasses.replace(w, box=(w.box[0] + x0, w.box[1] + y0,
                                                   w.box[2] + x0, w.box[3] + y0))
                       for w in found]
        block.words.sort(key=lambda w: (w.box[1], w.box[0]))
        block.text = " ".join(w.text for w in block.words)
        block.confidence = mean_confidence(block.words)
        return len(block.words)

    async def _reread_cells(self, layout: PageLayout, page: PreparedPage) -> None:
        """Empty table cells read again on their own crops (server/vision/cells.py)."""
        height, width = page.ocr_gray.shape
        crops = cells_to_reread(layout.blocks, width, height)
        if not crops:
            return
        stacked = await asyncio.to_thread(stack, page.ocr_gray, [c.box for c in crops])
        read = await ocr_png(_pgm(stacked.image), languages=page.languages or "eng", psm=6,
                             dpi=None, timeout_s=self.cfg.ocr_timeout_s)
        layout.ocr_words += apply_reread(layout.blocks, crops, stacked, read)

    async def _reread_devanagari(self, ocr: OcrPage, page: PreparedPage) -> None:
        """Words a Hindi+English reading returned in Latin letters whose pixels hang from a
        Devanagari headline ("रिपोर्ट" read "Rave", "मासिक" read "siren": tesseract keeps, per
        word, the language it is surer of) read again with Hindi alone, all on one stacked
        image; a re-reading in Devanagari replaces the word (its box stays)."""
        height, width = page.ocr_gray.shape
        suspects: list[int] = []
        boxes: list[Box] = []
        for i, word in enumerate(ocr.words):
            if DEVANAGARI.search(word.text) or not looks_devanagari(page.ocr_gray, word.box):
                continue
            x0, y0, x1, y1 = word.box
            pad = max(2, round(0.3 * (y1 - y0)))
            suspects.append(i)
            boxes.append((max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad),
                          min(height, y1 + pad)))
        if not boxes:
            return
        stacked = await asyncio.to_thread(stack, page.ocr_gray, boxes)
        read = await ocr_png(_pgm(stacked.image), languages="hin", psm=6, dpi=None,
                             timeout_s=self.cfg.ocr_timeout_s)
        for k, words in words_by_crop(boxes, stacked, read).items():
            text = " ".join(w.text for w in words)
            if DEVANAGARI.search(text):
                old = ocr.words[suspects[k]]
                ocr.words[suspects[k]] = dataclasses.replace(
                    old, text=text, conf=mean_confidence(words))
        log.debug("vision: %d Latin-read words re-read in Devanagari", len(boxes))

    async def extract(self, schema: CompiledSchema, pages: Sequence[PageResult]) -> Extraction:
        evidence = [PageEvidence(p.image.number, p.image.png, p.layout.text, p.layout.words())
                    for p in pages]
        return await self.extractor.extract(schema, evidence)


@dataclass(slots=True)
class PreparedPage:
    gray: npt.NDArray[np.uint8]  # the prepared page (figures are looked for in it)
    ocr_gray: npt.NDArray[np.uint8]  # ... without table rules, what tesseract reads
    prep: PagePreparation
    languages: str = ""

    @property
    def ocr_png(self) -> bytes:
        return _pgm(self.ocr_gray)


def _pgm(gray: npt.NDArray[np.uint8]) -> bytes:
    """Tesseract (leptonica) reads binary PGM from stdin: no compression to spend time on."""
    h, w = gray.shape
    return f"P5\n{w} {h}\n255\n".encode("ascii") + np.ascontiguousarray(gray).tobytes()


def _prepared(gray: npt.NDArray[np.uint8], prep: PagePreparation) -> PreparedPage:
    erased = erase_rules(gray)
    return PreparedPage(gray, gray if erased is None else erased, prep)


def _prepare(image: PageImage) -> PreparedPage:
    """Deskewed, cleaned and scaled (server/vision/prepare.py), in the PNGs tesseract reads."""
    ready, prep = prepare(image.pixels, dpi=image.dpi)
    return _prepared(ready, prep)


def _turn(page: PreparedPage, quarters: int) -> PreparedPage:
    turned = rotate_quarters(page.gray, page.prep, quarters)
    return _prepared(turned, page.prep)


def _turn_by_lines(gray: npt.NDArray[np.uint8]) -> int | None:
    """0 or 180 degrees when the text lines settle which way up the page is; None for OSD
    (a page lying on its side, or lines that do not agree)."""
    return None if lies_on_its_side(gray) else upright_turn(gray)


def map_layout(layout: PageLayout, prep: PagePreparation) -> PageLayout:
    """The layout's boxes (found on the prepared page) in the uploaded page's pixels."""
    def word(w: OcrWord) -> OcrWord:
        return dataclasses.replace(w, box=prep.to_original(w.box))

    blocks = [dataclasses.replace(b, box=prep.to_original(b.box), words=[word(w) for w in b.words])
              for b in layout.blocks]
    out: list[Block] = blocks
    return PageLayout(prep.width, prep.height, out, layout.ocr_words)
