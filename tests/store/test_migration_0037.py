"""Migration 0037 (the retention mark starts at what was deleted before 0035) on SQLite and
PostgreSQL: events deleted by a retention that kept no mark are marked at the upgrade, and a
reader resuming after one of their ids is told (OUT_OF_RANGE) instead of answered the rest as if
nothing were gone; a higher mark stays; an empty history is marked where its ids are known never
to come again (PostgreSQL's sequence), and not where they are given again (SQLite)."""

from __future__ import annotations

import pytest

from controller import limits
from controller.errors import OutOfRange
from controller.identity import Principal
from controller.store.db import Database
from controller.store.retention import events_deleted_through
from controller.usecases import events as event_cases

from .test_migration_0010 import _add_event, _downgrade, _run, _upgrade

BEFORE, REVISION = "0036_capacity_power", "0037_events_known_deleted"
ADMIN = Principal("admin")


async def _events(db: Database, count: int) -> list[int]:
    """`count` events written as a controller before 0037 wrote them; their ids, in order."""
    for i in range(count):
        await _add_event(db, f"e{i}")
    return [row[0] for row in await _run(db, "SELECT id FROM events ORDER BY id")]


async def _delete(db: Database, *ids: int) -> None:
    """As a retention that kept no mark deleted them (before 0035, or by hand)."""
    for event_id in ids:
        await _run(db, "DELETE FROM events WHERE id = :id", id=event_id)


async def _mark(db: Database) -> int:
    async with db.unit_of_work() as uow:
        return await events_deleted_through(uow.session)


async def _set_mark(db: Database, through: int) -> None:
    await _run(db, "UPDATE event_retention SET deleted_through = :through WHERE id = 1", through=through)


async def _read_after(db: Database, after_id: int) -> list[str]:
    async with db.unit_of_work() as uow:
        read = await event_cases.list_events(uow, ADMIN, after_id=after_id)
    return [e.object_id for e in read.events]


async def test_events_deleted_before_the_mark_are_marked_and_a_reader_after_them_is_told(db_url: str) -> None:
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        ids = await _events(db, 5)
        await _delete(db, *ids[:3])
        assert await _mark(db) == 0 and await _read_after(db, ids[0]) == ["e3", "e4"]  # as if none were gone
        await _upgrade(db_url, REVISION)
        assert await _mark(db) == ids[3] - 1 == ids[2]
        with pytest.raises(OutOfRange) as told:
            await _read_after(db, ids[0])
        assert told.value.metadata == ((limits.EVENTS_DELETED_THROUGH_METADATA_KEY, str(ids[2])),)
        assert await _read_after(db, ids[2]) == ["e3", "e4"]  # after the mark, and from the start, the rest
        assert await _read_after(db, 0) == ["e3", "e4"]
    finally:
        await db.dispose()


async def test_the_mark_is_raised_only_and_a_downgrade_leaves_it(db_url: str) -> None:
    """Retention deletes by time: a mark raised after 0035 (an id it deleted, above the lowest
    stored) stays; a downgrade changes nothing, and the next upgrade raises a lower mark."""
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        ids = await _events(db, 8)
        await _delete(db, *ids[:3])             # before 0035: no mark
        await _delete(db, ids[5])               # after 0035: an older event with a later id, marked
        await _set_mark(db, ids[5])
        await _upgrade(db_url, REVISION)
        assert await _mark(db) == ids[5]        # not lowered to ids[2]
        await _downgrade(db_url, BEFORE)
        assert await _mark(db) == ids[5]
        await _delete(db, ids[3], ids[4], ids[6])  # by hand, unmarked: only ids[7] is left
        await _upgrade(db_url, REVISION)
        assert await _mark(db) == ids[6]
        with pytest.raises(OutOfRange):
            await _read_after(db, ids[5])
    finally:
        await db.dispose()


async def test_a_history_never_written_keeps_the_mark_at_zero(db_url: str) -> None:
    """No id given yet (PostgreSQL: a sequence never read has a last_value, and is_called false):
    the first event's id is not deleted."""
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        await _upgrade(db_url, REVISION)
        assert await _mark(db) == 0
        first = (await _events(db, 1))[0]
        assert await _read_after(db, 0) == ["e0"] and first == 1
    finally:
        await db.dispose()


async def test_an_emptied_history_is_marked_where_its_ids_never_come_again(db_url: str) -> None:
    """PostgreSQL's sequence gives no id twice: the last it gave is marked, a new event comes after
    it. SQLite gives an empty table's next row id 1 again: a mark would call the new events
    deleted, and it stays."""
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        ids = await _events(db, 3)
        await _delete(db, *ids)
        await _upgrade(db_url, REVISION)
        new = (await _events(db, 1))[0]
        if db_url.startswith("postgresql"):
            assert await _mark(db) == ids[-1] and new > ids[-1]
            with pytest.raises(OutOfRange):
                await _read_after(db, ids[0])
            assert await _read_after(db, ids[-1]) == ["e0"]
        else:
            assert await _mark(db) == 0 and new == 1
            assert await _read_after(db, 0) == ["e0"]
    finally:
        await db.dispose()
