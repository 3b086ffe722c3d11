"""No silent loss (issue 16 item 3): every word the OCR read is in exactly one block of the
layout, figures included; and empty table cells are filled from their re-read crops."""

from __future__ import annotations

import random

import numpy as np

from server.vision.cells import apply_reread, cells_to_reread, stack
from server.vision.layout import analyze, uncovered
from server.vision.ocr import OcrPage, OcrWord

WORDS = ["Total", "1", "42.00", "Bristol", "BS1", "4DJ", "Qty", "Desk", "lamp", "7", "-", "|"]


def random_page(rng: random.Random) -> OcrPage:
    words: list[OcrWord] = []
    for _ in range(rng.randint(0, 120)):
        x, y = rng.randint(0, 1500), rng.randint(0, 2100)
        h = rng.choice([20, 28, 30, 45, 70, 400])  # some "words" are as tall as a picture
        text = rng.choice(WORDS)
        words.append(OcrWord(text, rng.uniform(0, 99), (x, y, x + 14 * len(text) + 8, y + h)))
    empty = [(rng.randint(0, 800), rng.randint(0, 1000), 1200, 1600)] if rng.random() < 0.3 \
        else []
    return OcrPage(1700, 2200, words, empty)


def test_every_word_lands_in_exactly_one_block() -> None:
    rng = random.Random(16)
    for _ in range(150):
        ocr = random_page(rng)
        gray = np.full((2200, 1700), 255, dtype=np.uint8) if rng.random() < 0.2 else None
        layout = analyze(ocr, gray)
        assert uncovered(ocr, layout) == []
        placed = [w for b in layout.blocks for w in b.words]
        assert len(placed) == layout.ocr_words  # each once


def test_a_figure_that_holds_text_returns_it_whatever_its_confidence() -> None:
    words = [OcrWord("Chart", 95.0, (100, 100, 200, 130)),
             OcrWord("North", 35.0, (300, 700, 380, 730)),  # a label inside the picture
             OcrWord("Al", 20.0, (250, 300, 1000, 1100))]  # the picture read as one glyph
    ocr = OcrPage(1700, 2200, words, [(250, 300, 1000, 1100)])
    layout = analyze(ocr)
    figure = next(b for b in layout.blocks if b.type == "figure")
    assert figure.text == "North"
    assert uncovered(ocr, layout) == [] and layout.ocr_words == 2


def row(y: int, *cells: tuple[int, str]) -> list[OcrWord]:
    return [OcrWord(text, 95.0, (x, y, x + 14 * len(text), y + 30)) for x, text in cells]


def test_an_empty_cell_is_read_again_on_its_crop() -> None:
    words = [*row(100, (100, "Item"), (600, "Qty"), (900, "Price")),
             *row(160, (100, "Apples"), (600, "12"), (900, "3.50")),
             *row(220, (100, "Pears"), (900, "2.25")),  # its Qty was not read
             *row(280, (100, "Plums"), (600, "30"), (900, "9.00"))]
    layout = analyze(OcrPage(1700, 2200, words))
    [table] = [b for b in layout.blocks if b.type == "table"]
    assert table.rows is not None and table.rows[2] == ["Pears", "", "2.25"]
    gray = np.full((2200, 1700), 255, dtype=np.uint8)
    gray[225:245, 605:615] = 0  # the "1" the page-level OCR missed
    crops = cells_to_reread(layout.blocks, 1700, 2200)
    assert [(c.row, c.column) for c in crops] == [(2, 1)]
    stacked = stack(gray, [c.box for c in crops])
    assert stacked.factor > 1  # small crops are enlarged for tesseract
    ys, xs = np.nonzero(stacked.image < 100)  # the digit's ink sits where the stack says
    crop, f = crops[0], stacked.factor
    assert abs(xs.min() / f - stacked.margin + crop.box[0] - 605) <= 1
    assert abs(ys.min() / f - stacked.starts[0] + crop.box[1] - 225) <= 1
    # What tesseract would say about the stacked image: the "1" at its place there.
    read = OcrPage(stacked.image.shape[1], stacked.image.shape[0], [
        OcrWord("1", 91.0, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)),
        OcrWord("~", 10.0, (0, 0, 5, 5))])  # noise is not taken
    added = apply_reread(layout.blocks, crops, stacked, read)
    assert added == 1
    assert table.rows[2] == ["Pears", "1", "2.25"]
    assert "Pears\t1\t2.25" in table.text
    one = next(w for w in table.words if w.text == "1")
    assert all(abs(a - b) <= 2 for a, b in zip(one.box, (605, 225, 615, 245), strict=True))


def test_doubtful_cells_are_re_read_and_replaced_only_by_a_better_reading() -> None:
    from server.vision.cells import column_shapes, shape

    words = [*row(100, (100, "Code"), (600, "Qty")),
             *row(160, (100, "A-101"), (600, "12")),
             *row(220, (100, "c-310"), (600, "iL")),  # a case slip and a misread digit
             *row(280, (100, "B-220"), (600, "30")),
             *row(340, (100, "D-015"), (600, "8"))]
    layout = analyze(OcrPage(1700, 2200, words))
    [table] = [b for b in layout.blocks if b.type == "table"]
    assert table.rows is not None
    assert shape("C-310") == "A-999" and column_shapes(table.rows)[0] == "A-999"
    crops = cells_to_reread(layout.blocks, 1700, 2200)
    assert sorted((c.row, c.column) for c in crops) == [(2, 0), (2, 1)]
    stacked = stack(np.full((2200, 1700), 255, dtype=np.uint8), [c.box for c in crops])
    f = stacked.factor

    def at(k: int, text: str, conf: float) -> OcrWord:
        y = round((stacked.starts[k] + 5) * f)
        x = round((stacked.margin + 5) * f)
        return OcrWord(text, conf, (x, y, x + 30, y + 30))

    by_cell = {(c.row, c.column): k for k, c in enumerate(crops)}
    read = OcrPage(1, 1, [at(by_cell[(2, 0)], "C-310", 60.0), at(by_cell[(2, 1)], "1", 50.0)])
    before = layout.ocr_words
    assert apply_reread(layout.blocks, crops, stacked, read) == 0  # two words for two
    assert table.rows[2] == ["C-310", "1"]
    assert layout.ocr_words == before
    assert not any(w.text in ("c-310", "iL") for w in table.words)
