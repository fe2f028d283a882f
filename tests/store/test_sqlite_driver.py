"""SQLite with one trip to aiosqlite's thread per statement (store/sqlite_driver.py): the same
results, row counts, ids, errors and transactions as the stock adapter, in fewer trips."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, delete, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

from controller.store.db import Database
from controller.store.marks import ROWCOUNT_UNREAD, deferred_writes, rowcount_unread
from controller.store.sqlite_driver import Trip, counted_trips


T = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer, nullable=False))


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
    async with database.unit_of_work() as uow:
        await uow.session.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL UNIQUE)"))
        await uow.session.commit()
    yield database
    await database.dispose()


def _names(trips: list[Trip]) -> list[str]:
    """What ran on aiosqlite's threads, by function name."""
    return [trip.function for trip in trips]


@pytest.fixture
def trips() -> Iterator[list[Trip]]:
    """Every trip to aiosqlite's threads from now on."""
    with counted_trips() as seen:
        yield seen


async def _nothing_written_and_the_writer_free(db: Database) -> None:
    """The table is empty, and the writer's turn was given back: a new write commits, alone."""
    async with db.unit_of_work() as uow:
        assert await uow.session.scalar(text("SELECT count(*) FROM t")) == 0
        await uow.session.execute(text("INSERT INTO t (v) VALUES (3)"))
        await uow.session.commit()
    async with db.unit_of_work() as uow:
        assert list(await uow.session.scalars(text("SELECT v FROM t"))) == [3]


async def test_statements_read_and_write_as_with_the_stock_adapter(db: Database) -> None:
    async with db.unit_of_work() as uow:
        s = uow.session
        inserted = await s.execute(text("INSERT INTO t (v) VALUES (10)"))
        assert inserted.lastrowid == 1 and inserted.rowcount == 1
        many = await s.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": 20}, {"v": 30}])
        assert many.rowcount == 2
        updated = await s.execute(text("UPDATE t SET v = v + 1 WHERE v >= 20"))
        assert updated.rowcount == 2
        rows = (await s.execute(text("SELECT id, v FROM t ORDER BY id"))).all()
        assert [tuple(r) for r in rows] == [(1, 10), (2, 21), (3, 31)]
        assert list((await s.execute(text("SELECT v FROM t WHERE v > 100"))).all()) == []
        await s.commit()
    async with db.unit_of_work() as uow:
        assert await uow.session.scalar(text("SELECT sum(v) FROM t")) == 62


async def test_a_failed_statement_raises_the_dbapi_error_and_its_transaction_is_rolled_back(db: Database) -> None:
    with pytest.raises(IntegrityError):
        async with db.unit_of_work() as uow:
            await uow.session.execute(text("INSERT INTO t (v) VALUES (1)"))
            await uow.session.execute(text("INSERT INTO t (v) VALUES (1)"))  # UNIQUE
    with pytest.raises(OperationalError):
        async with db.unit_of_work() as uow:
            await uow.session.execute(text("INSERT INTO t (v) VALUES (2)"))
            await uow.session.execute(text("SELECT nothing FROM nowhere"))
    await _nothing_written_and_the_writer_free(db)  # neither was committed


async def test_a_read_takes_one_trip_and_a_write_two(db: Database, trips: list[Trip]) -> None:
    async with db.unit_of_work() as uow:
        await uow.session.execute(text("SELECT v FROM t"))
    assert _names(trips) == ["_run"]  # the statement; no cursor to open or close, no transaction to end
    trips.clear()
    async with db.unit_of_work() as uow:
        await uow.session.execute(text("INSERT INTO t (v) VALUES (1)"))
        await uow.session.commit()
    assert _names(trips) == ["_run", "commit"]
    trips.clear()
    async with db.unit_of_work() as uow:  # not committed: rolled back on its trip
        await uow.session.execute(text("INSERT INTO t (v) VALUES (2)"))
    assert _names(trips) == ["_run", "rollback"]
    async with db.unit_of_work() as uow:
        assert list(await uow.session.scalars(text("SELECT v FROM t"))) == [1]


async def test_deferred_writes_go_with_the_next_statement_or_the_commit_in_order(db: Database,
                                                                                  trips: list[Trip]) -> None:
    async with db.unit_of_work() as uow:
        s = uow.session
        with deferred_writes():
            await s.execute(text("INSERT INTO t (v) VALUES (1)"))  # deferred
            await s.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": 2}, {"v": 3}])  # deferred
            assert _names(trips) == []
            moved = await s.execute(text("UPDATE t SET v = v * 10 WHERE v >= 2"))  # the inserts go first, with it
            assert _names(trips) == ["_run_after"] and moved.rowcount == 2
            returned = await s.execute(text("INSERT INTO t (v) VALUES (4) RETURNING id"))  # RETURNING: at once
            assert returned.scalar_one() == 4
            await s.execute(text("INSERT INTO t (v) VALUES (5)"))  # deferred: goes with the commit
        await s.commit()
    assert _names(trips) == ["_run_after", "_run", "_commit_after"]
    async with db.unit_of_work() as uow:
        assert list(await uow.session.scalars(text("SELECT v FROM t ORDER BY id"))) == [1, 20, 30, 4, 5]


