"""A JSON Schema subset compiled to a msgspec type, to validate model answers.

Supported: type (string, number, integer, boolean, object, array, null, or a list of these),
properties, required, additionalProperties: false, items, enum (strings, integers,
null), and the constraints minimum, maximum, exclusiveMinimum, exclusiveMaximum, minLength,
maxLength, pattern, minItems, maxItems. Annotations (title, description, format, default,
examples, $schema) are accepted and ignored. Anything else that changes what is valid ($ref,
oneOf, anyOf, allOf, not, if/then, patternProperties, ...) is refused, so a schema never
validates less than its author meant. The root must be an object (what structured-output
APIs accept, and what gives the answer named fields for provenance).

Objects become structs made with msgspec.defstruct; property names that are not Python
identifiers are mapped with `rename`. Errors read like "Expected `int`, got `str` - at
`$.total`", which is also what the model is shown when asked to repair its answer.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgspec

MAX_DEPTH = 8
MAX_NODES = 500
_ANNOTATIONS = frozenset({"title", "description", "format", "default", "examples", "$schema",
                          "$id", "$comment", "deprecated", "readOnly", "writeOnly"})
_CONSTRAINTS = {
    "minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt",
    "minLength": "min_length", "maxLength": "max_length", "pattern": "pattern",
    "minItems": "min_length", "maxItems": "max_length",
}
_STRUCTURAL = frozenset({"type", "properties", "required", "additionalProperties", "items",
                         "enum"})
_SCALARS: dict[str, Any] = {"string": str, "number": float, "integer": int, "boolean": bool,
                            "null": None}


class SchemaError(ValueError):
    """The schema is malformed or uses what this subset does not support (-> 400)."""


class InvalidAnswer(ValueError):
    """A model's answer is not JSON or does not match the schema; `errors` lists every problem
    found (msgspec stops at the first; the repair prompt names them all, issue 16)."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    schema: dict[str, Any]  # as given, for the prompt and response_format
    type: Any  # the msgspec type answers are converted to

    def validate(self, value: Any) -> dict[str, Any]:
        """The answer converted and re-dumped to plain JSON types; InvalidAnswer if it fails."""
        try:
            converted = msgspec.convert(value, self.type)
        except msgspec.ValidationError as exc:
            first = str(exc)
            where = first.rsplit(" - at ", 1)[-1] if " - at " in first else None
            more = [e for e in validation_errors(self.schema, value)
                    if where is None or not e.endswith(f" - at {where}")]
            errors = [first, *more][:MAX_ERRORS]
            raise InvalidAnswer("; ".join(errors), errors) from None
        data: dict[str, Any] = msgspec.to_builtins(converted)
        return data

    def parse(self, content: str) -> dict[str, Any]:
        """A model's message content -> validated data (tolerating ``` fences and chatter)."""
        return self.validate(parse_json_answer(content))


MAX_ERRORS = 20  # listed in one repair prompt


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "array" if isinstance(value, list) else "object"


_ACCEPTS = {"string": ("str",), "integer": ("int",), "number": ("int", "float"),
            "boolean": ("bool",), "null": ("null",), "object": ("object",), "array": ("array",)}
_NAMES = {"string": "str", "integer": "int", "number": "int | float", "boolean": "bool",
          "null": "null", "object": "object", "array": "array"}


def validation_errors(node: Any, value: Any, path: str = "$") -> list[str]:
    """Every way `value` breaks the (compiled, so supported) schema `node`, in msgspec's
    wording ("Expected `int`, got `str` - at `$.total`")."""
    if not isinstance(node, dict):
        return []
    at = f" - at `{path}`"
    if "enum" in node:
        options = node["enum"]
        ok = any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in options)
        return [] if ok else [f"Invalid enum value {value!r}{at}"]
    types = _types_of(node, path) or (["object"] if "properties" in node else [])
    kind = _json_type(value)
    if types and not any(kind in _ACCEPTS[t] for t in types):
        return [f"Expected `{' | '.join(_NAMES[t] for t in types)}`, got `{kind}`{at}"]
    errors: list[str] = []
    if kind in ("int", "float"):
        for key, op, text in (("minimum", "__ge__", ">="), ("maximum", "__le__", "<="),
                              ("exclusiveMinimum", "__gt__", ">"),
                              ("exclusiveMaximum", "__lt__", "<")):
            if key in node and not getattr(value, op)(node[key]):
                errors.append(f"Expected `{kind}` {text} {node[key]}{at}")
    elif kind == "str":
        if "minLength" in node and len(value) < node["minLength"]:
            errors.append(f"Expected `str` of length >= {node['minLength']}{at}")
        if "maxLength" in node and len(value) > node["maxLength"]:
            errors.append(f"Expected `str` of length <= {node['maxLength']}{at}")
        if "pattern" in node and re.search(node["pattern"], value) is None:
            errors.append(f"Expected `str` matching regex {node['pattern']!r}{at}")
    elif kind == "array":
        if "minItems" in node and len(value) < node["minItems"]:
            errors.append(f"Expected `array` of length >= {node['minItems']}{at}")
        if "maxItems" in node and len(value) > node["maxItems"]:
            errors.append(f"Expected `array` of length <= {node['maxItems']}{at}")
        for i, item in enumerate(value):
            errors += validation_errors(node.get("items"), item, f"{path}[{i}]")
    elif kind == "object":
        props = node.get("properties", {})
        errors += [f"Object missing required field `{name}`{at}"
                   for name in node.get("required", []) if name not in value]
        if node.get("additionalProperties", True) is False:
            errors += [f"Object contains unknown field `{key}`{at}"
                       for key in value if key not in props]
        for key, sub in props.items():
            if key in value:
                errors += validation_errors(sub, value[key], f"{path}.{key}")
    return errors


