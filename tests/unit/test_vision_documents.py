"""Uploads -> page images (Pillow, poppler) and the subprocess runner's limits."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.vision.documents import Document, DocumentError, DocumentTooLarge, sniff
from server.vision.figures import erase_rules
from server.vision.proc import ToolError, ToolMissing, ToolTimeout, run_tool
from tests.system_tools import require_programs

MAX_PIXELS = 10_000_000


async def open_doc(data: bytes) -> Document:
    return await Document.open(data, max_pages=5, max_pixels=MAX_PIXELS, dpi=100, timeout_s=20.0)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def test_sniff_by_magic_bytes() -> None:
    assert sniff(encode(Image.new("L", (4, 4)), "PNG")) == "png"
    assert sniff(encode(Image.new("RGB", (4, 4)), "JPEG")) == "jpeg"
    assert sniff(encode(Image.new("L", (4, 4)), "TIFF")) == "tiff"
    assert sniff(b"\n%PDF-1.7 ...") == "pdf"
    assert sniff(b"GIF89a....") is None


async def test_tiff_frames_are_pages_and_transparency_becomes_white() -> None:
    frames = [Image.new("L", (60, 40), 255), Image.new("L", (30, 20), 0)]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    doc = await open_doc(data)
    assert (doc.kind, doc.pages) == ("tiff", 2)
    second = await doc.render(2)
    assert (second.number, second.width, second.height) == (2, 30, 20)

    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # black, fully transparent
    page = await (await open_doc(encode(clear, "PNG"))).render(1)
    with Image.open(io.BytesIO(page.png)) as image:
        assert image.mode == "L" and image.getextrema() == (255, 255)


async def test_limits_and_unreadable_files() -> None:
    big = encode(Image.new("L", (4000, 3000)), "PNG")
    with pytest.raises(DocumentTooLarge, match="pixels"):
        await open_doc(big)
    many = encode(Image.new("L", (8, 8)), "TIFF", save_all=True,
                  append_images=[Image.new("L", (8, 8))] * 6)
    with pytest.raises(DocumentTooLarge, match="7 pages"):
        await open_doc(many)
    with pytest.raises(DocumentError, match="unsupported"):
        await open_doc(b"plain text")
    with pytest.raises(DocumentError, match="PNG"):
        await open_doc(b"\x89PNG\r\n\x1a\n truncated")


async def test_pdf_pages_render_at_the_configured_dpi_and_huge_pages_fit_the_budget() -> None:
    require_programs("pdftoppm")
    letter = Image.new("L", (850, 1100), 255)  # 8.5 x 11 in at 100 dpi
    two = encode(letter, "PDF", save_all=True, append_images=[letter], resolution=100.0)
    poster = encode(Image.new("L", (400, 400), 255), "PDF", resolution=10.0)  # 40 x 40 in
    doc = await open_doc(two)
    big = await open_doc(poster)
    try:
        assert (doc.pages, big.pages) == (2, 1)
        second, huge = await doc.render(2), await big.render(1)
    finally:
        await doc.aclose()
        await big.aclose()
    assert (second.number, second.width, second.height, second.dpi) == (2, 850, 1100, 100)
    # 40 in x 40 in at 100 dpi would be 16 Mpx; it is rendered at the dpi that fits 10 Mpx.
    assert huge.dpi == 79 and huge.width * huge.height <= MAX_PIXELS
    with pytest.raises(DocumentError, match="cannot read the PDF"):
        await open_doc(b"%PDF-1.4 but nothing else")


async def test_run_tool_kills_on_timeout_and_reports_failures() -> None:
    started = time.monotonic()
    with pytest.raises(ToolTimeout):
        await run_tool(["sleep", "5"], stdin=None, timeout_s=0.2)
    assert time.monotonic() - started < 2
    with pytest.raises(ToolMissing):
        await run_tool(["no-such-tool-here"], stdin=None, timeout_s=1)
    with pytest.raises(ToolError) as failed:
        await run_tool(["sh", "-c", "echo oops >&2; exit 3"], stdin=None, timeout_s=5)
    assert "status 3" in str(failed.value) and failed.value.stderr.strip() == "oops"
    assert (await run_tool(["cat"], stdin=b"echo", timeout_s=5)).stdout == b"echo"


def _running(cmdline: bytes) -> bool:
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("cmdline").read_bytes() == cmdline:
                return True
        except OSError:
            continue
    return False


async def test_cancelled_run_leaves_no_process() -> None:
    task = asyncio.ensure_future(run_tool(["sleep", "7.123"], stdin=None, timeout_s=10))
    await asyncio.sleep(0.2)
    assert _running(b"sleep\x007.123\x00")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _running(b"sleep\x007.123\x00")


def test_erase_rules_keeps_text_and_filled_shapes() -> None:
    gray = np.full((1000, 800), 255, dtype=np.uint8)
    gray[100:102, 50:750] = 0  # a table rule
    gray[100:600, 700:702] = 0  # a vertical rule
    gray[300:500, 100:300] = 80  # a filled bar: thick, stays
    gray[700:730, 100:115] = 0  # a glyph-sized stroke, stays
    out = erase_rules(gray)
    assert out is not None
    assert (out[100:102, 50:750] == 255).all() and (out[100:600, 700:702] == 255).all()
    assert (out[300:500, 100:300] == 80).all() and (out[700:730, 100:115] == 0).all()
    assert erase_rules(np.full((100, 100), 255, dtype=np.uint8)) is None


def test_pdf_text_layer_is_parsed_per_page() -> None:
    from server.vision.documents import parse_bbox_layout

    xhtml = (
        '<doc>\n  <page width="612.000000" height="792.000000">\n    <flow><block><line>\n'
        '      <word xMin="72.000000" yMin="77.076000" xMax="113.004000" yMax="93.726000">'
        'Price</word>\n'
        '      <word xMin="118.0" yMin="77.0" xMax="146.0" yMax="93.7">A&amp;B</word>\n'
        '      <word xMin="150.0" yMin="77.0" xMax="151.0" yMax="93.7"> </word>\n'
        '    </line></block></flow>\n  </page>\n'
        '  <page width="595.0" height="842.0">\n  </page>\n</doc>')
    pages = parse_bbox_layout(xhtml)
    assert [(p.width_pt, p.height_pt, len(p.words)) for p in pages] == [
        (612.0, 792.0, 2), (595.0, 842.0, 0)]
    assert pages[0].words[1].text == "A&B"
    assert pages[0].words[0].box == (72.0, 77.076, 113.004, 93.726)
