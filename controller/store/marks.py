"""Marks on statements: what a writer says about a statement that a driver may act on.

A mark is an SQL comment added as a prefix (`Update.prefix_with`), so the statement is the same on
every database (PostgreSQL ignores it) and the mark reaches the cursor with the statement's text.
The store's writers import the marks from here; the drivers read them (`sqlite_driver`,
`pg_driver`).

Here too the writer's word that its writes may wait (`deferred_writes`): an INSERT without
RETURNING or a statement marked `rowcount_unread`, executed inside, may go to the database with
the connection's next statement or its commit, in order (`may_defer`). For writers whose
transaction fails, or commits, as a whole: a deferred statement's error is raised by the statement
or the COMMIT it went with. Such a writer tells the refusal it provoked on purpose (a NULL put into
a NOT NULL column when what it wrote against changed since its read) from any other by
`refused_by_null`.
"""

from __future__ import annotations

import contextvars
import sqlite3
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Delete, Update
from sqlalchemy.exc import IntegrityError

from controller.store.inlist import POSTGRESQL

# An UPDATE or DELETE whose row count nobody reads (`rowcount_unread`).
ROWCOUNT_UNREAD = "/* maia:rowcount-unread */"

_Dml = TypeVar("_Dml", Update, Delete)

SQLITE = "sqlite"

# The dialects whose writes wait in this task now (`deferred_writes`).
_DEFERRING: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("maia_deferred_writes",
                                                                            default=frozenset())


@contextmanager
def deferred_writes(*, postgresql: bool = False) -> Iterator[None]:
    """Statements that `may_defer` executed inside (in this task) wait on their connection for its
    next statement or commit (the module docstring). On SQLite (`sqlite_driver`) always; on
    PostgreSQL (`pg_driver`) only with `postgresql`: there they go as literals in one simple-query
    message (the COMMIT's, or one sent before the next statement), which the server parses and
    plans anew, so a writer asks for it where round trips are what it waits for (a submit or
    delete batch)."""
    token = _DEFERRING.set(frozenset((SQLITE, POSTGRESQL) if postgresql else (SQLITE,)))
    try:
        yield
    finally:
        _DEFERRING.reset(token)


def deferring(dialect: str) -> bool:
    """Whether writes on `dialect` wait now (`deferred_writes`)."""
    return dialect in _DEFERRING.get()


def may_defer(operation: str) -> bool:
    """Whether `operation` may wait inside `deferred_writes`: an INSERT without RETURNING, or a
    statement marked `rowcount_unread` (nothing reads what either answers)."""
    if "RETURNING" in operation.upper():
        return False
    return operation.lstrip()[:6].upper() == "INSERT" or ROWCOUNT_UNREAD in operation


def rowcount_unread(statement: _Dml) -> _Dml:
    """`statement` marked as one whose row count nobody reads. Inside `deferred_writes` such a
    statement may go to the database with the connection's next statement or commit (its cursor
    then says -1, unknown). Never for a statement with RETURNING, nor for one whose result or row
    count is checked."""
    return statement.prefix_with(ROWCOUNT_UNREAD)


_NOT_NULL_VIOLATION = "23502"  # PostgreSQL's SQLSTATE


def refused_by_null(exc: BaseException, columns: Collection[tuple[str, str]]) -> bool:
    """`exc` is the refusal of a NULL a write put on purpose into one of these NOT NULL `columns`
    (table, column) when what it was written against changed since it was read (a write that
    reads nothing back, `deferred_writes`, fails its transaction so), and nothing else (another
    column's NOT NULL, a unique violation). PostgreSQL's error names the table and the column
    (asyncpg's, under SQLAlchemy's adaptation); SQLite's names them only in its message."""
    if not isinstance(exc, IntegrityError):
        return False
    if isinstance(exc.orig, sqlite3.IntegrityError):
        return sqlite_refusal(exc.orig, sqlite3.SQLITE_CONSTRAINT_NOTNULL,
                              {f"NOT NULL constraint failed: {table}.{column}" for table, column in columns})
    driver = getattr(exc.orig, "orig", None)  # asyncpg's exception (SQLAlchemy's EmulatedDBAPIException.orig)
    return (getattr(driver, "sqlstate", None) == _NOT_NULL_VIOLATION
            and (getattr(driver, "table_name", None), getattr(driver, "column_name", None)) in columns)


def sqlite_refusal(error: sqlite3.IntegrityError, code: int, messages: set[str]) -> bool:
    """SQLite refused with this extended error `code` and one of these `messages` (the table and
    column it names are only in its message)."""
    return error.sqlite_errorcode == code and error.args[:1] in {(message,) for message in messages}
