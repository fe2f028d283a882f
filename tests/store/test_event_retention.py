"""Event retention (`--event-ttl`): the leader deletes events past their time to live, a bounded
batch a transaction, and never the kinds a controller reads back as state (the isolation
watchdog's alarms, a node's drain)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from controller.config import parse_args
from controller.retention import EventRetention
from controller.store import models as m
from controller.store.db import Database
from controller.store import repositories as repo
from controller.store.repositories import NewEvent, record_events
from controller.store.retention import IDS_A_STATEMENT, STATE_KINDS, events_deleted_through, prune_events
from controller.store.rollout import DRAIN_EVENT
from controller.watchdog import CLEARED_KIND, EVENT_KIND, _stored_alarms

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
TTL_S = 3600.0


async def _record(database: Database, *events: tuple[str, str, float]) -> None:
    """Events (kind, object id, hours before NOW), with the data the watchdog stores for an alarm."""
    rows = [NewEvent(actor="test", kind=kind, object_kind="node", object_id=object_id, message=kind,
                     data={"rule": "exclusion", "scope": f"node {object_id}", "tenants": ["lab", "rival"]},
                     at=NOW - timedelta(hours=hours))
            for kind, object_id, hours in events]
    async with database.unit_of_work() as uow:
        await record_events(uow.session, rows)
        await uow.commit()


async def _left(database: Database) -> list[tuple[str, str]]:
    async with database.unit_of_work() as uow:
        rows = await uow.session.execute(select(m.Event.kind, m.Event.object_id).order_by(m.Event.id))
        return [(kind, object_id) for kind, object_id in rows]


async def _prune(database: Database, limit: int, since: datetime | None = None) -> int:
    async with database.unit_of_work() as uow:
        pruned = await prune_events(uow.session, NOW - timedelta(hours=1), limit, since=since)
        await uow.commit()
    return pruned.count


async def test_a_prune_deletes_the_oldest_events_past_the_cutoff_a_batch_at_most_and_keeps_state_kinds(
        database: Database) -> None:
    await _record(database, ("node.down", "old-3", 5), ("node.up", "old-1", 3), ("node.down", "old-2", 4),
                  (EVENT_KIND, "n1", 9), (DRAIN_EVENT, "n2", 9), (CLEARED_KIND, "n3", 9),
                  ("deployment.placed", "new", 0.5))
    assert await _prune(database, 2) == 2
    # the two oldest past the cutoff went (5 h and 4 h), whatever order they were written in
    assert ("node.up", "old-1") in await _left(database)
    assert await _prune(database, 2) == 1
    assert await _left(database) == [(EVENT_KIND, "n1"), (DRAIN_EVENT, "n2"), (CLEARED_KIND, "n3"),
                                     ("deployment.placed", "new")]


async def test_the_newest_event_stays_however_old_so_a_new_one_never_reuses_an_id(database: Database) -> None:
    """SQLite numbers a new row after the highest id left: with every event deleted, the next one
    took id 1, and a reader following the history after the last id it saw never saw it."""
    await _record(database, *(("node.down", f"n{i}", 2) for i in range(3)))
    assert await _prune(database, 10) == 2
    async with database.unit_of_work() as uow:
        last_seen = await uow.session.scalar(select(func.max(m.Event.id)))
    await _record(database, ("node.up", "n9", 0))
    async with database.unit_of_work() as uow:
        assert await uow.session.scalar(select(func.max(m.Event.id))) > last_seen
        assert len(await repo.list_events(uow.session, after_id=last_seen)) == 1


async def test_a_prune_reads_on_from_where_the_last_batch_stopped(database: Database) -> None:
    await _record(database, ("node.down", "a", 5), ("node.down", "b", 4), ("node.down", "c", 3),
                  ("node.up", "newest", 0))
    async with database.unit_of_work() as uow:
        first = await prune_events(uow.session, NOW - timedelta(hours=1), 1)
        await uow.commit()
    assert first.count == 1 and first.reached is not None
    # nothing at or after a time later than every due event: the batch reads from there on
    assert await _prune(database, 10, since=NOW - timedelta(hours=2)) == 0
    assert await _prune(database, 10, since=first.reached) == 2


def test_the_kinds_kept_are_those_the_controller_reads_back() -> None:
    assert {EVENT_KIND, CLEARED_KIND, DRAIN_EVENT} <= set(STATE_KINDS)


async def test_the_leader_deletes_everything_past_the_ttl_in_batches_and_alarms_standing_survive(
        database: Database) -> None:
    await _record(database, *(("node.down", f"n{i}", 2 + i / 100) for i in range(7)),
                  (EVENT_KIND, "n1", 30 * 24), ("node.up", "n9", 0.1))
    counted: list[int] = []
    paused: list[float] = []

    async def pause(seconds: float) -> None:
        paused.append(seconds)

    retention = EventRetention(database, ttl_s=TTL_S, should_run=lambda: True, batch=3, on_pruned=counted.append,
                               now=lambda: NOW, sleep=pause)
    assert await retention.prune_once() == 7
    assert counted == [3, 3, 1] and retention.pruned_total == 7  # a transaction a batch, until one is short
    assert len(paused) == 2 and all(p > 0 for p in paused)  # a pause after each whole batch, none after the last
    assert await _left(database) == [(EVENT_KIND, "n1"), ("node.up", "n9")]
    async with database.read_snapshot() as session:  # a new leader still learns the month-old alarm
        assert [v.scope for v in (await _stored_alarms(session)).values()] == ["node n1"]
    assert await retention.prune_once() == 0


async def test_a_batch_longer_than_one_statement_s_list_deletes_it_all(database: Database) -> None:
    await _record(database, *(("node.down", f"n{i}", 2) for i in range(IDS_A_STATEMENT + 100)), ("node.up", "n", 0))
    assert await _prune(database, IDS_A_STATEMENT + 50) == IDS_A_STATEMENT + 50
    assert await _prune(database, IDS_A_STATEMENT + 50) == 50


async def test_each_pass_starts_again_from_the_oldest_event(database: Database) -> None:
    """Within a pass a batch reads on from where the last stopped; the next pass does not: an
    event recorded after a pass with an older time (or one a failover's lost deletion kept) goes."""
    await _record(database, ("node.down", "a", 3), ("node.up", "newest", 0))
    retention = EventRetention(database, ttl_s=TTL_S, should_run=lambda: True, now=lambda: NOW)
    assert await retention.prune_once() == 1
    await _record(database, ("node.down", "late", 5), ("node.up", "newest-2", 0))
    assert await retention.prune_once() == 1  # "late", older than where the last pass stopped
    assert await _left(database) == [("node.up", "newest"), ("node.up", "newest-2")]


async def test_a_follower_deletes_nothing_and_a_leader_that_stops_leading_stops_between_batches(
        database: Database) -> None:
    await _record(database, *(("node.down", f"n{i}", 2) for i in range(5)))
    follower = EventRetention(database, ttl_s=TTL_S, should_run=lambda: False, batch=2, now=lambda: NOW)
    assert await follower.prune_once() == 0
    leading = iter([True, False])
    deposed = EventRetention(database, ttl_s=TTL_S, should_run=lambda: next(leading), batch=2, now=lambda: NOW)
    assert await deposed.prune_once() == 2
    async with database.unit_of_work() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(m.Event)) == 3


