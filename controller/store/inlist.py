"""`column IN (values)` as one statement text whatever the number of values, on PostgreSQL.

SQLAlchemy renders an IN list as one parameter per value (`IN ($1, $2, $3)`): a statement text per
length. PostgreSQL prepares each text once per connection (`db.PG_STATEMENT_CACHE`), so every batch
whose length a connection has not met yet costs a round trip to prepare before it runs (`pg8` in
`docs/benchmarks.md`: 539 distinct statements in a 1,024-node run). There `column = ANY($1::TEXT[])`
takes the whole list as one array parameter: one text, prepared once per connection, for every
length (an empty array matches nothing, as an empty IN does); a text array because asyncpg encodes
it without looking its type up first (`_any`). SQLite has no array parameters and no round trips to
prepare (a statement is parsed in-process): `any_of` keeps IN there. A statement built once
(`any_of_named`) takes its list on SQLite as one JSON text, `column IN (SELECT value FROM
json_each(:list))` (SQLite's JSON1, built in; `value` cast to text for a text column, whose
affinity an IN list applied): an expanding IN had SQLAlchemy render the statement's text again
at every execution (a batch's read of 3 lists: ~25 % of its CPU), and each
length was a text of its own for sqlite3's statement cache. The index on `column` is still used
(one lookup per value).

`any_of` builds the clause with its values bound, for statements built per call; `any_of_named`
builds it around a named parameter, for statements built once per dialect and executed with
`{name: [values]}`; `any_of_in_order` and `any_of_named_in_order` are those for a DELETE or
UPDATE that takes its rows' locks in ascending key on PostgreSQL (the lock order: store/changes.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import (BindParameter, ColumnElement, Select, String, Text, and_, any_, bindparam, cast, func,
                        literal_column, select)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeDecorator

from controller.store import jsoncodec

POSTGRESQL = "postgresql"


def session_dialect(session: AsyncSession) -> Dialect:
    """The dialect `session` runs on."""
    bind = session.bind
    if bind is None:
        raise ValueError("the session is bound to no engine: its dialect is unknown")
    return bind.dialect


def dialect_of(session: AsyncSession) -> str:
    """The name of the dialect `session` runs on ('sqlite', 'postgresql')."""
    return session_dialect(session).name


def _texts(column: ColumnElement[Any]) -> bool:
    return isinstance(column.type, String)


def _any(column: ColumnElement[Any], array: BindParameter[Any]) -> ColumnElement[bool]:
    """`column = ANY(array)`, the array a text[] parameter: asyncpg encodes text[] (and oid[]) with
    codecs of its own, but must look up any other array type on each new connection (four round
    trips, 10-30 ms on an idle server) before its first use; other columns cast it on the server."""
    return column == any_(array if _texts(column) else cast(array, ARRAY(column.type)))


def any_of(session: AsyncSession, column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
    """`column` equal to any of `values`: one array parameter on PostgreSQL, an IN list elsewhere."""
    if dialect_of(session) == POSTGRESQL:
        texts = list(values) if _texts(column) else [None if v is None else str(v) for v in values]
        return _any(column, bindparam(None, texts, type_=ARRAY(Text)))
    return column.in_(list(values))


def locked_in_order(listed: ColumnElement[bool], column: ColumnElement[Any], *, deletes: bool) -> Select[Any]:
    """PostgreSQL: `column` of the rows of its table that `listed` matches, locked in ascending
    `column` (a text one in code point order, `COLLATE "C"`, as Python sorts it: the lock order,
    store/changes.py), `FOR UPDATE` (what a DELETE takes: `deletes`) or `FOR NO KEY UPDATE` (what
    an UPDATE of other columns takes). A DELETE or UPDATE over a list takes its rows in the order
    its plan scans them (an index's, or the heap's, where an updated row's new version comes
    last): two transactions that took two rows in the other order waited for each other until
    PostgreSQL aborted one as a deadlock. As a subquery of the statement (`column IN (...)`) it
    takes them first, in this order."""
    order = column.collate("C") if _texts(column) else column
    return select(column).where(listed).order_by(order).with_for_update(key_share=not deletes)


def in_order(dialect: str, where: ColumnElement[bool], column: ColumnElement[Any], *,
             deletes: bool) -> ColumnElement[bool]:
    """`where`, for a DELETE (`deletes`) or UPDATE of the rows of `column`'s table it matches: on
    PostgreSQL those rows locked first, in ascending `column` (`locked_in_order`)."""
    if dialect != POSTGRESQL:
        return where
    return and_(where, column.in_(locked_in_order(where, column, deletes=deletes)))


def any_of_in_order(session: AsyncSession, column: ColumnElement[Any], values: Iterable[Any], *,
                    deletes: bool) -> ColumnElement[bool]:
    """`any_of`, for a DELETE (`deletes`) or UPDATE over a list of keys of `column`'s table: on
    PostgreSQL its rows locked first, in ascending key (`locked_in_order`)."""
    values = list(values)
    return in_order(dialect_of(session), any_of(session, column, values), column, deletes=deletes)


def any_of_named_in_order(dialect: str, column: ColumnElement[Any], name: str, *, deletes: bool) -> ColumnElement[bool]:
    """`any_of_named`, for a DELETE (`deletes`) or UPDATE over a list of keys of `column`'s table:
    on PostgreSQL its rows locked first, in ascending key (`locked_in_order`)."""
    return in_order(dialect, any_of_named(dialect, column, name), column, deletes=deletes)


def any_of_named(dialect: str, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """`column` equal to any value of the parameter `name` (a list at execution; of text for a
    column of another type, on PostgreSQL), for a statement built once for `dialect`."""
    if dialect == POSTGRESQL:
        return _any(column, bindparam(name, type_=ARRAY(Text)))
    listed_values = func.json_each(bindparam(name, type_=_JsonList()))
    value: ColumnElement[Any] = literal_column("value")
    if _texts(column):  # a number compared as its text, as an IN list's (the column's affinity): json_each's
        value = cast(value, Text)  # values have none, and no text equals the integer 7
    return column.in_(select(value).select_from(listed_values))


class _JsonList(TypeDecorator[Any]):
    """A list of values bound as its JSON text (what SQLite's `json_each` reads)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Iterable[Any] | None, dialect: Dialect) -> str | None:
        return None if value is None else jsoncodec.dumps(list(value))


def listed(dialect: str, values: Iterable[Any]) -> list[Any]:
    """Values as an `any_of_named` list wants them: as text on PostgreSQL (a text array, cast by the
    server for a column of another type), as they are elsewhere."""
    return [str(v) for v in values] if dialect == POSTGRESQL else list(values)
