"""Tesseract OCR through its CLI: PNG on stdin, TSV on stdout, parsed into words with boxes.

Page segmentation defaults to mode 11 ("sparse text"): with the automatic mode (3) tesseract
dropped whole table columns of short numeric cells in our tests, while sparse mode returns every
word and leaves the grouping into lines, columns, tables and blocks to server/vision/layout.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from server.vision.proc import ToolError, ToolMissing, ToolTimeout, run_tool

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in page pixels (x1/y1 exclusive)

_LANG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{1,40}$")
_installed: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class OcrWord:
    text: str
    conf: float  # 0-100, tesseract's word confidence
    box: Box
    block: int = 0  # tesseract's block/paragraph/line numbers (hints; layout regroups)
    par: int = 0
    line: int = 0


@dataclass(slots=True)
class OcrPage:
    width: int
    height: int
    words: list[OcrWord] = field(default_factory=list)
    # Level-2 blocks in which tesseract found no text: image regions, by its own analysis.
    empty_blocks: list[Box] = field(default_factory=list)


def parse_tsv(tsv: str) -> OcrPage:
    """Tesseract TSV (level, page, block, par, line, word, left, top, width, height, conf, text)."""
    page = OcrPage(0, 0)
    blocks: dict[int, Box] = {}
    blocks_with_text: set[int] = set()
    blank: list[Box] = []
    for raw in tsv.splitlines()[1:]:  # the first line is the header
        cols = raw.split("\t")
        if len(cols) < 11:
            continue
        try:
            level, block, par, line = int(cols[0]), int(cols[2]), int(cols[3]), int(cols[4])
            left, top, width, height = (int(c) for c in cols[6:10])
            conf = float(cols[10])
        except ValueError:
            continue
        text = cols[11].strip() if len(cols) > 11 else ""
        box = (left, top, left + width, top + height)
        if level == 1:
            page.width, page.height = width, height
        elif level == 2:
            blocks[block] = box
        elif level == 5 and text and conf >= 0:
            page.words.append(OcrWord(text, conf, box, block, par, line))
            blocks_with_text.add(block)
        elif level == 5 and conf >= 0:
            # A blank "word" (seen spanning a whole drawing): a picture hint, like empty blocks.
            blank.append(box)
    page.empty_blocks = [box for num, box in blocks.items() if num not in blocks_with_text]
    page.empty_blocks += blank
    return page


async def installed_languages(timeout_s: float = 10.0) -> frozenset[str]:
    """Language packs tesseract can load (cached: packages do not change under a process)."""
    global _installed
    if _installed is None:
        result = await run_tool(["tesseract", "--list-langs"], stdin=None, timeout_s=timeout_s)
        # tesseract 4 prints the list on stderr, 5 on stdout; the first line is a heading.
        text = result.stdout.decode("utf-8", "replace") + "\n" + result.stderr
        _installed = frozenset(
            line.strip() for line in text.splitlines()
            if _LANG_RE.match(line.strip()) and line.strip() != "osd"
        )
    return _installed


def parse_languages(spec: str) -> list[str]:
    """'eng+hin', 'eng,hin' or 'eng hin' (a '+' in a query string arrives as a space)."""
    names = [n for n in re.split(r"[+,\s]+", spec.strip()) if n]
    if not names or len(names) > 8:
        raise ValueError("languages: give 1-8 tesseract language codes, e.g. eng+hin")
    for name in names:
        if not _LANG_RE.match(name):
            raise ValueError(f"languages: {name!r} is not a tesseract language code")
    return list(dict.fromkeys(names))


async def check_languages(names: list[str]) -> str:
    """The `-l` argument for these languages; ValueError if a pack is not installed."""
    installed = await installed_languages()
    missing = [n for n in names if n not in installed]
    if missing:
        raise ValueError(f"languages not installed: {', '.join(missing)} "
                         f"(available: {', '.join(sorted(installed))})")
    return "+".join(names)


async def ocr_png(png: bytes, *, languages: str, psm: int, dpi: int | None,
                  timeout_s: float) -> OcrPage:
    # Sauvola (local) thresholding: with the default global Otsu, text on a shaded box
    # vanished entirely in our tests; Sauvola read it, and was no slower on plain pages.
    args = ["tesseract", "stdin", "stdout", "-l", languages, "--psm", str(psm),
            "-c", "thresholding_method=2"]
    if dpi:
        # Without it tesseract guesses the resolution from glyph sizes and says so on stderr.
        args += ["--dpi", str(dpi)]
    result = await run_tool([*args, "tsv"], stdin=png, timeout_s=timeout_s)
    page = parse_tsv(result.stdout.decode("utf-8", "replace"))
    if page.width <= 0:
        raise ToolError("tesseract returned no page", result.stderr)
    return page


@dataclass(frozen=True, slots=True)
class Orientation:
    """Tesseract's orientation and script detection (OSD) for one page."""

    rotate: int  # degrees clockwise the page needs turning to be upright: 0, 90, 180, 270
    orientation_conf: float
    script: str  # e.g. Latin, Devanagari, Han
    script_conf: float


# Characters OSD classifies before it answers (tesseract's default, 50, took 0.5-1 s a page; 20
# named the same script on every page of the evaluation corpus in two thirds of the time; a
# half-size page was faster still but named Cyrillic, Arabic or Telugu for Latin and Hindi).
OSD_CHARACTERS = 20
_OSD_FIELD = re.compile(r"^(Rotate|Orientation confidence|Script|Script confidence):\s*(\S+)",
                        re.M)


def parse_osd(text: str) -> Orientation | None:
    fields = dict(_OSD_FIELD.findall(text))
    try:
        return Orientation(int(fields["Rotate"]) % 360, float(fields["Orientation confidence"]),
                           fields["Script"], float(fields["Script confidence"]))
    except (KeyError, ValueError):
        return None


async def detect_orientation(png: bytes, *, dpi: int | None, timeout_s: float
                             ) -> Orientation | None:
    """OSD of a page; None when tesseract cannot tell (too little text, no osd pack)."""
    args = ["tesseract", "stdin", "stdout", "--psm", "0",
            "-c", f"min_characters_to_try={OSD_CHARACTERS}"]
    if dpi:
        args += ["--dpi", str(dpi)]
    try:
        result = await run_tool(args, stdin=png, timeout_s=timeout_s)
    except ToolError as exc:
        if isinstance(exc, ToolMissing | ToolTimeout):
            raise
        return None  # "Too few characters. Skipping this page": nothing to orient by
    return parse_osd(result.stdout.decode("utf-8", "replace"))
