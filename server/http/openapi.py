"""The OpenAPI document at /openapi.json, assembled from what each route module registers, so
the contract lives next to the handler that implements it. Bodies that are msgspec Structs get
their component schemas generated from the Struct (`components`, `ref`): the type that
validates a request is the one that documents it."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from server.protocol.errors import ErrorBody, ErrorEnvelope

OPENAPI_KEY: web.AppKey[dict[str, Any]] = web.AppKey("openapi")

REF_TEMPLATE = "#/components/schemas/{name}"


def components(*types: type[msgspec.Struct]) -> dict[str, Any]:
    """Component schemas for `types` in OpenAPI 3.0 dialect (msgspec emits JSON Schema 2020-12:
    `{"type": "null"}` alternatives become `nullable`, empty `required` lists go)."""
    _, generated = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    converted: dict[str, Any] = _to_openapi30(generated)
    return converted


def ref(struct: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(name=struct.__name__)}


def _to_openapi30(node: Any) -> Any:
    if isinstance(node, list):
        return [_to_openapi30(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _to_openapi30(value) for key, value in node.items()}
    if out.get("required") == []:
        del out["required"]
    enum = out.get("enum")
    if "type" not in out and isinstance(enum, list) and all(isinstance(e, str) for e in enum):
        out["type"] = "string"
    alternatives = out.get("anyOf")
    if isinstance(alternatives, list) and {"type": "null"} in alternatives:
        rest = [a for a in alternatives if a != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and "$ref" in rest[0]:
            out["allOf"] = rest  # siblings of a bare $ref are ignored in OpenAPI 3.0
        elif len(rest) == 1:
            out.update(rest[0])
        else:
            out["anyOf"] = rest
        out["nullable"] = True
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]  # 3.0: `nullable` does not extend an enum
    return out


def _error_schemas() -> dict[str, Any]:
    """The one error shape, `{"error": {"code", "message"}}`, as component `Error`."""
    schemas = components(ErrorEnvelope, ErrorBody)
    schemas["Error"] = schemas.pop(ErrorEnvelope.__name__)
    return schemas


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
                "schemas": _error_schemas(),
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
