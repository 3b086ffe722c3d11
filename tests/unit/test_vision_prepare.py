"""Page preparation (server/vision/prepare.py) on pages drawn here: skew found to within 0.1
degree, boxes mapped back to the uploaded pixels, noise and text size handled; OSD parsing and
the band OSD is shown."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from server.vision.ocr import parse_osd
from server.vision.prepare import densest_band, estimate_skew, prepare, rotate_quarters

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
LINES = ["Invoice INV-20417 for Northwind Traders", "Copy paper A4      10     4.20    42.00",
         "Stapler heavy duty  1    18.50    18.50", "Ink cartridge black 3    27.90    83.70",
         "Payment is due within 30 days of the date."]


def text_page(size: int = 24, width: int = 1100, height: int = 1400) -> Image.Image:
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, size)
    for i in range(18):
        draw.text((90, 100 + i * round(size * 1.6)), LINES[i % len(LINES)], font=font, fill=0)
    draw.rectangle((700, 1250, 760, 1300), fill=0)  # a marker to follow through the transform
    return image


def marker_box(gray: np.ndarray, below: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(gray[below:] < 100)
    return int(xs.min()), int(ys.min()) + below, int(xs.max()) + 1, int(ys.max()) + below + 1


@pytest.mark.parametrize("angle", [-5.0, -2.7, -0.5, 0.3, 1.3, 3.0, 4.6])
def test_skew_is_found_within_a_tenth_of_a_degree(angle: float) -> None:
    tilted = text_page().rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=255)
    found = estimate_skew(np.asarray(tilted) < 128)
    assert found is not None
    assert abs(found[0] - angle) <= 0.1


def test_a_blank_page_has_no_skew_and_is_left_alone() -> None:
    blank = np.full((800, 600), 250, dtype=np.uint8)
    assert estimate_skew(blank < 128) is None
    out, prep = prepare(blank)
    assert prep.skew_deg == 0.0 and prep.scale == 1.0 and out.shape == blank.shape


def test_boxes_on_the_prepared_page_map_back_to_the_upload() -> None:
    original = text_page(size=16).rotate(2.5, resample=Image.Resampling.BICUBIC, fillcolor=255)
    gray = np.asarray(original, dtype=np.uint8)
    out, prep = prepare(gray)
    assert abs(prep.skew_deg - 2.5) <= 0.1
    assert prep.scale > 1.15  # 16 px text is enlarged for tesseract
    found = marker_box(out, below=int(1100 * prep.scale))
    want = marker_box(gray, below=1100)
    back = prep.to_original(found)
    # A rotated square's bounding box: within a few pixels of the original's.
    assert all(abs(a - b) <= 4 for a, b in zip(back, want, strict=True)), (back, want)


def test_quarter_turns_map_back_too() -> None:
    gray = np.asarray(text_page(), dtype=np.uint8)
    out, prep = prepare(gray)
    turned = rotate_quarters(out, prep, 1)  # as if OSD said the page lay on its side
    assert turned.shape == out.shape[::-1]
    # Turned counter-clockwise, the marker (low on the page, below the text) is at the right.
    ys, xs = np.nonzero(turned[:, 1150:] < 100)
    box = (int(xs.min()) + 1150, int(ys.min()), int(xs.max()) + 1151, int(ys.max()) + 1)
    want = marker_box(gray, below=1100)
    assert all(abs(a - b) <= 3 for a, b in zip(prep.to_original(box), want, strict=True))


def test_a_page_on_its_side_is_turned_upright_and_maps_back() -> None:
    upright = np.asarray(text_page(), dtype=np.uint8)
    sideways = np.ascontiguousarray(np.rot90(upright, -1))  # scanned turned a quarter clockwise
    out, prep = prepare(sideways)
    assert prep.rotation == 1  # turned back a quarter counter-clockwise: upright, portrait
    assert out.shape[0] > out.shape[1] and abs(prep.skew_deg) <= 0.1
    assert (prep.width, prep.height) == (sideways.shape[1], sideways.shape[0])
    found = marker_box(out, below=int(1100 * prep.scale))  # low on the upright page
    ys, xs = np.nonzero(sideways < 100)
    marker = [(x, y) for x, y in zip(xs.tolist(), ys.tolist(), strict=True) if x < 200]
    want = (min(x for x, _ in marker), min(y for _, y in marker),
            max(x for x, _ in marker) + 1, max(y for _, y in marker) + 1)
    assert all(abs(a - b) <= 3 for a, b in zip(prep.to_original(found), want, strict=True)), (
        prep.to_original(found), want)


def test_noise_is_removed_and_paper_made_white() -> None:
    rng = np.random.default_rng(7)
    clean = np.asarray(text_page(), dtype=np.float64)
    noisy = np.clip(clean + rng.normal(0, 15, clean.shape), 0, 255).astype(np.uint8)
    out, prep = prepare(noisy)
    assert prep.denoised
    paper = out[30:90, 30:1000]  # above the first line: paper only
    assert float((paper < 200).mean()) < 0.001


def test_osd_output_is_parsed() -> None:
    text = ("Page number: 0\nOrientation in degrees: 270\nRotate: 90\nOrientation confidence: "
            "12.5\nScript: Devanagari\nScript confidence: 3.33\n")
    osd = parse_osd(text)
    assert osd is not None and (osd.rotate, osd.script) == (90, "Devanagari")
    assert parse_osd("Too few characters. Skipping this page") is None


def test_osd_is_shown_the_densest_band_of_text() -> None:
    page = np.full((1000, 400), 255, dtype=np.uint8)
    page[100:110, 50:350] = 0  # a lone line near the top...
    page[600:800:20, 20:380] = 0  # ...and a block of ten lines lower down
    band = densest_band(page, 250)
    assert band.shape == (250, 400)
    assert int((band < 128).sum(axis=1).astype(bool).sum()) == 10  # all ten lines, not the one
    assert densest_band(page, 2000) is page  # a short page is shown whole
