"""Uploaded documents -> page images.

The type is decided by the file's magic bytes (the declared Content-Type only has to be one we
accept): PNG, JPEG and TIFF (every frame a page) are decoded with Pillow, PDFs are rendered by
poppler's pdftoppm, one subprocess per page, so a hostile PDF can cost at most a timeout and a
killed process. A PDF's own text layer (pdftotext -bbox-layout, one run for the document) is
offered per page: where a page has one, its words are used instead of OCR. Every page becomes
an 8-bit greyscale image: OCR, the figure finder and the vision model (as a PNG) all read those
pixels, so the boxes they report are in the same frame.
"""

from __future__ import annotations

import asyncio
import html
import io
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from server.vision.proc import ToolError, ToolMissing, ToolTimeout, run_tool

Kind = Literal["png", "jpeg", "tiff", "pdf"]
ACCEPTED_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/tiff",
                            "application/pdf", "application/octet-stream", ""})
_PAGE_SIZE = re.compile(r"^Page\s+(\d+)\s+size:\s+([\d.]+)\s+x\s+([\d.]+)\s+pts", re.M)
_PAGES = re.compile(r"^Pages:\s+(\d+)", re.M)
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
_LAYER_PAGE = re.compile(r'<page width="([\d.]+)" height="([\d.]+)">(.*?)</page>', re.S)
_LAYER_WORD = re.compile(r'<word xMin="(-?[\d.]+)" yMin="(-?[\d.]+)" xMax="(-?[\d.]+)" '
                         r'yMax="(-?[\d.]+)">(.*?)</word>', re.S)


@dataclass(frozen=True, slots=True)
class LayerWord:
    text: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in PDF points from the top left


@dataclass(frozen=True, slots=True)
class TextLayer:
    """A PDF page's own text (poppler's pdftotext -bbox-layout): words with their boxes."""

    width_pt: float
    height_pt: float
    words: list[LayerWord]


def parse_bbox_layout(xhtml: str) -> list[TextLayer]:
    """pdftotext -bbox-layout output -> one TextLayer per page, in page order."""
    pages: list[TextLayer] = []
    for width, height, body in _LAYER_PAGE.findall(xhtml):
        words = [LayerWord(text, (float(x0), float(y0), float(x1), float(y1)))
                 for x0, y0, x1, y1, raw in _LAYER_WORD.findall(body)
                 if (text := html.unescape(raw).strip())]
        pages.append(TextLayer(float(width), float(height), words))
    return pages


class DocumentError(ValueError):
    """The upload is not a document we can read (-> 400)."""


class DocumentTooLarge(DocumentError):
    """Too many pages or pixels (-> 413)."""


@dataclass(slots=True)
class PageImage:
    number: int  # 1-based
    pixels: npt.NDArray[np.uint8]  # 8-bit greyscale, height x width
    dpi: int | None
    _png: bytes | None = None

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def png(self) -> bytes:
        """The page as a PNG (for the vision model), encoded when first asked for: OCR reads
        the pixels, and most requests never send the image anywhere."""
        if self._png is None:
            out = io.BytesIO()
            # Speed over size: it lives for a request.
            Image.fromarray(self.pixels).save(out, format="PNG", compress_level=1)
            self._png = out.getvalue()
        return self._png


def sniff(data: bytes) -> Kind | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if b"%PDF-" in data[:1024]:  # the PDF header may follow some junk bytes
        return "pdf"
    return None


