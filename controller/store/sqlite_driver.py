"""SQLite through aiosqlite with one trip to its thread per statement.

aiosqlite runs each connection's sqlite3 calls on a thread of its own; every call is a round trip
(a queue put, the thread woken, the result handed back through `call_soon_threadsafe`, the event
loop woken). SQLAlchemy's aiosqlite adapter makes four of them per statement (open a cursor,
execute, fetch the rows, close the cursor) and three per write. Here the cursor adapter does all
of a statement in one function run on the connection's thread: the sqlite3 cursor is opened,
executed, read and closed there, and what SQLAlchemy reads afterwards (`description`, `rowcount`,
`lastrowid`, the rows) is kept in the adapter, so nothing of sqlite3 is touched from the event
loop's thread. A commit or rollback with no transaction open takes no trip at all. Statements,
transactions and errors are the same as with the stock adapter;
server-side cursors (`stream_results`) keep the stock one.

A writer that never handles one statement's failure on its own (a batch or a plan commit that
fails, or commits, as a whole) may defer its writes (`marks.deferred_writes`): inside it, an INSERT
without RETURNING, and an UPDATE or DELETE marked `rowcount_unread` (`store/marks.py`: its row
count is never read; a deferred statement's cursor says -1, unknown), waits on the connection and goes to the thread
with the connection's next statement or its commit, in order, in that one trip. Under load each
trip is a turn of a busy event loop while the transaction holds SQLite's only writer (a plan
commit of a few arrivals: thirteen trips -> four). A deferred statement's error is raised by
the statement or the commit it went with; nothing after it in that trip runs, and the
transaction is rolled back by its caller as for any failed statement. Everything else is
executed at once, as before: the ORM's own UPDATEs and DELETEs (a flush checks their row counts)
are never marked.

`dbapi()` is the DBAPI module to hand `create_async_engine(..., module=...)` for a
`sqlite+aiosqlite` URL.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection, AsyncAdapt_aiosqlite_cursor, AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT, await_only

from controller.store.marks import SQLITE, deferring, may_defer

_Outcome = tuple[Any, int, Any, list[Any] | None]  # description, rowcount, lastrowid, rows
_Statement = tuple[str, Any, bool]  # operation, parameters, executemany

def _run_deferred(conn: sqlite3.Connection, deferred: list[_Statement]) -> None:
    for operation, parameters, many in deferred:
        try:
            _run(conn, operation, parameters, many)
        except sqlite3.Error as exc:  # raised by the statement it rode with: name the one that failed
            exc.add_note(f"in a deferred statement: {operation[:200]}")
            raise


def _run_after(conn: sqlite3.Connection, deferred: list[_Statement], operation: str, parameters: Any,
               many: bool) -> _Outcome:
    """The deferred statements, then this one: one trip."""
    _run_deferred(conn, deferred)
    return _run(conn, operation, parameters, many)


def _commit_after(conn: sqlite3.Connection, deferred: list[_Statement]) -> None:
    _run_deferred(conn, deferred)
    conn.commit()


def _run(conn: sqlite3.Connection, operation: str, parameters: Any, many: bool) -> _Outcome:
    """One statement on the connection's thread: execute, read every row, close."""
    cursor = conn.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else None
        return description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


@dataclass(frozen=True)
class Trip:
    """One trip to aiosqlite's thread (`counted_trips`)."""

    function: str  # what ran there: `_run`, `_run_after`, `_commit_after`, or aiosqlite's own (`commit`, ...)
    statement: str  # the statement's first three words, "COMMIT", or the function's name in capitals
    deferred: int  # deferred writes that went with it


def _trip(fn: Any, args: tuple[Any, ...]) -> Trip:
    name = getattr(fn, "__name__", repr(fn))
    if fn is _run:
        return Trip(name, " ".join(args[1].split()[:3]), 0)
    if fn is _run_after:
        return Trip(name, " ".join(args[2].split()[:3]), len(args[1]))
    if fn is _commit_after:
        return Trip(name, "COMMIT", len(args[1]))
    return Trip(name, name.upper(), 0)


