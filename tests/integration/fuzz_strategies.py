"""Hypothesis strategies for any protobuf request message, built from its descriptor.

Values lean towards what breaks servers: the ids the seeded cluster knows (so calls reach the
use cases, not only validation), empty and over-long strings, NUL and control characters,
int32/int64/uint64 extremes, NaN and infinities, unknown enum numbers, nested messages and
short repeated fields and maps.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

KNOWN_IDS = ("lab", "other", "z1", "row-a", "rack-a", "n1", "svc", "existing")
TEXT = st.one_of(
    st.sampled_from(KNOWN_IDS),
    st.sampled_from(("", " ", "\x00", "a\x00b", "Not_OK", "x" * 64, "y" * 129, "h" * 300, "é" * 40, "../..")),
    st.text(max_size=12),
)
INT32 = st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from((0, 1, 2, 4, 64, 65, 4096, 4097, 10**9)))
INT64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from((0, 1, 1000, 2**63 - 1)))
UINT = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from((0, 1)))
UINT64 = st.integers(0, 2**64 - 1)
DOUBLE = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from((0.0, 1.0, 0.5, 64.0, 1e300, -1.0, float("nan"), float("inf"))))
ENUM = st.integers(-3, 12)

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=16),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: INT32, FieldDescriptor.TYPE_SINT32: INT32, FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64, FieldDescriptor.TYPE_SINT64: INT64, FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT, FieldDescriptor.TYPE_FIXED32: UINT,
    FieldDescriptor.TYPE_UINT64: UINT64, FieldDescriptor.TYPE_FIXED64: UINT64,
    FieldDescriptor.TYPE_DOUBLE: DOUBLE, FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_ENUM: ENUM,
}
MAX_DEPTH = 3


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Any:
    """An instance of `descriptor`'s message with about half of its fields set."""
    msg = GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        target = getattr(msg, field.name)
        if _is_map(field):
            target.update(draw(st.dictionaries(TEXT, TEXT, max_size=4)))
        elif field.message_type is not None:
            if depth >= MAX_DEPTH:
                continue
            strategy = messages(field.message_type, depth + 1)
            if field.is_repeated:
                for item in draw(st.lists(strategy, max_size=3)):
                    target.add().CopyFrom(item)
            else:
                target.CopyFrom(draw(strategy))
        elif field.is_repeated:
            target.extend(draw(st.lists(_SCALARS[field.type], max_size=5)))
        else:
            setattr(msg, field.name, draw(_SCALARS[field.type]))
    return msg
