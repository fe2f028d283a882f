"""Connections (store/db.py). PostgreSQL's pool (`_ping_when_idle`): a connection that sat idle
in the pool is pinged before use and replaced if dead; one used lately is trusted (no round trip
in front of every unit of work), so a connection dropped since fails its unit of work as a
database failure, and the next one gets a live connection. SQLite's writers (`SqliteWriters`)
take turns, and one that cannot have its turn in time fails as SQLite's busy timeout would."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from controller.store import db as dbmod
from controller.store.db import Database, SqliteWriters, database_failed

POSTGRES_ONLY = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])


async def _pooled_backend_pid(db: Database) -> int:
    async with db.unit_of_work() as uow:
        return int(await uow.session.scalar(text("SELECT pg_backend_pid()")))


async def _terminate(url: str, pid: int) -> None:
    """The server drops that connection (as a restart or an idle timeout would)."""
    other = Database(url)
    try:
        async with other.unit_of_work() as uow:
            assert await uow.session.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await other.dispose()


@POSTGRES_ONLY
async def test_an_idle_connection_dropped_by_the_server_is_replaced_before_use(database: Database, monkeypatch):
    monkeypatch.setattr(dbmod, "PING_IDLE_S", 0.0)  # every connection back in the pool counts as idle
    pid = await _pooled_backend_pid(database)
    await _terminate(database.url, pid)
    assert await _pooled_backend_pid(database) != pid  # pinged, found dead, replaced: no error


@POSTGRES_ONLY
async def test_a_connection_used_lately_is_not_pinged_and_a_drop_fails_one_unit_of_work(database: Database,
                                                                                       monkeypatch):
    monkeypatch.setattr(dbmod, "PING_IDLE_S", 3600.0)
    pid = await _pooled_backend_pid(database)
    await _terminate(database.url, pid)
    with pytest.raises(Exception) as failed:  # no ping: the dead connection is used
        await _pooled_backend_pid(database)
    assert database_failed(failed.value)
    assert await _pooled_backend_pid(database) != pid  # the pool replaced it


@POSTGRES_ONLY
async def test_a_tcp_connection_gives_up_on_a_server_gone_silent(database: Database) -> None:
    """Keepalive probes and a user timeout on every TCP connection of the pool: a server gone
    silent (a partition, a dropped NAT entry) fails the statement waiting on it within about 30 s
    rather than never (a healed leader took the lease again with its passes stuck for good). The
    kernel does the giving up; what is checked here is that it is told to."""
    import socket

    if "/" in (database.engine.url.host or "") or not database.engine.url.host:
        pytest.skip("the test server is reached over a Unix socket: no TCP to set")
    async with database.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        sock = raw.driver_connection._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == dbmod.PG_TCP_USER_TIMEOUT_MS
        assert [sock.getsockopt(socket.IPPROTO_TCP, option) for option in (
            socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)] == list(dbmod.PG_TCP_KEEPALIVE)


async def test_a_sqlite_writer_waits_its_turn_and_fails_as_sqlite_would_past_the_timeout(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    SqliteWriters(timeout_s=0.2).attach(engine)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        async with engine.connect() as first:
            await first.execute(text("INSERT INTO t VALUES (1)"))  # holds the turn until it returns
            async with engine.connect() as second:
                with pytest.raises(OperationalError, match="no turn to write in 0 s; held by .*INSERT INTO t"):
                    await asyncio.wait_for(second.execute(text("INSERT INTO t VALUES (2)")), 30)  # no hang
            await first.commit()
        async with engine.begin() as conn:  # the turn was given back: a writer goes at once
            await conn.execute(text("INSERT INTO t VALUES (3)"))
            assert list(await conn.scalars(text("SELECT x FROM t ORDER BY x"))) == [1, 3]
    finally:
        await engine.dispose()


async def test_a_begin_immediate_takes_the_writers_turn_before_sqlites_lock(tmp_path: Path) -> None:
    """A migration begins with BEGIN IMMEDIATE (SQLite's write lock at once). Not counted as a
    write, it held the lock while its first CREATE waited for the turn of a writer that itself
    waited for the lock: each stuck until a timeout. Counted, the other writer waits its turn."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", connect_args={"timeout": 5})
    SqliteWriters(timeout_s=5).attach(engine)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        async with engine.connect() as writer:
            async with engine.connect() as migration:
                await migration.exec_driver_sql("BEGIN IMMEDIATE")
                inserting = asyncio.create_task(writer.execute(text("INSERT INTO t VALUES (1)")))
                await asyncio.sleep(0.2)  # the writer is under way: waiting for its turn, not holding it
                await asyncio.wait_for(migration.exec_driver_sql("CREATE TABLE u (y INTEGER)"), 3)
                await migration.commit()
            await asyncio.wait_for(inserting, 10)  # its turn came when the migration's connection went back
            await writer.commit()
        async with engine.connect() as conn:
            assert list(await conn.scalars(text("SELECT x FROM t"))) == [1]
            assert list(await conn.scalars(text("SELECT count(*) FROM u"))) == [0]
    finally:
        await engine.dispose()


