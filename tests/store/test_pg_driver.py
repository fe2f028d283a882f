"""PostgreSQL's transactions begun at the first statement that needs one (`store/pg_driver.py`):
a unit of work that only reads sends neither BEGIN nor ROLLBACK; a write, a row lock or a
function with transactional effects begins the transaction before it runs, and everything after it
runs in that transaction (rolled back whole, locks held to the end); `read_snapshot` still reads
one snapshot."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.db import Database
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
    ("SELECT nextval('s')", False),
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
        await uow.session.execute(text("CREATE TABLE scratch (id INTEGER PRIMARY KEY, v TEXT)"))
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
