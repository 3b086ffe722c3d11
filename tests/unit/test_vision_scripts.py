"""Script and way-up detection from pixels (server/vision/scripts.py, prepare.py) and rule
erasing that spares a Devanagari headline (server/vision/figures.py), on lines drawn here with
DejaVu and Lohit Devanagari at the prepared page's text size."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from server.vision.figures import erase_rules
from server.vision.prepare import densest_band, lies_on_its_side
from server.vision.scripts import PageScripts, looks_devanagari, page_scripts, upright_turn
from tests.system_tools import require_pillow_feature

FONTS = "/usr/share/fonts/truetype"
SANS = f"{FONTS}/dejavu/DejaVuSans.ttf"
DEVA = f"{FONTS}/lohit-devanagari/Lohit-Devanagari.ttf"
LATIN = ["Invoice INV-20417 for Northwind Traders", "Copy paper A4 10 4.20 42.00",
         "Payment is due within 30 days of the date.", "TOTAL DUE 1,284.60 EUR"]
HINDI = ["इस महीने बिक्री में अच्छी बढ़त हुई और", "सभी क्षेत्रों में लागत कम रही।",
         "अगले महीने हम पुणे में नया कार्यालय", "खोलेंगे और दो नए लोग रखेंगे।"]


def page(lines: list[tuple[str, str]], size: int = 26) -> tuple[npt.NDArray[np.uint8],
                                                                  list[tuple[int, int, int, int]]]:
    """The lines drawn one under another; the page and each line's box."""
    image = Image.new("L", (1400, 120 + 60 * len(lines)), 255)
    draw = ImageDraw.Draw(image)
    boxes = []
    for i, (font_path, text) in enumerate(lines):
        font = ImageFont.truetype(font_path, size)
        xy = (80, 60 + 60 * i)
        draw.text(xy, text, font=font, fill=0)
        left, top, right, bottom = draw.textbbox(xy, text, font=font)
        boxes.append((int(left), int(top), int(right), int(bottom)))
    return np.asarray(image, dtype=np.uint8), boxes


def test_latin_lines_have_no_headline() -> None:
    gray, boxes = page([(SANS, t) for t in LATIN])
    assert page_scripts(gray) == PageScripts(devanagari_lines=0, other_lines=4)
    assert not any(looks_devanagari(gray, box) for box in boxes)


def test_devanagari_lines_and_words_hang_from_a_headline() -> None:
    require_pillow_feature("raqm", "Devanagari cannot be shaped without libraqm and libfribidi")
    gray, boxes = page([(DEVA, t) for t in HINDI])
    assert page_scripts(gray) == PageScripts(devanagari_lines=4, other_lines=0)
    assert all(looks_devanagari(gray, box) for box in boxes)


def test_a_page_of_both_gets_both_languages_hindi_first() -> None:
    require_pillow_feature("raqm", "Devanagari cannot be shaped without libraqm and libfribidi")
    gray, _ = page([(DEVA, HINDI[0]), (SANS, LATIN[0]), (DEVA, HINDI[1])])
    scripts = page_scripts(gray)
    assert scripts == PageScripts(devanagari_lines=2, other_lines=1)
    assert scripts.languages(["eng", "hin"]) == ["hin", "eng"]


def test_languages_out_of_the_allowed_list() -> None:
    latin, hindi = PageScripts(0, 5), PageScripts(5, 0)
    assert latin.languages(["eng", "hin"]) == ["eng"]
    assert hindi.languages(["eng", "hin"]) == ["hin"]
    assert latin.languages(["eng", "deu", "hin"]) == ["eng", "deu"]
    assert hindi.languages(["eng"]) == ["eng"]  # Hindi not allowed here: the list as it is
    assert PageScripts(0, 0).languages(["eng", "hin"]) == ["eng", "hin"]  # no text seen


def test_a_titles_headline_is_not_erased_as_a_rule() -> None:
    require_pillow_feature("raqm", "Devanagari cannot be shaped without libraqm and libfribidi")
    image = Image.new("L", (1275, 600), 255)
    draw = ImageDraw.Draw(image)
    # "मासिक" in 40 px type: a headline 100 px long, as long as the shortest rule.
    draw.text((100, 60), "मासिक रिपोर्ट", font=ImageFont.truetype(DEVA, 40), fill=0)
    draw.rectangle((100, 300, 1175, 302), fill=0)  # a table's top rule, its column rules
    for x in (100, 500, 800, 1173):  # hanging from it
        draw.rectangle((x, 300, x + 2, 460), fill=0)
    draw.text((120, 310), "Item Qty Price", font=ImageFont.truetype(SANS, 26), fill=0)
    draw.rectangle((100, 450, 1175, 452), fill=0)  # a rule under a row of text
    draw.text((120, 415), "Copy paper 10 42.00", font=ImageFont.truetype(SANS, 26), fill=0)
    gray = np.asarray(image, dtype=np.uint8)
    erased = erase_rules(gray)
    assert erased is not None
    title = (slice(40, 140), slice(80, 500))
    assert np.array_equal(erased[title], gray[title])  # the headline stays
    assert (erased[300:303, 100:1176] < 128).mean() < 0.02  # both rules go
    assert (erased[450:453, 100:1176] < 128).mean() < 0.02


def test_the_lines_say_which_way_up_the_page_is() -> None:
    require_pillow_feature("raqm", "Devanagari cannot be shaped without libraqm and libfribidi")
    for lines in ([(SANS, t) for t in LATIN + LATIN], [(DEVA, t) for t in HINDI]):
        gray, _ = page(lines)
        assert upright_turn(gray) == 0
        assert upright_turn(np.ascontiguousarray(gray[::-1, ::-1])) == 180
    few, _ = page([(SANS, LATIN[0]), (SANS, LATIN[2])])
    assert upright_turn(few) is None  # two lines settle nothing: OSD is asked


def test_a_page_on_its_side_is_told_from_an_upright_one() -> None:
    gray, _ = page([(SANS, t) for t in LATIN + LATIN])
    assert not lies_on_its_side(gray)
    assert lies_on_its_side(np.ascontiguousarray(np.rot90(gray)))
    band = densest_band(np.ascontiguousarray(np.rot90(gray)), 200)
    assert band.shape == (gray.shape[1], 200)  # a band of columns: across its text lines
