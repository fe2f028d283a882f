"""PostgreSQL's transactions begun at the first statement that needs one (`store/pg_driver.py`):
a unit of work that only reads sends neither BEGIN nor ROLLBACK; a write, a row lock or a
function with transactional effects begins the transaction before it runs, and everything after it
runs in that transaction (rolled back whole, locks held to the end); `read_snapshot` still reads
one snapshot. Deferred writes wait for the COMMIT's message, or one of their own before the next
statement that cannot carry them."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest
from sqlalchemy import Column, DateTime, Integer, MetaData, Table, Text, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.db import Database
from controller.store.marks import deferred_writes, rowcount_unread
from controller.store.pg_driver import LazyBeginConnection, counted_trips, reads_only

POSTGRES_ONLY = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])


@pytest.mark.parametrize(("statement", "only"), [
    ("SELECT nodes.id FROM nodes WHERE nodes.id IN ($1::VARCHAR)", True),
    ("\n  (SELECT 1) UNION (SELECT 2)", True),
    ("select token from leader_lease where id = 1", True),
    ("SELECT token FROM leader_lease WHERE id = 1 FOR KEY SHARE", False),
    ("SELECT id FROM nodes FOR UPDATE SKIP LOCKED", False),
    ("SELECT id FROM nodes FOR NO KEY UPDATE", False),
    ("SELECT id FROM nodes for share", False),
    ("SELECT pg_advisory_xact_lock(1)", False),
    ("SELECT pg_try_advisory_lock(1)", False),
    ("SELECT nextval('s')", True),  # what it takes is never given back: no transaction needed
    ("SELECT pg_notify($1, $2)", False),
    ("SELECT set_config('x.y', '1', true)", False),
    ("INSERT INTO events (kind) VALUES ($1)", False),
    ("UPDATE nodes SET health = $1", False),
    ("DELETE FROM nodes", False),
    ("WITH gone AS (DELETE FROM nodes RETURNING id) SELECT count(*) FROM gone", False),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", False),
    ("SAVEPOINT sa_savepoint_1", False),
])
def test_only_a_plain_select_runs_before_the_transaction(statement: str, only: bool) -> None:
    assert reads_only(statement) is only


async def _driver(session: AsyncSession) -> LazyBeginConnection:
    raw = await (await session.connection()).get_raw_connection()
    driver = raw.dbapi_connection
    assert isinstance(driver, LazyBeginConnection)
    return driver


async def _scratch(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await uow.session.execute(text("CREATE TABLE scratch (id INTEGER PRIMARY KEY, v TEXT, at TIMESTAMPTZ)"))
        await uow.commit()


@POSTGRES_ONLY
async def test_a_unit_of_work_that_only_reads_never_begins(database: Database) -> None:
    async with database.unit_of_work() as uow:
        assert await uow.session.scalar(text("SELECT 41 + 1")) == 42
        assert await uow.session.scalar(text("SELECT count(*) FROM nodes")) == 0
        assert not (await _driver(uow.session)).in_transaction
        # PostgreSQL agrees: each statement is a transaction of its own (in one, now() would not move).
        first = await uow.session.scalar(text("SELECT now()"))
        await asyncio.sleep(0.01)
        assert await uow.session.scalar(text("SELECT now()")) > first


@POSTGRES_ONLY
async def test_reads_then_a_write_commit_or_roll_back_whole(database: Database) -> None:
    await _scratch(database)
    async with database.unit_of_work() as uow:
        assert await uow.session.scalar(text("SELECT count(*) FROM scratch")) == 0
        await uow.session.execute(text("INSERT INTO scratch VALUES (1, 'a')"))
        assert (await _driver(uow.session)).in_transaction
        await uow.session.execute(text("INSERT INTO scratch VALUES (2, 'b')"))
        await uow.rollback()
    async with database.unit_of_work() as uow:
        await uow.session.execute(text("INSERT INTO scratch VALUES (3, 'c')"))
        assert await uow.session.scalar(text("SELECT count(*) FROM scratch")) == 1  # its own write, in it
        # not committed: another connection does not see it
        async with database.unit_of_work() as other:
            assert await other.session.scalar(text("SELECT count(*) FROM scratch")) == 0
        await uow.commit()
    async with database.unit_of_work() as uow:
        assert (await uow.session.execute(text("SELECT id FROM scratch"))).scalars().all() == [3]


@POSTGRES_ONLY
async def test_a_row_lock_is_taken_in_the_transaction_and_held_until_it_ends(database: Database) -> None:
    await _scratch(database)
    async with database.unit_of_work() as uow:
        await uow.session.execute(text("INSERT INTO scratch VALUES (1, 'a')"))
        await uow.commit()
    async with database.unit_of_work() as holder:
        assert await holder.session.scalar(text("SELECT v FROM scratch WHERE id = 1 FOR UPDATE")) == "a"
        assert (await _driver(holder.session)).in_transaction
        async with database.unit_of_work() as other:
            with pytest.raises(Exception, match="could not obtain lock"):
                await other.session.execute(text("SELECT v FROM scratch WHERE id = 1 FOR UPDATE NOWAIT"))
    async with database.unit_of_work() as after:  # released with the holder's transaction
        assert await after.session.scalar(text("SELECT v FROM scratch WHERE id = 1 FOR UPDATE NOWAIT")) == "a"


@POSTGRES_ONLY
async def test_an_advisory_transaction_lock_begins_the_transaction(database: Database) -> None:
    async with database.unit_of_work() as holder:
        await holder.session.execute(text("SELECT pg_advisory_xact_lock(8)"))
        async with database.unit_of_work() as other:
            assert await other.session.scalar(text("SELECT pg_try_advisory_xact_lock(8)")) is False


@POSTGRES_ONLY
async def test_a_read_snapshot_still_reads_one_snapshot(database: Database) -> None:
    await _scratch(database)
    async with database.read_snapshot() as snapshot:
        assert await snapshot.scalar(text("SELECT count(*) FROM scratch")) == 0
        async with database.unit_of_work() as uow:
            await uow.session.execute(text("INSERT INTO scratch VALUES (1, 'a')"))
            await uow.commit()
        assert await snapshot.scalar(text("SELECT count(*) FROM scratch")) == 0


async def _generation_writers_free(database: Database, exclusive: bool) -> bool:
    from controller.store.changes import GENERATION_WRITERS

    function = "pg_try_advisory_xact_lock" if exclusive else "pg_try_advisory_xact_lock_shared"
    async with database.unit_of_work() as other:
        return bool(await other.session.scalar(text(f"SELECT {function}({GENERATION_WRITERS})")))


@POSTGRES_ONLY
async def test_the_generation_writers_lock_goes_with_the_begin_and_with_a_savepoint_rolled_back_to(
        database: Database) -> None:
    """A plan commit that takes the generation last holds the generation writers' lock shared
    after its savepoint; falling back (rolled back to it) it must hold nothing, then take it
    exclusive (an upgrade from shared waited for every other holder, which could wait for it)."""
    from controller.store import changes, pg_driver

    async with database.unit_of_work() as uow:
        savepoint = pg_driver.Savepoint(uow.session, "maia_test")
        await savepoint.open()
        await changes.will_move_generation(uow.session)
        driver = await _driver(uow.session)
        assert not driver.in_transaction and driver.begin_with is not None  # queued for the BEGIN: no trip
        await changes.move_generation(uow.session, 0)
        assert driver.in_transaction and driver.begin_with is None
        await changes.will_move_generation(uow.session)  # held: nothing sent
        assert await _generation_writers_free(database, exclusive=False)
        assert not await _generation_writers_free(database, exclusive=True)
        await savepoint.rollback()
        assert await _generation_writers_free(database, exclusive=True)
        await changes.moves_generation_first(uow.session)  # taken again, exclusive this time
        assert not await _generation_writers_free(database, exclusive=False)
        await uow.commit()
    assert await _generation_writers_free(database, exclusive=True)


@POSTGRES_ONLY
async def test_the_generation_writers_lock_held_shared_is_never_upgraded_to_exclusive(database: Database) -> None:
    """A transaction that holds the generation writers' lock shared (from before a savepoint, or
    with none) and then asks for it exclusive is refused at once, before any wait: the upgrade
    waits for every other holder, and two upgrading at once wait for each other (a deadlock)."""
    from controller.store import changes, pg_driver

    async with database.unit_of_work() as uow:
        await changes.will_move_generation(uow.session)
        savepoint = pg_driver.Savepoint(uow.session, "maia_test")
        await savepoint.open()
        await changes.move_generation(uow.session, 0)
        await savepoint.rollback()  # the shared lock was taken before it: still held
        with pytest.raises(changes.LockUpgrade):
            await changes.moves_generation_first(uow.session)
        assert not await _generation_writers_free(database, exclusive=True)
    assert await _generation_writers_free(database, exclusive=True)


@POSTGRES_ONLY
async def test_counted_trips_are_the_counting_threads_own(database: Database) -> None:
    """A trip made meanwhile from another thread (as the tests' maker of spare databases makes its
    CREATE DATABASE) is not counted: only the trips of the thread that counts."""
    import asyncpg

    dsn = database.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def elsewhere() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("SELECT 2")
        finally:
            await conn.close()

    async def select_one() -> None:
        async with database.unit_of_work() as uow:
            await uow.session.execute(text("SELECT 1"))

    await select_one()  # the engine's first connection, and its setup's trips, before counting
    with counted_trips() as seen:
        await asyncio.to_thread(asyncio.run, elsewhere())
        await select_one()
    assert [t.statement for t in seen] == ["SELECT 1"]


# Deferred writes (`marks.deferred_writes(postgresql=True)`): rendered as literals, sent in the
# COMMIT's message, or in one message before the next statement that cannot carry them.

_SCRATCH = Table("scratch", MetaData(), Column("id", Integer, primary_key=True), Column("v", Text),
                 Column("at", DateTime(timezone=True)))
_AT = datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=timezone.utc)


async def _scratch_rows(database: Database) -> list[tuple[int, str, datetime]]:
    async with database.unit_of_work() as uow:
        return [tuple(row) for row in await uow.session.execute(
            select(_SCRATCH.c.id, _SCRATCH.c.v, _SCRATCH.c.at).order_by(_SCRATCH.c.id))]


@POSTGRES_ONLY
async def test_deferred_writes_go_in_one_message_as_one_implicit_transaction(database: Database) -> None:
    """A unit that reads and then only writes what may wait costs two round trips: its read, then
    the writes (an executemany's rows each) in one message, which the server runs as one
    transaction (no BEGIN, no COMMIT to send). The values arrive as they were bound (quotes,
    backslashes, dollars, times with their offset, NULL)."""
    await _scratch(database)
    await database.engine.dispose()  # a connection whose scratch table is known (no prepared plan of before)
    tricky = "it's $1 \\ $$ done"
    with counted_trips() as seen:
        async with database.unit_of_work() as uow:
            assert await uow.session.scalar(text("SELECT count(*) FROM scratch")) == 0
            with deferred_writes(postgresql=True):
                await uow.session.execute(insert(_SCRATCH), [{"id": 1, "v": tricky, "at": _AT},
                                                            {"id": 2, "v": None, "at": _AT}])
                await uow.session.execute(rowcount_unread(update(_SCRATCH).where(_SCRATCH.c.id == 2)).values(v="two"))
            assert not (await _driver(uow.session)).in_transaction  # nothing sent yet
            await uow.commit()
    assert [(t.kind, t.statement) for t in seen if t.kind != "prepare"] == [
        ("execute", "SELECT count(*) FROM"), ("query", "INSERT INTO scratch")]
    assert await _scratch_rows(database) == [(1, tricky, _AT), (2, "two", _AT)]


@POSTGRES_ONLY
async def test_deferred_writes_go_before_a_statement_that_cannot_carry_them_in_order(database: Database) -> None:
    """A statement that reads back (RETURNING) cannot wait: the writes waiting before it go first,
    in one message that begins the transaction, so it sees them; so do those waiting before a
    write sent as it is (outside `deferred_writes`, or without `postgresql`, nothing waits)."""
    await _scratch(database)
    with counted_trips() as seen:
        async with database.unit_of_work() as uow:
            with deferred_writes(postgresql=True):
                await uow.session.execute(insert(_SCRATCH).values(id=1, v="a", at=_AT))
                assert (await uow.session.execute(
                    update(_SCRATCH).where(_SCRATCH.c.id == 1).values(v="b").returning(_SCRATCH.c.v))).scalar() == "b"
                await uow.session.execute(insert(_SCRATCH).values(id=2, v="c", at=_AT))
            with deferred_writes():  # SQLite's alone
                await uow.session.execute(insert(_SCRATCH).values(id=3, v="d", at=_AT))
            await uow.commit()
    assert [(t.kind, t.statement) for t in seen if t.kind != "prepare"] == [
        ("query", "BEGIN; INSERT INTO"), ("execute", "UPDATE scratch SET"),
        ("query", "INSERT INTO scratch"), ("execute", "INSERT INTO scratch"), ("query", "COMMIT")]
    assert [row[:2] for row in await _scratch_rows(database)] == [(1, "b"), (2, "c"), (3, "d")]


@POSTGRES_ONLY
async def test_a_deferred_write_that_fails_fails_its_transaction_whole_and_leaves_the_connection_clean(
        database: Database) -> None:
    """A deferred write's error is raised by the message it went in (the COMMIT's, or the one
    before a statement): nothing of the transaction is written (the server rolled back its implicit
    transaction; an explicit one is rolled back by a ROLLBACK), and the connection goes back to
    the pool out of the aborted transaction (the next unit of work on it works)."""
    await _scratch(database)
    async with database.unit_of_work() as uow:
        await uow.session.execute(insert(_SCRATCH).values(id=1, v="kept", at=_AT))
        await uow.commit()
    for then_read, trips in ((False, ["INSERT INTO scratch"]), (True, ["BEGIN; INSERT INTO", "ROLLBACK"])):
        with pytest.raises(IntegrityError), counted_trips() as seen:
            async with database.unit_of_work() as uow:
                with deferred_writes(postgresql=True):
                    await uow.session.execute(insert(_SCRATCH).values(id=2, v="new", at=_AT))
                    await uow.session.execute(insert(_SCRATCH).values(id=1, v="taken", at=_AT))
                if then_read:
                    await uow.session.execute(text("SELECT count(*) FROM scratch"))
                await uow.commit()
        assert [t.statement for t in seen if t.kind == "query"] == trips
        assert [row[:2] for row in await _scratch_rows(database)] == [(1, "kept")]
    async with database.unit_of_work() as uow:  # the pool's connection, in no transaction
        assert not (await _driver(uow.session)).in_transaction
        await uow.session.execute(insert(_SCRATCH).values(id=3, v="after", at=_AT))
        await uow.commit()
    assert [row[:2] for row in await _scratch_rows(database)] == [(1, "kept"), (3, "after")]


@POSTGRES_ONLY
async def test_deferred_writes_rolled_back_are_never_sent_and_unrenderable_ones_go_at_once(
        database: Database) -> None:
    """A rollback drops what waits (nothing was sent: no BEGIN, no ROLLBACK); a write whose values
    have no exact literal (a naive time) is not deferred but sent as it is, at once."""
    await _scratch(database)
    with counted_trips() as seen:
        async with database.unit_of_work() as uow:
            with deferred_writes(postgresql=True):
                await uow.session.execute(insert(_SCRATCH).values(id=1, v="dropped", at=_AT))
            await uow.rollback()
    assert seen == []
    naive = datetime(2026, 12, 5, 1, 2, 3)
    with counted_trips() as seen:
        async with database.unit_of_work() as uow:
            with deferred_writes(postgresql=True):
                await uow.session.execute(insert(_SCRATCH).values(id=2, v="naive", at=naive))
            assert (await _driver(uow.session)).in_transaction
            await uow.commit()
    assert [(t.kind, t.statement) for t in seen if t.kind != "prepare"] == [
        ("query", "BEGIN"), ("execute", "INSERT INTO scratch"), ("query", "COMMIT")]
    assert [row[:2] for row in await _scratch_rows(database)] == [(2, "naive")]
