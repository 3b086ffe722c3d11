"""Where each extracted value came from: the model that produced it and, when the value is
printed verbatim in the OCR words, the page and the box around those words.

Fields are named by JSON Pointer (RFC 6901: "/total", "/items/0/name"), one entry per leaf
value. Matching is token by token on normalised text (Unicode NFKC, case-folded, punctuation
trimmed at word edges); numbers also match a word that reads as the same number ("1,250.00"
for 1250). Values that are not found keep the model as their only provenance, with the page
when the document has a single page, and say so: `verified` is true for a string or number
found printed on the pages, false for one that is not (a model may have misread or invented
it, issue 16), and None (left out of the answer) for booleans and null, which a page never
prints as such.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from server.vision.geometry import union
from server.vision.ocr import Box, OcrWord

MAX_TOKENS = 40  # longer values (a whole paragraph) are not worth locating word by word
# Quotes, brackets, dashes, bullets and the Devanagari danda, as escapes (ruff: ambiguous).
_EDGE_PUNCT = ("\"'`.,;:!?()[]{}<>|/\\*-\u00ab\u00bb\u201c\u201d\u2018\u2019\u00b7\u2022"
               "\u2013\u2014\u0964\u0965")
_NUMBER_JUNK = re.compile(r"[,\s$€£₹%]|^rs\.?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class FieldSource:
    source: str  # vlm | vlm_repaired | text_model
    page: int | None = None
    bbox: Box | None = None
    verified: bool | None = None


def pointer(parts: Sequence[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def leaves(value: Any, parts: tuple[str | int, ...] = ()) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from leaves(sub, (*parts, key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from leaves(sub, (*parts, i))
    else:
        yield pointer(parts), value


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold().strip(_EDGE_PUNCT)


def _as_number(text: str) -> float | None:
    cleaned = _NUMBER_JUNK.sub("", unicodedata.normalize("NFKC", text)).strip(_EDGE_PUNCT)
    try:
        return float(cleaned)
    except ValueError:
        return None


def locate(value: Any, pages: Sequence[tuple[int, Sequence[OcrWord]]]
           ) -> tuple[int, Box] | None:
    """(page, box) of the first place `value` is printed, or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        for number, words in pages:
            for w in words:
                if _as_number(w.text) == float(value):
                    return number, w.box
        return None
    tokens = [t for t in (_norm(t) for t in str(value).split()) if t]
    if not tokens or len(tokens) > MAX_TOKENS:
        return None
    for number, words in pages:
        normed = [_norm(w.text) for w in words]
        for i in range(len(words) - len(tokens) + 1):
            if normed[i : i + len(tokens)] == tokens:
                return number, union(w.box for w in words[i : i + len(tokens)])
    return None


def provenance(data: dict[str, Any], source: str,
               pages: Sequence[tuple[int, Sequence[OcrWord]]]) -> dict[str, FieldSource]:
    only_page = pages[0][0] if len(pages) == 1 else None
    out: dict[str, FieldSource] = {}
    for path, value in leaves(data):
        found = locate(value, pages)
        checkable = not (isinstance(value, bool) or value is None)
        if found is None:
            out[path] = FieldSource(source, only_page, verified=False if checkable else None)
        else:
            out[path] = FieldSource(source, found[0], found[1], verified=True)
    return out