async def test_a_deferred_insert_that_fails_fails_the_commit_and_nothing_is_written(db: Database) -> None:
    with pytest.raises(IntegrityError) as raised:
        async with db.unit_of_work() as uow:
            with deferred_writes():
                await uow.session.execute(text("INSERT INTO t (v) VALUES (7)"))
                await uow.session.execute(text("INSERT INTO t (v) VALUES (7)"))  # UNIQUE, raised by the commit
            await uow.session.commit()
    await _nothing_written_and_the_writer_free(db)  # rolled back whole
    # raised by the commit it rode with, the error names the deferred statement that failed
    assert raised.value.orig.__notes__ == ["in a deferred statement: INSERT INTO t (v) VALUES (7)"]


async def test_deferred_writes_of_a_transaction_not_committed_are_never_run(db: Database, trips: list[Trip]) -> None:
    async with db.unit_of_work() as uow:
        with deferred_writes():
            await uow.session.execute(text("INSERT INTO t (v) VALUES (9)"))
    assert _names(trips) == []  # dropped with the rollback: nothing had reached the thread
    await _nothing_written_and_the_writer_free(db)


async def test_updates_and_deletes_marked_rowcount_unread_are_deferred_and_unmarked_ones_are_not(
        db: Database, trips: list[Trip]) -> None:
    async with db.unit_of_work() as uow:
        s = uow.session
        with deferred_writes():
            await s.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": 1}, {"v": 2}, {"v": 3}])  # deferred
            marked = await s.execute(rowcount_unread(update(T).where(T.c.v >= 2).values(v=T.c.v * 10)))  # deferred
            assert marked.rowcount == -1  # unknown: nothing ran yet
            await s.execute(rowcount_unread(delete(T).where(T.c.v == 1)))  # deferred
            assert _names(trips) == []
            unmarked = await s.execute(update(T).where(T.c.v == 30).values(v=31))  # at once, after the three
            assert _names(trips) == ["_run_after"] and unmarked.rowcount == 1
            await s.execute(rowcount_unread(update(T).where(T.c.v == 20).values(v=21)))  # goes with the commit
        await s.commit()
    assert _names(trips) == ["_run_after", "_commit_after"]
    async with db.unit_of_work() as uow:
        assert list(await uow.session.scalars(text("SELECT v FROM t ORDER BY id"))) == [21, 31]


def test_the_mark_is_a_comment_the_driver_reads_in_the_statement_text() -> None:
    compiled = str(rowcount_unread(update(T).values(v=1)))
    assert compiled.startswith(f"UPDATE {ROWCOUNT_UNREAD} t SET")  # same SQL on every database


async def test_a_marked_statement_outside_deferred_writes_runs_at_once(db: Database, trips: list[Trip]) -> None:
    async with db.unit_of_work() as uow:
        await uow.session.execute(text("INSERT INTO t (v) VALUES (5)"))
        moved = await uow.session.execute(rowcount_unread(update(T).values(v=6)))
        assert moved.rowcount == 1
        await uow.session.commit()
    assert _names(trips) == ["_run", "_run", "commit"]


async def test_a_deferred_update_that_fails_fails_the_commit_and_nothing_is_written(db: Database) -> None:
    with pytest.raises(IntegrityError):
        async with db.unit_of_work() as uow:
            with deferred_writes():
                await uow.session.execute(text("INSERT INTO t (v) VALUES (7), (8)"))
                await uow.session.execute(rowcount_unread(update(T).where(T.c.v == 8).values(v=7)))  # UNIQUE
            await uow.session.commit()
    await _nothing_written_and_the_writer_free(db)  # rolled back whole


async def test_counted_trips_are_the_counting_threads_own(db: Database, tmp_path: Path) -> None:
    """A trip asked meanwhile from another thread (an event loop of its own, its own engine) is
    not counted: only the trips the counting thread asks for."""
    import asyncio

    async def elsewhere() -> None:
        other = Database(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
        try:
            async with other.unit_of_work() as uow:
                await uow.session.execute(text("SELECT count(*) FROM t"))
        finally:
            await other.dispose()

    with counted_trips() as seen:
        await asyncio.to_thread(asyncio.run, elsewhere())
        assert seen == []
        async with db.unit_of_work() as uow:
            await uow.session.execute(text("SELECT v FROM t"))
    assert _names(seen) == ["_run"]
