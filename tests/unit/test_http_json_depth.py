"""Deeply nested JSON on the HTTP routes that parse free-form JSON (the LLM proxy's body, the
vision extraction schema) is a 400 `bad_request`, not msgspec's RecursionError (a plain-text 500
and a traceback; found by a long run of the hostile-input suite)."""

from __future__ import annotations

import json

import pytest

from server.flow_control.json_depth import MAX_JSON_DEPTH
from server.http.errors import ApiError
from server.http.llm import decode
from server.http.vision import _schema
from server.llm.schema import ChatCompletionRequest, TranslateRequest


def nested(depth: int, opener: str = "[") -> str:
    """JSON nesting `depth` arrays, or objects (`{"a":{"a":...{}}}`)."""
    if opener == "{":
        return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)
    return "[" * depth + "1" + "]" * depth


def chat_body(extra: str) -> bytes:
    return ('{"model":"chat","messages":[{"role":"user","content":"hi"}],"extra":'
            + extra + "}").encode()


@pytest.mark.parametrize("opener", ["[", "{"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 2_000, 30_000])
def test_a_chat_body_nested_too_deep_is_a_bad_request(opener: str, depth: int) -> None:
    with pytest.raises(ApiError) as err:
        decode(chat_body(nested(depth, opener)), ChatCompletionRequest)
    assert err.value.status == 400 and err.value.code == "bad_request"
    assert f"{MAX_JSON_DEPTH} levels" in err.value.message


def test_a_chat_body_at_the_bound_is_parsed() -> None:
    # The body's own object and the field's value: 1 + (MAX_JSON_DEPTH - 1) levels.
    raw = chat_body(nested(MAX_JSON_DEPTH - 1))
    req, data = decode(raw, ChatCompletionRequest)
    assert req.model == "chat" and data["extra"] == json.loads(raw)["extra"]


def test_a_translate_body_nested_too_deep_is_a_bad_request() -> None:
    with pytest.raises(ApiError) as err:
        decode(b'{"text":' + nested(5_000).encode() + b"}", TranslateRequest)
    assert err.value.status == 400 and err.value.code == "bad_request"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 3_000, 30_000])
def test_a_vision_schema_nested_too_deep_is_a_bad_request(depth: int) -> None:
    with pytest.raises(ApiError) as err:
        _schema(nested(depth, "{"))
    assert err.value.status == 400 and err.value.code == "bad_request"
    assert f"{MAX_JSON_DEPTH} levels" in err.value.message


def test_a_vision_schema_within_the_bound_still_gets_the_schema_checks() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    assert _schema(json.dumps(schema)) is not None
    with pytest.raises(ApiError) as err:  # compile_schema's own, smaller depth bound
        _schema(nested(40, "{"))
    assert err.value.status == 400 and "unsupported schema" in err.value.message
