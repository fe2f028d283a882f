"""The database handle and the unit of work.

`Database` owns the async engine (SQLite via aiosqlite, PostgreSQL via asyncpg);
`Database.unit_of_work()` yields a `UnitOfWork` whose changes are rolled back unless
`commit()` is called, so a failed use case never leaves anything half-written.
`Database.fenced(fence)` is the same database whose units of work commit through `fence.commit`,
which checks the leader lease as the transaction commits (`lease.commit_fenced`): the leader's
writers use it, so a controller that lost the leader lease (`controller.store.lease`) writes
nothing.

On SQLite, `SqliteWriters` makes this process's writing transactions take turns, first come
first served, instead of racing in SQLite's busy handler (see there).
"""

from __future__ import annotations

import asyncio
import copy
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.util import await_only
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from controller.aio import within
from controller.store import audit
from controller.store import jsoncodec, pg_driver, sqlite_driver
from controller.store.checkpoints import COMMIT_CHECKPOINT_PAGES
from controller.store.lease import CommitOutcomeUnknown
from controller.store.exclusive import sqlite_path
from controller.store.turns import WriterTurns

DEFAULT_DB_URL = "sqlite+aiosqlite:///maia.db"
SQLITE_BUSY_TIMEOUT_S = 30.0
# Connections kept open. A checkout beyond the pool's size opens a connection (SQLite: a thread, a
# file and its pragmas; PostgreSQL: a server process) and closes it on return; one beyond size +
# overflow waits. 16 concurrent submits (each checks on its own connection), the submit batch
# writer, the reconciler, the agents' pushes and the background loops exceed SQLAlchemy's
# defaults (SQLite 5 + 10; 10 + 10 was set here for PostgreSQL).
POOL_SIZE = 20
POOL_OVERFLOW = 20
# PostgreSQL: statements prepared and kept per connection (SQLAlchemy's asyncpg default: 100). One not in
# its connection's cache costs a round trip to prepare before it runs, and an IN list or a multi-row
# INSERT is a statement per length (539 distinct in a 1,024-node bench run). The pool hands out the
# connection returned last (LIFO), so the busy few keep theirs prepared.
PG_STATEMENT_CACHE = 1000
# A pooled PostgreSQL connection idle this long is pinged before use (`_ping_when_idle`).
PING_IDLE_S = 5.0
# PostgreSQL ends a session left idle inside a transaction this long (`idle_in_transaction_session_timeout`).
# A controller's transactions send their statements back to back (`pg_driver` begins one only at
# its first write); one left open this long belongs to a process that stopped: SIGSTOPped, a VM
# paused, a thread stuck. Its row locks (`audit_head`, `cluster_state`, deployments) would stall
# every controller's writes, the new leader's commits included, until it ran again or TCP gave up
# on it (hours); fencing keeps its late commits out, but not its locks. The lease's default (5 s):
# a frozen leader's locks go when its lease does, a frozen follower's no later.
PG_IDLE_IN_TRANSACTION_TIMEOUT_S = 5.0
# What the controller's sessions are called in `pg_stat_activity` (an operator's first look at locks).
PG_APPLICATION_NAME = "maia-controller"
# How long a PostgreSQL connection whose server went silent (a partition, a NAT or conntrack entry
# dropped, a database host gone without a reset) lasts: TCP gives up on data not acknowledged for
# `PG_TCP_USER_TIMEOUT_MS` and probes an idle connection after `PG_TCP_KEEPALIVE` (idle, interval,
# count) seconds. Without them a statement waited for its answer for ever: a leader cut off and
# healed took the lease again (its lease thread opens new connections) with its reconciler, its
# report flushes and its watchdog stuck on the old ones, and never scheduled again (found in
# review). A connection given up fails its statement; the pool replaces it.
PG_TCP_USER_TIMEOUT_MS = 30_000
PG_TCP_KEEPALIVE = (10, 5, 3)
_WRITE_VERBS = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")
# Transactions that take SQLite's write lock as they begin (a migration's: `migrate.begin_sqlite_migration`).
_WRITING_BEGINS = ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE")


def _writes(statement: str) -> bool:
    """Whether a statement takes SQLite's write lock: a write, or a BEGIN that takes it at once.
    Counted as a write, a BEGIN IMMEDIATE takes the writer's turn before the lock: else it held
    the lock while its first CREATE waited for a turn held by a writer waiting for that lock."""
    head = statement.lstrip()[:15].upper()
    return head.startswith(_WRITE_VERBS) or head.startswith(_WRITING_BEGINS)


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


