"""SQLAlchemy's asyncpg adaptation with the transaction begun at the first statement that needs one.

SQLAlchemy's asyncpg adapter sends BEGIN (a round trip of its own) before a transaction's first
statement and ROLLBACK (another) when its session closes: a unit of work that only reads costs
three round trips for its one SELECT, and on the controller's event loop each trip waits for a
turn of the loop (at 4,096 nodes ~5-10 ms: measured, `docs/benchmarks.md`, `pg8`).

Here the SELECTs a unit of work runs before its first write run outside a transaction (PostgreSQL's
autocommit), and BEGIN is sent before the first statement that needs one: anything but a plain
SELECT (an INSERT, UPDATE, DELETE, SET TRANSACTION, SAVEPOINT, a WITH that may write), a SELECT
that locks rows (FOR UPDATE / SHARE) or one that calls a function with transactional effects
(advisory locks, pg_notify, set_config, a transaction id). From then on every statement runs in
the transaction as before. A unit of work that never needs one sends neither BEGIN nor ROLLBACK.
A sequence's `nextval` needs none: what it takes is never given back, in a transaction or not (a
submit batch's read takes its deployments' ids so).

This changes nothing a caller can see under READ COMMITTED (`Database.unit_of_work`'s isolation):
there every statement reads the latest commit anyway, in a transaction or not. A connection set to
a stricter isolation level (`read_snapshot`'s SET TRANSACTION, an `isolation_level` option) begins
at its first statement as before, since its snapshot must be taken there.

BEGIN, COMMIT and ROLLBACK are sent as plain statements (`PlainTransaction`), so that a COMMIT can
carry a statement of the caller's in its own message (`LazyBeginConnection.commit_guard`: the
leader fence, `lease.commit_fenced`) instead of a round trip before it, and a BEGIN a SAVEPOINT
(`savepoint`: a plan commit's, `store/plans/commit.py`).

Deferred writes (`marks.deferred_writes(postgresql=True)`: a submit or delete batch). Inside, a
statement that `marks.may_defer` (an INSERT without RETURNING, one marked `rowcount_unread`) and
whose parameters have exact literals (`pg_literals.render`) is not sent: its text with the
literals waits on the connection (its cursor answers no rows, row count -1) and goes, in order, in
the message of the connection's next statement that is sent as plain text (the COMMIT) or in one
message of their own just before the next statement that is not (a prepared one). A transaction
not begun yet begins in that message: a submit batch's INSERT (a delete batch's UPDATE) goes with
BEGIN, before its audit append (which reads back); a unit of work that reads, then writes only
such statements costs two round trips, its read and one message with the writes, which the server
runs as one implicit transaction. The server parses and plans each of them anew (no prepared
plan), which is why a writer asks for it. Their errors are raised by the message they went in: the
transaction fails as a whole (rolled back by the server, or by `PlainTransaction.commit`), as with
SQLite's deferred writes.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects.postgresql.asyncpg import (
    AsyncAdapt_asyncpg_connection, AsyncAdapt_asyncpg_cursor, AsyncAdapt_asyncpg_dbapi,
)
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util import await_only

from controller.store import pg_literals
from controller.store.inlist import POSTGRESQL
from controller.store.marks import deferring, may_defer

# Isolation levels (asyncpg's names) under which reads before the first write need no transaction.
_LAZY_LEVELS = (None, "read_committed")
# What makes a SELECT more than a read: a row lock, or a function with effects (ours:
# migration 0026's `maia_lease_fence`, which locks the lease row).
_LOCKS_OR_EFFECTS = re.compile(
    r"\bFOR\s+(?:UPDATE|NO\s+KEY\s+UPDATE|SHARE|KEY\s+SHARE)\b"
    r"|\b(?:pg_advisory\w*|pg_try_advisory\w*|pg_notify|set_config|txid_current\w*"
    r"|pg_current_xact_id\w*|maia_lease_fence)\s*\(",
    re.IGNORECASE)
_KNOWN_MAX = 4096  # statements remembered (the controller's are compiled once: a few hundred)


class _Reads:
    """Whether a statement reads only (memoised by its text)."""

    def __init__(self) -> None:
        self._known: dict[str, bool] = {}

    def only(self, statement: str) -> bool:
        known = self._known.get(statement)
        if known is None:
            head = statement.lstrip(" \t\n(")[:6].upper()
            known = head == "SELECT" and _LOCKS_OR_EFFECTS.search(statement) is None
            if len(self._known) >= _KNOWN_MAX:
                self._known.clear()
            self._known[statement] = known
        return known


reads = _Reads()


def reads_only(statement: str) -> bool:
    """True for a plain SELECT: no row locks, no functions with transactional effects."""
    return reads.only(statement)


class LazyBeginCursor(AsyncAdapt_asyncpg_cursor):
    __slots__ = ()

    async def _prepare_and_execute(self, operation: str, parameters: Any) -> None:
        if self._deferred((operation,), (parameters,)):
            return
        connection = self._adapt_connection
        if connection.deferred:
            await self._send_deferred()
        connection.begin_later = reads_only(operation)
        try:
            await super()._prepare_and_execute(operation, parameters)
        finally:
            connection.begin_later = False

    async def _executemany(self, operation: str, seq_of_parameters: Any) -> Any:
        seq_of_parameters = list(seq_of_parameters)
        if self._deferred((operation,) * len(seq_of_parameters), seq_of_parameters):
            return None
        if self._adapt_connection.deferred:
            await self._send_deferred()
        return await super()._executemany(operation, seq_of_parameters)

    def _deferred(self, operations: Sequence[str], parameters: Sequence[Any]) -> bool:
        """Whether the statements wait on the connection (the module docstring), each rendered."""
        if (not operations or not deferring(POSTGRESQL) or not may_defer(operations[0])
                or self._adapt_connection.isolation_level == "autocommit"):
            return False
        rendered = [pg_literals.render(o, p) for o, p in zip(operations, parameters)]
        if any(r is None for r in rendered):
            return False
        self._adapt_connection.deferred.extend(rendered)  # type: ignore[arg-type]
        self._description, self._rowcount = None, -1
        self._rows = deque()
        return True

    async def _send_deferred(self) -> None:
        """The statements waiting on the connection, sent now in one message (before a statement
        that cannot carry them), beginning the transaction there if it has not begun. Its callers
        ask only when some wait: no coroutine on every statement's way."""
        connection: LazyBeginConnection = self._adapt_connection  # type: ignore[assignment]
        async with connection._execute_mutex:
            try:
                await connection.send_deferred()
            except Exception as error:
                self._handle_exception(error)


