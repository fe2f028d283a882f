"""Marks on statements: what a writer says about a statement that a driver may act on.

A mark is an SQL comment added as a prefix (`Update.prefix_with`), so the statement is the same on
every database (PostgreSQL ignores it) and the mark reaches the cursor with the statement's text.
The store's writers import the marks from here; the drivers read them (`sqlite_driver`).
"""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Delete, Update

# An UPDATE or DELETE whose row count nobody reads (`rowcount_unread`).
ROWCOUNT_UNREAD = "/* maia:rowcount-unread */"

_Dml = TypeVar("_Dml", Update, Delete)


def rowcount_unread(statement: _Dml) -> _Dml:
    """`statement` marked as one whose row count nobody reads. On SQLite, inside
    `sqlite_driver.deferred_writes`, such a statement may go to the database with the
    connection's next statement or commit (its cursor then says -1, unknown). Never for a
    statement with RETURNING, nor for one whose result or row count is checked."""
    return statement.prefix_with(ROWCOUNT_UNREAD)
