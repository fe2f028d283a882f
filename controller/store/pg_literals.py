"""A PostgreSQL statement with its parameters written into its text, for a simple-query message.

asyncpg sends a statement with parameters as a prepared statement: a round trip of its own. A
statement with none can share one simple-query message with others (BEGIN, COMMIT: `pg_driver`'s
deferred writes and commit guard), so a write whose answer nobody reads is rendered here, its
`$n` placeholders replaced by literals of the values SQLAlchemy would have bound.

Only values whose literal is exact are rendered: None, bools, ints, finite floats (their `repr`,
which reads back as the same double), text (an escape string, no `$` in it, so it is safe inside
a dollar-quoted body too), timestamps with an offset (ISO 8601) and arrays of those. Anything else
(bytes, a naive timestamp, whose meaning would be the session's time zone, a mapping) returns
None: the caller sends the statement as it is. A statement whose text holds a dollar quote, or a
quoted string of its own that could hold a `$` (a backslash, a `$` in it), is not rendered either (a
`$n` inside one is not a placeholder); plain ones, such as an enum's member compared inline
(`store/enumtype.py`), hold none.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

_PLACEHOLDER = re.compile(r"\$(\d+)(?!\d)")
_QUOTES = re.compile(r"'|\$\$|\$[A-Za-z_]\w*\$")
# A quoted string that holds no `$`, no backslash (an escape string's) and no quote: no placeholder
# can be inside it, and none of its text is taken for one (`_PLACEHOLDER` needs a `$`).
_PLAIN_STRING = re.compile(r"'[^'\\$]*'")


class _Unrendered(Exception):
    """A value with no exact literal here."""


def quoted(value: str) -> str:
    """`value` as an escape-string literal that holds no `$` (it may go inside a dollar-quoted body)."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("$", "\\x24") + "'"


def literal(value: Any) -> str:
    """`value` as an SQL literal (the module docstring); `_Unrendered` when it has none here."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value) if value >= 0 else f"({value})"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Unrendered(value)
        return repr(value) if value >= 0 else f"({value!r})"
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise _Unrendered(value)
        return quoted(value.isoformat())
    if isinstance(value, date):
        return quoted(value.isoformat())
    if isinstance(value, (Decimal, UUID)):
        return quoted(str(value))
    if isinstance(value, (list, tuple)):
        return "'{}'" if not value else "ARRAY[" + ", ".join(literal(v) for v in value) + "]"
    raise _Unrendered(value)


def render(operation: str, parameters: Sequence[Any] | None) -> str | None:
    """`operation` (asyncpg's `$1`, `$2`, ...) with `parameters` written in as literals; None when
    it cannot be (the module docstring)."""
    if _QUOTES.search(_PLAIN_STRING.sub("", operation)):
        return None
    values = tuple(parameters or ())
    try:
        rendered = [literal(v) for v in values]
    except _Unrendered:
        return None

    def place(match: re.Match[str]) -> str:
        return rendered[int(match.group(1)) - 1]
    try:
        return _PLACEHOLDER.sub(place, operation)
    except IndexError:  # a placeholder past the parameters: not ours to guess
        return None
