"""The evaluation corpus: pages drawn with Pillow (DejaVu and Lohit Devanagari fonts) at 300 dpi,
each with its ground truth (the text of its blocks in reading order, and its tables cell by cell),
and two multi-page PDFs, one with a text layer and one of page images only.

Everything here is deterministic: the same code draws the same pixels and the same truth.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

FONTS = "/usr/share/fonts/truetype"
SANS = f"{FONTS}/dejavu/DejaVuSans.ttf"
BOLD = f"{FONTS}/dejavu/DejaVuSans-Bold.ttf"
SERIF = f"{FONTS}/dejavu/DejaVuSerif.ttf"
DEVA = f"{FONTS}/lohit-devanagari/Lohit-Devanagari.ttf"
DPI = 300  # pages are drawn at this resolution; lower ones are resampled from it (like a scan)
PAGE_W, PAGE_H = 2550, 3300  # US letter at 300 dpi
BODY = 42  # px at 300 dpi: about 10 pt


@dataclass(slots=True)
class Truth:
    blocks: list[str] = field(default_factory=list)  # block texts, in reading order
    tables: list[list[list[str]]] = field(default_factory=list)  # rows x cells
    language: str = "eng"

    def text(self) -> str:
        return "\n".join(self.blocks)


@dataclass(frozen=True, slots=True)
class Page:
    name: str  # e.g. "invoice"
    image: Image.Image  # greyscale, 300 dpi
    truth: Truth


@dataclass(frozen=True, slots=True)
class PdfDocument:
    name: str
    data: bytes
    pages: list[Truth]
    text_layer: bool


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


class _Sheet:
    """A page being drawn, with its truth kept alongside."""

    def __init__(self) -> None:
        self.image = Image.new("L", (PAGE_W, PAGE_H), 255)
        self.draw = ImageDraw.Draw(self.image)
        self.truth = Truth()

    def text(self, xy: tuple[int, int], text: str, font: ImageFont.FreeTypeFont,
             anchor: str = "la") -> None:
        self.draw.text(xy, text, font=font, fill=0, anchor=anchor)

    def block(self, x: int, y: int, lines: Sequence[str], font: ImageFont.FreeTypeFont,
              leading: float = 1.45) -> int:
        """Lines drawn from (x, y) as one block of the truth; returns the y below it."""
        step = round(font.size * leading)
        for i, line in enumerate(lines):
            self.text((x, y + i * step), line, font)
        self.truth.blocks.append(" ".join(lines))
        return y + len(lines) * step


def invoice() -> Page:
    """A ruled 4-column table of 5 rows, an address, totals: the page of issue 16."""
    s = _Sheet()
    body, bold = _font(SANS, BODY), _font(BOLD, BODY)
    s.text((200, 200), "INVOICE", _font(BOLD, 90))
    s.truth.blocks.append("INVOICE")
    y = s.block(200, 420, ["Acme Supplies Ltd", "12 Harbour Road", "Bristol BS1 4DJ"], body)
    s.block(200, y + 90, ["Invoice number: INV-20417", "Date: 14 March 2026",
                          "Customer: Northwind Traders"], body)
    header = ["Description", "Qty", "Unit price", "Amount"]
    rows = [["Copy paper A4", "10", "4.20", "42.00"],
            ["Stapler heavy duty", "1", "18.50", "18.50"],
            ["Ink cartridge black", "3", "27.90", "83.70"],
            ["Desk lamp", "2", "35.00", "70.00"],
            ["Cable ties 100 pack", "7", "3.15", "22.05"]]
    edges = [180, 1180, 1500, 1900, 2370]  # column rules
    top, row_h = 1200, 110
    for r, cells in enumerate([header, *rows]):
        base = top + r * row_h + row_h // 2
        for c, cell in enumerate(cells):
            font = bold if r == 0 else body
            if c == 0:
                s.text((edges[0] + 30, base), cell, font, anchor="lm")
            else:  # numbers (and their headings) right-aligned, as invoices print them
                s.text((edges[c + 1] - 30, base), cell, font, anchor="rm")
    bottom = top + (len(rows) + 1) * row_h
    for r in range(len(rows) + 2):
        s.draw.line((edges[0], top + r * row_h, edges[-1], top + r * row_h), fill=0, width=4)
    for x in edges:
        s.draw.line((x, top, x, bottom), fill=0, width=4)
    table = [header, *rows]
    s.truth.blocks.append(" ".join(" ".join(r) for r in table))
    s.truth.tables.append(table)
    y = bottom + 110
    for label, value in (("Subtotal", "236.25"), ("VAT 20%", "47.25"), ("Total", "283.50")):
        s.text((1530, y), label, bold if label == "Total" else body, anchor="lm")
        s.text((edges[-1] - 30, y), value, bold if label == "Total" else body, anchor="rm")
        y += 80
    s.truth.blocks.append("Subtotal 236.25 VAT 20% 47.25 Total 283.50")
    s.block(200, y + 200, ["Payment is due within 30 days of the invoice date.",
                           "Thank you for your business."], body)
    return Page("invoice", s.image, s.truth)


def stock_table() -> Page:
    """An unruled table: columns only by alignment, short numbers, a one-digit cell."""
    s = _Sheet()
    body, bold = _font(SANS, BODY), _font(BOLD, BODY)
    s.text((200, 200), "Warehouse Stock Report", _font(BOLD, 70))
    s.truth.blocks.append("Warehouse Stock Report")
    s.block(200, 400, ["Counted on the first Monday of the month by the night shift."], body)
    table = [["Code", "Product", "On hand", "Reorder"],
             ["A-101", "Steel bolts M6", "1,250", "300"],
             ["A-102", "Steel nuts M6", "980", "300"],
             ["B-220", "Hinge brass", "8", "20"],
             # Not "Wood glue 1 l" (the first corpus): in DejaVu Sans a lone "l" is the glyph
             # of "|" (and nearly of "1"), which no reader can tell apart.
             ["C-310", "Wood glue bottle", "45", "10"],
             ["D-015", "Sandpaper P120", "312", "50"],
             ["E-777", "Safety goggles", "5", "12"]]
    xs = [200, 600, 1500, 2000]  # left edges of the columns; numbers right-aligned at the next
    right = [None, None, 1800, 2300]
    y = 620
    for r, cells in enumerate(table):
        for c, cell in enumerate(cells):
            font = bold if r == 0 else body
            r_edge = right[c]
            if r_edge is None:
                s.text((xs[c], y), cell, font)
            else:
                s.text((r_edge, y), cell, font, anchor="ra")
        y += 90
    s.truth.blocks.append(" ".join(" ".join(r) for r in table))
    s.truth.tables.append(table)
    s.block(200, y + 150, ["Items below their reorder level are ordered on Friday."], body)
    return Page("table_unruled", s.image, s.truth)


def two_column() -> Page:
    s = _Sheet()
    body = _font(SERIF, 40)
    s.text((PAGE_W // 2, 220), "Field Notes Weekly", _font(BOLD, 80), anchor="ma")
    s.truth.blocks.append("Field Notes Weekly")
    columns = {
        200: [["Alpha rivers flow north across the", "wide plains toward the cold sea",
               "beyond the old stone bridge where", "the ferry waits for the tide."],
              ["Bravo birds nest high in the old", "oak trees near the quiet farm where",
               "the road meets the green hills and", "the river bends to the west."]],
        1350: [["Charlie clouds drift east over the", "distant hills before the evening",
                "rain reaches the small town and", "the lamps come on one by one."],
               ["Delta lights shine bright along the", "harbour wall until the dawn comes",
                "over the grey water and the boats", "go out again to the open sea."]],
    }
    for x, paras in columns.items():
        y = 500
        for para in paras:
            y = s.block(x, y, para, body) + 90
    s.block(200, 1500, ["This footer line runs across both columns of the whole page and ends "
                        "here."], _font(SANS, 36))
    return Page("two_column", s.image, s.truth)


def form() -> Page:
    """Labels with their values printed in boxes."""
    s = _Sheet()
    body = _font(SANS, BODY)
    s.text((200, 200), "Insurance Claim Form", _font(BOLD, 76))
    s.truth.blocks.append("Insurance Claim Form")
    fields = [("Full name", "Priya Sharma"), ("Date of birth", "14/03/1988"),
              ("Policy number", "PX-44817"), ("Claim amount", "1,940.00"),
              ("Phone", "+44 117 496 0321"), ("City", "Leeds LS2 9JT")]
    y = 500
    for label, value in fields:
        s.text((200, y + 50), label, body, anchor="lm")
        s.draw.rectangle((900, y, 2300, y + 100), outline=0, width=3)
        s.text((940, y + 50), value, body, anchor="lm")
        s.truth.blocks.append(f"{label} {value}")
        y += 170
    s.block(200, y + 120, ["I confirm that the details above are correct."], body)
    s.block(200, y + 260, ["Signed: P. Sharma"], body)
    return Page("form", s.image, s.truth)


def hindi() -> Page:
    s = _Sheet()
    deva = _font(DEVA, 46)
    s.text((200, 200), "मासिक रिपोर्ट", _font(DEVA, 80))
    s.truth.blocks.append("मासिक रिपोर्ट")
    s.truth.language = "hin"
    y = s.block(200, 450, ["इस महीने बिक्री में अच्छी बढ़त हुई और", "सभी क्षेत्रों में लागत कम रही।"],
                deva, leading=1.6)
    y = s.block(200, y + 100, ["अगले महीने हम पुणे में नया कार्यालय", "खोलेंगे और दो नए लोग रखेंगे।"],
                deva, leading=1.6)
    s.block(200, y + 100, ["Reference: HR-2026-04"], _font(SANS, BODY))
    return Page("hindi", s.image, s.truth)


PAGES: dict[str, Callable[[], Page]] = {
    "invoice": invoice, "table_unruled": stock_table, "two_column": two_column, "form": form,
    "hindi": hindi,
}


def pages(names: Sequence[str] | None = None) -> list[Page]:
    return [PAGES[n]() for n in (names or list(PAGES))]


# --- PDFs ----------------------------------------------------------------------------------------

def scanned_pdf(images: Sequence[Image.Image], dpi: int) -> bytes:
    """Page images only (no text layer), as a scanner writes them."""
    out = io.BytesIO()
    rgb = [im.convert("L") for im in images]
    rgb[0].save(out, format="PDF", save_all=True, append_images=rgb[1:], resolution=dpi)
    return out.getvalue()


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def text_pdf(pages_lines: Sequence[Sequence[tuple[float, float, float, str]]]) -> bytes:
    """A PDF with a real text layer: each page a list of (x pt, y pt from top, size pt, text)
    in Helvetica (a standard font: no embedding needed). Written by hand: a few objects and an
    xref table, no library needed for this much."""
    n_pages = len(pages_lines)
    # Objects: 1 catalog, 2 page tree, 3 font, 4.. pages, then their content streams.
    font_id, first_page = 3, 4
    body: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: (f"<< /Type /Pages /Kids [{' '.join(f'{first_page + i} 0 R' for i in range(n_pages))}"
            f"] /Count {n_pages} >>").encode(),
        font_id: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
                 b"/Encoding /WinAnsiEncoding >>",
    }
    for i, lines in enumerate(pages_lines):
        stream = "\n".join(
            f"BT /F1 {size:g} Tf {x:g} {792 - y_top - size:g} Td {_pdf_string(text)} Tj ET"
            for x, y_top, size, text in lines).encode("latin-1")
        content = first_page + n_pages + i
        body[first_page + i] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                                f"/Resources << /Font << /F1 {font_id} 0 R >> >> "
                                f"/Contents {content} 0 R >>").encode()
        body[content] = (f"<< /Length {len(stream)} >>\nstream\n".encode() + stream
                         + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for num in sorted(body):
        offsets[num] = len(out)
        out += f"{num} 0 obj\n".encode() + body[num] + b"\nendobj\n"
    xref = len(out)
    count = max(body) + 1
    out += f"xref\n0 {count}\n0000000000 65535 f \n".encode()
    for num in range(1, count):
        out += f"{offsets[num]:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {count} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def text_layer_pdf() -> PdfDocument:
    """Two pages: a letter, and a price list (an unruled table in the text layer)."""
    letter = [
        (72, 72, 20, "Quarterly Letter"),
        (72, 120, 11, "Dear shareholders, the second quarter closed with revenue of"),
        (72, 136, 11, "4,812,300 dollars and an operating margin of 14.2 percent."),
        (72, 170, 11, "We opened two offices and hired 37 engineers in Pune and Leeds."),
    ]
    prices = [(72, 72, 18, "Price List 2026")]
    table = [["Item", "Qty", "Price"], ["Bolts", "500", "12.50"], ["Washers", "1", "0.75"],
             ["Brackets", "20", "48.00"], ["Rivets", "250", "9.95"]]
    for r, row in enumerate(table):
        y = 120 + r * 22
        prices += [(72, y, 11, row[0]), (300, y, 11, row[1]), (420, y, 11, row[2])]
    truths = [
        Truth(blocks=["Quarterly Letter",
                      " ".join(t for _, _, _, t in letter[1:])]),
        Truth(blocks=["Price List 2026", " ".join(" ".join(r) for r in table)],
              tables=[table]),
    ]
    return PdfDocument("pdf_text_layer", text_pdf([letter, prices]), truths, True)


def image_only_pdf(dpi: int = 200) -> PdfDocument:
    """The invoice and the two-column page as a scanner's PDF (images, no text layer)."""
    chosen = [invoice(), two_column()]
    scale = dpi / DPI
    images = [p.image.resize((round(PAGE_W * scale), round(PAGE_H * scale)),
                             Image.Resampling.LANCZOS) for p in chosen]
    return PdfDocument("pdf_image_only", scanned_pdf(images, dpi), [p.truth for p in chosen],
                       False)