_ISOLATION = {"read_committed": " ISOLATION LEVEL READ COMMITTED", "read_uncommitted": " ISOLATION LEVEL READ UNCOMMITTED",
              "repeatable_read": " ISOLATION LEVEL REPEATABLE READ", "serializable": " ISOLATION LEVEL SERIALIZABLE"}


class PlainTransaction:
    """BEGIN, COMMIT and ROLLBACK sent as plain statements, as asyncpg's `Transaction` sends them,
    except that the COMMIT carries the connection's `commit_guard` in its message: one round trip
    for both. A guard that fails (raises) leaves the transaction aborted: it is rolled back and the
    guard's error raised, nothing committed; if that ROLLBACK fails too (the connection lost
    meanwhile), the connection is closed (the server rolls back what it ends) and the guard's error
    raised all the same: the refusal is known, the loss after it changes nothing.

    A connection lost while the COMMIT was on its way or its answer on the way back leaves the
    outcome unknown (the server may have committed): the connection's `commit_unknown` says so
    until its next COMMIT (`lease.commit_fenced` reads it). One found closed before the COMMIT was
    sent did not commit and does not set it.

    The COMMIT's message carries the connection's deferred writes too, before the guard. When no
    BEGIN was sent (`begun=False`: nothing but deferred writes in the transaction), the message is
    the writes and the guard alone, which the server runs as one implicit transaction (`_implicit`),
    or BEGIN, them and COMMIT when the connection's settings are not the session's defaults."""

    __slots__ = ("_adapted", "_begun")

    def __init__(self, adapted: LazyBeginConnection, *, begun: bool = True) -> None:
        self._adapted = adapted
        self._begun = begun

    def _begin(self) -> str:
        """BEGIN (and what was queued to go with it, `begin_with`)."""
        a = self._adapted
        then, a.begin_with = a.begin_with, None
        self._begun = True
        return (f"BEGIN{_ISOLATION.get(a.isolation_level or '', '')}"
                f"{' READ ONLY' if a.readonly else ''}{' DEFERRABLE' if a.deferrable else ''}"
                + ("" if then is None else f";\n{then}"))

    def _implicit(self) -> bool:
        """Whether a transaction not begun commits as the server's implicit one: a simple-query
        message of several statements runs them as one transaction, committed at its end, rolled
        back whole by the first that fails (no ROLLBACK to send after it), under the session's
        defaults (READ COMMITTED, read-write), which a connection set otherwise would not be."""
        a = self._adapted
        return (a.begin_with is None and a.isolation_level in _LAZY_LEVELS and not a.readonly
                and not a.deferrable)

    async def start(self, *then: str) -> None:
        """BEGIN, with `then` (statements without parameters) in its message."""
        await self._adapted._connection.execute(";\n".join((self._begin(), *then)))

    async def commit(self) -> None:
        adapted = self._adapted
        connection, guard = adapted._connection, adapted.commit_guard
        adapted.commit_unknown = False
        sent = not connection.is_closed()
        parts = [*adapted.take_deferred(), *([] if guard is None else [guard])]
        if self._begun:
            parts.append("COMMIT")
        elif not self._implicit():
            parts = [self._begin(), *parts, "COMMIT"]
        try:
            await connection.execute(";\n".join(parts))
        except Exception:
            if connection.is_closed():
                adapted.commit_unknown = sent
            elif connection.is_in_transaction():  # the guard failed: its statement aborted the transaction
                try:
                    await connection.execute("ROLLBACK")
                except Exception:
                    connection.terminate()  # never back to the pool inside the aborted transaction
            raise

    async def rollback(self) -> None:
        if self._begun:  # one not begun lives only in its COMMIT (`LazyBeginConnection.commit`)
            await self._adapted._connection.execute("ROLLBACK")


