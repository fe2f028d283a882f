"""The text of JSON columns, as `json.dumps` and `json.loads` make and read it, for less CPU a value.

Every JSON value a statement binds or a row returns goes through the engine's serializer or
deserializer (`db.create_engine`): a deployment's reasons, revision specs and accelerator models,
a placement's accelerator indices, an event's data, an audit entry's detail. At saturation that is
about ten values encoded and as many decoded per deployment, most of them `[]` or `{}`. `json.dumps`
builds a new C encoder for each value (`JSONEncoder.iterencode`); here one is built once. The
text is the same as `json.dumps`' (same separators, ASCII escapes, NaN and infinities), so what
is stored does not change; the one difference: a value that contains itself fails with
`RecursionError`, not `ValueError` (no circular check; the controller never binds such a value).
Decoding reads `[]` and `{}` without the parser (a fresh list or dict each time) and anything
else with `json.loads`.
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

# The C encoder `json.dumps` uses with its defaults (`JSONEncoder.iterencode` for one shot: no
# indent, ", " and ": ", keys unsorted, none skipped, NaN allowed), less the circular check.
_ENCODER = None if c_make_encoder is None else c_make_encoder(
    None, json.JSONEncoder().default, encode_basestring_ascii, None, ": ", ", ", False, False, True)


def dumps(value: Any) -> str:
    """`json.dumps(value)`."""
    if not value and type(value) is list:
        return "[]"
    if not value and type(value) is dict:
        return "{}"
    if _ENCODER is None or isinstance(value, str):  # a str alone: what `JSONEncoder.encode` does first
        return json.dumps(value)
    return "".join(_ENCODER(value, 0))


def loads(text: str | bytes) -> Any:
    """`json.loads(text)`."""
    if text == "[]":
        return []
    if text == "{}":
        return {}
    return json.loads(text)
