"""Tables from alignment: consecutive rows split into several segments whose x-extents line up.

Within one region (a page column or a full-width band), a run of at least MIN_ROWS rows that
each hold two or more segments (words separated by a gap much wider than a word space) is a
table candidate. Its columns are the clusters of overlapping segment x-extents across the run
(left-, right- and centre-aligned cells all overlap within their column). The candidate is a
table when every segment of every row falls into its own column and at least two columns are
filled in two or more rows. Runs whose cells read like lines of prose (many words per segment)
are left to the paragraph builder: those are text columns the gutter search did not split.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.vision.geometry import Block, Segment, center, mean_confidence, median, union

Row = list[Segment]

MIN_ROWS = 2
MAX_ROW_GAP = 2.5  # line heights between two rows of one table
PROSE_WORDS = 4.0


def split_tables(rows: Sequence[Row], line_h: float) -> tuple[list[Block], list[Row]]:
    """(tables, the rows that are not part of one), rows in their original order."""
    tables: list[Block] = []
    rest: list[Row] = []
    i = 0
    while i < len(rows):
        if len(rows[i]) >= 2:
            j = i + 1
            while (j < len(rows) and len(rows[j]) >= 2
                   and _top(rows[j]) - _bottom(rows[j - 1]) <= MAX_ROW_GAP * line_h):
                j += 1
            table = make_table(rows[i:j], line_h)
            if table is not None:
                tables.append(table)
                i = j
                continue
        rest.append(rows[i])
        i += 1
    return tables, rest


def _top(row: Row) -> int:
    return min(s.box[1] for s in row)


def _bottom(row: Row) -> int:
    return max(s.box[3] for s in row)


def column_clusters(rows: Sequence[Row], tolerance: float) -> list[tuple[int, int]]:
    spans = sorted((s.box[0], s.box[2]) for row in rows for s in row)
    clusters: list[list[int]] = []
    for x0, x1 in spans:
        if clusters and x0 <= clusters[-1][1] + tolerance:
            clusters[-1][1] = max(clusters[-1][1], x1)
        else:
            clusters.append([x0, x1])
    return [(a, b) for a, b in clusters]


def make_table(rows: Sequence[Row], line_h: float) -> Block | None:
    if len(rows) < MIN_ROWS:
        return None
    columns = column_clusters(rows, tolerance=0.3 * line_h)
    if len(columns) < 2:
        return None
    grid: list[list[str]] = []
    for row in rows:
        cells = [""] * len(columns)
        for seg in row:
            cx = center(seg.box)[0]
            k = next(i for i, (a, b) in enumerate(columns) if a <= cx <= b)
            if cells[k]:
                return None  # two cells of one row in one column: not aligned
            cells[k] = seg.text
        grid.append(cells)
    filled = [sum(1 for cells in grid if cells[k]) for k in range(len(columns))]
    if sum(1 for n in filled if n >= 2) < 2:
        return None
    if median([len(s.words) for row in rows for s in row]) >= PROSE_WORDS:
        return None
    words = [w for row in rows for seg in row for w in seg.words]
    return Block(
        type="table",
        box=union(w.box for w in words),
        words=words,
        text="\n".join("\t".join(cells) for cells in grid),
        confidence=mean_confidence(words),
        rows=grid,
        columns=list(columns),
        bands=[(_top(row), _bottom(row)) for row in rows],
    )
