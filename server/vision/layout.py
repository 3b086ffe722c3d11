"""Layout of one OCRed page: typed blocks with boxes, in reading order.

Pipeline (pure functions of tesseract's words; no pixels needed except for figures):
1. words -> visual rows (vertical overlap) -> segments: a row is cut where the gap between two
   words is far wider than a word space (a column gutter or a table gap);
2. column gutters and reading regions (server/vision/columns.py);
3. per region: tables from aligned segments (server/vision/tables.py), the remaining rows
   become lines, and lines are grouped into blocks at paragraph gaps, at a change between
   title-sized and body-sized text, and where a list starts or ends;
4. typing: `list` when the block's first line starts with a bullet or a number; `title` when
   all its lines are large (TITLE_RATIO x the page's median line height) and it is short, or
   when it is the page's first block, a single short line near the top and somewhat large;
   otherwise `paragraph`. Figures come from server/vision/figures.py (plus tesseract's empty
   blocks and oversized low-confidence "words") and take the words printed inside them.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.vision.columns import find_gutters, reading_regions
from server.vision.figures import TEXT_BOX_AREA, find_figures, merge_boxes, text_area
from server.vision.geometry import (
    Block,
    BlockType,
    Segment,
    center,
    contains_point,
    height,
    mean_confidence,
    median,
    rows_of,
    union,
    width,
)
from server.vision.ocr import Box, OcrPage, OcrWord
from server.vision.tables import split_tables

TITLE_RATIO = 1.4
TOP_TITLE_RATIO = 1.15
PARAGRAPH_GAP = 1.0  # line heights of empty space that end a paragraph...
WIDER_GAP = 1.6  # ...or this many times the region's usual gap between lines, if wider
MIN_GAPS = 3  # line gaps needed before "the usual gap" means anything
HINT_HEIGHT = 3.5  # a "word" this many median word heights tall is a picture, not text
DEVANAGARI_SCALE = 1.35  # measured: Lohit Devanagari 30 px -> 39 px boxes, DejaVu 28 px -> 27
_MARKER = re.compile(
    r"^([-\u2022\u2023\u25aa\u25cf\u25e6\u2043\u2219*\u00b7\u2013\u2014\u25a0\u25a1\u27a2\u25ba"
    r"\u2713o]|\(?[0-9\u0966-\u096f]{1,3}[.)]|\(?[a-zA-Z][.)]|\(?[ivxIVX]{1,4}[.)])$"
)


@dataclass(slots=True)
class PageLayout:
    width: int
    height: int
    blocks: list[Block]
    # Words the OCR read on the page (its noise left out, see split_words): every one of them
    # is in exactly one block (the coverage invariant of issue 16, tests/unit/test_vision_*).
    ocr_words: int = 0

    @property
    def text(self) -> str:
        return "\n\n".join(b.text for b in self.blocks if b.text)

    def words(self) -> list[OcrWord]:
        """All words in reading order."""
        return [w for b in self.blocks for w in b.words]


@dataclass(slots=True)
class _Line:
    words: list[OcrWord]
    box: Box

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    @property
    def size(self) -> float:
        return text_height(self.box, self.text)


def text_height(box: Box, text: str) -> float:
    """Box height scaled to Latin proportions: Devanagari boxes (head line, vowel signs above
    and below) are about DEVANAGARI_SCALE times taller at the same font size, which would make
    every Hindi line look like a title next to English text."""
    letters = [ch for ch in text if ch.isalpha() or "\u0900" <= ch <= "\u097f"]
    deva = sum(1 for ch in letters if "\u0900" <= ch <= "\u097f")
    scale = DEVANAGARI_SCALE if letters and deva * 2 > len(letters) else 1.0
    return height(box) / scale


def is_noise(w: OcrWord) -> bool:
    """Specks read as punctuation: no letter or digit and little confidence. Not words: left out
    of the page (and of its word count) rather than sprinkled into its text."""
    return w.conf < 30 and not any(ch.isalnum() for ch in w.text)


def split_words(words: Sequence[OcrWord]) -> tuple[list[OcrWord], list[Box], float]:
    """(text words, boxes of picture-like "words", median word height). Noise (is_noise) and
    picture-like "words" (a chart read as one huge low-confidence glyph) are not words of the
    page: they are left out of its text and of its word count."""
    word_h = median([height(w.box) for w in words], default=0.0)
    text: list[OcrWord] = []
    hints: list[Box] = []
    for w in words:
        if is_noise(w):
            continue
        # Bars of a chart come back as "ll" or "Il", sometimes with fair confidence.
        if word_h and height(w.box) > HINT_HEIGHT * word_h and (
                w.conf < 90 or len(w.text) <= 2 or not any(ch.isalnum() for ch in w.text)):
            hints.append(w.box)
        else:
            text.append(w)
    return text, hints, median([height(w.box) for w in text], default=word_h)


def segments_of(words: Sequence[OcrWord]) -> list[Segment]:
    """Words -> visual rows -> segments cut at gaps wider than a few word spaces."""
    rows = rows_of([Segment([w]) for w in words])
    gaps: list[float] = []
    for row in rows:
        row_h = median([height(s.box) for s in row])
        # Only gaps narrower than the text is tall can be word spaces: on a page that is mostly
        # table, the wide gaps would otherwise become "the usual spacing".
        gaps += [b.box[0] - a.box[2] for a, b in itertools.pairwise(row)
                 if 0 < b.box[0] - a.box[2] <= row_h]
    word_gap = median(gaps, default=0.0)
    out: list[Segment] = []
    for row in rows:
        row_h = median([height(s.box) for s in row])
        limit = max(3.0 * word_gap, 1.0 * row_h)
        current: list[OcrWord] = []
        for seg in row:
            if current and seg.box[0] - current[-1].box[2] > limit:
                out.append(Segment(current))
                current = []
            current += seg.words
        if current:
            out.append(Segment(current))
    return out


def analyze(page: OcrPage, gray: npt.NDArray[np.uint8] | None = None) -> PageLayout:
    words, hints, word_h = split_words(page.words)
    line_h = word_h or max(8.0, page.height / 60)
    # Tesseract's hints are taken only where little recognised text lies inside them: an
    # "empty" block drawn around a paragraph must not swallow the paragraph as a figure.
    text_boxes = [w.box for w in words]
    candidates = [b for b in [*hints, *page.empty_blocks]
                  if text_area(b, text_boxes) < TEXT_BOX_AREA * width(b) * height(b)]
    if gray is not None:
        candidates += find_figures(gray, [w.box for w in words], line_h)
    min_side = 3 * line_h
    figure_boxes = [b for b in merge_boxes(candidates)
                    if width(b) >= min_side and height(b) >= min_side]
    figures = [Block(type="figure", box=b) for b in figure_boxes]
    loose: list[OcrWord] = []
    # Every word lands in a block: words inside a figure are its text, whatever their
    # confidence (a figure that holds text says so and returns it: no silent loss, issue 16).
    for w in words:
        home = next((f for f in figures if contains_point(f.box, center(w.box))), None)
        if home is None:
            loose.append(w)
        else:
            home.words.append(w)
    for f in figures:
        f.words.sort(key=lambda w: (w.box[1], w.box[0]))
        f.text = " ".join(w.text for w in f.words)
        f.confidence = mean_confidence(f.words)
    segments = segments_of(loose)
    page_line_h = median([text_height(s.box, s.text) for s in segments], default=line_h)
    gutters = find_gutters(segments, page.width, page_line_h)
    items: list[Segment | Block] = [*segments, *figures]
    blocks: list[Block] = []
    for region in reading_regions([it.box for it in items], gutters):
        segs = [it for i in region if isinstance(it := items[i], Segment)]
        figs = [it for i in region if isinstance(it := items[i], Block)]
        blocks += _region_blocks(segs, figs, page_line_h)
    _mark_top_title(blocks, page.height, page_line_h)
    for i, block in enumerate(blocks):
        block.order = i
    return PageLayout(page.width, page.height, blocks, len(words))


def uncovered(page: OcrPage, layout: PageLayout) -> list[OcrWord]:
    """The OCR's words (noise and picture-like "words" aside) that are in no block of the
    layout: always empty."""
    placed = Counter((w.text, w.box) for b in layout.blocks for w in b.words)
    missing: list[OcrWord] = []
    for w in split_words(page.words)[0]:
        key = (w.text, w.box)
        if placed[key]:
            placed[key] -= 1
        else:
            missing.append(w)
    return missing


def _region_blocks(segments: list[Segment], figures: list[Block], page_line_h: float
                   ) -> list[Block]:
    rows = rows_of(segments)
    region_h = median([text_height(s.box, s.text) for s in segments], default=page_line_h)
    tables, rest = split_tables(rows, region_h)
    lines = [_Line([w for s in row for w in s.words], union(s.box for s in row)) for row in rest]
    blocks = tables + _group_lines(lines, region_h, page_line_h) + figures
    blocks.sort(key=lambda b: (b.box[1], b.box[0]))
    return blocks


def _is_marker(line: _Line) -> bool:
    first = line.words[0].text
    if _MARKER.match(first):
        return len(line.words) > 1 or first not in ("o",)
    # "•Item" glued to its bullet
    return len(first) > 1 and first[0] in "\u2022\u25aa\u25cf\u25e6\u27a2\u25ba\u2713"


def _group_lines(lines: list[_Line], region_h: float, page_line_h: float) -> list[Block]:
    lines = sorted(lines, key=lambda ln: ln.box[1])
    gaps = [b.box[1] - a.box[3] for a, b in itertools.pairwise(lines)]
    # Double-spaced text has a line gap of about a line height everywhere: with enough lines
    # to tell, a paragraph break is a gap clearly wider than the usual one.
    usual = median(gaps) if len(gaps) >= MIN_GAPS else 0.0
    limit = max(PARAGRAPH_GAP * region_h, WIDER_GAP * usual)
    groups: list[list[_Line]] = []
    for line in lines:
        big = line.size >= TITLE_RATIO * page_line_h
        if groups:
            current = groups[-1]
            prev = current[-1]
            gap = line.box[1] - prev.box[3]
            was_big = prev.size >= TITLE_RATIO * page_line_h
            in_list = _is_marker(current[0])
            if in_list:
                # Continuation lines of a list item are indented past its bullet.
                continues = _is_marker(line) or line.box[0] > current[0].box[0] + 0.5 * region_h
            else:
                continues = not _is_marker(line)
            if gap <= limit and big == was_big and continues:
                current.append(line)
                continue
        groups.append([line])
    return [_text_block(group, page_line_h) for group in groups]


def _text_block(lines: list[_Line], page_line_h: float) -> Block:
    words = [w for line in lines for w in line.words]
    box = union(line.box for line in lines)
    if _is_marker(lines[0]):
        items: list[str] = []
        for line in lines:
            if _is_marker(line) or not items:
                items.append(line.text)
            else:
                items[-1] = _join(items[-1], line.text)
        return Block("list", box, words, "\n".join(items), mean_confidence(words))
    text = lines[0].text
    for line in lines[1:]:
        text = _join(text, line.text)
    large = all(line.size >= TITLE_RATIO * page_line_h for line in lines)
    kind: BlockType = "title" if large and len(lines) <= 3 and len(words) <= 25 else "paragraph"
    return Block(kind, box, words, text, mean_confidence(words))


def _join(text: str, more: str) -> str:
    # A word hyphenated across lines ("docu-" + "ment") is joined back together.
    if text.endswith("-") and len(text) > 1 and text[-2].isalpha() and more[:1].islower():
        return text[:-1] + more
    return f"{text} {more}"


def _mark_top_title(blocks: list[Block], page_h: int, page_line_h: float) -> None:
    """A short, somewhat large first line near the top is the title even below TITLE_RATIO."""
    text_blocks = [b for b in blocks if b.type != "figure"]
    if not text_blocks:
        return
    first = text_blocks[0]
    size = text_height(first.box, first.text)
    if (first.type == "paragraph" and first.box[1] < 0.2 * page_h
            and size < 2 * page_line_h and len(first.words) <= 10
            and size >= TOP_TITLE_RATIO * page_line_h
            and not first.text.rstrip().endswith((".", ",", ";", ":"))):
        first.type = "title"
