"""POST /v1/vision/extract over real HTTP with real OCR (tesseract, poppler) on documents the
tests render themselves (Pillow + DejaVu / Lohit Devanagari fonts), and fake vision/text models.

The routes are served from an in-process aiohttp app with the gateway's auth middleware and
/openapi.json; the last test runs the route on a real `streamgate serve`.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image, ImageDraw, ImageFont

from server.billing.auth import Principal, StaticKeyAuthenticator, key_digest
from server.billing.meter import InsufficientBalance, PricedMeter
from server.billing.service import RequestCharge
from server.config import load_config
from server.http.app import build_http_app
from server.http.auth import install_api_auth
from server.http.openapi import add_openapi_route
from server.http.vision import add_vision_routes
from server.telemetry.metrics import Metrics
from tests.e2e.conftest import TEST_KEY, ServerProcess
from tests.fakes.upstream import FakeLlmUpstream, FakeVisionUpstream, LlmReply, closed_port_url
from tests.system_tools import require_pillow_feature, require_programs

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def ocr_programs() -> None:
    require_programs("tesseract", "pdftoppm")


FONTS = "/usr/share/fonts/truetype"
SANS, BOLD = f"{FONTS}/dejavu/DejaVuSans.ttf", f"{FONTS}/dejavu/DejaVuSans-Bold.ttf"
DEVA = f"{FONTS}/lohit-devanagari/Lohit-Devanagari.ttf"
PRICE = 2000
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
SCHEMA = {"type": "object", "required": ["item", "price"],
          "properties": {"item": {"type": "string"}, "price": {"type": "number"}}}


# --- documents ---------------------------------------------------------------------------------

def _page() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("L", (1275, 1650), 255)  # US letter at 150 dpi
    return image, ImageDraw.Draw(image)


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def text_page() -> Image.Image:
    image, d = _page()
    d.text((100, 90), "Quarterly Report", font=_font(BOLD, 56), fill=0)
    body, y = _font(SANS, 28), 220
    d.rectangle((90, 345, 930, 440), fill=210)  # the second paragraph sits on a shaded box
    for para in (["The company grew steadily this quarter with strong sales",
                  "in every region and lower costs across the board."],
                 ["Margins improved because shipping became cheaper and",
                  "fewer returns were processed by the support team."]):
        for text in para:
            d.text((100, y), text, font=body, fill=0)
            y += 42
        y += 50
    for text in ("- hire two engineers", "- open the Pune office", "- renew the cloud contract"):
        d.text((100, y), text, font=body, fill=0)
        y += 42
    return image


def table_page() -> Image.Image:
    image, d = _page()
    d.text((100, 90), "Fruit Prices", font=_font(BOLD, 44), fill=0)
    body = _font(SANS, 28)
    rows = [("Item", "Qty", "Price"), ("Apples", "12", "3.50"), ("Pears", "17", "2.25"),
            ("Plums", "30", "9.00")]
    for r, cells in enumerate(rows):
        for x, cell in zip((100, 520, 900), cells, strict=True):
            d.text((x, 220 + 56 * r), cell, font=body, fill=0)
    for r in range(5):  # ruled: a grid is not a figure
        d.line((85, 208 + 56 * r, 1040, 208 + 56 * r), fill=0, width=2)
    for x in (85, 500, 880, 1040):
        d.line((x, 208, x, 432), fill=0, width=2)
    d.rectangle((100, 600, 800, 1100), outline=0, width=3)  # a bar chart: the figure
    for i, h in enumerate([120, 300, 200, 420, 260]):
        d.rectangle((150 + i * 120, 1090 - h, 230 + i * 120, 1090), fill=90)
    return image


def two_column_page() -> Image.Image:
    image, d = _page()
    d.text((330, 80), "Field Notes Weekly", font=_font(BOLD, 52), fill=0)
    body = _font(SANS, 24)
    columns = {90: [["Alpha rivers flow north across", "the wide plains toward the cold",
                     "sea beyond the old stone bridge."],
                    ["Bravo birds nest high in the", "old oak trees near the quiet farm",
                     "where the road meets the hills."]],
               690: [["Charlie clouds drift east over", "the distant hills before the",
                      "evening rain reaches the town."],
                     ["Delta lights shine bright along", "the harbour wall until the dawn",
                      "comes over the grey water."]]}
    for x, paras in columns.items():
        y = 220
        for para in paras:
            for text in para:
                d.text((x, y), text, font=body, fill=0)
                y += 36
            y += 40
    d.text((90, 700), "This footer line runs across both columns of the whole page.",
           font=body, fill=0)
    return image


def hindi_page() -> Image.Image:
    image, d = _page()
    d.text((100, 100), "Greetings in two languages are shown below.", font=_font(SANS, 28),
           fill=0)
    d.text((100, 180), "नमस्ते दुनिया भारत एक सुंदर देश है", font=_font(DEVA, 30), fill=0)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def two_page_pdf() -> bytes:
    return encode(text_page(), "PDF", save_all=True, append_images=[table_page()],
                  resolution=150.0)


# --- server ------------------------------------------------------------------------------------

@dataclass
class RecordingMeter:
    """Billing stand-in: real RequestCharges on PricedMeters, every reservation kept."""

    reservations: list[tuple[str, int, PricedMeter]] = field(default_factory=list)
    refuse: bool = False

    async def reserve_request(self, *, principal: Principal, request_id: str, model: str,
                              unit: str, estimate_units: int) -> RequestCharge:
        if self.refuse:
            raise InsufficientBalance("the wallet cannot cover this request")
        assert unit == "pages"
        meter = PricedMeter(PRICE, 1)
        self.reservations.append((model, estimate_units, meter))
        return RequestCharge(meter)

    async def settled(self, i: int = -1) -> int:
        return (await self.reservations[i][2].report()).audio_ms  # the meter's units: pages


@asynccontextmanager
async def gateway(vision: dict[str, Any] | None = None, meter: RecordingMeter | None = None
                  ) -> AsyncIterator[tuple[aiohttp.ClientSession, str, Metrics]]:
    cfg = load_config(environ={}, overrides={"vision": {"price_micros_per_page": PRICE,
                                                        **(vision or {})}})
    metrics = Metrics()
    app = build_http_app(metrics, lambda: (True, ""))
    install_api_auth(app, StaticKeyAuthenticator([key_digest(TEST_KEY)], allow_anonymous=False),
                     None)
    add_openapi_route(app)
    add_vision_routes(app, config=cfg.vision, metrics=metrics,
                      requests=meter or RecordingMeter())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            yield client, f"http://{host}:{port}/v1/vision/extract", metrics
    finally:
        await runner.cleanup()


def form(data: bytes, content_type: str, **fields: str) -> aiohttp.FormData:
    out = aiohttp.FormData()
    out.add_field("file", data, filename="upload", content_type=content_type)
    for name, value in fields.items():
        out.add_field(name, value)
    return out


def block_types(page: dict[str, Any]) -> list[str]:
    return [b["type"] for b in page["blocks"]]


def firsts(page: dict[str, Any]) -> list[str]:
    return [b["text"].split()[0] for b in page["blocks"] if b["text"]]


# --- OCR and layout ----------------------------------------------------------------------------

async def test_text_page_title_paragraphs_list() -> None:
    async with gateway() as (client, url, _):
        async with client.post(url, data=form(encode(text_page()), "image/png")) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    (page,) = body["pages"]
    assert (page["page"], page["width"], page["height"]) == (1, 1275, 1650)
    assert block_types(page) == ["title", "paragraph", "paragraph", "list"]
    blocks = page["blocks"]
    assert blocks[0]["text"] == "Quarterly Report"
    assert blocks[1]["text"].startswith("The company grew steadily")
    assert blocks[3]["text"].splitlines()[1] == "- open the Pune office"
    assert [b["order"] for b in blocks] == [0, 1, 2, 3]
    assert all(b["confidence"] > 0.8 for b in blocks)
    x0, y0, x1, y1 = blocks[0]["bbox"]
    assert 90 <= x0 <= 110 and 85 <= y0 <= 110 and x1 > 500 and y1 < 170
    assert "shipping became cheaper" in page["text"]
    assert body["usage"] == {"pages": 1, "cost_micros": PRICE}
    assert "extraction" not in body


async def test_table_cells_and_figure_from_raw_png_body() -> None:
    async with gateway() as (client, url, _):
        async with client.post(url, data=encode(table_page()), params={"languages": "eng"},
                               headers={"Content-Type": "image/png"}) as resp:
            assert resp.status == 200, await resp.text()
            (page,) = (await resp.json())["pages"]
    assert block_types(page) == ["title", "table", "figure"]
    assert page["blocks"][1]["rows"] == [["Item", "Qty", "Price"], ["Apples", "12", "3.50"],
                                         ["Pears", "17", "2.25"], ["Plums", "30", "9.00"]]
    fx0, fy0, fx1, fy1 = page["blocks"][2]["bbox"]
    assert fx0 <= 110 and fy0 <= 610 and fx1 >= 790 and fy1 >= 1090


async def test_two_columns_read_left_column_first_from_jpeg() -> None:
    async with gateway() as (client, url, _):
        jpeg = encode(two_column_page(), "JPEG", quality=90)
        async with client.post(url, data=form(jpeg, "image/jpeg")) as resp:
            assert resp.status == 200, await resp.text()
            (page,) = (await resp.json())["pages"]
    assert firsts(page) == ["Field", "Alpha", "Bravo", "Charlie", "Delta", "This"]
    assert block_types(page)[0] == "title"


async def test_hindi_line_is_read_in_devanagari() -> None:
    require_pillow_feature("raqm", "Devanagari cannot be shaped without libraqm and libfribidi")
    async with gateway() as (client, url, _):
        data = form(encode(hindi_page()), "image/png", languages="hin+eng")
        async with client.post(url, data=data) as resp:
            assert resp.status == 200, await resp.text()
            (page,) = (await resp.json())["pages"]
    for word in ("नमस्ते", "दुनिया", "भारत", "सुंदर", "देश"):
        assert word in page["text"]
    assert "Greetings in two languages" in page["text"]


async def test_two_page_pdf_is_metered_per_page_and_idempotent() -> None:
    meter = RecordingMeter()
    pdf, headers = two_page_pdf(), {"Content-Type": "application/pdf", "Idempotency-Key": "k1"}
    async with gateway(meter=meter) as (client, url, _):
        async with client.post(url, data=pdf, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        async with client.post(url, data=pdf, headers=headers) as resp:  # a retry: replayed
            assert resp.headers["Idempotent-Replayed"] == "true"
            assert await resp.json() == body
        async with client.post(url, data=pdf[:-10] + b"\n%%EOF\n", headers=headers) as resp:
            assert resp.status == 409
    assert [p["page"] for p in body["pages"]] == [1, 2]
    assert body["pages"][0]["width"] == 1700  # 8.5 in rendered at 200 dpi
    assert "Quarterly Report" in body["pages"][0]["text"]
    assert "table" in block_types(body["pages"][1])
    assert [(m, n) for m, n, _ in meter.reservations] == [("vision-ocr", 2)]
    assert await meter.settled() == 2
    assert body["usage"] == {"pages": 2, "cost_micros": 2 * PRICE}


# --- structured extraction ---------------------------------------------------------------------

def vlm_settings(vlm_url: str, text_url: str | None = None) -> dict[str, Any]:
    upstream = {"enabled": True, "model": "fake", "retries": 0, "timeout_s": 5.0}
    out: dict[str, Any] = {"vlm": {**upstream, "url": vlm_url}}
    if text_url:
        out["text_model"] = {**upstream, "url": text_url}
    return out


async def test_extraction_repaired_by_retry_with_provenance() -> None:
    async with FakeVisionUpstream() as vlm:
        vlm.script_answers({"item": "Pears", "price": "2.25"}, {"item": "Pears", "price": 2.25})
        async with gateway(vlm_settings(vlm.url)) as (client, url, _):
            data = form(encode(table_page()), "image/png", schema=json.dumps(SCHEMA))
            async with client.post(url, data=data) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
    extraction = body["extraction"]
    assert extraction["data"] == {"item": "Pears", "price": 2.25}
    assert [a["outcome"] for a in extraction["attempts"]] == ["invalid", "ok"]
    item = extraction["provenance"]["/item"]
    assert item["source"] == "vlm_repaired" and item["page"] == 1
    pears_row = body["pages"][0]["blocks"][1]["rows"].index(["Pears", "17", "2.25"])
    assert 100 <= item["bbox"][0] <= 110 and item["bbox"][1] > 220 + 56 * (pears_row - 1)
    assert extraction["provenance"]["/price"]["bbox"][0] >= 890
    assert "got `str` - at `$.price`" in vlm.llm_requests[1]["messages"][-1]["content"]


async def test_text_model_fallback_when_the_vlm_is_down() -> None:
    text = FakeLlmUpstream("text")
    await text.start()
    text.llm_default = LlmReply(content='{"item": "Plums", "price": 9.0}')
    try:
        async with gateway(vlm_settings(closed_port_url(), text.url)) as (client, url, _):
            data = form(encode(table_page()), "image/png", schema=json.dumps(SCHEMA))
            async with client.post(url, data=data) as resp:
                assert resp.status == 200, await resp.text()
                extraction = (await resp.json())["extraction"]
    finally:
        await text.aclose()
    assert [(a["model"], a["outcome"]) for a in extraction["attempts"]] == [
        ("vlm", "upstream_error"), ("text_model", "ok")]
    assert extraction["provenance"]["/item"]["source"] == "text_model"
    assert "bbox" in extraction["provenance"]["/item"]
    assert "Plums\t30\t9.00" in text.llm_requests[0]["messages"][-1]["content"]


async def test_schema_never_satisfied_is_422_with_the_ocr() -> None:
    meter = RecordingMeter()
    async with FakeVisionUpstream() as vlm:
        vlm.llm_default = LlmReply(content="I cannot help with that.")
        async with gateway(vlm_settings(vlm.url), meter) as (client, url, _):
            data = form(encode(table_page()), "image/png", schema=json.dumps(SCHEMA))
            async with client.post(url, data=data) as resp:
                assert resp.status == 422
                body = await resp.json()
    assert body["error"]["code"] == "extraction_failed"
    assert len(body["attempts"]) == 3 and "Fruit Prices" in body["pages"][0]["text"]
    assert await meter.settled() == 1  # the OCR was delivered: it is charged


async def test_no_model_reachable_is_503_and_not_charged() -> None:
    meter = RecordingMeter()
    settings = vlm_settings(closed_port_url(), closed_port_url())
    async with gateway(settings, meter) as (client, url, metrics):
        data = form(encode(hindi_page()), "image/png", schema=json.dumps(SCHEMA))
        async with client.post(url, data=data) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert await meter.settled() == 0
    assert metrics.engine_errors.labels(model="vlm:fake")._value.get() >= 1


# --- contract and errors -----------------------------------------------------------------------

async def test_errors_have_the_json_shape_and_status() -> None:
    meter = RecordingMeter()
    limits = {"max_upload_bytes": 200_000, "max_pages": 1}
    async with gateway(limits, meter) as (client, url, _):
        tiny = encode(Image.new("L", (40, 40), 255))
        cases: list[tuple[Callable[[], Any], int]] = [
            (lambda: client.post(url, data=b"hello", headers={"Content-Type": "text/plain"}),
             400),
            (lambda: client.post(url, data=form(b"not an image", "image/png")), 400),
            (lambda: client.post(url, data=form(tiny, "image/png", schema="{nope")), 400),
            (lambda: client.post(url, data=form(tiny, "image/png", schema='{"type": "array"}')),
             400),
            (lambda: client.post(url, data=form(tiny, "image/png", languages="xyz")), 400),
            (lambda: client.post(url, data=form(tiny, "image/png",
                                                schema=json.dumps(SCHEMA))), 400),
            (lambda: client.post(url, data=bytes(300_000),
                                 headers={"Content-Type": "image/png"}), 413),
            (lambda: client.post(url, data=form(bytes(210_000), "image/png")), 413),
            (lambda: client.post(url, data=two_page_pdf(),  # 2 pages, at most 1
                                 headers={"Content-Type": "application/pdf"}), 413),
            (lambda: client.post(url, data=form(tiny, "image/png"), headers={
                "Authorization": "Bearer wrong"}), 401),
        ]
        for make, status in cases:
            async with make() as resp:
                body = await resp.json()
                assert resp.status == status, body
                assert set(body["error"]) == {"code", "message"}
        meter.refuse = True
        async with client.post(url, data=form(tiny, "image/png")) as resp:
            assert resp.status == 402
            assert (await resp.json())["error"]["code"] == "insufficient_balance"


async def test_openapi_documents_the_route() -> None:
    async with gateway() as (client, url, _):
        async with client.get(url.replace("/v1/vision/extract", "/openapi.json")) as resp:
            doc = await resp.json()
    op = doc["paths"]["/v1/vision/extract"]["post"]
    assert set(op["requestBody"]["content"]) >= {"multipart/form-data", "application/pdf"}
    assert {"200", "400", "402", "413", "422", "503"} <= set(op["responses"])
    assert "VisionExtractResponse" in doc["components"]["schemas"]


async def test_real_server_process_serves_the_route(server: ServerProcess) -> None:
    """Against `streamgate serve`: the composition root wires the route and documents it."""
    async with aiohttp.ClientSession(headers=AUTH) as client:
        async with client.get(f"{server.http}/openapi.json") as resp:
            paths = (await resp.json())["paths"]
        assert "/v1/vision/extract" in paths
        async with client.post(f"{server.http}/v1/vision/extract",
                               data=form(encode(text_page()), "image/png")) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert body["pages"][0]["blocks"][0]["text"] == "Quarterly Report"
