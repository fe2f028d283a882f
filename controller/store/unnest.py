"""Many rows updated or inserted by one statement on PostgreSQL: each column's values as an array, `unnest`ed.

asyncpg's executemany sends a statement's rows in one round trip, but the server still runs the
statement once per row: a bind, a plan from the cache, an executor started and ended, the
triggers' WHEN conditions prepared, the indexes opened, per row. For an UPDATE by key that is
most of its cost: 150-250 us of the server's CPU a row for the report flush's UPDATE of
deployments, against 13-57 us a row for the same rows in one `UPDATE ... FROM unnest(...)`
(`pgcpu` in docs/benchmarks.md; the controller's own CPU a row fell too, ~95 to ~70 us). Used
where the rows are locked already: the report flush's deployments. An INSERT's executemany costs
the server no more a row than one statement over arrays did (events, ~30 us a row either way),
and the arrays cost the controller a little more: INSERTs stay executemany, except where one text
for any number of rows saves a statement to prepare (an INSERT that reads back, whose many VALUES
were a text per number of rows) or where they ride in another statement (`InsertRows`, a
`riders.Rider`: a submit batch's events in its audit append, one round trip for both).

Here the rows go as one text array per column (asyncpg encodes text[] with its own codec; an
array of another type would cost a type lookup on each new connection first, `inlist._any`),
cast on the server to the column's type, in one statement whose text depends on the columns
alone (prepared once per connection, whatever the number of rows).

SQLite keeps the executemany: it runs in the controller's process, with no such cost per
statement to save.

Each value goes through its column type's bind processing first (an enum to its string, JSON to
its text), then as text (None as NULL): the server parses what `str` gives of an int, a float, a
timestamp with its offset, a bool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Table, TextClause, insert, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.inlist import POSTGRESQL, session_dialect


async def update_rows(session: AsyncSession, table: Table, fallback: Any, rows: Sequence[Mapping[str, Any]], *,
                      key: tuple[str, str], values: Mapping[str, str], match: Mapping[str, str] | None = None) -> None:
    """UPDATE the rows of `table` whose `key` column (column, parameter) equals each row's, setting
    `values` (column -> parameter) where the `match` columns (column -> parameter) still equal the
    row's: one statement over arrays on PostgreSQL, `fallback` (the same UPDATE with those
    parameters, bound per row) as an executemany elsewhere. Each key once in `rows`.

    PostgreSQL takes the rows' locks in the order its plan meets them, not the rows': only for rows
    this transaction locked already (in the lock order, store/changes.py). Locking them first in
    a subquery (`inlist.locked_in_order`) was tried: its plan rescanned the locking subquery once
    per row (a nested semi join) or scanned the whole table (a hash semi join on nodes), so rows
    not locked yet keep their executemany (docs/benchmarks.md, `pgcpu`)."""
    if not rows:
        return
    dialect = session_dialect(session)
    if dialect.name != POSTGRESQL:
        await session.execute(fallback, list(rows))
        return
    matched = tuple((match or {}).items())
    named = (key, *values.items(), *matched)
    statement = _update_text(table, key[0], tuple(values), tuple(column for column, _ in matched), dialect)
    await session.execute(statement, _arrays(table, dialect, named, rows))


@dataclass(frozen=True)
class InsertRows:
    """Rows to INSERT into `table` (each a mapping of the same columns): a `riders.Rider`, on
    PostgreSQL a data-modifying WITH over arrays (`cte`, `params`) in another statement's text,
    so that both take one round trip (`audit.append(along=)`); else an executemany (`write`)."""

    table: Table
    rows: Sequence[Mapping[str, Any]]

    @property
    def empty(self) -> bool:
        return not self.rows

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.rows[0]) if self.rows else ()

    def cte(self, name: str, dialect: Dialect) -> str:
        """`name AS (INSERT ...)`: the rows from one text array parameter per column, each named
        `name` and the column's place (`params(name, ...)`)."""
        return _insert_cte(self.table, self.columns, name, dialect)

    def params(self, name: str, dialect: Dialect) -> dict[str, Any]:
        return _arrays(self.table, dialect, [(c, c) for c in self.columns], self.rows, prefix=name)

    async def write(self, session: AsyncSession) -> None:
        if self.rows:
            await session.execute(insert(self.table), list(self.rows))

    async def insert(self, session: AsyncSession) -> None:
        """INSERT the rows by one statement on PostgreSQL (over arrays: one text, and inside
        `marks.deferred_writes(postgresql=True)` one statement in the message it waits for, not one
        a row), an executemany elsewhere."""
        if not self.rows:
            return
        dialect = session_dialect(session)
        if dialect.name != POSTGRESQL:
            await self.write(session)
            return
        await session.execute(_insert_returning(self.table, self.columns, (), dialect), self.params("a", dialect))

    async def insert_returning(self, session: AsyncSession, *returned: str) -> list[tuple[Any, ...]]:
        """INSERT the rows by one statement and read back the `returned` columns of each (in no
        particular order). On PostgreSQL over arrays: one text whatever the number of rows (an
        INSERT of many VALUES was a text, and a statement to prepare, per number of rows)."""
        if not self.rows:
            return []
        dialect = session_dialect(session)
        if dialect.name != POSTGRESQL:
            table = self.table
            return [tuple(row) for row in await session.execute(
                insert(table).returning(*(table.c[c] for c in returned)), list(self.rows))]
        return [tuple(row) for row in await session.execute(
            _insert_returning(self.table, self.columns, returned, dialect), self.params("a", dialect))]


