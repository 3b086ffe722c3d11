"""Figures: large regions of ink that OCR did not read as text (best effort).

Tesseract's TSV does not say "image" for a region; it either leaves it out or reports a huge,
low-confidence "word" there. So figures come from the pixels: the page is cut into cells of
about a third of a text line; a cell holds ink when enough of its pixels differ clearly from
the background (the page's median grey); cells under recognised words (plus a one-cell halo)
are cleared; the rest is grouped into connected regions (bridging one-cell gaps). A region is a
figure when it is at least FIGURE_LINES text lines tall and wide and covers at least
MIN_AREA of the page. Thin rules and underlines fail the size test. Regions that hold much
recognised text are not figures: a shaded text box (TEXT_BOX_AREA of its area is words), or
the frame of a text box (little ink of its own around some text). Chart labels cover less than
that, so a chart keeps its labels as the figure's text. A region whose ink is mostly thin
full-length horizontal or vertical lines is the grid of a ruled table, not a figure either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from server.vision.geometry import center, contains_point, height, width
from server.vision.ocr import Box

FIGURE_LINES = 4.0
MIN_AREA = 0.005
INK_DELTA = 48  # grey levels from the background that count as ink
CELL_INK = 0.03  # fraction of a cell's pixels that makes it an ink cell
TEXT_BOX_AREA = 0.12  # words covering this much of a region: a shaded text box
FRAME_TEXT_AREA = 0.05  # ... or this much of a region with little ink: a frame or table grid
FRAME_INK = 0.15
RULE_FILL = 0.6  # a row/column of cells this full is a ruling line...
RULE_CELLS = 2  # ...when the run of such rows is at most this thick
RULED_SHARE = 0.7  # a region with this share of its ink on ruling lines is a table grid
RULE_RUN = 0.08  # straight ink this share of the page long is a rule, never a glyph
HANGING_SHARE = 0.1  # of a long thin run's columns with ink hanging below: a headline
RULE_THICKNESS = 0.005  # ...if it is at most this share of the page thick (2200 px: 11 px)


def find_figures(gray: npt.NDArray[np.uint8], text_boxes: Sequence[Box],
                 line_h: float) -> list[Box]:
    h, w = gray.shape
    cell = int(max(4, min(32, round(line_h / 3))))
    gh, gw = h // cell, w // cell
    if gh < 3 or gw < 3:
        return []
    pixels = gray[: gh * cell, : gw * cell]
    background = int(np.median(pixels[::4, ::4]))
    ink = np.abs(pixels.astype(np.int16) - background) > INK_DELTA
    raw = ink.reshape(gh, cell, gw, cell).mean(axis=(1, 3)) > CELL_INK
    mask = raw.copy()
    for x0, y0, x1, y1 in text_boxes:
        mask[max(0, y0 // cell - 1) : y1 // cell + 2, max(0, x0 // cell - 1) : x1 // cell + 2] = 0
    bridged = mask.copy()
    bridged[1:, :] |= mask[:-1, :]
    bridged[:-1, :] |= mask[1:, :]
    bridged[:, 1:] |= mask[:, :-1]
    bridged[:, :-1] |= mask[:, 1:]
    figures: list[Box] = []
    min_side = FIGURE_LINES * line_h
    for cells in _components(bridged):
        own = [(r, c) for r, c in cells if mask[r, c]]
        if not own:
            continue
        rows = [r for r, _ in own]
        cols = [c for _, c in own]
        box = (min(cols) * cell, min(rows) * cell, (max(cols) + 1) * cell, (max(rows) + 1) * cell)
        if width(box) < min_side or height(box) < min_side:
            continue
        area = width(box) * height(box)
        if area < MIN_AREA * w * h:
            continue
        density = len(own) / ((max(rows) - min(rows) + 1) * (max(cols) - min(cols) + 1))
        words = text_area(box, text_boxes)
        if words >= TEXT_BOX_AREA * area or (
                density < FRAME_INK and words >= FRAME_TEXT_AREA * area):
            continue
        r0, c0 = min(rows), min(cols)
        region = np.zeros((max(rows) - r0 + 1, max(cols) - c0 + 1), dtype=bool)
        region[np.array(rows) - r0, np.array(cols) - c0] = True
        # Ruling lines are judged on the ink before the words were cleared: the halo around
        # each word cuts the lines of a ruled table into pieces.
        if _ruled(raw[r0 : r0 + region.shape[0], c0 : c0 + region.shape[1]], region):
            continue
        figures.append(box)
    return figures


def text_area(box: Box, text_boxes: Sequence[Box]) -> int:
    """Area of the word boxes whose centre lies in `box`."""
    return sum(width(b) * height(b) for b in text_boxes if contains_point(box, center(b)))


def _ruled(ink: npt.NDArray[np.bool_], region: npt.NDArray[np.bool_]) -> bool:
    """The region's own ink (`region`) lies mostly on thin lines that span the whole box in
    `ink` (a table grid), as opposed to filled areas or drawings."""
    def thin(full: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        # Full rows (or columns) in runs of at most RULE_CELLS: lines, not a filled block.
        out = np.zeros_like(full)
        i = 0
        while i < len(full):
            if full[i]:
                j = i
                while j < len(full) and full[j]:
                    j += 1
                if j - i <= RULE_CELLS:
                    out[i:j] = True
                i = j
            else:
                i += 1
        return out

    rows = thin(ink.mean(axis=1) >= RULE_FILL)
    cols = thin(ink.mean(axis=0) >= RULE_FILL)
    on_rules = region & (rows[:, None] | cols[None, :])
    return bool(on_rules.sum() >= RULED_SHARE * region.sum())


def _components(mask: npt.NDArray[np.bool_]) -> list[list[tuple[int, int]]]:
    """4-connected regions of True cells (a plain BFS: a page is a few ten thousand cells)."""
    seen = np.zeros_like(mask)
    rows, cols = mask.shape
    found: list[list[tuple[int, int]]] = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue = deque([(int(r0), int(c0))])
        cells: list[tuple[int, int]] = []
        while queue:
            r, c = queue.popleft()
            cells.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < rows and 0 <= nc < cols and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        found.append(cells)
    return found


def merge_boxes(boxes: Sequence[Box], margin: int = 0) -> list[Box]:
    """Union boxes that overlap (after growing them by `margin`) until none do."""
    merged = [tuple(b) for b in boxes]
    changed = True
    while changed:
        changed = False
        out: list[tuple[int, ...]] = []
        for box in merged:
            for i, other in enumerate(out):
                if (box[0] - margin < other[2] and other[0] - margin < box[2]
                        and box[1] - margin < other[3] and other[1] - margin < box[3]):
                    out[i] = (min(box[0], other[0]), min(box[1], other[1]),
                              max(box[2], other[2]), max(box[3], other[3]))
                    changed = True
                    break
            else:
                out.append(box)
        merged = out
    return [(b[0], b[1], b[2], b[3]) for b in merged]


def erase_rules(gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8] | None:
    """A copy of the page without long straight lines (table rules, underlines, frames), for
    OCR only: tesseract reads a rule next to a cell as "|" or merges it into the cell's text.
    Lines are runs of ink at least RULE_RUN of the page's width (or height) long (no glyph is
    that long) and at most RULE_THICKNESS of it thick (filled bars and photos are thicker).
    None when the page has no such line (the original can be used as it is)."""
    h, w = gray.shape
    background = int(np.median(gray[::4, ::4]))
    ink = np.abs(gray.astype(np.int16) - background) > INK_DELTA
    thick = max(4, int(RULE_THICKNESS * max(h, w))) + 1
    across = _long_runs(ink, max(40, int(RULE_RUN * w)), axis=1)
    across &= ~_long_runs(across, thick, axis=0)
    across = _without_headlines(ink, across, thick)
    down = _long_runs(ink, max(40, int(RULE_RUN * h)), axis=0)
    down &= ~_long_runs(down, thick, axis=1)
    lines = across | down
    if not lines.any():
        return None
    # The grey edges of a resampled or scanned rule are not "ink": a rule erased without them
    # leaves two faint lines, which tesseract reads as a row of dashes.
    for shift in (1, 2):
        lines[shift:, :] |= across[:-shift, :]
        lines[:-shift, :] |= across[shift:, :]
        lines[:, shift:] |= down[:, :-shift]
        lines[:, :-shift] |= down[:, shift:]
    out = gray.copy()
    out[lines] = background
    return out


def _without_headlines(ink: npt.NDArray[np.bool_], across: npt.NDArray[np.bool_],
                       thick: int) -> npt.NDArray[np.bool_]:
    """`across` less the runs that are the headline of a word of Devanagari: a title's
    headline is as long and thin as a rule (at 150 dpi, "मासिक" in 80 px type drew a 184 px
    line: erased, the word read "siren"), but letters hang from it: stems, each about a
    stroke wide, going down from it with nothing above. A rule has at most a few vertical
    rules meeting it, and a table's shaded header row under it is one wide run, not stems.
    A run (the rows of one line, together) is kept as a rule unless HANGING_SHARE of its
    columns are such stems (runs of at most 2 `thick` columns inked in the rows just below it
    and not in the rows above it)."""
    h = ink.shape[0]
    out = across.copy()
    rows = np.flatnonzero(across.any(axis=1))
    if rows.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(rows) > 1)
    for y0, y1 in zip(np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks], rows[-1]] + 1,
                      strict=True):
        line = np.concatenate(([False], across[y0:y1].any(axis=0), [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(line))
        # Two rows either side are the line's grey edge, not what meets it.
        # Stems are looked for just under the line, before the letters' bowls widen them.
        below = ink[min(h, y1 + 2) : min(h, y1 + 2 + max(2, thick // 2))]
        above = ink[max(0, y0 - 2 - thick) : max(0, y0 - 2)]
        if below.shape[0] < 2:
            continue
        stems = (below.mean(axis=0) >= 0.5) & ~above.any(axis=0)
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            run = np.concatenate(([False], stems[a:b], [False])).astype(np.int8)
            ends = np.flatnonzero(np.diff(run))
            widths = ends[1::2] - ends[::2]
            if widths[widths <= 2 * thick].sum() >= HANGING_SHARE * (b - a):
                out[y0:y1, a:b] = False
    return out


def _long_runs(ink: npt.NDArray[np.bool_], length: int, axis: int) -> npt.NDArray[np.bool_]:
    """Pixels on runs of ink at least `length` long along `axis`."""
    found = np.zeros_like(ink)
    if ink.shape[axis] < length:
        return found
    # Only rows (columns) with that much ink at all can hold such a run: on a text page that
    # leaves a small part of the image to scan.
    lanes = np.flatnonzero(ink.sum(axis=axis) >= length)
    if lanes.size == 0:
        return found
    sub = (ink[lanes, :] if axis == 1 else ink[:, lanes].T).astype(np.int32)
    n = sub.shape[1]
    total = np.zeros((sub.shape[0], n + 1), dtype=np.int32)
    np.cumsum(sub, axis=1, out=total[:, 1:])
    starts = np.zeros((sub.shape[0], n + 1), dtype=np.int32)
    starts[:, : n - length + 1] = (total[:, length:] - total[:, : n - length + 1]) == length
    # Every pixel within `length` after a start lies on the run.
    covered = np.cumsum(starts, axis=1)
    covered[:, length:] -= covered[:, :-length].copy()
    hit = covered[:, :n] > 0
    if axis == 1:
        found[lanes, :] = hit
    else:
        found[:, lanes] = hit.T
    return found