@contextmanager
def counted_trips() -> Iterator[list[Trip]]:
    """Every trip to aiosqlite's threads asked from this thread meanwhile, in order (for tests and
    `bench commit`: it patches aiosqlite's connection class, so every connection's trips are
    counted). Another thread's (an event loop of its own) are not the caller's and are not
    counted, as `pg_driver.counted_trips` counts."""
    seen: list[Trip] = []
    real = aiosqlite.core.Connection._execute
    counting = threading.get_ident()

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == counting:
            seen.append(_trip(fn, args))
        return await real(self, fn, *args, **kwargs)

    aiosqlite.core.Connection._execute = counted  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        aiosqlite.core.Connection._execute = real  # type: ignore[method-assign]


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """A client-side cursor whose statements each take one trip to the connection's thread."""

    __slots__ = ("_description", "_rowcount", "_lastrowid")
    _awaitable_cursor_close = False  # nothing is left open on the thread to close

    def __init__(self, adapt_connection: AsyncAdapt_aiosqlite_connection) -> None:  # no trip: no sqlite3 cursor yet
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: Any = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    def close(self) -> None:
        self._rows.clear()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        try:
            return await_only(self._trip(operation, parameters, many=False))
        except Exception as error:
            self._adapt_connection._handle_exception(error)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        try:
            return await_only(self._trip(operation, seq_of_parameters, many=True))
        except Exception as error:
            self._adapt_connection._handle_exception(error)

    async def _trip(self, operation: Any, parameters: Any, *, many: bool) -> None:
        adapt: _Connection = self._adapt_connection  # type: ignore[assignment]
        if deferring(SQLITE) and may_defer(operation):
            adapt.deferred.append((operation, parameters, many))
            self._description, self._rowcount, self._lastrowid = None, -1, None
            self._rows = collections.deque()
            return
        connection: aiosqlite.Connection = self._connection
        async with adapt._execute_mutex:
            deferred, adapt.deferred = adapt.deferred, []
            try:
                if deferred:
                    outcome = await connection._execute(_run_after, connection._conn, deferred, operation,
                                                        parameters, many)
                else:
                    outcome = await connection._execute(_run, connection._conn, operation, parameters, many)
            except BaseException:  # cancelled, the statement may still run on the thread: see `_Connection`
                adapt.unsure = True
                raise
        self._description, self._rowcount, self._lastrowid, rows = outcome
        self._rows = collections.deque(rows) if rows else collections.deque()


class _Connection(AsyncAdapt_aiosqlite_connection):
    """A connection whose rollback and commit take no trip when sqlite3 has no transaction open
    (its driver begins one only before a write: a unit of work that only read, and the pool's
    rollback after a commit, have nothing to end). `in_transaction` is read from the event loop's
    thread while the connection's thread is idle: its statements are awaited one at a time. After
    a statement that did not come back (cancelled: it may still be running there, and begin a
    transaction), the next rollback takes its trip, queued behind it, whatever sqlite3 says."""

    __slots__ = ("unsure", "deferred")
    _cursor_cls = OneTripCursor

    def __init__(self, dbapi: Any, connection: aiosqlite.Connection) -> None:
        super().__init__(dbapi, connection)
        self.unsure = False
        self.deferred: list[_Statement] = []  # writes waiting for the next trip (`deferred_writes`)

    def _idle(self) -> bool:
        conn = self._connection._conn
        return not self.unsure and conn is not None and not conn.in_transaction

    def rollback(self) -> None:
        self.deferred = []  # never sent: nothing of theirs to undo
        if not self._idle():
            super().rollback()
            self.unsure = False

    def commit(self) -> None:
        if self.deferred:
            deferred, self.deferred = self.deferred, []
            try:
                await_only(self._connection._execute(_commit_after, self._connection._conn, deferred))
            except Exception as error:
                self._handle_exception(error)
            except BaseException:  # cancelled: the trip may still run on the thread (`rollback` takes its own)
                self.unsure = True
                raise
        elif not self._idle():
            super().commit()


class _Dbapi(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> _Connection:
        stock = super().connect(*arg, **kw)
        return _Connection(self, stock._connection)


def dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The DBAPI module of a `sqlite+aiosqlite` engine whose statements take one trip each."""
    return _Dbapi(aiosqlite, sqlite3)
