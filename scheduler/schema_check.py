"""A fast yes/no check of a document against the shipped JSON schema.

`jsonschema` walks a 4,096-node document in about 1.3 s: it builds an error iterator, resolves
`$ref`s and dispatches every keyword per value. The controller validates the snapshot it built
itself on every reconcile pass, so that walk is paid for nothing nearly every time.

`compile_schema` turns the schema once into nested Python closures for the keywords our schemas
use (type, enum, const, required, properties, additionalProperties, items, minimum, maximum,
minLength, maxLength, local `$ref`) with jsonschema's semantics (booleans are not numbers,
1.0 is an integer, arrays are lists). It only answers *valid or not*: when it says not, the
caller runs jsonschema itself for the precise, field-naming message, so error reports are
unchanged. A keyword it does not know makes `compile_schema` return None, and callers fall back
to jsonschema for every document (never a silently weaker check).
"""

from __future__ import annotations

from typing import Any, Callable

Check = Callable[[Any], bool]

ANNOTATIONS = frozenset({"$schema", "$id", "title", "description", "default", "$comment",
                         "examples", "$defs", "definitions"})


class Unsupported(Exception):
    """The schema uses a keyword this compiler does not implement."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_check(name: str) -> Check:
    if name == "object":
        return lambda v: isinstance(v, dict)
    if name == "array":
        return lambda v: isinstance(v, list)
    if name == "string":
        return lambda v: isinstance(v, str)
    if name == "boolean":
        return lambda v: isinstance(v, bool)
    if name == "number":
        return _is_number
    if name == "integer":
        return lambda v: (isinstance(v, int) and not isinstance(v, bool)) or \
            (isinstance(v, float) and v.is_integer())
    if name == "null":
        return lambda v: v is None
    raise Unsupported(f"type {name!r}")


class _Compiler:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.refs: dict[str, Check] = {}

    def ref(self, target: str) -> Check:
        if not target.startswith("#/"):
            raise Unsupported(f"$ref {target!r}")
        if target not in self.refs:
            node: Any = self.root
            for part in target[2:].split("/"):
                node = node[part]
            box: list[Check] = []
            self.refs[target] = lambda v: box[0](v)  # used only if the schema recurses
            box.append(self.compile(node))
            self.refs[target] = box[0]
        return self.refs[target]

    def compile(self, schema: Any) -> Check:
        if schema is True or schema == {}:
            return lambda v: True
        if schema is False:
            return lambda v: False
        if not isinstance(schema, dict):
            raise Unsupported(f"schema {schema!r}")
        unknown = set(schema) - ANNOTATIONS - {
            "type", "enum", "const", "required", "properties", "additionalProperties", "items",
            "minimum", "maximum", "minLength", "maxLength", "$ref"}
        if unknown:
            raise Unsupported(", ".join(sorted(unknown)))
        scalar = self._scalar(schema)
        if scalar is not None:
            return scalar
        checks: list[Check] = []
        if "$ref" in schema:
            checks.append(self.ref(schema["$ref"]))
        if "type" in schema:
            if not isinstance(schema["type"], str):
                raise Unsupported("type list")
            checks.append(_type_check(schema["type"]))
        if "enum" in schema:
            values = schema["enum"]
            if not all(isinstance(x, str) for x in values):
                raise Unsupported("non-string enum")
            allowed = frozenset(values)
            checks.append(lambda v: isinstance(v, str) and v in allowed)
        if "const" in schema:
            const = schema["const"]
            if not _is_number(const):
                raise Unsupported("non-numeric const")
            checks.append(lambda v: _is_number(v) and v == const)
        if "minimum" in schema:
            low = schema["minimum"]
            checks.append(lambda v: not _is_number(v) or v >= low)
        if "maximum" in schema:
            high = schema["maximum"]
            checks.append(lambda v: not _is_number(v) or v <= high)
        if "minLength" in schema or "maxLength" in schema:
            lo, hi = schema.get("minLength", 0), schema.get("maxLength", float("inf"))
            checks.append(lambda v: not isinstance(v, str) or lo <= len(v) <= hi)
        if "items" in schema:
            item = self.compile(schema["items"])
            checks.append(lambda v: not isinstance(v, list) or all(map(item, v)))
        if {"required", "properties", "additionalProperties"} & set(schema):
            checks.append(self._object(schema))
        if not checks:
            return lambda v: True
        if len(checks) == 1:
            return checks[0]
        if len(checks) == 2:
            first, second = checks
            return lambda v: first(v) and second(v)
        return lambda v: all(c(v) for c in checks)

    def _scalar(self, schema: dict[str, Any]) -> Check | None:
        """One fused closure for the common leaf shapes (the bulk of a big document)."""
        keys = set(schema) - ANNOTATIONS
        kind = schema.get("type")
        low = schema.get("minimum", -float("inf"))
        high = schema.get("maximum", float("inf"))
        if keys <= {"type", "minimum", "maximum"} and kind == "integer":
            def integer(v: Any) -> bool:
                if type(v) is int or (isinstance(v, int) and not isinstance(v, bool)) or \
                        (isinstance(v, float) and v.is_integer()):
                    return low <= v <= high
                return False
            return integer
        if keys <= {"type", "minimum", "maximum"} and kind == "number":
            return lambda v: _is_number(v) and low <= v <= high
        if keys <= {"type", "minLength", "maxLength"} and kind == "string":
            lo, hi = schema.get("minLength", 0), schema.get("maxLength", float("inf"))
            return lambda v: isinstance(v, str) and lo <= len(v) <= hi
        if keys == {"type"} and kind == "boolean":
            return lambda v: v is True or v is False
        return None

    def _object(self, schema: dict[str, Any]) -> Check:
        required = tuple(schema.get("required", ()))
        props = {k: self.compile(s) for k, s in schema.get("properties", {}).items()}
        extra = schema.get("additionalProperties")
        extra_check = self.compile(extra) if extra is not None else None

        def check(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            for key in required:
                if key not in v:
                    return False
            for key, value in v.items():
                c = props.get(key)
                if c is not None:
                    if not c(value):
                        return False
                elif extra_check is not None and not extra_check(value):
                    return False
            return True
        return check


def compile_schema(schema: dict[str, Any]) -> Check | None:
    """A predicate equal to `jsonschema` validity for this schema, or None if unsupported."""
    try:
        return _Compiler(schema).compile(schema)
    except Unsupported:
        return None
