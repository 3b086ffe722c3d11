"""The OpenAPI document at /openapi.json, assembled from what each route module registers, so
the contract lives next to the handler that implements it."""

from __future__ import annotations

from typing import Any

from aiohttp import web

OPENAPI_KEY: web.AppKey[dict[str, Any]] = web.AppKey("openapi")

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"},
                                            "message": {"type": "string"}}}},
}


def error_responses(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "error",
                     "content": {"application/json": {"schema": {"$ref":
                                 "#/components/schemas/Error"}}}} for s in statuses}


def document(app: web.Application) -> dict[str, Any]:
    if OPENAPI_KEY not in app:
        app[OPENAPI_KEY] = {
            "openapi": "3.0.3",
            "info": {"title": "streamgate", "version": "1"},
            "paths": {},
            "components": {
                "schemas": {"Error": ERROR_SCHEMA},
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }
    doc: dict[str, Any] = app[OPENAPI_KEY]
    return doc


def register(app: web.Application, path: str, method: str, operation: dict[str, Any],
             schemas: dict[str, Any] | None = None) -> None:
    doc = document(app)
    doc["paths"].setdefault(path, {})[method.lower()] = operation
    if schemas:
        doc["components"]["schemas"].update(schemas)


def add_openapi_route(app: web.Application) -> None:
    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(document(request.app))

    app.router.add_get("/openapi.json", openapi)