class LazyBeginConnection(AsyncAdapt_asyncpg_connection):
    """Begins its transaction at the first statement that needs one (the module docstring).

    `commit_guard`, when set, is a statement (no parameters) run in the COMMIT's own message, just
    before it (`PlainTransaction`): `lease.commit_fenced`'s check costs no round trip of its own.
    `begin_with`, when set, one run in the next BEGIN's message, just after it (`savepoint`).
    `commit_unknown`: the last COMMIT's connection was lost with its outcome unknown.
    `deferred`: writes waiting for the next message (the module docstring)."""

    __slots__ = ("begin_later", "begin_with", "commit_guard", "commit_unknown", "deferred")
    _cursor_cls = LazyBeginCursor

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.begin_later = False
        self.begin_with: str | None = None
        self.commit_guard: str | None = None
        self.commit_unknown = False
        self.deferred: list[str] = []

    def take_deferred(self) -> list[str]:
        deferred, self.deferred = self.deferred, []
        return deferred

    async def send_deferred(self) -> None:
        """The deferred writes in one message, with BEGIN when the transaction has not begun
        (the caller holds the execute mutex)."""
        if self._transaction is None:
            transaction = PlainTransaction(self)
            try:
                await transaction.start(*self.take_deferred())
            finally:
                if self._connection.is_in_transaction():  # begun, even if a write failed: rolled back as one
                    self._transaction = transaction  # type: ignore[assignment]
        else:
            await self._connection.execute(";\n".join(self.take_deferred()))

    async def _start_transaction(self) -> None:
        if self.isolation_level == "autocommit":
            return
        if self.begin_later and self.isolation_level in _LAZY_LEVELS and not self.readonly and not self.deferrable:
            return  # this statement runs on its own; the next one asks again
        transaction = PlainTransaction(self)
        try:
            await transaction.start()
        except Exception as error:
            self._handle_exception(error)
        else:
            self._transaction = transaction  # type: ignore[assignment]

    @property
    def in_transaction(self) -> bool:
        """Whether BEGIN was sent (and neither COMMIT nor ROLLBACK since)."""
        return self._transaction is not None

    def commit(self) -> None:
        if self._transaction is None and self.deferred:
            # writes waited and nothing began the transaction: they are the COMMIT's message
            self._transaction = PlainTransaction(self, begun=False)  # type: ignore[assignment]
        try:
            super().commit()
        finally:
            self.begin_with = None  # queued for a BEGIN that never came: it ends with the transaction
            self.deferred = []

    def rollback(self) -> None:
        self.begin_with = None
        self.deferred = []  # never sent: nothing to undo on the server
        super().rollback()


