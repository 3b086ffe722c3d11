"""Layout heuristics on synthetic OCR words (no tesseract, no images except for figures)."""

from __future__ import annotations

import numpy as np

from server.vision.figures import find_figures, merge_boxes
from server.vision.layout import analyze, segments_of
from server.vision.ocr import OcrPage, OcrWord, parse_tsv

CHAR_W = 14
SPACE = 12


def line(text: str, x: int, y: int, h: int = 30, conf: float = 95.0) -> list[OcrWord]:
    """Words of one printed line starting at (x, y), widths proportional to their length."""
    words = []
    for token in text.split():
        w = len(token) * CHAR_W
        words.append(OcrWord(token, conf, (x, y, x + w, y + h)))
        x += w + SPACE
    return words


def page(*lines: list[OcrWord], width: int = 1700, height: int = 2200) -> OcrPage:
    return OcrPage(width, height, [w for ln in lines for w in ln])


def test_parse_tsv_levels_blank_words_and_empty_blocks() -> None:
    header = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight" \
             "\tconf\ttext"
    rows = [
        "1\t1\t0\t0\t0\t0\t0\t0\t1000\t1400\t-1\t",
        "2\t1\t1\t0\t0\t0\t100\t100\t300\t40\t-1\t",
        "5\t1\t1\t1\t1\t1\t100\t100\t120\t40\t96.5\tHello",
        "5\t1\t1\t1\t1\t2\t240\t100\t160\t40\t91.0\twörld",
        "2\t1\t2\t0\t0\t0\t100\t400\t500\t500\t-1\t",
        "5\t1\t2\t1\t1\t1\t100\t400\t500\t500\t95.0\t ",
        "2\t1\t3\t0\t0\t0\t700\t400\t200\t200\t-1\t",
    ]
    ocr = parse_tsv("\n".join([header, *rows]) + "\n")
    assert (ocr.width, ocr.height) == (1000, 1400)
    assert [(w.text, w.box, w.block) for w in ocr.words] == [
        ("Hello", (100, 100, 220, 140), 1), ("wörld", (240, 100, 400, 140), 1)]
    # Block 2 only had a blank "word" (a drawing), block 3 nothing: both are picture hints.
    assert (100, 400, 600, 900) in ocr.empty_blocks
    assert (700, 400, 900, 600) in ocr.empty_blocks


def test_title_paragraphs_and_list() -> None:
    ocr = page(
        line("Annual Report", 100, 100, h=70),
        line("The first paragraph talks about growth in", 100, 250),
        line("every region and lower costs this year.", 100, 295),
        line("A second paragraph follows after a gap", 100, 400),
        line("and ends here with a full stop.", 100, 445),
        line("- first point of the list", 100, 550),
        line("- second point of the list", 100, 595),
        line("which wraps onto a second line", 130, 640),
        line("3. a numbered point", 100, 685),
    )
    blocks = analyze(ocr).blocks
    assert [b.type for b in blocks] == ["title", "paragraph", "paragraph", "list"]
    assert [b.order for b in blocks] == [0, 1, 2, 3]
    assert blocks[0].text == "Annual Report"
    assert blocks[1].text.startswith("The first paragraph") and blocks[1].text.endswith("year.")
    assert blocks[3].text.splitlines() == [
        "- first point of the list",
        "- second point of the list which wraps onto a second line",
        "3. a numbered point",
    ]
    assert blocks[1].box == (100, 250, blocks[1].box[2], 325)
    assert 0.9 < blocks[1].confidence <= 1.0


def test_table_cells_rows_by_columns() -> None:
    rows = [("Item", "Qty", "Price"), ("Apples", "12", "3.50"), ("Pears", "7", "2.25"),
            ("Plums", "", "9.00")]
    words: list[list[OcrWord]] = [line("Fruit prices", 100, 100, h=45)]
    for r, cells in enumerate(rows):
        for x, cell in zip((100, 600, 1000), cells, strict=True):
            if cell:
                words.append(line(cell, x, 200 + 60 * r))
    words.append(line("Prices are per kilo and include tax.", 100, 500))
    blocks = analyze(page(*words)).blocks
    assert [b.type for b in blocks] == ["title", "table", "paragraph"]
    table = blocks[1]
    assert table.rows == [["Item", "Qty", "Price"], ["Apples", "12", "3.50"],
                          ["Pears", "7", "2.25"], ["Plums", "", "9.00"]]
    assert table.text.splitlines()[1] == "Apples\t12\t3.50"
    assert table.box[0] == 100 and table.box[1] == 200


def test_two_columns_read_left_column_first() -> None:
    left = ["Alpha rivers flow north across the plains", "toward the cold sea and the old",
            "stone bridge near the town hall.", "", "Bravo birds nest high in the oak",
            "trees near the quiet farm road", "where the hills begin to rise."]
    right = ["Charlie clouds drift east over the", "distant hills before the evening",
             "rain reaches the harbour town.", "", "Delta lights shine bright along the",
             "harbour wall until the dawn comes", "over the grey and quiet water."]
    lines = [line("Field Notes Weekly", 500, 80, h=60)]
    for texts, x in ((left, 100), (right, 900)):
        for i, text in enumerate(texts):
            if text:
                lines.append(line(text, x, 200 + 45 * i))
    lines.append(line("This footer runs across the whole width of the page below both "
                      "columns.", 100, 600))
    blocks = analyze(page(*lines)).blocks
    firsts = [b.text.split()[0] for b in blocks]
    assert firsts == ["Field", "Alpha", "Bravo", "Charlie", "Delta", "This"]
    assert blocks[0].type == "title"
    assert all(b.type == "paragraph" for b in blocks[1:])
    assert blocks[1].box[2] < 900 and blocks[3].box[0] >= 900