# JSON columns' text as `json.dumps` / `json.loads` make it, cheaper per value (`jsoncodec`).
_JSON_CODEC = {"json_serializer": jsoncodec.dumps, "json_deserializer": jsoncodec.loads}


def create_engine(url: str) -> AsyncEngine:
    """An engine with the settings each backend needs (SQLite: WAL checkpointed by the controller's
    `checkpoints.WalCheckpointer` rather than by commits, FKs on, busy timeout, one trip to
    aiosqlite's thread per statement: `sqlite_driver`)."""
    if _is_sqlite(url):
        pool = {} if sqlite_path(url) is None else {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW}
        module = {"module": sqlite_driver.dbapi()} if url.startswith("sqlite+aiosqlite") else {}
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **module, **pool,  # in memory: one
                                     **_JSON_CODEC)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL: readers never wait for the writer (nor it for them), a commit appends to the
            # log instead of rewriting pages. synchronous=NORMAL in WAL mode syncs at checkpoints,
            # not at every commit: the database can never be corrupted by a crash, and a power
            # loss can lose at most the commits since the last checkpoint (never half of one; a
            # controller's checkpointer runs one once `checkpoints.CHECKPOINT_FRAMES` are not
            # copied, as often as SQLite's default would) -- what an embedded single-node
            # controller can accept; PostgreSQL is for more. A commit checkpoints only past
            # `COMMIT_CHECKPOINT_PAGES` (with SQLite's default, 1,000, one commit in 33 copied the
            # log into the file and synced both while holding the writer: `checkpoints`).
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA wal_autocheckpoint={COMMIT_CHECKPOINT_PAGES}")
            cur.close()

        SqliteWriters(turns=process_turns(url)).attach(engine)
        return engine
    module = {"module": pg_driver.dbapi()} if url.startswith("postgresql+asyncpg") else {}
    server_settings = {"idle_in_transaction_session_timeout": f"{round(PG_IDLE_IN_TRANSACTION_TIMEOUT_S * 1000)}",
                       "application_name": PG_APPLICATION_NAME}
    engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_use_lifo=True, **module,
                                 **_JSON_CODEC,
                                 connect_args={"prepared_statement_cache_size": PG_STATEMENT_CACHE,
                                               "server_settings": server_settings}
                                 if module else {})
    _ping_when_idle(engine)
    if module:
        event.listen(engine.sync_engine, "connect", _tcp_gives_up)
    return engine


