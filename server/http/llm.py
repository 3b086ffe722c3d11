"""HTTP side of the LLM proxy: `POST /v1/chat/completions` (OpenAI-compatible, JSON or SSE)
and `POST /v1/translate`, with body size limits, Idempotency-Key replay and their OpenAPI
operations. The work itself is server/llm/service.py.

Wiring (composition root), after install_api_auth and before the runner is set up:

    add_llm_routes(app, config=cfg.llm, metrics=metrics, requests=gateway.requests)
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from server.config import LlmConfig
from server.flow_control.json_depth import MAX_JSON_DEPTH, nests_deeper_than
from server.http.auth import principal
from server.http.errors import ApiError
from server.http.openapi import components, error_responses, ref, register
from server.idempotency import IdempotencyCache, IdempotencyRefused, IdempotencyStore, ReplyStores
from server.llm.metering import RequestMeter
from server.llm.router import RouteError
from server.llm.schema import (
    ChatCompletion,
    ChatCompletionRequest,
    TranslateRequest,
    TranslateResponse,
)
from server.llm.service import LlmService, new_request_id
from server.telemetry.metrics import Metrics

S = TypeVar("S", bound=msgspec.Struct)
LLM_SERVICE_KEY: web.AppKey[LlmService] = web.AppKey("llm_service")
MAX_IDEMPOTENCY_KEY = 255
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # proxies in front must not hold events back


# One parsed event (OpenAPI 3.2 `itemSchema` semantics; 3.0 tools such as schemathesis apply
# `schema` per event): `data` is a chunk as JSON, an {"error": ..., "usage": ...} object (a
# stream the upstream broke), or [DONE].
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                   "id": {"type": "string"}, "retry": {"type": "integer"}},
}


def _api_error(exc: RouteError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message, exc.headers)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` (read as it arrives: a
    chunked upload has no Content-Length to check first)."""
    too_large = ApiError(413, "payload_too_large", f"request body larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise too_large
    return bytes(buf)


def decode(raw: bytes, typ: type[S]) -> tuple[S, dict[str, Any]]:
    # Free-form fields (tools, response_format) are parsed recursively, here and by whatever
    # walks them later: bound the nesting before the parser (msgspec's RecursionError was a 500).
    if nests_deeper_than(raw):
        raise ApiError(400, "bad_request",
                       f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        parsed = msgspec.json.decode(raw, type=typ)
        data = msgspec.json.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(400, "bad_request", f"invalid request body: {exc}") from None
    if not isinstance(data, dict):  # a Struct decoded, so it is an object; keeps mypy sure
        raise ApiError(400, "bad_request", "the request body must be a JSON object")
    return parsed, data


def _json(body: bytes, request_id: str, *, replayed: bool = False) -> web.Response:
    headers = {"X-Request-Id": request_id}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.Response(body=body, content_type="application/json", headers=headers)


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(400, "bad_request",
                       f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
    return key


async def _idempotent(request: web.Request, cache: IdempotencyStore, tenant: str, raw: bytes,
                      request_id: str, run: Callable[[], Awaitable[bytes]]) -> web.Response:
    """Run `run` once per (tenant, route, Idempotency-Key); replay its answer after that."""
    key = idempotency_key(request)
    if key is None:
        return _json(await run(), request_id)
    fingerprint = hashlib.sha256(raw).hexdigest()
    try:
        async with cache.claim((tenant, request.path, key), fingerprint) as claim:
            if claim.replay is not None:
                return _json(claim.replay.body, request_id, replayed=True)
            body = await run()
            claim.store(200, body)  # only answers are kept: a failed request may be retried
            return _json(body, request_id)
    except IdempotencyRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.headers) from None


async def _stream(request: web.Request, service: LlmService, who: Any,
                  req: ChatCompletionRequest, data: dict[str, Any], request_id: str
                  ) -> web.StreamResponse:
    try:
        stream = await service.open_stream(who, req, data, request_id)
    except RouteError as exc:
        raise _api_error(exc) from None
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, "X-Request-Id": request_id})
    try:
        await resp.prepare(request)
        while (event := await stream.next_event()) is not None:
            await resp.write(event)  # as it arrives: no buffering of the answer
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client hung up: stop reading the upstream, charge what was streamed
    finally:
        await stream.finish()
    return resp


