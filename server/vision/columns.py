"""Page columns and reading order.

A column gutter is a vertical strip that the text of split rows (rows holding more than one
segment) does not cross. Rows that are one segment wide (titles, full-width paragraphs, rules)
are left out of that search, so a heading across both columns does not hide the gutter; they
are later read as "spanning" items that cut the page into horizontal bands.

A table also has such strips between its columns; what tells prose columns from a table is the
text on both sides: at least 3 segments, typically of 3 or more words (lines of running text),
where table cells are mostly one or two words.

Reading order: band by band from the top; inside a band, the left column top to bottom, then
the next column; a spanning item is a band of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.vision.geometry import Segment, center, median, rows_of
from server.vision.ocr import Box

Gutter = tuple[int, int]  # x0, x1 of the empty strip

MIN_SIDE_SEGMENTS = 3
MIN_PROSE_WORDS = 3.0


def find_gutters(segments: Sequence[Segment], page_width: int, line_h: float) -> list[Gutter]:
    split = [s for row in rows_of(segments) if len(row) >= 2 for s in row]
    if len(split) < 2 * MIN_SIDE_SEGMENTS:
        return []
    x_min = min(s.box[0] for s in split)
    x_max = max(s.box[2] for s in split)
    span = x_max - x_min
    if span <= 0:
        return []
    coverage = np.zeros(span + 1, dtype=np.int32)
    for s in split:
        coverage[s.box[0] - x_min : s.box[2] - x_min] += 1
    # A few stray words (a page number, a figure label) may sit in a gutter.
    allowed = max(0, round(0.05 * len(split)))
    min_width = max(1.5 * line_h, 0.02 * page_width)
    candidates: list[Gutter] = []
    free = np.flatnonzero(coverage <= allowed)
    if free.size:
        # Split the free x positions into runs of consecutive values.
        breaks = np.flatnonzero(np.diff(free) > 1)
        starts = np.concatenate(([free[0]], free[breaks + 1]))
        ends = np.concatenate((free[breaks], [free[-1]]))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            if b - a + 1 >= min_width and a > 0.1 * span and b < 0.9 * span:
                candidates.append((x_min + a, x_min + b + 1))
    return _validated(candidates, split)


def _validated(gutters: list[Gutter], segments: Sequence[Segment]) -> list[Gutter]:
    """Drop gutters whose sides are not prose, one at a time, until the rest all pass."""
    while gutters:
        edges = [-(10**9), *[g for gutter in gutters for g in gutter], 10**9]
        columns = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]
        members: list[list[Segment]] = [[] for _ in columns]
        for s in segments:
            for k, (lo, hi) in enumerate(columns):
                if s.box[0] >= lo and s.box[2] <= hi:
                    members[k].append(s)
                    break
        scores = [_prose_score(m) for m in members]
        worst = min(range(len(gutters)), key=lambda i: min(scores[i], scores[i + 1]))
        if min(scores[worst], scores[worst + 1]) >= MIN_PROSE_WORDS:
            return gutters
        gutters = gutters[:worst] + gutters[worst + 1 :]
    return []


def _prose_score(segments: Sequence[Segment]) -> float:
    if len(segments) < MIN_SIDE_SEGMENTS:
        return 0.0
    return median([len(s.words) for s in segments])


def _column_of(box: Box, gutters: Sequence[Gutter]) -> int | None:
    """Column index, or None for an item that runs across a gutter."""
    for g0, g1 in gutters:
        if box[0] < g0 and box[2] > g1:
            return None
    cx = center(box)[0]
    return sum(1 for g0, g1 in gutters if cx > (g0 + g1) / 2)


def reading_regions(boxes: Sequence[Box], gutters: Sequence[Gutter]) -> list[list[int]]:
    """Indices of `boxes` grouped into regions, regions in reading order."""
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0]))
    if not gutters:
        return [order] if order else []
    regions: list[list[int]] = []
    band: list[list[int]] = [[] for _ in range(len(gutters) + 1)]
    spanning: list[int] = []

    def flush_band() -> None:
        regions.extend(list(column) for column in band if column)
        for column in band:
            column.clear()

    for i in order:
        column = _column_of(boxes[i], gutters)
        if column is None:
            flush_band()
            spanning.append(i)
            continue
        if spanning:
            regions.append(spanning)
            spanning = []
        band[column].append(i)
    flush_band()
    if spanning:
        regions.append(spanning)
    return regions