def _tcp_gives_up(dbapi_conn: Any, _record: Any) -> None:
    """A new asyncpg connection over TCP: keepalive probes and a user timeout (`PG_TCP_USER_TIMEOUT_MS`),
    so that a server gone silent fails its statements instead of hanging them for ever (one over a
    Unix socket has no silent network in between)."""
    transport = getattr(getattr(dbapi_conn, "_connection", None), "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle, interval, count = PG_TCP_KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count),
                          ("TCP_USER_TIMEOUT", PG_TCP_USER_TIMEOUT_MS)):
        if hasattr(socket, option):  # Linux has them all; elsewhere what the platform has
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _ping_when_idle(engine: AsyncEngine) -> None:
    """A pooled connection is pinged before use only when it sat in the pool longer than `PING_IDLE_S`
    (`pool_pre_ping` pinged at every checkout: a round trip, a turn of the event loop, in front of
    every unit of work). One that fails its ping is replaced, as with `pool_pre_ping`. One dropped
    while in use or lately used fails its first statement instead (`database_failed`: its caller
    hears UNAVAILABLE), and SQLAlchemy then replaces every older connection of the pool at its
    next checkout: a server restart fails the units of work under way or started before the first
    failure was seen, not the later ones."""
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["maia_checked_in_at"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.get("maia_checked_in_at")
        idle_s = PING_IDLE_S
        if checked_in_at is None or time.monotonic() - checked_in_at <= idle_s:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 (whatever the driver raises: the connection is gone)
            raise DisconnectionError(f"a pooled connection idle for {idle_s:g}+ s failed its ping: {exc}") from exc
        if not alive:
            raise DisconnectionError(f"a pooled connection idle for {idle_s:g}+ s failed its ping")


# The writer turns of each SQLite file this process opened (`process_turns`), kept while an engine uses them.
_FILE_TURNS: weakref.WeakValueDictionary[Path, WriterTurns] = weakref.WeakValueDictionary()
_FILE_TURNS_LOCK = threading.Lock()


# The writer turns of each engine `SqliteWriters` is attached to (`engine_turns`).
_ENGINE_TURNS: weakref.WeakKeyDictionary[Any, WriterTurns] = weakref.WeakKeyDictionary()


def engine_turns(engine: AsyncEngine) -> WriterTurns | None:
    """The writer turns `engine`'s writing transactions take (None: it takes none, PostgreSQL)."""
    return _ENGINE_TURNS.get(engine.sync_engine)


def process_turns(url: str) -> WriterTurns:
    """The writer turns every engine of this process on `url`'s SQLite file shares (one SQLite
    writer per file, whichever thread or loop writes); new ones for an in-memory database (each
    engine its own database)."""
    path = sqlite_path(url)
    if path is None:
        return WriterTurns()
    key = path.resolve()
    with _FILE_TURNS_LOCK:
        turns = _FILE_TURNS.get(key)
        if turns is None:
            turns = _FILE_TURNS[key] = WriterTurns()
        return turns


class SqliteWriters:
    """This process's SQLite writers take turns: by priority, in arrival order within one.

    SQLite lets one connection write at a time; the others wait in its busy handler, which polls
    with growing sleeps (up to 100 ms each). Under a stream of short writers (submits, agent
    reports, plan commits) a waiter keeps losing the race to newcomers and runs out its 30 s
    busy timeout ("database is locked") while the database is never idle. Here a connection
    waits for its turn (`turns.WriterTurns`: by its task's `write_priority`, first come first
    served within one, none starved) before its transaction's first write statement and gives
    it back when it returns to the pool (committed or rolled back), so the busy handler only
    ever sees another process. Reads (WAL) never wait. A writer waiting longer than the busy
    timeout fails as SQLite would (a nested writer waiting for its own outer transaction).
    `turns` are shared by every engine of the process on one database file (`process_turns`):
    a reconciler's engine on its own thread and loop (`own_thread=True`; not the default)
    takes turns with the controller's.
    """

    def __init__(self, timeout_s: float = SQLITE_BUSY_TIMEOUT_S, *, turns: WriterTurns | None = None) -> None:
        self.timeout_s = timeout_s
        self.turns = WriterTurns() if turns is None else turns
        self._held: dict[int, WriterTurns] = {}  # id(pool entry) -> the turns its transaction holds
        self._holder: dict[WriterTurns, str] = {}  # what holds it (for the error of a writer that waited too long)

    def attach(self, engine: AsyncEngine) -> None:
        _ENGINE_TURNS[engine.sync_engine] = self.turns
        event.listen(engine.sync_engine, "before_cursor_execute", self._before_execute)
        for name in ("checkin", "invalidate", "close", "detach"):
            event.listen(engine.sync_engine.pool, name, self._released)

    def _before_execute(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        entry = id(conn.connection._connection_record)
        if entry in self._held or not _writes(statement):
            return
        lock = self.turns
        try:
            # In the caller's task (`asyncio.wait_for` ran it as a task of its own: a turn of the
            # event loop in front of every write transaction); a free lock is taken at once.
            await_only(within(lock.acquire(), self.timeout_s))
        except TimeoutError as exc:
            raise OperationalError(statement, None, Exception(
                f"database is locked (no turn to write in {self.timeout_s:.0f} s; "
                f"held by {self._holder.get(lock, '?')})")) from exc
        self._held[entry] = lock
        task = asyncio.current_task()
        self._holder[lock] = f"task {task.get_name() if task else '?'} since {time.monotonic():.1f}: {statement[:120]}"

    def _released(self, _dbapi_conn: Any, record: Any, *_args: Any) -> None:
        lock = self._held.pop(id(record), None)
        if lock is not None:
            lock.release()


# Database failures kept coming this long make the health monitor say NOT_SERVING; a run of them
# ends after FAILURES_GAP_S without one (a writer waits SQLite's busy timeout before it fails).
FAILING_UNHEALTHY_S = 30.0
RETRY_AFTER_MIN_MS, RETRY_AFTER_MAX_MS = 1000, 10_000  # what callers the database failed are told
FAILURES_GAP_S = SQLITE_BUSY_TIMEOUT_S + 5.0


class FailureRun:
    """The run of database failures (`database_failed`) that this process's units of work met
    since one last committed: when it began, when the last came, and its kind. A database that
    answers the health probe's `SELECT 1` may take no write (SQLite's write lock held by another
    process, a PostgreSQL table locked): then every writer fails while the probe passes, and
    only this run tells."""

    def __init__(self) -> None:
        self.began: float | None = None
        self.last: float | None = None
        self.error = ""

    def failed(self, exc: BaseException, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.last is None or now - self.last > FAILURES_GAP_S:
            self.began = now
        self.last = now
        self.error = type(exc).__name__  # what failed is in the failing caller's log line

    def retry_after_ms(self) -> int:
        """The pause a caller the database failed is told: a second at first, then a quarter of
        how long failures have kept coming, up to RETRY_AFTER_MAX_MS (every agent of a fleet
        came back each second for a whole outage: thousands of calls a second, each trying the
        database, at a server that was starting up)."""
        return int(min(RETRY_AFTER_MAX_MS, max(RETRY_AFTER_MIN_MS, self.failing_for_s() * 250)))

    def committed(self) -> None:
        """A unit of work committed: whatever failed before, the database takes work (a failure now
        and then under load is no outage)."""
        if self.began is not None:
            self.began = self.last = None

    def failing_for_s(self, now: float | None = None) -> float:
        """How long failures have kept coming (0 when the last is more than FAILURES_GAP_S ago)."""
        now = time.monotonic() if now is None else now
        if self.began is None or self.last is None or now - self.last > FAILURES_GAP_S:
            return 0.0
        return self.last - self.began


# SQLSTATEs of a PostgreSQL server that is there but takes no connection yet: cannot_connect_now
# (starting up, shutting down, in recovery), too_many_connections; and class 08, connection exceptions.
NOT_YET_ACCEPTING = frozenset({"57P03", "53300"})
# SQLSTATEs of a PostgreSQL server that cannot do any work now, whatever the statements (the
# driver's plain DBAPIError, not an OperationalError): those, admin_shutdown and crash_shutdown
# (57P01, 57P02), read_only_sql_transaction (25006: a demoted primary, a standby), and the classes
# 08 (connection exceptions), 53 (insufficient resources: disk full, out of memory, connections)
# and 58 (system errors: I/O).
CANNOT_WORK_NOW = NOT_YET_ACCEPTING | {"57P01", "57P02", "25006"}
CANNOT_WORK_NOW_CLASSES = ("08", "53", "58")


def database_failed(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or used (no connection in time, a
    connection lost, a lock not granted, a server shutting down, read-only or full) rather than
    that the statements were wrong: the same work retried at once, whole or in parts, fails the
    same way; later it may not (callers are told UNAVAILABLE, with a retry time)."""
    if isinstance(exc, (PoolTimeout, OperationalError, OSError, TimeoutError, CommitOutcomeUnknown)):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = pg_driver.sqlstate(exc)
    return state is not None and (state in CANNOT_WORK_NOW or state.startswith(CANNOT_WORK_NOW_CLASSES))


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says a database server could not be reached or takes no connection yet
    (refused, timed out, its name not resolved, starting up, full): what may pass on its own,
    unlike a wrong password, database name or statement."""
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    state = pg_driver.sqlstate(exc)
    if state is not None:
        return state in NOT_YET_ACCEPTING or state.startswith("08")
    return isinstance(exc.orig, (OSError, TimeoutError)) or isinstance(exc.__cause__, (OSError, TimeoutError))


# PostgreSQL aborted the transaction for what another one did: deadlock_detected (it broke a
# deadlock by aborting this side, `deadlock_timeout` after the wait began), serialization_failure.
TRANSACTION_ABORTED = {"40P01": "a deadlock with a concurrent transaction", "40001": "a serialization failure"}


def transaction_aborted(exc: BaseException) -> str | None:
    """Why PostgreSQL rolled back `exc`'s transaction whole for what a concurrent one did (a
    `TRANSACTION_ABORTED` reason), or None. Nothing of that transaction was written and the same
    work run again usually succeeds; unlike `database_failed`, the database answered."""
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return None
    return TRANSACTION_ABORTED.get(pg_driver.sqlstate(exc) or "")


class Fence(Protocol):
    """Commits a transaction only while its writer may; refuses (raises) otherwise, and then
    nothing is committed. Told of each unit of work as it opens (`opened`): what a transaction
    decided is its writer's only in the term it was decided in."""

    def opened(self, session: AsyncSession) -> None: ...

    async def commit(self, session: AsyncSession, commit: Callable[[], Awaitable[None]]) -> None: ...


@dataclass
class UnitOfWork:
    """One transaction. Use `session` for queries; nothing persists without `commit()`."""

    session: AsyncSession
    fence: Fence | None = None
    failures: FailureRun | None = None  # its database's (a commit ends a run of failures)

    async def commit(self) -> None:
        # Inside an audited API call, the call's audit entry is written in this transaction.
        if self.fence is None:
            await audit.commit(self.session)
        else:
            await self.fence.commit(self.session, lambda: audit.commit(self.session))
        if self.failures is not None:
            self.failures.committed()

    async def rollback(self) -> None:
        await self.session.rollback()


async def _discard(session: AsyncSession) -> None:
    try:
        if session.in_transaction():  # committed: nothing to roll back (a trip into SQLAlchemy less)
            await session.rollback()
    finally:
        await session.close()


class DatabaseReadOnly(Exception):
    """The database takes no write (`Database.check_writable`, at start-up)."""


class Database:
    def __init__(self, url: str = DEFAULT_DB_URL) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.fence: Fence | None = None
        self.failures = FailureRun()  # shared by its fenced views

    def fenced(self, fence: Fence) -> Database:
        """This database (same engine) with every commit checked by `fence` first."""
        view = copy.copy(self)
        view.fence = fence
        return view

    @property
    def is_sqlite(self) -> bool:
        return _is_sqlite(self.url)

    @property
    def turns(self) -> WriterTurns | None:
        """The turns at SQLite's writer its writing transactions take (None on PostgreSQL)."""
        return engine_turns(self.engine)

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        session = self._sessions()
        if self.fence is not None:
            self.fence.opened(session)
        try:
            yield UnitOfWork(session, self.fence, self.failures)
        except BaseException as exc:
            if database_failed(exc):
                self.failures.failed(exc)
            raise
        finally:
            # Anything not committed is discarded (no-op after a commit) and the connection goes
            # back to the pool, shielded: a task cancelled again while it cleans up (an RPC past
            # its deadline writing its audit entry) must not leave its transaction open, holding
            # the writer (SQLite's lock) until the garbage collector finds the connection.
            await asyncio.shield(_discard(session))

    @asynccontextmanager
    async def writing_soon(self) -> AsyncIterator[None]:
        """Inside, this task reads and then writes, its caller waiting for the commit (a submit
        batch): on SQLite the writer is kept for it meanwhile (`WriterTurns.intend`), so that the
        transaction it waits for is never one that began during its reads."""
        turns = self.turns
        if turns is None:
            yield
            return
        with turns.intend():
            yield

    @asynccontextmanager
    async def read_snapshot(self) -> AsyncIterator[AsyncSession]:
        """A read-only transaction whose statements all see the database as of its first read.

        `unit_of_work`'s reads each see the latest commit (PostgreSQL's READ COMMITTED; on SQLite
        the driver begins a transaction only before a write), so several SELECTs can straddle a
        commit: placements read, then their deployment deleted, then deployments read. A reader
        that joins several tables in Python and must see them whole (the isolation watchdog)
        reads here: REPEATABLE READ, READ ONLY on PostgreSQL (never a serialization failure for
        a reader); on SQLite an explicit BEGIN, which holds the WAL snapshot of its first read.
        Nothing can be written in it.
        """
        session = self._sessions()
        try:
            if self.is_sqlite:
                await session.execute(text("BEGIN"))
            else:
                await session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
            yield session
        finally:
            await asyncio.shield(_discard(session))

    @asynccontextmanager
    async def read_unit(self) -> AsyncIterator[UnitOfWork]:
        """`read_snapshot` as a unit of work, for the use cases that read the whole cluster
        (a snapshot, a dry run, a full pass's fresh read): a tenant and its first deployment
        committed between the tenants' SELECT and the deployments' made a problem naming an
        unknown tenant, and the full pass quarantined that valid deployment. Never committed."""
        async with self.read_snapshot() as session:
            yield UnitOfWork(session)

    async def check_writable(self) -> None:
        """Raise `DatabaseReadOnly` when this SQLite database takes no write (a read-only or
        immutable file, a read-only mount): the controller would start, say SERVING and fail
        every write, its leader lease's every second. Probed with a write that deletes nothing,
        rolled back; on a migrated database (`alembic_version` is there). PostgreSQL is not
        probed: a read-only server is a standby or a demoted primary, what a failover ends."""
        if not self.is_sqlite:
            return
        async with self.engine.connect() as conn:
            try:
                await conn.exec_driver_sql("DELETE FROM alembic_version WHERE 0")
            except OperationalError as exc:
                if getattr(exc.orig, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_READONLY:
                    raise
                url = self.engine.url.render_as_string(hide_password=True)
                raise DatabaseReadOnly(f"the database at {url} is read-only: {exc.orig}; hint: let this user "
                                       f"write the file, its folder and its -wal and -shm files (and check "
                                       f"that the mount is writable and the file not immutable: lsattr)") from exc
            finally:
                await conn.rollback()

    async def dispose(self) -> None:
        await self.engine.dispose()