def test_two_word_columns_are_a_table_not_page_columns() -> None:
    lines = []
    for i, (name, city) in enumerate([("Name", "City"), ("Asha", "Pune"), ("Ravi", "Delhi"),
                                      ("Mira", "Agra"), ("Omar", "Goa")]):
        lines += [line(name, 100, 100 + 50 * i), line(city, 900, 100 + 50 * i)]
    blocks = analyze(page(*lines)).blocks
    assert [b.type for b in blocks] == ["table"]
    assert blocks[0].rows is not None and blocks[0].rows[2] == ["Ravi", "Delhi"]


def test_segments_split_at_column_gaps_not_word_spaces() -> None:
    words = line("one two three", 100, 100) + line("far away", 800, 102)
    segments = segments_of(words)
    assert [s.text for s in segments] == ["one two three", "far away"]


def test_hyphenated_line_break_is_joined() -> None:
    ocr = page(line("The docu-", 100, 100), line("ment is long.", 100, 145))
    assert analyze(ocr).blocks[0].text == "The document is long."


def test_devanagari_line_is_not_mistaken_for_a_title() -> None:
    # Devanagari boxes are ~1.35x taller than Latin ones at the same font size.
    ocr = page(line("Greetings are shown below in two scripts.", 100, 300),
               line("नमस्ते दुनिया भारत एक सुंदर देश है", 100, 400, h=45),
               line("The line above is written in Hindi.", 100, 500))
    assert [b.type for b in analyze(ocr).blocks] == ["paragraph"] * 3


def test_oversized_low_confidence_word_is_a_figure_and_keeps_its_labels() -> None:
    ocr = page(
        line("Sales by region", 100, 100, h=60),
        line("Revenue grew in every region this year and", 100, 200),
        line("costs fell in most of them as well.", 100, 245),
        [OcrWord("Al", 40.0, (100, 350, 900, 950))],  # tesseract reading a chart
        line("North", 200, 900, conf=90.0),
        line("The chart above shows the totals per region.", 100, 1000),
    )
    blocks = analyze(ocr).blocks
    assert [b.type for b in blocks] == ["title", "paragraph", "figure", "paragraph"]
    assert blocks[2].box == (100, 350, 900, 950) and blocks[2].text == "North"


def test_figures_from_pixels_skip_text_and_frames() -> None:
    gray = np.full((1400, 1000), 255, dtype=np.uint8)
    gray[600:1000, 100:600] = 60  # a photo-like filled region
    text_boxes = []
    for row in range(5):  # a framed text box: a thin border around lines of words
        y = 150 + 50 * row
        gray[y : y + 30, 120:800] = 0
        text_boxes.append((120, y, 800, y + 30))
    gray[120:122, 100:820] = 0
    gray[420:422, 100:820] = 0
    gray[120:422, 100:102] = 0
    gray[120:422, 818:820] = 0
    found = find_figures(gray, text_boxes, line_h=30.0)
    assert len(found) == 1
    x0, y0, x1, y1 = found[0]
    assert abs(x0 - 100) <= 12 and abs(y0 - 600) <= 12 and abs(x1 - 600) <= 12
    assert abs(y1 - 1000) <= 12


def test_merge_boxes_unions_overlaps() -> None:
    assert sorted(merge_boxes([(0, 0, 10, 10), (5, 5, 20, 20), (100, 100, 110, 110)])) == [
        (0, 0, 20, 20), (100, 100, 110, 110)]


def test_empty_page() -> None:
    layout = analyze(OcrPage(800, 600))
    assert layout.blocks == [] and layout.text == ""


def test_ruled_table_grid_and_shaded_text_box_are_not_figures() -> None:
    gray = np.full((1400, 1000), 255, dtype=np.uint8)
    text_boxes = []
    for r in range(5):  # a ruled 4 x 3 table: thin lines, a word in each cell
        gray[100 + 60 * r : 102 + 60 * r, 100:900] = 0
    for c in (100, 380, 640, 898):
        gray[100:342, c : c + 2] = 0
    for r in range(4):
        for c in (100, 380, 640):
            box = (c + 15, 115 + 60 * r, c + 45, 135 + 60 * r)  # small: ~4% of the area
            gray[box[1] : box[3], box[0] : box[2]] = 0
            text_boxes.append(box)
    gray[500:800, 100:900] = 209  # a shaded box behind three lines of text
    for r in range(3):
        box = (130, 530 + 80 * r, 860, 560 + 80 * r)
        gray[box[1] : box[3], box[0] : box[2]] = 0
        text_boxes.append(box)
    assert find_figures(gray, text_boxes, line_h=30.0) == []


def test_double_spaced_lines_stay_one_paragraph() -> None:
    texts = ["Double spaced drafts leave a full line", "of space between every line of a",
             "paragraph, so the gap alone does not", "end the paragraph here at all."]
    lines = [line(t, 100, 100 + 70 * i) for i, t in enumerate(texts)]
    lines.append(line("A real break is wider than the usual gap.", 100, 100 + 70 * 3 + 150))
    blocks = analyze(page(*lines)).blocks
    assert [len(b.text.split()) for b in blocks] == [27, 9]


def test_an_empty_block_around_text_does_not_swallow_it() -> None:
    ocr = page(line("A paragraph that tesseract also drew an", 100, 100),
               line("empty block around, for reasons of its own.", 100, 145))
    ocr.empty_blocks.append((90, 90, 800, 260))
    assert [b.type for b in analyze(ocr).blocks] == ["paragraph"]
