"""`column IN (values)` as one statement text whatever the number of values, on PostgreSQL.

SQLAlchemy renders an IN list as one parameter per value (`IN ($1, $2, $3)`): a statement text per
length. PostgreSQL prepares each text once per connection (`db.PG_STATEMENT_CACHE`), so every batch
whose length a connection has not met yet costs a round trip to prepare before it runs (`pg8` in
`docs/benchmarks.md`: 539 distinct statements in a 1,024-node run). There `column = ANY($1::type[])`
takes the whole list as one array parameter: one text, prepared once per connection, for every
length (an empty array matches nothing, as an empty IN does). SQLite has no array parameters and
no round trips to prepare (a statement is parsed in-process): it keeps IN.

`any_of` builds the clause with its values bound, for statements built per call; `any_of_named`
builds it around a named parameter, for statements built once per dialect and executed with
`{name: [values]}`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

POSTGRESQL = "postgresql"


def dialect_of(session: AsyncSession) -> str:
    """The name of the dialect `session` runs on ('sqlite', 'postgresql')."""
    bind = session.bind
    if bind is None:
        raise ValueError("the session is bound to no engine: its dialect is unknown")
    return bind.dialect.name


def any_of(session: AsyncSession, column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
    """`column` equal to any of `values`: one array parameter on PostgreSQL, an IN list elsewhere."""
    if dialect_of(session) == POSTGRESQL:
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(list(values))


def any_of_named(dialect: str, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """`column` equal to any value of the parameter `name` (a list at execution), for a statement
    built once for `dialect`."""
    if dialect == POSTGRESQL:
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))
