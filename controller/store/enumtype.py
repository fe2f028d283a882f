"""The type of the enum columns (a deployment's and a shard's phase, a node's health): stored as
plain strings (no native ENUM types: portable and trivial to migrate), and compared with a member
of their enum as a constant in the statement's text, not a bound parameter.

Why inline: PostgreSQL plans a prepared statement for its parameters' values the first five times,
then once for any values (a generic plan) and keeps that one when it is no costlier. For a column
whose statistics hold a single value (every deployment running, as in a steady cluster) a
generic plan estimates `phase NOT IN ($1, $2)` to keep no row at all, whatever the values, and
joins what it keeps by nested loops: the rollout's scan of every placement (`retire_replaced`,
each reconcile pass while nodes join) took 25 ms and 60,000 buffers over 10,000 placements,
against 7 ms and 478 by the hash joins planned for `NOT IN ('deleting', 'quarantined')`
(docs/benchmarks.md, `inline`). With the constant in the text, every plan of the statement is
made for it. An enum has a handful of members, so this adds a handful of texts at most; values
that are not members (a parameter, another column, a string) are bound or compared as before.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Enum, literal_column, type_coerce
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ColumnElement

_MEMBERS_COMPARED = {operators.eq, operators.ne}
_MEMBER_LISTS_COMPARED = {operators.in_op, operators.not_in_op}
_LISTS = (list, tuple, set, frozenset)


class InlineEnum(Enum):
    """`Enum` whose comparisons with its members (`==`, `!=`, `in_`, `not_in`) put them in the
    statement's text (the module docstring)."""

    class Comparator(Enum.Comparator):
        def operate(self, op: Any, *other: Any, **kwargs: Any) -> ColumnElement[Any]:
            if len(other) == 1:
                if op in _MEMBERS_COMPARED:
                    other = (self._constant(other[0]),)
                elif op in _MEMBER_LISTS_COMPARED and isinstance(other[0], _LISTS):
                    values = sorted(other[0], key=str) if isinstance(other[0], (set, frozenset)) else list(other[0])
                    if values and all(self._member(v) for v in values):
                        other = ([self._constant(v) for v in values],)
            return super().operate(op, *other, **kwargs)

        def _member(self, value: Any) -> bool:
            enum_class = self.type.enum_class
            return enum_class is not None and isinstance(value, enum_class) and isinstance(value.value, str)

        def _constant(self, value: Any) -> Any:
            """A member of the column's enum as a typed SQL literal (its stored value); anything
            else as given."""
            if not self._member(value):
                return value
            return type_coerce(literal_column("'" + value.value.replace("'", "''") + "'"), self.type)

    comparator_factory = Comparator
