"""Table cells re-read on their own (issue 16 item 2).

Sparse-text OCR (psm 11) drops lone short words: the Qty "1" of an invoice row came back empty
while `--psm 6` on the same pixels reads it (and on a scan, every one-digit Qty cell), or reads
it as "iL". So, once a table is found, every cell left empty and every doubtful one (at most
DOUBTFUL_CHARS characters, and read less sure than DOUBTFUL_CONF or not a number in a column of
numbers; or of any length, differing from the shape its column's cells share in letter case
only: "c-310" among "A-101", "B-220") is cut out of the page (its column's extent, halfway into
the gaps on either side, and its row's band), the crops are stacked into one image with white
between them, enlarged, and tesseract reads that image once as a uniform block of text (psm 6):
one process for all the cells of a page. A re-read word is taken when it is readable (a letter
or digit) and at least REREAD_CONF sure. It fills an empty cell; it replaces a doubtful cell's
words when it is surer, or a number where the column holds numbers, or fits its column's shape
where the first reading did not (the replaced words leave the page's word count with them: the
cell's words are its re-reading). Re-read words join the table's words like any other, so
provenance and the coverage count see them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from server.vision.geometry import Block, center, mean_confidence, union
from server.vision.ocr import Box, OcrPage, OcrWord

REREAD_CONF = 40.0
DOUBTFUL_CHARS = 4
DOUBTFUL_CONF = 75.0
SHAPE_SHARE = 0.6
_NUMBER = re.compile(r"^[-+(]?[$€£₹]?\d[\d,.]*%?\)?$")
GAP = 0.8  # white between stacked crops, in crop heights
FAINT = 160  # grey levels lighter than this are paper on a cell's crop
CROP_PX = 80.0  # crops are enlarged to about this height (text about 40 px) ...
MAX_ENLARGE = 3.0  # ... by at most this factor


@dataclass(frozen=True, slots=True)
class CellCrop:
    block: int  # index of the table in the page's blocks
    row: int
    column: int
    box: Box  # in the page's pixels


def _cell_words(block: Block, box: Box) -> list[OcrWord]:
    return [w for w in block.words
            if box[0] <= center(w.box)[0] <= box[2] and box[1] <= center(w.box)[1] <= box[3]]


def is_number(text: str) -> bool:
    return bool(_NUMBER.match(text.replace(" ", "")))


def numeric_columns(rows: Sequence[Sequence[str]]) -> list[bool]:
    """Columns where most filled cells below the header are numbers."""
    out: list[bool] = []
    for c in range(len(rows[0]) if rows else 0):
        cells = [r[c] for r in rows[1:] if c < len(r) and r[c]]
        out.append(len(cells) >= 2 and sum(map(is_number, cells)) * 2 > len(cells))
    return out


def shape(text: str) -> str:
    """"C-310" -> "A-999": what a column of codes has in common."""
    return "".join("A" if ch.isupper() else "a" if ch.isalpha() else "9" if ch.isdigit()
                   else ch for ch in text)


def column_shapes(rows: Sequence[Sequence[str]]) -> list[str | None]:
    """Per column, the shape most of its cells below the header share (at least 3 cells and
    SHAPE_SHARE of them), else None."""
    out: list[str | None] = []
    for c in range(len(rows[0]) if rows else 0):
        shapes = [shape(r[c]) for r in rows[1:] if c < len(r) and r[c]]
        best = max(set(shapes), key=shapes.count) if shapes else None
        ok = best is not None and shapes.count(best) >= max(3, SHAPE_SHARE * len(shapes))
        out.append(best if ok else None)
    return out


def _off_shape(text: str, column: str | None) -> bool:
    """The cell differs from its column's shape in letter case only ("c-310" among "A-101",
    "B-220"): a case the OCR confuses on a lone word (c/C, o/O, s/S, x/X...)."""
    own = shape(text)
    return column is not None and own != column and own.upper() == column.upper()


def _doubtful(text: str, words: Sequence[OcrWord], numeric: bool, column: str | None) -> bool:
    if not text:
        return True
    if not words:
        return False
    if _off_shape(text, column):
        return True
    if len(text) > DOUBTFUL_CHARS:
        return False
    return min(w.conf for w in words) < DOUBTFUL_CONF or (numeric and not is_number(text))


def cells_to_reread(blocks: Sequence[Block], width: int, height: int) -> list[CellCrop]:
    crops: list[CellCrop] = []
    for index, block in enumerate(blocks):
        if block.type != "table" or not block.rows or not block.columns or not block.bands:
            continue
        cols, bands = block.columns, block.bands
        numeric = numeric_columns(block.rows)
        shapes = column_shapes(block.rows)
        for r, (top, bottom) in enumerate(bands):
            pad_y = max(2, round(0.35 * (bottom - top)))
            for c, (left, right) in enumerate(cols):
                x0 = (cols[c - 1][1] + left) // 2 if c > 0 else left - pad_y
                x1 = (right + cols[c + 1][0]) // 2 if c + 1 < len(cols) else right + pad_y
                box = (max(0, x0), max(0, top - pad_y), min(width, x1), min(height, bottom + pad_y))
                text = block.rows[r][c]
                words = _cell_words(block, box)
                body = r > 0
                if (text or words) and not _doubtful(text, words, numeric[c] and body,
                                                     shapes[c] if body else None):
                    continue
                crops.append(CellCrop(index, r, c, box))
    return crops


@dataclass(frozen=True, slots=True)
class Stack:
    """The crops one under another on white, enlarged by `factor`; `starts` and `margin` are
    before enlarging (where each crop starts, and the white left of every crop)."""

    image: npt.NDArray[np.uint8]
    starts: list[int]
    margin: int
    factor: float


def stack(gray: npt.NDArray[np.uint8], boxes: Sequence[Box]) -> Stack:
    """Cells (or words: server/vision/service.py re-reads words in another script the same
    way) cut out of the page and stacked for one tesseract run."""
    heights = [b[3] - b[1] for b in boxes]
    margin = max(heights)
    gap = max(4, round(GAP * margin))
    width = max(b[2] - b[0] for b in boxes) + 2 * margin
    total = sum(heights) + gap * (len(boxes) + 1)
    out = np.full((total, width), 255, dtype=np.uint8)
    starts: list[int] = []
    y = gap
    for box, h in zip(boxes, heights, strict=True):
        x0, y0, x1, y1 = box
        cell = gray[y0:y1, x0:x1].copy()
        # Faint leftovers (a rule's grey edge, speckle) next to a lone digit turn "1" into
        # "I." (measured); on a crop with nothing else in it they are better gone.
        cell[cell > FAINT] = 255
        out[y : y + h, margin : margin + x1 - x0] = cell
        starts.append(y)
        y += h + gap
    # A lone digit is read far better larger than the page's text size: at 1.5x a "5" that
    # came back "S" (26 % sure) or nothing read "5" at 96 % (measured on the corpus).
    factor = min(MAX_ENLARGE, max(1.0, CROP_PX / float(np.median(heights))))
    if factor > 1.05:
        image = Image.fromarray(out).resize((round(width * factor), round(total * factor)),
                                            Image.Resampling.BICUBIC)
        out = np.asarray(image, dtype=np.uint8)
    else:
        factor = 1.0
    return Stack(out, starts, margin, factor)


def words_by_crop(boxes: Sequence[Box], stacked: Stack, page: OcrPage
                  ) -> dict[int, list[OcrWord]]:
    """The words tesseract read on a stack, by the index of the crop they lie in, with their
    boxes in the page's pixels (kept within the crop's columns); unreadable ones (no letter or
    digit, less sure than REREAD_CONF) left out; left to right within a crop."""
    f, starts, margin = stacked.factor, stacked.starts, stacked.margin
    found: dict[int, list[OcrWord]] = {}
    for w in page.words:
        if w.conf < REREAD_CONF or not any(ch.isalnum() for ch in w.text):
            continue
        x0, y0 = math.floor(w.box[0] / f), math.floor(w.box[1] / f)
        x1, y1 = math.ceil(w.box[2] / f), math.ceil(w.box[3] / f)
        cy = (y0 + y1) / 2
        for k, crop in enumerate(boxes):
            h = crop[3] - crop[1]
            if starts[k] <= cy < starts[k] + h:
                dx, dy = crop[0] - margin, crop[1] - starts[k]
                box = (max(crop[0], x0 + dx), y0 + dy, min(crop[2], x1 + dx), y1 + dy)
                found.setdefault(k, []).append(OcrWord(w.text, w.conf, box))
                break
    for words in found.values():
        words.sort(key=lambda w: w.box[0])
    return found


def apply_reread(blocks: list[Block], crops: Sequence[CellCrop], stacked: Stack,
                 page: OcrPage) -> int:
    """Put the words read on the stacked crops into their cells; the change in the page's
    word count (words added, less those of doubtful cells they replaced)."""
    found = words_by_crop([c.box for c in crops], stacked, page)
    added = 0
    touched: set[int] = set()
    for k, words in found.items():
        crop = crops[k]
        block = blocks[crop.block]
        assert block.rows is not None
        text = " ".join(w.text for w in words)
        old = _cell_words(block, crop.box)
        if old:
            body = crop.row > 0
            before = block.rows[crop.row][crop.column]
            numeric = numeric_columns(block.rows)[crop.column] and body
            column = column_shapes(block.rows)[crop.column] if body else None
            better = ((numeric and is_number(text) and not is_number(before))
                      or (column is not None and shape(text) == column != shape(before))
                      or (not _off_shape(text, column)
                          and mean_confidence(words) > mean_confidence(old)))
            if not better:
                continue
            block.words = [w for w in block.words if w not in old]
        block.words += words
        block.rows[crop.row][crop.column] = text
        added += len(words) - len(old)
        touched.add(crop.block)
    for index in touched:
        block = blocks[index]
        assert block.rows is not None
        block.words.sort(key=lambda w: (w.box[1], w.box[0]))
        block.text = "\n".join("\t".join(cells) for cells in block.rows)
        block.box = union([block.box, *(w.box for w in block.words)])
        block.confidence = mean_confidence(block.words)
    return added
