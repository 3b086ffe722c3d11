"""Scores of one answered page against its truth.

- CER: edit distance between the page's text and the truth (both in reading order, whitespace
  collapsed), over the truth's length;
- word recall: share of the truth's words (as a multiset) found anywhere in the answer;
- reading order: of the words found, the share that come in the truth's order (the longest
  common subsequence of the two word sequences over the words in common);
- table cells: share of the truth's table cells that the answer has, exactly, at the same row
  and column of some table block (each truth row takes the answer row that matches it best);
- coverage: share of the OCR's words that appear in the answer's blocks.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance, one numpy row at a time (insertions by a running minimum)."""
    if not a:
        return len(b)
    if not b:
        return len(a)
    codes_b = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    positions = np.arange(len(b) + 1, dtype=np.int64)
    row = positions.copy()
    for i, ch in enumerate(a, start=1):
        cost = (codes_b != ord(ch)).astype(np.int64)
        candidate = np.empty_like(row)
        candidate[0] = i
        candidate[1:] = np.minimum(row[1:] + 1, row[:-1] + cost)
        # row[j] = min(candidate[j], row[j-1] + 1): a running minimum of candidate - j, plus j.
        row = np.minimum.accumulate(candidate - positions) + positions
    return int(row[-1])


def cer(answer: str, truth: str) -> float:
    a, t = normalize(answer), normalize(truth)
    return levenshtein(a, t) / max(1, len(t))


def word_recall(answer: str, truth: str) -> float:
    want = Counter(normalize(truth).split())
    have = Counter(normalize(answer).split())
    total = sum(want.values())
    return sum((want & have).values()) / total if total else 1.0


def reading_order(answer: str, truth: str) -> float:
    t, a = normalize(truth).split(), normalize(answer).split()
    common = sum((Counter(t) & Counter(a)).values())
    if not common:
        return 0.0
    matcher = difflib.SequenceMatcher(None, t, a, autojunk=False)
    in_order = sum(block.size for block in matcher.get_matching_blocks())
    return in_order / common


def table_cells(answer_rows: Sequence[Sequence[str]], truth: Sequence[Sequence[str]]
                ) -> tuple[int, int]:
    """(cells right, cells in the truth)."""
    total = sum(len(r) for r in truth)
    used: set[int] = set()
    right = 0
    for want in truth:
        best, best_i = 0, -1
        for i, row in enumerate(answer_rows):
            if i in used:
                continue
            hits = sum(1 for k, cell in enumerate(want)
                       if k < len(row) and normalize(row[k]) == normalize(cell))
            if hits > best:
                best, best_i = hits, i
        if best_i >= 0:
            used.add(best_i)
            right += best
    return right, total


@dataclass(slots=True)
class Score:
    cer: float
    word_recall: float
    reading_order: float
    cells_right: int
    cells_total: int
    ocr_words: int
    covered_words: int
    seconds: float  # wall time of the request, per page
    cpu: float  # CPU time of the server process and its children, per page