async def test_the_run_loop_prunes_on_its_period_while_leading(database: Database) -> None:
    await _record(database, ("node.down", "n1", 2), ("node.up", "n1", 0))
    leads = asyncio.Event()
    retention = EventRetention(database, ttl_s=TTL_S, should_run=leads.is_set, interval_s=0.02, now=lambda: NOW)
    task = asyncio.create_task(retention.run())
    try:
        await asyncio.sleep(0.1)
        assert retention.pruned_total == 0  # not the leader: nothing
        leads.set()
        for _ in range(200):
            if retention.pruned_total:
                break
            await asyncio.sleep(0.02)
        assert await _left(database) == [("node.up", "n1")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_event_ttl_is_a_flag_and_zero_keeps_every_event() -> None:
    assert parse_args([], env={}).event_ttl_s == 7 * 24 * 3600
    assert parse_args(["--event-ttl", "0"], env={}).event_ttl_s == 0
    assert parse_args(["--event-ttl", "3600"], env={}).event_ttl_s == 3600
    with pytest.raises(ValueError):
        EventRetention(None, ttl_s=0, should_run=lambda: True)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", ["-1", "60", "1e12", "nan"])
def test_an_event_ttl_out_of_range_is_a_usage_error(ttl: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Under an hour would cut what rollouts and operators read back; past ten years the cutoff
    overflowed a date and every pass failed."""
    with pytest.raises(SystemExit) as caught:
        parse_args(["--event-ttl", ttl], env={})
    assert caught.value.code == 2 and "--event-ttl:" in capsys.readouterr().err


async def test_each_batch_raises_the_mark_to_the_highest_id_it_deleted_never_lowers_it(database: Database) -> None:
    """The mark tells a reader resuming after an id whether events after it were deleted (pruned
    by time, so the ids deleted are not a prefix: the mark is their highest)."""
    await _record(database, ("node.down", "late-id-old", 5), ("node.down", "kept", 0.5), ("node.up", "old", 3),
                  ("node.up", "newest", 0))
    async with database.unit_of_work() as uow:
        ids = {object_id: event_id for event_id, object_id in
               await uow.session.execute(select(m.Event.id, m.Event.object_id))}
        assert await events_deleted_through(uow.session) == 0
    assert await _prune(database, 1) == 1  # the oldest: the lowest id
    async with database.unit_of_work() as uow:
        assert await events_deleted_through(uow.session) == ids["late-id-old"]
    assert await _prune(database, 5) == 1
    async with database.unit_of_work() as uow:
        assert await events_deleted_through(uow.session) == ids["old"]
        await uow.session.execute(m.EventRetentionMark.__table__.update().values(deleted_through=10**6))
        await uow.commit()
    await _record(database, ("node.down", "older", 9), ("node.up", "newest-2", 0))
    assert await _prune(database, 5) == 1
    async with database.unit_of_work() as uow:  # a batch of lower ids leaves a higher mark as it was
        assert await events_deleted_through(uow.session) == 10**6