async def adapted_connection(session: AsyncSession) -> LazyBeginConnection | None:
    """The connection `session` runs on (checked out now if it has none), as this driver adapts it;
    None on another driver (SQLite's)."""
    connection = (await (await session.connection()).get_raw_connection()).dbapi_connection
    return connection if isinstance(connection, LazyBeginConnection) else None


async def run_at_begin(session: AsyncSession, statement: str) -> LazyBeginConnection | None:
    """Run `statement` (no parameters, no rows wanted) in `session`'s transaction: sent with the
    transaction's BEGIN when it has not begun yet (after what was queued there already: no round
    trip of its own), else on its own now. Returns the connection it was queued on (None: run)."""
    connection = await adapted_connection(session)
    if connection is not None and not connection.in_transaction:
        connection.begin_with = statement if connection.begin_with is None else f"{connection.begin_with};\n{statement}"
        return connection
    with session.sync_session.no_autoflush:  # the caller's pending writes come after it
        await session.execute(text(statement))
    return None


def sqlstate(exc: DBAPIError) -> str | None:
    """The SQLSTATE PostgreSQL answered `exc`'s statement with (on the driver's error or one it was
    raised from); None when there is none (the connection failed, or it is not PostgreSQL's)."""
    cause: BaseException | None = exc.orig
    while cause is not None:
        state = getattr(cause, "sqlstate", None)
        if state:
            return str(state)
        cause = cause.__cause__
    return None


# `session.info`'s key of what a transaction holds that a savepoint rolled back to releases with
# the rest (the generation writers' advisory lock: `changes.will_move_generation`).
SAVEPOINT_HELD = "maia_savepoint_held"


class Savepoint:
    """A SAVEPOINT in a session's transaction on this driver, set by `open`, sent with the
    transaction's BEGIN when it has not begun yet (no round trip of its own), else on its own.
    `rollback` undoes what the transaction did since (its row and advisory locks included, and
    `session.info[SAVEPOINT_HELD]` as it was at `open`); `close` forgets one never sent (the
    transaction never began after it) and what was queued after it."""

    def __init__(self, session: AsyncSession, name: str) -> None:
        self._session = session
        self._statement = f"SAVEPOINT {name}"
        self._name = name
        self._connection: LazyBeginConnection | None = None
        self._held: Any = None

    async def open(self) -> None:
        self._held = self._session.info.get(SAVEPOINT_HELD)
        self._connection = await run_at_begin(self._session, self._statement)

    async def rollback(self) -> None:
        await self._session.execute(text(f"ROLLBACK TO SAVEPOINT {self._name}"))
        self._session.info[SAVEPOINT_HELD] = self._held

    def close(self) -> None:
        connection = self._connection
        if connection is not None and connection.begin_with is not None and connection.begin_with.startswith(
                self._statement):
            connection.begin_with = None
            self._session.info[SAVEPOINT_HELD] = self._held


