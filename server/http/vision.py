"""POST /v1/vision/extract: OCR, layout and optional schema-driven extraction of an image or PDF.

Upload: multipart/form-data with a `file` part (and optional `schema` and `languages` parts),
or the raw file as the body with its Content-Type (then `schema` and `languages` are query
parameters). Billing: the document's pages are reserved before any OCR (402 when the wallet
cannot cover them) and the pages actually processed are settled afterwards; a request that
fails upstream (502/503) is not charged, a 422 (schema never satisfied) is, since its OCR is
returned. With an Idempotency-Key, a retry of the same upload replays the charged answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec
from aiohttp import BodyPartReader, web

from server.billing.auth import Principal
from server.billing.meter import BillingUnavailable, InsufficientBalance
from server.billing.service import BillingService, RequestCharge, UnmeteredRequests
from server.config import VisionConfig
from server.flow_control.json_depth import MAX_JSON_DEPTH, nests_deeper_than
from server.http.auth import principal
from server.http.errors import ApiError
from server.http.openapi import register
from server.idempotency import IdempotencyCache, IdempotencyRefused, ReplyStores
from server.telemetry.metrics import Metrics
from server.vision.api_schema import OPERATION, SCHEMAS
from server.vision.documents import ACCEPTED_TYPES, Document, DocumentError, DocumentTooLarge
from server.vision.ocr import check_languages, parse_languages
from server.vision.proc import ToolError, ToolMissing, ToolTimeout
from server.vision.schema import CompiledSchema, SchemaError, compile_schema
from server.vision.service import (
    ExtractFailedResponse,
    ExtractionOut,
    ExtractResponse,
    PageResult,
    UsageOut,
    VisionService,
    attempts_out,
    extraction_out,
    page_out,
)
from server.vision.vlm import ExtractionFailed, ExtractionUnavailable

PATH = "/v1/vision/extract"
UNIT = "pages"
CHUNK = 64 * 1024
MAX_IDEMPOTENCY_KEY = 255
SERVICE_KEY: web.AppKey[VisionService] = web.AppKey("vision_service")


class RequestBilling(Protocol):
    async def reserve_request(self, *, principal: Principal, request_id: str, model: str,
                              unit: str, estimate_units: int) -> RequestCharge: ...


class Upload(msgspec.Struct):
    data: bytes
    schema: str | None
    languages: str | None


def add_vision_routes(app: web.Application, *, config: VisionConfig, metrics: Metrics | None,
                      requests: RequestBilling,
                      replies: ReplyStores = IdempotencyCache) -> VisionService:
    cfg = config
    service = VisionService(cfg, metrics)
    # Requests that charge honour Idempotency-Key: a retried upload gets the first answer
    # back instead of being OCRed and charged again (shared through Redis when there is one).
    answers = replies(ttl_s=cfg.idempotency_ttl_s, max_entries=cfg.idempotency_max_entries)
    app[SERVICE_KEY] = service

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        if isinstance(requests, BillingService) and requests.store is not None \
                and (cfg.model, UNIT) not in requests.prices:
            # Like the ASR/TTS models at bootstrap: config gives a default price, a price
            # already in Postgres wins.
            await requests.store.set_price(cfg.model, UNIT, cfg.price_micros_per_page, 1)
            await requests.refresh_prices()
        await service.start()
        try:
            yield
        finally:
            await service.aclose()

    app.cleanup_ctx.append(lifecycle)
    if metrics is not None:
        def breaker_gauges() -> None:
            for upstream in service.upstreams:
                metrics.breaker_open.labels(model=upstream.name).set(
                    1 if upstream.breaker.state == "open" else 0)
        metrics.scrape_hooks.append(breaker_gauges)

    async def extract(request: web.Request) -> web.Response:
        who = await principal(request)
        key = _idempotency_key(request)
        upload = await _read_upload(request, cfg.max_upload_bytes, cfg.max_schema_bytes)
        schema = _schema(upload.schema)
        if schema is not None and not service.extractor.enabled:
            raise ApiError(400, "bad_request", "structured extraction (schema) is not enabled "
                                               "on this server")
        try:
            # Named languages are used on every page; without them each page's script (OSD)
            # picks its own out of the server's default list (issue 16: no Devanagari read
            # into an English page).
            languages = (await check_languages(parse_languages(upload.languages or cfg.languages))
                         ).split("+")
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        except ToolError as exc:
            raise _tool_error(exc) from None

        async def run() -> tuple[int, bytes]:
            doc = await _open(service, upload.data)
            try:
                return await _process(service, requests, who, doc, languages,
                                      bool(upload.languages), schema, cfg.model,
                                      cfg.price_micros_per_page)
            finally:
                await doc.aclose()

        if key is None:
            return _response(*await run())
        # The same document, schema and languages: multipart framing differs between retries,
        # so the parsed upload is the fingerprint, not the raw body.
        fingerprint = await asyncio.to_thread(_fingerprint, upload)
        try:
            async with answers.claim((who.tenant_id, PATH, key), fingerprint) as claim:
                if claim.replay is not None:
                    return _response(claim.replay.status, claim.replay.body, replayed=True)
                status, body = await run()
                if status in (200, 422):  # charged answers; failures may simply be retried
                    claim.store(status, body)
                return _response(status, body)
        except IdempotencyRefused as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.headers) from None

    app.router.add_post(PATH, extract)
    register(app, PATH, "post", OPERATION, SCHEMAS)
    return service


async def _process(service: VisionService, requests: RequestBilling, who: Principal,
                   doc: Document, languages: list[str], named: bool,
                   schema: CompiledSchema | None, model: str,
                   price_per_page: int) -> tuple[int, bytes]:
    try:
        charge = await requests.reserve_request(
            principal=who, request_id=f"vision-{uuid.uuid4().hex}", model=model, unit=UNIT,
            estimate_units=doc.pages)
    except InsufficientBalance as exc:
        raise ApiError(402, "insufficient_balance", str(exc)) from None
    except BillingUnavailable as exc:
        raise ApiError(503, "billing_unavailable", str(exc), {"Retry-After": "2"}) from None
    charged = 0
    pages: list[PageResult] = []
    extraction: ExtractionOut | None = None
    failed: ExtractionFailed | None = None
    try:
        try:
            pages = await service.read_pages(doc, languages, named)
        except DocumentTooLarge as exc:
            raise ApiError(413, "too_large", str(exc)) from None
        except DocumentError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        except ToolError as exc:
            raise _tool_error(exc) from None
        charged = len(pages)
        if schema is not None:
            try:
                extraction = extraction_out(await service.extract(schema, pages))
            except ExtractionFailed as exc:
                failed = exc
            except ExtractionUnavailable as exc:
                charged = 0  # retryable trouble on our side: the client will ask again
                status = 503 if exc.unavailable else 502
                raise ApiError(status, "upstream_unavailable" if exc.unavailable
                               else "upstream_error", f"extraction failed: {exc}") from None
    finally:
        cost = await charge.settle(charged)
    if isinstance(requests, UnmeteredRequests):
        cost = charged * price_per_page  # billing off: priced, not charged (like sessions)
    usage = UsageOut(pages=charged, cost_micros=cost)
    out_pages = [page_out(p) for p in pages]
    if failed is not None:
        body = ExtractFailedResponse(
            error={"code": "extraction_failed", "message": str(failed)}, pages=out_pages,
            attempts=attempts_out(failed.attempts), usage=usage)
        return 422, msgspec.json.encode(body)
    return 200, msgspec.json.encode(ExtractResponse(pages=out_pages, extraction=extraction,
                                                    usage=usage))


def _response(status: int, body: bytes, *, replayed: bool = False) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return web.Response(body=body, status=status, content_type="application/json",
                        headers=headers)


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(400, "bad_request",
                       f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
    return key


def _fingerprint(upload: Upload) -> str:
    digest = hashlib.sha256(upload.data)
    for text in (upload.schema, upload.languages):
        digest.update(b"\x00" + (text or "").encode())
    return digest.hexdigest()


def _tool_error(exc: ToolError) -> ApiError:
    if isinstance(exc, ToolMissing):
        return ApiError(503, "ocr_unavailable", f"OCR is not available: {exc}")
    if isinstance(exc, ToolTimeout):
        return ApiError(422, "processing_timeout", str(exc))
    return ApiError(422, "unprocessable", f"the document could not be processed: {exc}")


async def _open(service: VisionService, data: bytes) -> Document:
    try:
        return await service.open_document(data)
    except DocumentTooLarge as exc:
        raise ApiError(413, "too_large", str(exc)) from None
    except DocumentError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    except ToolError as exc:
        raise _tool_error(exc) from None


def _schema(text: str | None) -> CompiledSchema | None:
    if text is None or not text.strip():
        return None
    raw = text.encode()
    if nests_deeper_than(raw):  # msgspec's RecursionError was a 500; compile_schema bounds the rest
        raise ApiError(400, "bad_request", f"schema nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return compile_schema(msgspec.json.decode(raw))
    except msgspec.DecodeError as exc:
        raise ApiError(400, "bad_request", f"schema is not valid JSON: {exc}") from None
    except SchemaError as exc:
        raise ApiError(400, "bad_request", f"unsupported schema: {exc}") from None


async def _read_upload(request: web.Request, max_bytes: int, max_schema: int) -> Upload:
    # Cheap refusal before reading anything (the margin leaves room for multipart framing).
    if request.content_length is not None and request.content_length > max_bytes + max_schema \
            + 4096:
        raise ApiError(413, "too_large", f"the upload is larger than {max_bytes} bytes")
    if request.content_type == "multipart/form-data":
        try:
            return await _read_multipart(request, max_bytes, max_schema)
        except ApiError:
            raise
        except Exception as exc:  # aiohttp's multipart parser raises several kinds
            raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
    if request.content_type.lower() not in ACCEPTED_TYPES:
        raise ApiError(400, "bad_request",
                       f"unsupported Content-Type {request.content_type!r}: send "
                       "image/png, image/jpeg, image/tiff or application/pdf, or multipart")
    data = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        data += chunk
        if len(data) > max_bytes:
            raise ApiError(413, "too_large", f"the upload is larger than {max_bytes} bytes")
    if not data:
        raise ApiError(400, "bad_request", "empty body: send the file")
    return Upload(bytes(data), _single(request, "schema"), _single(request, "languages"))


def _single(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise ApiError(400, "bad_request", f"{name} is given more than once")
    return values[0] if values else None


async def _read_multipart(request: web.Request, max_bytes: int, max_schema: int) -> Upload:
    reader = await request.multipart()
    data: bytes | None = None
    fields: dict[str, str] = {}
    seen: set[str] = set()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "bad_request", "nested multipart bodies are not supported")
        if part.name in seen:
            raise ApiError(400, "bad_request", f"form field {part.name!r} is given more than once")
        seen.add(part.name or "")
        if part.name == "file":
            data = await _read_part(part, max_bytes)
        elif part.name in ("schema", "languages"):
            raw = await _read_part(part, max_schema)
            try:
                fields[part.name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "bad_request", f"{part.name} must be UTF-8 text") from None
        else:
            raise ApiError(400, "bad_request", f"unexpected form field {part.name!r}")
    if not data:
        raise ApiError(400, "bad_request", "the form needs a non-empty `file` part")
    return Upload(data, fields.get("schema"), fields.get("languages"))


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    out = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        out += chunk
        if len(out) > limit:
            raise ApiError(413, "too_large", f"form field {part.name!r} is larger than "
                                              f"{limit} bytes")
    return bytes(out)
