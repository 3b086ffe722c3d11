"""The JSON depth limit: exact on any JSON text, and what the ASR and TTS decoders make of it."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.flow_control.json_depth import MAX_JSON_DEPTH, nests_deeper_than
from server.protocol.decoding import BadMessage, decode_client_message
from streamgate_protocol import messages as m


def depth(value: Any) -> int:
    """Levels of arrays and objects, `[]` and `{}` being 1."""
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


# Strings full of what could fool a bracket counter: brackets, quotes, backslashes.
tricky_text = st.text(alphabet='[]{}"\\ab\u00e9\u2028', max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=60,
)


@settings(max_examples=400, deadline=None)
@given(value=json_values, limit=st.integers(0, 6), ascii_only=st.booleans())
def test_exact_on_any_json_text(value: Any, limit: int, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nests_deeper_than(data, limit) == (depth(value) > limit)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1])
def test_the_limit_itself(levels: int) -> None:
    assert nests_deeper_than(nested(levels).encode()) == (levels > MAX_JSON_DEPTH)
    # Brackets in a string are text, however many there are.
    assert not nests_deeper_than(json.dumps({"text": nested(levels) * 50}).encode())


def test_linear_on_hostile_text() -> None:
    """Unterminated strings, runs of escapes: no input makes the check quadratic (a regex
    over strings would be, on `"\\"\\"\\"...`). 64 KiB of each answers without a timeout."""
    for data in (b'"\\"' * 21_000 + b"[" * 100, b"\\" * 65_536, b'"' + b"[" * 65_535,
                 b"[" * 65_536, b"[]" * 32_768, b"{" * 65_536):
        nests_deeper_than(data)
    assert nests_deeper_than(b"[" * 65_536)  # not valid JSON, and no parser should try it


DECODERS = [m.asr_client_decoder, m.tts_client_decoder]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(
    "frame",
    [nested(30_000), nested(2_000), nested(MAX_JSON_DEPTH + 1),
     # deep in a field the decoder skips: msgspec still recursed into it
     '{"type": "keepalive", "x": ' + nested(2_000) + "}",
     '{"x": ' + nested(2_000) + ', "type": "keepalive"}',
     '{"type": "keepalive", "x": ' + nested(MAX_JSON_DEPTH) + "}"],
)
def test_deep_nesting_is_a_bad_message(decoder: msgspec.json.Decoder[Any], frame: str) -> None:
    with pytest.raises(BadMessage, match=f"^JSON nested deeper than {MAX_JSON_DEPTH} levels"):
        decode_client_message(frame.encode(), decoder)


@pytest.mark.parametrize("decoder", DECODERS)
def test_nesting_up_to_the_limit_decodes(decoder: msgspec.json.Decoder[Any]) -> None:
    frame = '{"type": "keepalive", "x": ' + nested(MAX_JSON_DEPTH - 1) + "}"
    assert isinstance(decode_client_message(frame.encode(), decoder), m.KeepAlive)
    text = '{"type": "text", "text": "' + nested(1_000) + '"}'
    assert decode_client_message(text.encode(), m.tts_client_decoder) == m.Text(
        text=nested(1_000))