class Document:
    """An opened upload: its kind, page count and a way to render each page."""

    def __init__(self, kind: Kind, data: bytes, pages: int, *, max_pixels: int,
                 dpi: int, timeout_s: float) -> None:
        self.kind = kind
        self.pages = pages
        self._data = data
        self._max_pixels = max_pixels
        self._dpi = dpi
        self._timeout_s = timeout_s
        self._pdf_path: Path | None = None
        self._page_dpi: dict[int, int] = {}
        self._layers: list[TextLayer] | None = None
        self._layers_lock = asyncio.Lock()

    @classmethod
    async def open(cls, data: bytes, *, max_pages: int, max_pixels: int, dpi: int,
                   timeout_s: float) -> Document:
        kind = sniff(data)
        if kind is None:
            raise DocumentError("unsupported file type: send a PNG, JPEG, TIFF or PDF")
        if kind == "pdf":
            doc = cls(kind, data, 0, max_pixels=max_pixels, dpi=dpi, timeout_s=timeout_s)
            try:
                await doc._open_pdf(max_pages)
            except BaseException:
                await doc.aclose()
                raise
            return doc
        pages = await asyncio.to_thread(_count_frames, data, kind, max_pixels)
        if pages > max_pages:
            raise DocumentTooLarge(f"the document has {pages} pages; at most {max_pages}")
        return cls(kind, data, pages, max_pixels=max_pixels, dpi=dpi, timeout_s=timeout_s)

    async def _open_pdf(self, max_pages: int) -> None:
        # pdftoppm is run once per page: a file on disk spares piping the whole PDF each time.
        path = await asyncio.to_thread(_write_temp, self._data)
        self._pdf_path = path
        self._data = b""
        try:
            info = await run_tool(["pdfinfo", str(path)], stdin=None,
                                  timeout_s=self._timeout_s)
        except (ToolMissing, ToolTimeout):
            raise
        except ToolError as exc:
            raise DocumentError(f"cannot read the PDF: {_first_line(exc.stderr)}") from None
        match = _PAGES.search(info.stdout.decode("utf-8", "replace"))
        self.pages = int(match.group(1)) if match else 0
        if self.pages < 1:
            raise DocumentError("the PDF has no pages")
        if self.pages > max_pages:
            raise DocumentTooLarge(f"the document has {self.pages} pages; at most {max_pages}")
        sizes = await run_tool(["pdfinfo", "-f", "1", "-l", str(self.pages), str(path)],
                               stdin=None, timeout_s=self._timeout_s)
        for num, w_pt, h_pt in _PAGE_SIZE.findall(sizes.stdout.decode("utf-8", "replace")):
            area_in2 = max(float(w_pt), 1.0) * max(float(h_pt), 1.0) / (72.0 * 72.0)
            # A poster-sized page at the configured dpi would exceed the pixel budget: render
            # it at the resolution that fits instead of refusing it.
            fit = int(math.sqrt(self._max_pixels / area_in2))
            self._page_dpi[int(num)] = max(20, min(self._dpi, fit))

    async def render(self, number: int) -> PageImage:
        if not 1 <= number <= self.pages:
            raise ValueError(f"page {number} out of range")
        if self.kind != "pdf":
            return await asyncio.to_thread(_frame_png, self._data, self.kind, number,
                                           self._max_pixels)
        assert self._pdf_path is not None
        dpi = self._page_dpi.get(number, self._dpi)
        try:
            result = await run_tool(
                # PGM (pdftoppm's default with -gray): no PNG to compress and decompress.
                ["pdftoppm", "-r", str(dpi), "-gray", "-f", str(number), "-l",
                 str(number), "-singlefile", str(self._pdf_path)],
                stdin=None, timeout_s=self._timeout_s)
        except (ToolMissing, ToolTimeout):
            raise
        except ToolError as exc:
            raise DocumentError(
                f"cannot render page {number}: {_first_line(exc.stderr)}") from None
        return await asyncio.to_thread(_rendered_page, result.stdout, number, dpi)

    async def text_layer(self, number: int) -> TextLayer | None:
        """The page's own text when it is a PDF page that has one (None otherwise): read for
        all pages by one pdftotext run, on the first call."""
        if self.kind != "pdf" or self._pdf_path is None:
            return None
        async with self._layers_lock:
            if self._layers is None:
                try:
                    result = await run_tool(
                        ["pdftotext", "-bbox-layout", "-enc", "UTF-8", "-f", "1", "-l",
                         str(self.pages), str(self._pdf_path), "-"],
                        stdin=None, timeout_s=self._timeout_s)
                    self._layers = await asyncio.to_thread(
                        parse_bbox_layout, result.stdout.decode("utf-8", "replace"))
                except ToolTimeout:
                    raise
                except ToolError:
                    self._layers = []  # no usable text layer (or no pdftotext): OCR the pages
        if number > len(self._layers):
            return None
        layer = self._layers[number - 1]
        return layer if layer.words else None

    async def aclose(self) -> None:
        path, self._pdf_path = self._pdf_path, None
        if path is not None:
            await asyncio.to_thread(shutil.rmtree, path.parent, True)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:200] if lines else "unknown error"


def _write_temp(data: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="streamgate-vision-"))
    path = folder / "input.pdf"
    path.write_bytes(data)
    return path


def _open_image(data: bytes, kind: Kind, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]])
    except Image.DecompressionBombError as exc:
        raise DocumentTooLarge(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise DocumentError(f"cannot read the {kind.upper()} image: {exc}") from None
    w, h = image.size
    # Checked on the header, before any pixel is decoded (a decompression bomb is a few kB).
    if w * h > max_pixels:
        raise DocumentTooLarge(f"the image is {w}x{h} pixels; at most {max_pixels} per page")
    if w < 1 or h < 1:
        raise DocumentError("the image is empty")
    return image


def _count_frames(data: bytes, kind: Kind, max_pixels: int) -> int:
    with _open_image(data, kind, max_pixels) as image:
        try:
            return int(getattr(image, "n_frames", 1))
        except (OSError, ValueError) as exc:
            raise DocumentError(f"cannot read the {kind.upper()} image: {exc}") from None


def _frame_png(data: bytes, kind: Kind, number: int, max_pixels: int) -> PageImage:
    with _open_image(data, kind, max_pixels) as image:
        try:
            image.seek(number - 1)
            if image.width * image.height > max_pixels:  # frames may differ from the first
                raise DocumentTooLarge(f"page {number} has more than {max_pixels} pixels")
            dpi_info = image.info.get("dpi")
            page = _grey_on_white(ImageOps.exif_transpose(image) or image)
        except DocumentError:
            raise
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DocumentError(f"cannot decode the {kind.upper()} image: {exc}") from None
    dpi: int | None = None
    if isinstance(dpi_info, tuple) and dpi_info and isinstance(dpi_info[0], int | float):
        guess = round(float(dpi_info[0]))
        dpi = guess if 70 <= guess <= 1200 else None  # 72/96 are "unknown" in practice too
    return _encode(page, number, dpi)


def _grey_on_white(image: Image.Image) -> Image.Image:
    # Transparent pixels are laid on white: a transparent PNG with black text would otherwise
    # turn into black on black.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256)
    return image.convert("L")


def _encode(image: Image.Image, number: int, dpi: int | None) -> PageImage:
    return PageImage(number, np.asarray(image, dtype=np.uint8), dpi)


def _rendered_page(pgm: bytes, number: int, dpi: int) -> PageImage:
    try:
        with Image.open(io.BytesIO(pgm), formats=["PPM"]) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DocumentError(f"page {number} did not render: {exc}") from None
    return PageImage(number, pixels, dpi)