async def test_a_unit_of_work_rolls_back_what_it_did_not_commit_and_nothing_after_a_commit(database: Database,
                                                                                          monkeypatch) -> None:
    rollbacks: list[bool] = []
    rollback = dbmod.AsyncSession.rollback

    async def counted(self: dbmod.AsyncSession) -> None:
        rollbacks.append(self.in_transaction())
        await rollback(self)

    monkeypatch.setattr(dbmod.AsyncSession, "rollback", counted)
    insert = text("INSERT INTO zones (id, created_at) VALUES (:id, CURRENT_TIMESTAMP)")
    async with database.unit_of_work() as uow:
        await uow.session.execute(insert, {"id": "kept"})
        await uow.commit()
    assert rollbacks == []  # committed: closed without a rollback call
    async with database.unit_of_work() as uow:
        await uow.session.execute(insert, {"id": "dropped"})
    assert rollbacks == [True]
    async with database.unit_of_work() as uow:
        assert list(await uow.session.scalars(text("SELECT id FROM zones ORDER BY id"))) == ["kept"]


@POSTGRES_ONLY
async def test_a_transaction_a_stopped_process_left_open_is_ended_by_the_server_and_frees_its_locks(
        database: Database, monkeypatch) -> None:
    """A controller stopped mid-transaction (SIGSTOP, a paused VM) holds its row locks: every
    other controller's writes to those rows (the new leader's commits) waited until it ran again.
    PostgreSQL now ends a session idle in a transaction past `PG_IDLE_IN_TRANSACTION_TIMEOUT_S`:
    the other writer goes on, and the stopped one's commit fails as a database failure."""
    monkeypatch.setattr(dbmod, "PG_IDLE_IN_TRANSACTION_TIMEOUT_S", 0.5)
    stopped, other = Database(database.url), Database(database.url)
    bump = text("UPDATE cluster_state SET generation = generation + 1 WHERE id = 1")
    try:
        async with stopped.unit_of_work() as stuck:
            await stuck.session.execute(bump)  # holds the row's lock; then sends nothing more
            async with other.unit_of_work() as uow:
                await asyncio.wait_for(uow.session.execute(bump), timeout=15)  # waited forever before
                await uow.commit()
            with pytest.raises(Exception) as ended:
                await stuck.commit()
            assert database_failed(ended.value)
        async with other.unit_of_work() as uow:  # named for an operator's pg_stat_activity
            assert await uow.session.scalar(text(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")) == "maia-controller"
    finally:
        await stopped.dispose()
        await other.dispose()


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("state", "failed"), [
    ("53300", True),   # too_many_connections: a plain DBAPIError from the driver
    ("57P03", True),   # cannot_connect_now: starting up, in recovery
    ("57P01", True),   # admin_shutdown: a fast stop
    ("25006", True),   # read_only_sql_transaction: a demoted primary, a standby
    ("53100", True),   # disk_full
    ("58030", True),   # io_error
    ("08006", True),   # connection_failure
    ("23505", False),  # unique_violation: the statement's, not the database's
    ("28P01", False),  # invalid_password: retrying changes nothing
    ("42P01", False),  # undefined_table
])
def test_a_server_that_cannot_work_now_is_a_database_failure(state: str, failed: bool) -> None:
    """These answered callers UNKNOWN or INTERNAL ("see the controller log"), with no retry time."""
    from sqlalchemy.exc import DBAPIError

    assert database_failed(DBAPIError("SELECT 1", None, _PgError(state))) is failed