@lru_cache(maxsize=64)
def _insert_cte(table: Table, columns: tuple[str, ...], name: str, dialect: Dialect) -> str:
    return f"{name} AS ({_insert_text(table, columns, name, dialect)})"


@lru_cache(maxsize=16)
def _insert_returning(table: Table, columns: tuple[str, ...], returned: tuple[str, ...],
                      dialect: Dialect) -> TextClause:
    """The INSERT over arrays, reading back the `returned` columns (none: nothing)."""
    quote = dialect.identifier_preparer.quote
    returning = f" RETURNING {', '.join(quote(c) for c in returned)}" if returned else ""
    return text(f"{_insert_text(table, columns, 'a', dialect)}{returning}")


def _insert_text(table: Table, columns: tuple[str, ...], prefix: str, dialect: Dialect) -> str:
    quote = dialect.identifier_preparer.quote
    return (f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
            f"SELECT * FROM {_unnest(table, columns, dialect, prefix=prefix)}")


def _arrays(table: Table, dialect: Dialect, named: Sequence[tuple[str, str]],
            rows: Sequence[Mapping[str, Any]], *, prefix: str = "a") -> dict[str, list[str | None]]:
    """The parameters of `_update_text` (`_unnest`): `a0`, `a1`, ... (`prefix` and the place) one
    text array per (column, parameter) of `named`, each value bind-processed as its column's
    type would be."""
    arrays: dict[str, list[str | None]] = {}
    for i, (column, parameter) in enumerate(named):
        process = table.c[column].type.dialect_impl(dialect).bind_processor(dialect)
        values = [row[parameter] for row in rows]
        if process is not None:
            values = [process(v) for v in values]
        arrays[f"{prefix}{i}"] = [None if v is None else _text(v) for v in values]
    return arrays


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _unnest(table: Table, columns: Sequence[str], dialect: Dialect, *, prefix: str = "a") -> str:
    """`unnest(...)` of one text array parameter per column, each cast to its column's type."""
    return "unnest(" + ", ".join(
        f"CAST(CAST(:{prefix}{i} AS TEXT[]) AS {table.c[column].type.compile(dialect=dialect)}[])"
        for i, column in enumerate(columns)) + ")"


@lru_cache(maxsize=64)
def _update_text(table: Table, key: str, values: tuple[str, ...], match: tuple[str, ...], dialect: Dialect) -> TextClause:
    quote = dialect.identifier_preparer.quote
    name = quote(table.name)
    columns = (key, *values, *match)
    sets = ", ".join(f"{quote(c)} = v.v{1 + i}" for i, c in enumerate(values))
    where = " AND ".join([f"{name}.{quote(key)} = v.v0",
                          *(f"{name}.{quote(c)} = v.v{1 + len(values) + i}" for i, c in enumerate(match))])
    aliases = ", ".join(f"v{i}" for i in range(len(columns)))
    return text(f"UPDATE {name} SET {sets} FROM {_unnest(table, columns, dialect)} AS v({aliases}) WHERE {where}")
