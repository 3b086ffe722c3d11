"""Which scripts a page is printed in, and which way up, from its pixels (issue 16 items 1 and 4,
decision 16V2).

Devanagari hangs its letters from a headline (shirorekha): a horizontal stroke drawn across the
whole top of every word. No Latin letter does: the densest row of a Latin text line (the top of
the x-height, or the baseline) is a string of separate curves and serifs. So, on the prepared
(deskewed, upright, contrast-stretched) page:

1. text lines are the runs of rows with ink in the page's row profile (taller than a rule);
2. a line's headline share is, over the columns of that line that hold any ink, the largest
   share inked in one row (in a band of HEADLINE_ROWS rows, which absorbs a headline one pixel
   thick but slanted by a residual tilt) within the upper part of the line;
3. a line is Devanagari when that share is at least HEADLINE_SHARE (measured on the evaluation
   corpus: Devanagari lines 0.7-0.95, Latin ones below 0.4);

and the page gets Hindi only when it has a Devanagari line, English only when it has a line
that is not. The same test on one word's box tells a Devanagari word that the OCR read as Latin
("रिपोर्ट" as "Rave"), which server/vision/service.py then re-reads with Hindi alone.

Tesseract's OSD (`--psm 0`) named the script too, but for the whole page (one script for a page
of both), at 0.3-0.6 s of CPU a page; this costs a few milliseconds.

Which way up: a Devanagari line's headline is at its top; a Latin line has more ink above its
core (the x-height band) than below it. When the lines agree (`upright_turn`), OSD is not run;
a page lying on its side, or one whose lines do not settle it, still goes to OSD.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.vision.ocr import Box

Gray = npt.NDArray[np.uint8]

INK = 128  # darker than this is ink on a prepared page (ink stretched to black, paper white)
MIN_LINE_ROWS = 8  # thinner runs of inked rows are rules, underlines or specks
HEADLINE_TOP = 0.6  # the headline is looked for in this upper share of a line (matras above)
LONG_RUN = 0.8  # line heights: a run of ink in one row at least this long is a headline
HEADLINE_SHARE = 0.35  # a line whose headline row covers this share of its inked columns
MIN_INK_COLUMNS = 12  # fewer inked columns than this: too little to tell
CORE_SHARE = 0.5  # rows with this share of a line's densest row's ink are its core (x-height)
LEAN = 1.5  # ink above the core this many times the ink below: upright (and the reverse)
MIN_VOTES = 4  # text lines that must agree on which way up the page is...
VOTE_RATIO = 3.0  # ...and outnumber those that disagree this many times
DEVANAGARI = re.compile("[\u0900-\u097f]")


@dataclass(frozen=True, slots=True)
class PageScripts:
    devanagari_lines: int
    other_lines: int  # text lines without a headline (Latin, digits)

    def languages(self, allowed: list[str]) -> list[str]:
        """The OCR languages for this page out of `allowed` (the server's default list):
        Hindi where Devanagari is printed, English (and any other non-Devanagari language of
        the list) where something else is; the whole list when the page has no text line."""
        if not self.devanagari_lines and not self.other_lines:
            return allowed
        latin = [n for n in allowed if n != "hin"]
        if not self.devanagari_lines:
            return latin or allowed
        hindi = [n for n in allowed if n == "hin"]
        if not hindi:
            return allowed
        return hindi + latin if self.other_lines else hindi


def headline_share(ink: npt.NDArray[np.bool_]) -> float:
    """For a line's (or a word's) ink: the largest share of its inked columns that one row in
    its upper HEADLINE_TOP part covers with long runs of ink (each at least LONG_RUN line
    heights: a headline spans a word, a Latin row of ink breaks at every letter). 0 when too
    little ink."""
    columns = ink.any(axis=0)
    inked = int(columns.sum())
    height = ink.shape[0]
    if inked < MIN_INK_COLUMNS or height < 2:
        return 0.0
    top = ink[: max(1, round(HEADLINE_TOP * height))]
    padded = np.zeros((top.shape[0], top.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = top
    steps = np.diff(padded, axis=1)
    starts_r, starts_c = np.nonzero(steps == 1)
    ends_c = np.nonzero(steps == -1)[1]
    lengths = ends_c - starts_c  # runs come in the same row-major order for both
    long_ink = np.bincount(starts_r, weights=lengths * (lengths >= LONG_RUN * height),
                           minlength=top.shape[0])
    return float(long_ink.max()) / inked
def text_lines(ink: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(top, bottom) of each run of rows with ink, at least MIN_LINE_ROWS tall."""
    rows = ink.sum(axis=1)
    if rows.size == 0 or int(rows.max()) == 0:
        return []
    # Rows with a trace of ink (a speck, a long rule's edge) are not text.
    level = max(1, int(0.02 * float(np.percentile(rows[rows > 0], 90))))
    inked = np.concatenate(([False], rows > level, [False]))
    edges = np.flatnonzero(np.diff(inked.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)
            if b - a >= MIN_LINE_ROWS]


def page_scripts(gray: Gray) -> PageScripts:
    ink = gray < INK
    deva = other = 0
    for top, bottom in text_lines(ink):
        band = ink[top:bottom]
        if int(band.any(axis=0).sum()) < MIN_INK_COLUMNS:
            continue
        if headline_share(band) >= HEADLINE_SHARE:
            deva += 1
        else:
            other += 1
    return PageScripts(deva, other)


def looks_devanagari(gray: Gray, box: Box) -> bool:
    """Whether the ink in `box` (one word, in the prepared page's pixels) hangs from a
    headline."""
    x0, y0, x1, y1 = box
    ink = gray[max(0, y0) : y1, max(0, x0) : x1] < INK
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return False
    return headline_share(ink[rows[0] : rows[-1] + 1]) >= HEADLINE_SHARE


def line_leans(band: npt.NDArray[np.bool_]) -> int:
    """+1 when a text line's ink says it is upright, -1 upside down, 0 when it cannot tell.
    Devanagari hangs from a headline at its top. Latin letters share a core (the x-height
    band, where most rows of ink are), and more of them reach above it (capitals, digits,
    b d f h k l t) than below it (g j p q y)."""
    top = headline_share(band)
    bottom = headline_share(band[::-1])
    if max(top, bottom) >= HEADLINE_SHARE:
        return 1 if top > bottom else -1
    rows = band.sum(axis=1)
    core = np.flatnonzero(rows >= CORE_SHARE * float(rows.max()))
    above = float(rows[: core[0]].sum())
    below = float(rows[core[-1] + 1 :].sum())
    if above > LEAN * below:
        return 1
    if below > LEAN * above:
        return -1
    return 0


def upright_votes(gray: Gray) -> tuple[int, int]:
    """(text lines that say the page is upright, lines that say it is upside down)."""
    ink = gray < INK
    up = down = 0
    for top, bottom in text_lines(ink):
        lean = line_leans(ink[top:bottom])
        up += lean > 0
        down += lean < 0
    return up, down


def upright_turn(gray: Gray) -> int | None:
    """Degrees (0 or 180) the page needs turning by its text lines' own evidence, or None
    when they do not settle it (few lines, a split vote): then OSD is asked. Measured on the
    evaluation corpus: every upright page voted 4-15 to 0-4, every page turned upside down
    the reverse."""
    up, down = upright_votes(gray)
    if up >= MIN_VOTES and up >= VOTE_RATIO * down:
        return 0
    if down >= MIN_VOTES and down >= VOTE_RATIO * up:
        return 180
    return None
