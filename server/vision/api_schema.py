"""OpenAPI description of POST /v1/vision/extract (registered by server/http/vision.py)."""

from __future__ import annotations

from typing import Any

from server.http.openapi import error_responses


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_BOX = {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4,
        "description": "[x0, y0, x1, y1] in page pixels"}
_BINARY = {"schema": {"type": "string", "format": "binary"}}

SCHEMAS: dict[str, Any] = {
    "VisionBlock": {
        "type": "object",
        "required": ["type", "bbox", "text", "confidence", "order"],
        "properties": {
            "type": {"type": "string",
                     "enum": ["title", "paragraph", "list", "table", "figure"]},
            "bbox": _BOX,
            "text": {"type": "string"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1,
                           "description": "mean OCR word confidence; 0 for a figure without "
                                          "text"},
            "order": {"type": "integer", "minimum": 0,
                      "description": "reading order on the page (blocks are listed in it)"},
            "rows": {"type": "array", "items": {"type": "array", "items": {"type": "string"}},
                     "description": "tables only: cells, rows x columns"},
        },
    },
    "VisionPage": {
        "type": "object",
        "required": ["page", "width", "height", "text", "blocks"],
        "properties": {
            "page": {"type": "integer", "minimum": 1},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "text": {"type": "string", "description": "block texts in reading order"},
            "blocks": {"type": "array", "items": _ref("VisionBlock")},
            "skew_deg": {"type": "number",
                         "description": "tilt measured on the page and corrected before OCR, "
                                        "degrees counter-clockwise (boxes are in the uploaded "
                                        "page's pixels all the same)"},
            "rotation": {"type": "integer", "enum": [0, 90, 180, 270],
                         "description": "degrees the page was turned clockwise to be upright"},
            "languages": {"type": "string",
                          "description": "OCR languages used: the request's, or picked by the "
                                         "page's script; empty for a text-layer page"},
            "source": {"type": "string", "enum": ["ocr", "text_layer"],
                       "description": "text_layer: a PDF page's own text, not OCR"},
            "ocr_words": {"type": "integer", "minimum": 0,
                          "description": "words read on the page; every one is in a block"},
        },
    },
    "VisionAttempt": {
        "type": "object",
        "required": ["model", "outcome"],
        "properties": {
            "model": {"type": "string", "enum": ["vlm", "text_model"]},
            "outcome": {"type": "string", "enum": ["ok", "invalid", "upstream_error"]},
            "detail": {"type": "string"},
        },
    },
    "VisionExtraction": {
        "type": "object",
        "required": ["data", "provenance", "attempts"],
        "properties": {
            "data": {"type": "object", "description": "the answer, valid against the schema"},
            "provenance": {
                "type": "object",
                "description": "per leaf value, keyed by JSON Pointer (e.g. /items/0/name)",
                "additionalProperties": {
                    "type": "object",
                    "required": ["source"],
                    "properties": {
                        "source": {"type": "string",
                                   "enum": ["vlm", "vlm_repaired", "text_model"]},
                        "page": {"type": "integer", "minimum": 1},
                        "bbox": _BOX,
                        "verified": {"type": "boolean",
                                     "description": "true: the value is printed on the page "
                                                    "(at bbox); false: it was not found there "
                                                    "(misread or invented: check it); absent "
                                                    "for booleans and null"},
                    },
                },
            },
            "attempts": {"type": "array", "items": _ref("VisionAttempt")},
        },
    },
    "VisionUsage": {
        "type": "object",
        "required": ["pages", "cost_micros"],
        "properties": {"pages": {"type": "integer", "minimum": 0},
                       "cost_micros": {"type": "integer", "minimum": 0}},
    },
    "VisionExtractResponse": {
        "type": "object",
        "required": ["pages", "usage"],
        "properties": {
            "pages": {"type": "array", "items": _ref("VisionPage")},
            "extraction": _ref("VisionExtraction"),
            "usage": _ref("VisionUsage"),
        },
    },
    "VisionExtractFailed": {
        "type": "object",
        "required": ["error"],
        "description": "extraction_failed carries the OCR (charged) and the failed attempts; "
                       "processing_timeout and unprocessable carry only the error",
        "properties": {
            "error": {"type": "object", "required": ["code", "message"],
                      "properties": {"code": {"type": "string"},
                                     "message": {"type": "string"}}},
            "pages": {"type": "array", "items": _ref("VisionPage")},
            "attempts": {"type": "array", "items": _ref("VisionAttempt")},
            "usage": _ref("VisionUsage"),
        },
    },
}

_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "PNG, JPEG, TIFF (each frame a page) or PDF"},
        # Text parts. Deliberately untyped: schemathesis "negates" a string part into an
        # empty array, which multipart encodes as no part at all (a valid request), and then
        # reports the accepted request as a false positive.
        "schema": {"description": "JSON Schema (as JSON text) for structured extraction",
                   "example": '{"type": "object", "properties": {"total": {"type": "number"}}}'},
        "languages": {"description": "tesseract languages, e.g. eng+hin", "example": "eng"},
    },
}

OPERATION: dict[str, Any] = {
    "summary": "OCR, layout and optional schema-driven extraction of an image or PDF",
    "description": (
        "Each page is OCRed (tesseract) and split into typed blocks (title, paragraph, list, "
        "table, figure) with boxes and reading order. With `schema`, a vision model (or OCR "
        "text + a text model as the fallback) fills it, validated and repaired; values carry "
        "provenance. Metered per page."
    ),
    "security": [{"bearer": []}],
    "parameters": [
        {"name": "languages", "in": "query", "required": False,
         "schema": {"type": "string"}, "description": "raw-body uploads: e.g. eng+hin"},
        {"name": "schema", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "raw-body uploads: JSON Schema as JSON text"},
        {"name": "Idempotency-Key", "in": "header", "required": False,
         "schema": {"type": "string", "minLength": 1, "maxLength": 255},
         "description": "a retry with the same key and upload gets the first answer back "
                        "(header Idempotent-Replayed: true) and is not charged again"},
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _FORM},
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "image/tiff": _BINARY,
            "application/pdf": _BINARY,
        },
    },
    "responses": {
        "200": {"description": "pages, blocks and (with a schema) the extraction",
                "content": {"application/json": {"schema": _ref("VisionExtractResponse")}}},
        "422": {"description": "the schema was never satisfied, or the document could not be "
                               "processed",
                "content": {"application/json": {"schema": _ref("VisionExtractFailed")}}},
        **error_responses(400, 401, 402, 409, 413, 429, 502, 503),
    },
}
