"""Following the events history from an id (`ListEvents(after_id=)`, `maiactl get events -w`):
no event is missed, however many come between two asks and in whatever order they commit."""

from __future__ import annotations

import pytest

from controller.cli.follow import EventFollower, read_after
from controller.domain.values import EventView
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.repositories import NewEvent, record_events


def _events(*names: str) -> list[NewEvent]:
    return [NewEvent(actor="test", kind="node.down", object_kind="node", object_id=n) for n in names]


async def _record(database: Database, *names: str) -> None:
    async with database.unit_of_work() as uow:
        await record_events(uow.session, _events(*names))
        await uow.commit()


async def _after(database: Database, after_id: int, limit: int) -> list[EventView]:
    async with database.unit_of_work() as uow:
        return await repo.list_events(uow.session, after_id=after_id, limit=limit)


async def test_after_an_id_the_oldest_events_come_first_and_without_one_the_newest(database: Database) -> None:
    """After an id, a reply holds the oldest `limit` events after it (a follower asking again from
    its last id misses none of a burst larger than a reply); without one, the newest `limit`."""
    await _record(database, "first")
    async with database.unit_of_work() as uow:
        first = (await repo.list_events(uow.session))[-1].id
    await _record(database, *(f"burst{i:02}" for i in range(25)))
    followed: list[str] = []
    last = first
    while page := await _after(database, last, 10):
        followed += [e.object_id for e in page]
        last = page[-1].id
    assert followed == [f"burst{i:02}" for i in range(25)]
    async with database.unit_of_work() as uow:
        newest = await repo.list_events(uow.session, limit=3)
    assert [e.object_id for e in newest] == ["burst22", "burst23", "burst24"]


# SQLite has one writer at a time: its events commit in id order.
@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_follower_sees_an_event_committed_after_one_with_a_larger_id(database: Database) -> None:
    """PostgreSQL takes an event's id as it is written: one committed after a larger id was read
    is still shown, once, by a follower that asks from behind (`EventFollower`); a follower asking
    from the last id it saw (as maiactl did) never saw it."""
    await _record(database, "before")
    async with database.unit_of_work() as uow:
        shown = await repo.list_events(uow.session, limit=1)
    now = [0.0]
    follower = EventFollower(shown, settle_s=10.0, clock=lambda: now[0])
    naive_last = shown[-1].id
    naive: list[str] = []
    seen: list[str] = []

    async def poll() -> None:
        nonlocal naive_last
        page = await _after(database, naive_last, 1000)
        naive.extend(e.object_id for e in page)
        naive_last = page[-1].id if page else naive_last
        async with database.unit_of_work() as uow:
            after = follower.after_id()
            got = await repo.list_events(uow.session, after_id=after, limit=1000)
        seen.extend(e.object_id for e in follower.fresh(got))

    async with database.unit_of_work() as slow:
        await record_events(slow.session, _events("slow"))  # its id taken, not committed
        await _record(database, "fast")  # a larger id, committed first
        await poll()
        now[0] += 1.0
        await slow.commit()
    await poll()
    now[0] += 11.0
    await _record(database, "after")
    await poll()
    await poll()
    assert seen == ["fast", "slow", "after"]
    assert naive == ["fast", "after"]  # what following from the last id seen missed


async def test_read_after_asks_again_while_a_reply_is_full(database: Database) -> None:
    """`read_after` reads a burst of more than one reply (1,000) in full."""
    await _record(database, "first")
    async with database.unit_of_work() as uow:
        first = (await repo.list_events(uow.session))[-1].id
    await _record(database, *(f"e{i}" for i in range(2500)))
    asks: list[int] = []
    views: dict[int, list[EventView]] = {}
    after = first
    while True:  # the replies read first: read_after's fetch is synchronous, as the CLI's
        views[after] = await _after(database, after, 1000)
        if len(views[after]) < 1000:
            break
        after = views[after][-1].id

    def fetch(after_id: int) -> tuple[list[EventView], int]:
        asks.append(after_id)
        return views[after_id], 0

    got, _ = read_after(fetch, first)
    assert [e.object_id for e in got] == [f"e{i}" for i in range(2500)]
    assert len(asks) == 3


async def test_a_follower_that_has_seen_none_reads_a_burst_from_the_start(database: Database) -> None:
    """Started with nothing shown (an empty history, or `--for` an object not there yet), the
    follower asks from the start oldest first: after_id 0 alone gave the newest 1,000, and the
    first 500 of a burst of 1,500 were never shown."""
    follower = EventFollower([], clock=lambda: 0.0)
    await _record(database, *(f"e{i:04}" for i in range(1500)))
    replies: dict[int, list[EventView]] = {}
    after = follower.after_id()
    while True:  # the replies read first: read_after's fetch is synchronous, as the CLI's
        async with database.unit_of_work() as uow:
            replies[after] = await repo.list_events(uow.session, after_id=after, limit=1000, oldest_first=True)
        if len(replies[after]) < 1000:
            break
        after = replies[after][-1].id
    shown = follower.fresh(*read_after(lambda a: (replies[a], 0), follower.after_id()))
    assert [e.object_id for e in shown] == [f"e{i:04}" for i in range(1500)]