class LazyBeginDbapi(AsyncAdapt_asyncpg_dbapi):
    """asyncpg's DBAPI adaptation whose connections are `LazyBeginConnection`s."""

    def connect(self, *arg: Any, **kw: Any) -> LazyBeginConnection:
        creator = kw.pop("async_creator_fn", self.asyncpg.connect)
        adapted = {"prepared_statement_cache_size": kw.pop("prepared_statement_cache_size", 100),
                   "prepared_statement_name_func": kw.pop("prepared_statement_name_func", None)}
        return await_only(LazyBeginConnection.create(self, creator(*arg, **kw), **adapted))


def dbapi() -> LazyBeginDbapi:
    """The module to give `create_async_engine(url, module=...)` for postgresql+asyncpg URLs."""
    import asyncpg

    return LazyBeginDbapi(asyncpg)


@dataclass(frozen=True, slots=True)
class Trip:
    """One round trip to the server (`counted_trips`)."""

    kind: str       # "prepare", "execute" (a prepared statement run), "executemany", "query" (simple: BEGIN, COMMIT, ...)
    statement: str  # its first three words


@contextmanager
def counted_trips() -> Iterator[list[Trip]]:
    """Every round trip of every asyncpg connection used from this thread meanwhile, in order (for
    tests and benchmarks: it patches asyncpg's connection and prepared statement classes, as
    `sqlite_driver.counted_trips` patches aiosqlite's). Another thread's trips are not the caller's
    and are not counted: the tests' maker of spare databases runs its CREATE DATABASE on a thread
    of its own while a test counts (which once made a test see a trip it did not make)."""
    from asyncpg import connection, prepared_stmt

    seen: list[Trip] = []
    counting = threading.get_ident()

    def note(kind: str, statement: str) -> None:
        if threading.get_ident() == counting:
            seen.append(Trip(kind, " ".join(statement.split()[:3])))

    real_statement = connection.Connection._get_statement
    real_execute = connection.Connection.execute
    real_many = connection.Connection.executemany
    real_fetch = prepared_stmt.PreparedStatement.fetch

    async def get_statement(self: Any, query: str, timeout: Any, *, use_cache: bool = True, **kw: Any) -> Any:
        key = (query, kw.get("record_class") or self._protocol.get_record_class(), kw.get("ignore_custom_codec", False))
        if not use_cache or self._stmt_cache.get(key) is None:
            note("prepare", query)
        return await real_statement(self, query, timeout, use_cache=use_cache, **kw)

    async def execute(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        note("query" if not args else "execute", query)  # with arguments: prepared (and counted) first
        return await real_execute(self, query, *args, **kw)

    async def executemany(self: Any, command: str, args: Any, **kw: Any) -> Any:
        note("executemany", command)
        return await real_many(self, command, args, **kw)

    async def fetch(self: Any, *args: Any, **kw: Any) -> Any:
        note("execute", self._query)
        return await real_fetch(self, *args, **kw)

    patches: list[tuple[type, str, Callable[..., Any], Callable[..., Any]]] = [
        (connection.Connection, "_get_statement", get_statement, real_statement),
        (connection.Connection, "execute", execute, real_execute),
        (connection.Connection, "executemany", executemany, real_many),
        (prepared_stmt.PreparedStatement, "fetch", fetch, real_fetch),
    ]
    for cls, name, counted, _ in patches:
        setattr(cls, name, counted)
    try:
        yield seen
    finally:
        for cls, name, _, real in patches:
            setattr(cls, name, real)