def parse_json_answer(content: str) -> Any:
    text = content.strip()
    candidates = [text]
    if text.startswith("```"):
        body = text.split("\n", 1)[1] if "\n" in text else ""
        candidates.append(body.rsplit("```", 1)[0])
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    error = "empty answer"
    for candidate in candidates:
        try:
            return msgspec.json.decode(candidate.encode())
        except msgspec.DecodeError as exc:
            error = str(exc)
    raise InvalidAnswer(f"the answer is not valid JSON ({error})")


def compile_schema(schema: Any) -> CompiledSchema:
    if not isinstance(schema, dict):
        raise SchemaError("schema must be a JSON object")
    if _types_of(schema, "$") != ["object"]:
        raise SchemaError('the schema root must have "type": "object"')
    counter = itertools.count()
    typ = _compile(schema, "$", 0, counter)
    try:
        msgspec.json.Decoder(typ)  # msgspec checks the type here (e.g. unsupported unions)
    except (TypeError, ValueError, re.error) as exc:
        raise SchemaError(f"unsupported combination of types: {exc}") from None
    return CompiledSchema(schema, typ)


def _types_of(node: dict[str, Any], path: str) -> list[str]:
    raw = node.get("type")
    names = [raw] if isinstance(raw, str) else raw
    if raw is None:
        return []
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SchemaError(f"{path}: type must be a string or a list of strings")
    for name in names:
        if name not in _SCALARS and name not in ("object", "array"):
            raise SchemaError(f"{path}: unknown type {name!r}")
    return list(dict.fromkeys(names))


def _compile(node: Any, path: str, depth: int, counter: itertools.count[int]) -> Any:
    if not isinstance(node, dict):
        raise SchemaError(f"{path}: a schema must be an object")
    if depth > MAX_DEPTH or next(counter) > MAX_NODES:
        raise SchemaError(f"schema too large or too deep (depth {MAX_DEPTH}, {MAX_NODES} nodes)")
    unknown = set(node) - _ANNOTATIONS - _STRUCTURAL - set(_CONSTRAINTS)
    if unknown:
        raise SchemaError(f"{path}: unsupported keyword(s): {', '.join(sorted(unknown))}")
    if "enum" in node:
        return _enum(node["enum"], path)
    types = _types_of(node, path) or (["object"] if "properties" in node else [])
    if not types:
        return Any
    options = [_one_type(name, node, path, depth, counter) for name in types]
    if len(options) == 1:
        return options[0]
    return Union[tuple(options)]  # noqa: UP007 - built from a runtime tuple


def _enum(values: Any, path: str) -> Any:
    if not isinstance(values, list) or not values:
        raise SchemaError(f"{path}: enum must be a non-empty list")
    literals = [v for v in values if v is not None]
    for v in literals:
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise SchemaError(f"{path}: enum values must be strings, integers or null")
    choices: list[Any] = []
    if literals:
        choices.append(Literal[tuple(literals)])
    if len(literals) < len(values):
        choices.append(None)
    return choices[0] if len(choices) == 1 else Union[tuple(choices)]  # noqa: UP007


def _one_type(name: str, node: dict[str, Any], path: str, depth: int,
              counter: itertools.count[int]) -> Any:
    if name == "object":
        return _object(node, path, depth, counter)
    if name == "array":
        items = node.get("items")
        item_type = Any if items is None else _compile(items, f"{path}[]", depth + 1, counter)
        return _constrained(list[item_type], node, path, ("minItems", "maxItems"))  # type: ignore[valid-type]
    if name == "null":
        return None
    keys = {"string": ("minLength", "maxLength", "pattern"),
            "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
            "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
    if name == "number":
        # int | float: an integer answer stays an integer in the data (3, not 3.0).
        options = tuple(_constrained(t, node, path, keys["number"]) for t in (int, float))
        return Union[options]  # noqa: UP007
    return _constrained(_SCALARS[name], node, path, keys.get(name, ()))


def _constrained(base: Any, node: dict[str, Any], path: str, allowed: tuple[str, ...]) -> Any:
    meta = {_CONSTRAINTS[k]: node[k] for k in allowed if k in node}
    if not meta:
        return base
    try:
        return Annotated[base, msgspec.Meta(**meta)]
    except (TypeError, ValueError, re.error) as exc:
        raise SchemaError(f"{path}: bad constraint: {exc}") from None


def _object(node: dict[str, Any], path: str, depth: int, counter: itertools.count[int]) -> Any:
    props = node.get("properties", {})
    required = node.get("required", [])
    if not isinstance(props, dict) or not isinstance(required, list):
        raise SchemaError(f"{path}: properties must be an object and required a list")
    if not all(isinstance(r, str) for r in required):
        raise SchemaError(f"{path}: required must list property names")
    extra = node.get("additionalProperties", True)
    if not isinstance(extra, bool):
        raise SchemaError(f"{path}: additionalProperties must be true or false here")
    if not props:
        return dict[str, Any]
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    for i, (name, sub) in enumerate(props.items()):
        attr = f"f{i}"
        rename[attr] = name
        typ = _compile(sub, f"{path}.{name}", depth + 1, counter)
        if name in required:
            fields.append((attr, typ))
        else:
            fields.append((attr, Union[typ, msgspec.UnsetType], msgspec.UNSET))  # noqa: UP007
    missing = [r for r in required if r not in props]
    if missing:
        raise SchemaError(f"{path}: required names unknown properties: {', '.join(missing)}")
    return msgspec.defstruct(f"Object{next(counter)}", fields, kw_only=True, rename=rename,
                             forbid_unknown_fields=not extra)