def add_llm_routes(app: web.Application, *, config: LlmConfig, metrics: Metrics | None,
                   requests: RequestMeter, replies: ReplyStores = IdempotencyCache) -> LlmService:
    service = LlmService(config, requests=requests, metrics=metrics)
    cache = replies(ttl_s=config.idempotency_ttl_s, max_entries=config.idempotency_max_entries)
    app[LLM_SERVICE_KEY] = service
    if metrics is not None:
        metrics.scrape_hooks.append(service.router.publish_metrics)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await service.start()  # provider sessions live as long as the HTTP app
        yield
        await service.aclose()

    app.cleanup_ctx.append(lifecycle)

    async def chat(request: web.Request) -> web.StreamResponse:
        who = await principal(request)
        raw = await read_body(request, config.max_request_bytes)
        req, data = decode(raw, ChatCompletionRequest)
        request_id = new_request_id()
        if req.stream:  # an Idempotency-Key is checked, not honoured: no stream replays
            idempotency_key(request)
            return await _stream(request, service, who, req, data, request_id)

        async def run() -> bytes:
            try:
                return msgspec.json.encode(await service.complete(who, req, data, request_id))
            except RouteError as exc:
                raise _api_error(exc) from None

        return await _idempotent(request, cache, who.tenant_id, raw, request_id, run)

    async def translate(request: web.Request) -> web.StreamResponse:
        who = await principal(request)
        raw = await read_body(request, config.max_request_bytes)
        req, _ = decode(raw, TranslateRequest)
        request_id = new_request_id()

        async def run() -> bytes:
            try:
                return msgspec.json.encode(await service.translate(who, req, request_id))
            except RouteError as exc:
                raise _api_error(exc) from None

        return await _idempotent(request, cache, who.tenant_id, raw, request_id, run)

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/translate", translate)
    _register_openapi(app, config)
    return service


def _register_openapi(app: web.Application, config: LlmConfig) -> None:
    schemas = components(ChatCompletionRequest, ChatCompletion, TranslateRequest,
                                 TranslateResponse)
    for field in ("max_tokens", "max_completion_tokens"):
        schemas["ChatCompletionRequest"]["properties"][field]["maximum"] = config.max_tokens_limit
    served = sorted({model for p in config.providers for model in p.models})
    if served:  # the contract names the models this gateway serves (others: 404)
        schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] = served
        # OpenAPI 3.0: `nullable` does not extend an enum; null must be listed in it.
        schemas["TranslateRequest"]["properties"]["model"]["enum"] = [*served, None]
    idempotency_key = {
        "name": "Idempotency-Key", "in": "header", "required": False,
        "description": "Replays the completed answer for a repeated key (per tenant) without "
                       "charging again; a concurrent duplicate waits for the first. Ignored "
                       "for streamed completions.",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
    }
    errors = error_responses(400, 401, 402, 404, 409, 413, 429, 502, 503, 504)
    body_note = f"Bodies are limited to {config.max_request_bytes} bytes (413)."
    register(app, "/v1/chat/completions", "post", {
        "summary": "OpenAI-compatible chat completion, routed across the configured upstreams",
        "description": "With `stream: true` the answer is server-sent events (`data: {chunk}`, "
                       "ending with `data: [DONE]`, or, if the upstream breaks mid-answer, "
                       "with `data: {\"error\": {message, type, code, param}, \"usage\": "
                       "{...}}` (no failover once the answer started; a client that asked for "
                       "`stream_options.include_usage` gets the usage chunk before it). "
                       "Metered in tokens: the estimate is reserved up front, the upstream's "
                       "usage is charged; a broken stream is charged the completion tokens "
                       "delivered (its final `usage`). " + body_note,
        "security": [{"bearer": []}],
        "parameters": [idempotency_key],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": ref(ChatCompletionRequest)}}},
        "responses": {
            "200": {"description": "the completion (JSON), or its stream (SSE)",
                    "content": {"application/json": {"schema": ref(ChatCompletion)},
                                "text/event-stream": {"schema": SSE_EVENT_SCHEMA}}},
            **errors,
        },
    }, schemas)
    register(app, "/v1/translate", "post", {
        "summary": "Translate text with a chat model (metered in tokens like chat)",
        "description": "`model` defaults to the gateway's translation model. " + body_note,
        "security": [{"bearer": []}],
        "parameters": [idempotency_key],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": ref(TranslateRequest)}}},
        "responses": {
            "200": {"description": "the translation",
                    "content": {"application/json": {"schema": ref(TranslateResponse)}}},
            **errors,
        },
    })
