"""Shared layout types: boxes, segments (runs of words on one visual line) and typed blocks."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from server.vision.ocr import Box, OcrWord

BlockType = Literal["title", "paragraph", "list", "table", "figure"]


def union(boxes: Iterable[Box]) -> Box:
    xs0, ys0, xs1, ys1 = zip(*boxes, strict=True)
    return min(xs0), min(ys0), max(xs1), max(ys1)


def width(box: Box) -> int:
    return box[2] - box[0]


def height(box: Box) -> int:
    return box[3] - box[1]


def center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def contains_point(box: Box, point: tuple[float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def median(values: Sequence[float], default: float = 0.0) -> float:
    return float(statistics.median(values)) if values else default


def vertical_overlap(a: Box, b: Box) -> int:
    return min(a[3], b[3]) - max(a[1], b[1])


@dataclass(slots=True)
class Segment:
    """Words on one visual line with ordinary word spacing between them (no column gap)."""

    words: list[OcrWord]
    box: Box = (0, 0, 0, 0)

    def __post_init__(self) -> None:
        self.words.sort(key=lambda w: w.box[0])
        self.box = union(w.box for w in self.words)

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)


@dataclass(slots=True)
class Block:
    type: BlockType
    box: Box
    words: list[OcrWord] = field(default_factory=list)  # in reading order
    text: str = ""
    confidence: float = 0.0  # mean word confidence, 0-1 (0 for a figure without text)
    rows: list[list[str]] | None = None  # tables: cells, rows x columns
    order: int = 0
    # Tables: each column's x extent and each row's y extent (where an empty cell is re-read).
    columns: list[tuple[int, int]] | None = None
    bands: list[tuple[int, int]] | None = None


def mean_confidence(words: Sequence[OcrWord]) -> float:
    if not words:
        return 0.0
    return round(sum(w.conf for w in words) / len(words) / 100.0, 3)


def rows_of(items: Sequence[Segment]) -> list[list[Segment]]:
    """Cluster segments into visual rows (vertical overlap of at least half the smaller one),
    each row sorted left to right, rows top to bottom."""
    rows: list[tuple[Box, list[Segment]]] = []
    for seg in sorted(items, key=lambda s: (s.box[1] + s.box[3], s.box[0])):
        for i in range(len(rows) - 1, max(-1, len(rows) - 4), -1):
            band, members = rows[i]
            if vertical_overlap(band, seg.box) >= 0.5 * min(height(band), height(seg.box)):
                members.append(seg)
                break
        else:
            rows.append((seg.box, [seg]))
    return [sorted(members, key=lambda s: s.box[0]) for _, members in rows]
