"""JSON Schema subset -> msgspec validation, answer parsing and provenance lookup."""

from __future__ import annotations

from typing import Any

import pytest

from server.vision.ocr import OcrWord
from server.vision.provenance import leaves, locate, pointer, provenance
from server.vision.schema import InvalidAnswer, SchemaError, compile_schema, parse_json_answer

INVOICE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "invoice number": {"type": "string", "minLength": 2},
        "total": {"type": "number", "minimum": 0},
        "count": {"type": ["integer", "null"]},
        "currency": {"enum": ["INR", "USD", None]},
        "paid": {"type": "boolean"},
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}}}},
        "notes": {"description": "anything"},
    },
    "required": ["total"],
    "additionalProperties": False,
}


def test_valid_answer_keeps_integers_and_drops_absent_optionals() -> None:
    schema = compile_schema(INVOICE)
    data = schema.validate({"total": 12, "invoice number": "A-1", "currency": None,
                            "items": [{"name": "pen", "qty": 2}, {"name": "ink"}],
                            "notes": [1, "x"]})
    assert data == {"invoice number": "A-1", "total": 12, "currency": None,
                    "items": [{"name": "pen", "qty": 2}, {"name": "ink"}], "notes": [1, "x"]}
    assert isinstance(data["total"], int)


@pytest.mark.parametrize(("answer", "message"), [
    ({"total": "12"}, "Expected `int | float`, got `str` - at `$.total`"),
    ({"total": -1}, "at `$.total`"),
    ({"total": 1, "extra": 1}, "unknown field `extra`"),
    ({"total": 1, "currency": "EUR"}, "Invalid enum value 'EUR' - at `$.currency`"),
    ({"total": 1, "items": [{"qty": 1}]}, "missing required field `name` - at `$.items[0]`"),
    ({"total": 1, "invoice number": "A"}, "length >= 2"),
    ({"total": 1, "count": 1.5}, "at `$.count`"),
    ({"total": 1, "paid": "yes"}, "at `$.paid`"),
    ({"total": 1, "items": [{"name": "a"}] * 4}, "length <= 3"),
    ([1, 2], "Expected `object`"),
])
def test_invalid_answers_name_the_problem(answer: Any, message: str) -> None:
    with pytest.raises(InvalidAnswer, match=None) as info:
        compile_schema(INVOICE).validate(answer)
    assert message in str(info.value)


@pytest.mark.parametrize("schema", [
    [],
    {"type": "array", "items": {"type": "string"}},
    {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}},
    {"type": "object", "properties": {"a": {"$ref": "#/x"}}},
    {"type": "object", "properties": {"a": {"type": "date"}}},
    {"type": "object", "properties": {"a": {"enum": [1.5]}}},
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}},
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
    {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {}},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}},
])
def test_unsupported_or_malformed_schemas_are_refused(schema: Any) -> None:
    with pytest.raises(SchemaError):
        compile_schema(schema)


def test_deep_schema_is_refused() -> None:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(12):
        node = {"type": "object", "properties": {"a": node}}
    with pytest.raises(SchemaError, match="too deep"):
        compile_schema(node)


@pytest.mark.parametrize("content", [
    '{"total": 3}',
    '```json\n{"total": 3}\n```',
    'Sure! Here it is: {"total": 3} Anything else?',
])
def test_answers_are_found_inside_fences_and_chatter(content: str) -> None:
    assert parse_json_answer(content) == {"total": 3}


def test_garbage_is_an_invalid_answer() -> None:
    with pytest.raises(InvalidAnswer, match="not valid JSON"):
        compile_schema(INVOICE).parse("I could not read the document, sorry.")


def words(*specs: tuple[str, int, int]) -> list[OcrWord]:
    return [OcrWord(text, 95.0, (x, y, x + 10 * len(text), y + 30)) for text, x, y in specs]


def test_locate_strings_numbers_and_devanagari() -> None:
    page1 = words(("Invoice", 10, 10), ("No.", 100, 10), ("A-17", 150, 10))
    page2 = words(("Total:", 10, 100), ("₹1,250.00", 100, 100), ("नमस्ते", 10, 200),
                  ("दुनिया", 100, 200))
    pages = [(1, page1), (2, page2)]
    assert locate("a-17", pages) == (1, (150, 10, 190, 40))
    assert locate(1250, pages) == (2, (100, 100, 190, 130))
    assert locate("नमस्ते दुनिया", pages) == (2, (10, 200, 160, 230))
    assert locate("missing", pages) is None
    assert locate(True, pages) is None


def test_provenance_per_leaf_with_json_pointers() -> None:
    data = {"a/b": "A-17", "items": [{"name": "Invoice"}, {"name": "nowhere"}], "ok": True}
    assert [p for p, _ in leaves(data)] == ["/a~1b", "/items/0/name", "/items/1/name", "/ok"]
    assert pointer(["x~y", 0]) == "/x~0y/0"
    prov = provenance(data, "vlm_repaired",
                      [(1, words(("Invoice", 10, 10), ("A-17", 150, 10)))])
    assert prov["/a~1b"].bbox == (150, 10, 190, 40) and prov["/a~1b"].page == 1
    assert prov["/items/1/name"].bbox is None and prov["/items/1/name"].page == 1
    assert {f.source for f in prov.values()} == {"vlm_repaired"}


def test_every_validation_error_is_listed() -> None:
    answer = {"total": "12", "currency": "EUR", "items": [{"qty": 1}], "extra": 1}
    with pytest.raises(InvalidAnswer) as info:
        compile_schema(INVOICE).validate(answer)
    errors = info.value.errors
    assert len(errors) >= 4, errors
    joined = "\n".join(errors)
    for part in ("got `str` - at `$.total`", "Invalid enum value 'EUR' - at `$.currency`",
                 "missing required field `name` - at `$.items[0]`", "unknown field `extra`"):
        assert part in joined


def test_provenance_says_whether_a_value_is_on_the_page() -> None:
    data = {"total": 283.5, "city": "Bristol", "invented": "Zanzibar", "paid": True}
    prov = provenance(data, "vlm", [(1, words(("Bristol", 10, 10), ("283.50", 150, 10)))])
    assert prov["/total"].verified is True and prov["/city"].verified is True
    assert prov["/invented"].verified is False and prov["/invented"].bbox is None
    assert prov["/paid"].verified is None  # a boolean is never printed as such
