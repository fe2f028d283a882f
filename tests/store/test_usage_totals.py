"""Usage to date from the closed intervals' sums the database's triggers keep (migration 0028).

`metering.usage_to_date` (the `maia_usage_*` counters, the console's totals) reads `closed_usage`
(and on PostgreSQL its deltas not folded yet) plus the open intervals, never the history. Here it
is held to `metering.usage_by` over all time, the sum of every interval, on both backends: after
random opens and closes (some rolled back, some rows inserted closed or edited by hand), after
each path of the controller that closes intervals (a plan commit's moves and preemptions, a
node's shards removed, a quarantine, a release, a node registered smaller), and on PostgreSQL with
writers closing intervals at once (neither waits, nothing is lost) and through the migration
(an interval closed while it runs is counted once).
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from alembic import command
from sqlalchemy import delete, event, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import metering
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.metering import StartedShard
from controller.store.migrate import alembic_config
from controller.store.plans import commit_plan
from controller.store.release import stop_placements
from controller.store.snapshot import Snapshot, load_snapshot
from scheduler import Move, Placement as PlanPlacement, Plan, Preemption

from .migrating import upgrade_past
from .seed import seed_problem

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
GROUPS = ("tenant", "accelerator_model", "zone")
Sums = dict[tuple[str, ...], tuple[float, float]]


def _sums(totals: list[metering.UsageTotal], group: tuple[str, ...] = GROUPS) -> Sums:
    return {tuple(getattr(t, name) for name in group): (t.accelerator_seconds, t.energy_j) for t in totals}


def _approx(sums: Sums) -> dict[tuple[str, ...], Any]:
    return {key: pytest.approx(value, rel=1e-9, abs=1e-6) for key, value in sums.items()}


async def _assert_to_date_is_the_whole_history(database: Database, now: datetime, why: str = "") -> None:
    """Usage to date equals the sum of every interval (`usage_by` over all time), per each grouping
    and for each tenant alone; the closed sums alone equal the closed intervals'."""
    async with database.unit_of_work() as uow:
        s = uow.session
        for group in (GROUPS, ("tenant",), ("zone",), ("accelerator_model", "zone")):
            whole = _sums(await metering.usage_by(s, group, now=now), group)
            assert _sums(await metering.usage_to_date(s, group, now=now), group) == _approx(whole), (why, group)
        tenants = set(await s.scalars(select(m.UsageInterval.tenant_id).distinct()))
        for tenant in tenants | {"nobody"}:
            whole = _sums(await metering.usage_by(s, GROUPS, now=now, tenant=tenant))
            to_date = _sums(await metering.usage_to_date(s, GROUPS, now=now, tenant=tenant))
            assert to_date == _approx(whole), (why, tenant)
        assert await _closed_sums(s) == _approx(await _closed_intervals(s)), why


async def _closed_sums(session: AsyncSession) -> Sums:
    """`closed_usage` plus the deltas not folded yet, per (tenant, model, zone)."""
    sums: dict[tuple[str, ...], list[float]] = {}
    for table in (m.ClosedUsage, m.ClosedUsageDelta):
        for tenant, model, zone, seconds, joules in await session.execute(select(
                table.tenant_id, table.accelerator_model, table.zone_id, table.accelerator_seconds, table.energy_j)):
            held = sums.setdefault((tenant, model, zone), [0.0, 0.0])
            held[0] += seconds
            held[1] += joules
    return {key: (a, b) for key, (a, b) in sums.items()}


async def _closed_intervals(session: AsyncSession) -> Sums:
    iv = m.UsageInterval
    seconds = iv.ended_s - iv.started_s
    rows = await session.execute(
        select(iv.tenant_id, iv.accelerator_model, iv.zone_id, func.sum(seconds * iv.accelerator_milli / 1000.0),
               func.sum(seconds * (iv.load_power_w + iv.idle_share_w)))
        .where(iv.ended_s.is_not(None)).group_by(iv.tenant_id, iv.accelerator_model, iv.zone_id))
    return {(tenant, model, zone): (float(a), float(b)) for tenant, model, zone, a, b in rows}


async def _open_count(database: Database, *, closed: bool = False) -> int:
    """How many intervals are open (`closed`: closed)."""
    ended = m.UsageInterval.ended_s
    async with database.unit_of_work() as uow:
        return await uow.session.scalar(select(func.count()).select_from(m.UsageInterval)
                                        .where(ended.is_not(None) if closed else ended.is_(None)))


def _interval(rng: random.Random, placement_id: int, started_s: float, ended_s: float | None = None) -> dict[str, Any]:
    node = rng.choice(("n1", "n2", "n3", "n4"))
    return {"placement_id": placement_id, "tenant_id": rng.choice(("lab", "web", "ops")),
            "deployment": f"d{placement_id % 7}", "replica": 0, "shard": 0, "node_id": node,
            "zone_id": "z1" if node in ("n1", "n2") else "z2",
            "accelerator_model": rng.choice(("a100", "h100")), "accelerator_milli": rng.choice((250, 500, 1000, 2000)),
            "load_power_w": rng.choice((0.0, 150.0, 400.0)), "idle_share_w": rng.choice((0.0, 31.25, 125.0)),
            "started_s": started_s, "ended_s": ended_s}


async def test_usage_to_date_is_the_whole_history_after_random_opens_and_closes(database: Database) -> None:
    rng = random.Random(28)
    next_id, now = 1, T0
    for round_ in range(30):
        now += timedelta(seconds=rng.randint(1, 7200))
        at = metering.epoch_s(now)
        async with database.unit_of_work() as uow:
            s = uow.session
            opened = [_interval(rng, next_id + i, at - rng.choice((0.0, 0.5, 90.0, 3600.0)))
                      for i in range(rng.randint(0, 8))]
            next_id += len(opened)
            if opened:
                await s.execute(insert(m.UsageInterval.__table__), opened)
            open_ids = list(await s.scalars(
                select(m.UsageInterval.placement_id).where(m.UsageInterval.ended_s.is_(None))))
            if open_ids:
                await metering.stop_intervals(s, rng.sample(open_ids, rng.randint(0, len(open_ids))), now)
            if rng.random() < 0.3:
                await metering.stop_intervals_on_node(s, rng.choice(("n1", "n2", "n3", "n4")), now)
            if rng.random() < 0.3:  # a row written closed (a restore, by hand)
                await s.execute(insert(m.UsageInterval.__table__), [_interval(rng, next_id, at - 600.0, at)])
                next_id += 1
            if rng.random() < 0.2:  # a closed interval's end edited by hand: the sums move by the change
                await s.execute(update(m.UsageInterval).where(
                    m.UsageInterval.ended_s.is_not(None), m.UsageInterval.id % 3 == round_ % 3)
                    .values(ended_s=m.UsageInterval.ended_s + 0.25))
            if rng.random() < 0.2:
                await uow.rollback()  # counts nothing
                continue
            await uow.commit()
        await _assert_to_date_is_the_whole_history(database, now + timedelta(seconds=1), f"round {round_}")
    assert await _open_count(database) > 0  # open intervals accrued to the end too


async def test_a_deleted_interval_stays_counted(database: Database) -> None:
    """The sums are counters: deleting closed history (by hand, a retention) takes nothing back."""
    rng = random.Random(5)
    end = metering.epoch_s(T0)
    async with database.unit_of_work() as uow:
        await uow.session.execute(insert(m.UsageInterval.__table__),
                                  [_interval(rng, i, end - 3600.0 * (i + 1), end - 60.0 * i) for i in range(6)])
        await uow.commit()
    async with database.unit_of_work() as uow:
        before = _sums(await metering.usage_to_date(uow.session, GROUPS, now=T0))
        await uow.session.execute(delete(m.UsageInterval).where(m.UsageInterval.placement_id < 4))
        await uow.commit()
    async with database.unit_of_work() as uow:
        assert _sums(await metering.usage_to_date(uow.session, GROUPS, now=T0)) == _approx(before)
        assert len(await metering.usage_by(uow.session, ("deployment",), now=T0)) < 6  # the history is gone


# Four nodes of four accelerators in two zones, two models; web (a) and chat (b, quarter
# accelerators) spread over them, burst (b, preemptible) fills n4, train (a) holds two of n2's.
PATHS: dict[str, Any] = {
    "version": 1,
    "zones": [{"id": "z1"}, {"id": "z2"}],
    "rows": [{"id": "row1", "zone": "z1"}, {"id": "row2", "zone": "z2"}],
    "racks": [{"id": "rack1", "row": "row1"}, {"id": "rack2", "row": "row2"}],
    "nodes": [{"id": f"n{i}", "rack": "rack1" if i <= 2 else "rack2", "accelerators": 4,
               "accelerator_model": "a100" if i % 2 else "h100", "idle_power_w": 500.0} for i in range(1, 5)],
    "tenants": [{"id": "a"}, {"id": "b"}],
    "deployments": [
        {"id": "a/web", "tenant": "a", "replicas": 2, "shards_per_replica": 1,
         "shard": {"accelerators": 1, "power_w": 400.0}},
        {"id": "a/train", "tenant": "a", "replicas": 1, "shards_per_replica": 2,
         "shard": {"accelerators": 1, "power_w": 700.0}},
        {"id": "b/chat", "tenant": "b", "replicas": 2, "shards_per_replica": 1,
         "shard": {"accelerators": 1, "accelerator_milli": 250, "power_w": 800.0}},
        {"id": "b/burst", "tenant": "b", "replicas": 1, "shards_per_replica": 1,
         "shard": {"accelerators": 4, "power_w": 300.0}, "preemptible": True},
    ],
    "placements": [
        {"deployment": "a/web", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]},
        {"deployment": "a/web", "replica": 1, "shard": 0, "node": "n3", "accelerator_indices": [0]},
        {"deployment": "a/train", "replica": 0, "shard": 0, "node": "n2", "accelerator_indices": [0]},
        {"deployment": "a/train", "replica": 0, "shard": 1, "node": "n2", "accelerator_indices": [1]},
        {"deployment": "b/chat", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [1],
         "accelerator_milli": 250},
        {"deployment": "b/chat", "replica": 1, "shard": 0, "node": "n2", "accelerator_indices": [2],
         "accelerator_milli": 250},
        {"deployment": "b/burst", "replica": 0, "shard": 0, "node": "n4", "accelerator_indices": [0, 1, 2, 3]},
    ],
}


async def _metered_cluster(database: Database) -> None:
    """PATHS seeded, every placed shard's interval opened at T0 (as the placements' writers do)."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, PATHS)
        await uow.commit()
    async with database.unit_of_work() as uow:
        rows = await uow.session.execute(select(m.Placement.deployment_id, m.Placement.replica, m.Placement.shard,
                                                m.Placement.node_id, m.Placement.accelerator_milli,
                                                m.Placement.accelerator_indices))
        await metering.start_intervals(uow.session, [StartedShard(*row[:5], len(row[5])) for row in rows], T0)
        await uow.commit()


def _placed(snapshot: Snapshot, *, leaving: tuple[str, ...] = (), moving: dict[tuple[str, int, int], tuple[str, int]]
            | None = None) -> tuple[PlanPlacement, ...]:
    """The snapshot's placements as a plan keeps them, but `leaving` deployments' and `moving`
    shards' ((deployment, replica, shard) -> (node, accelerator index))."""
    moving = moving or {}
    kept = []
    for p in snapshot.problem["placements"]:
        key = (p["deployment"], p["replica"], p["shard"])
        if p["deployment"] in leaving:
            continue
        node, indices = p["node"], tuple(p["accelerator_indices"])
        if key in moving:
            node, indices = moving[key][0], (moving[key][1],)
        kept.append(PlanPlacement(*key, node, indices, p.get("accelerator_milli")))
    return tuple(kept)


async def _commit(session: AsyncSession, plan_of: Any, at: datetime) -> None:
    snapshot = await load_snapshot(session)
    await commit_plan(session, snapshot, plan_of(snapshot), actor="test", now=at)


async def _ids(session: AsyncSession, deployment: str, *, node: str | None = None) -> list[int]:
    tenant, name = deployment.split("/")
    query = (select(m.Placement.id).join(m.Deployment)
             .where(m.Deployment.tenant_id == tenant, m.Deployment.name == name))
    return list(await session.scalars(query if node is None else query.where(m.Placement.node_id == node)))


async def test_every_path_that_closes_intervals_moves_the_totals(database: Database) -> None:
    await _metered_cluster(database)
    h = timedelta(hours=1)

    async def moved(s: AsyncSession) -> None:  # a plan commit moving a shard: closed on n1, opened on n2
        await _commit(s, lambda snap: Plan("optimal", _placed(snap, moving={("a/web", 0, 0): ("n2", 3)}),
                                           moved=(Move("a/web", 0, 0, "n1", "n2"),)), T0 + h)

    async def preempted(s: AsyncSession) -> None:  # a plan commit preempting a replica
        await _commit(s, lambda snap: Plan("optimal", _placed(snap, leaving=("b/burst",)),
                                           preempted=(Preemption("b/burst", 0),)), T0 + 2 * h)

    async def node_removed(s: AsyncSession) -> None:  # a node drained or deleted: its shards removed
        await repo.remove_placements_on_node(s, "n3", now=T0 + 3 * h)

    async def quarantined(s: AsyncSession) -> None:
        assert await repo.quarantine_deployment(s, "a/train", "a stored row beyond today's limits", T0 + 4 * h)

    async def released(s: AsyncSession) -> None:  # a rollout's retired or a failed replica released
        await stop_placements(s, await _ids(s, "b/chat", node="n1"), {"n1"}, T0 + 5 * h, ["b/chat"])

    async def shrunk(s: AsyncSession) -> None:  # n2 registered with 2 accelerators: chat 1 (index 2) and web 0 (3) go
        assert set(await repo.release_placements_beyond(s, {"n2": 2})) == {"n2"}

    for path in (moved, preempted, node_removed, quarantined, released, shrunk):
        closed_before = await _open_count(database, closed=True)
        async with database.unit_of_work() as uow:
            await path(uow.session)
            await uow.commit()
        assert await _open_count(database, closed=True) > closed_before, path.__name__
        # Until well after the last close (release_placements_beyond closes at the wall clock).
        await _assert_to_date_is_the_whole_history(database, datetime.now(timezone.utc) + h, path.__name__)
    async with database.unit_of_work() as uow:
        assert (await uow.session.execute(select(m.UsageInterval.deployment).where(
            m.UsageInterval.ended_s.is_(None)))).scalars().all() == []  # every path above closed its share


async def _close(database: Database, placement_ids: list[int], at: datetime) -> None:
    async with database.unit_of_work() as uow:
        await metering.stop_intervals(uow.session, placement_ids, at)
        await uow.commit()


async def _opened(database: Database, count: int) -> None:
    rng = random.Random(count)
    async with database.unit_of_work() as uow:
        await uow.session.execute(insert(m.UsageInterval.__table__),
                                  [_interval(rng, i, metering.epoch_s(T0) - 60.0 * i) for i in range(1, count + 1)])
        await uow.commit()


async def _deltas(database: Database) -> int:
    async with database.unit_of_work() as uow:
        return await uow.session.scalar(select(func.count()).select_from(m.ClosedUsageDelta))


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_writers_closing_at_once_never_wait_and_lose_nothing(database: Database) -> None:
    """PostgreSQL: the first closer folds and holds the fold to its end; a second one meanwhile adds
    its closes as deltas without waiting; the readers count both, folded or not, and a rolled-back
    close counts nothing."""
    await _opened(database, 6)
    async with database.unit_of_work() as first:
        await metering.stop_intervals(first.session, [1, 2], T0 + timedelta(hours=1))  # folds: holds the lock
        async with database.unit_of_work() as second:
            await asyncio.wait_for(metering.stop_intervals(second.session, [3, 4], T0 + timedelta(hours=2)), 10)
            await asyncio.wait_for(second.commit(), 10)
        assert await _deltas(database) > 0  # the second's, not folded
        await _assert_to_date_is_the_whole_history(database, T0 + timedelta(hours=3), "first in flight")
        await first.rollback()
    await _assert_to_date_is_the_whole_history(database, T0 + timedelta(hours=3), "first rolled back")
    await _close(database, [5], T0 + timedelta(hours=3))
    assert await _deltas(database) == 0  # the third folded the second's deltas with its own
    await _assert_to_date_is_the_whole_history(database, T0 + timedelta(hours=4), "folded")


_CLOSING_CALLS = text("SELECT funcname, calls FROM pg_stat_xact_user_functions WHERE funcname LIKE 'maia_%usage'")


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_opening_calls_no_trigger_and_a_close_one_per_statement(database: Database) -> None:
    """PostgreSQL: the INSERTs that open intervals (an executemany: a statement per row) call no
    function of the triggers; a statement closing many intervals calls one."""
    async with database.unit_of_work() as uow:
        s = uow.session
        await s.execute(text("SET LOCAL track_functions = 'pl'"))  # this transaction's calls, as they happen
        rng = random.Random(1)
        await s.execute(insert(m.UsageInterval.__table__),
                        [_interval(rng, i, metering.epoch_s(T0)) for i in range(1, 41)])
        assert (await s.execute(_CLOSING_CALLS)).all() == []
        await metering.stop_intervals(s, list(range(1, 41)), T0 + timedelta(hours=1))
        assert dict((await s.execute(_CLOSING_CALLS)).all()) == {"maia_close_usage": 1}
        await uow.commit()
    await _assert_to_date_is_the_whole_history(database, T0 + timedelta(hours=1))


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_an_interval_closed_while_the_migration_runs_is_counted_once(db_url: str) -> None:
    """PostgreSQL, migrated by hand while an older controller still writes: a close in flight when
    the migration starts, committed while the migration waits for its lock on usage_intervals, is
    in the sums once (neither missed by the backfill nor counted by a trigger too)."""
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "0027_known_tenants")
    db = Database(db_url)
    try:
        await _opened(db, 3)
        async with db.unit_of_work() as writer:
            await writer.session.execute(text("UPDATE usage_intervals SET ended_s = :at WHERE placement_id = 1"),
                                         {"at": metering.epoch_s(T0 + timedelta(hours=1))})
            await upgrade_past(writer, db_url, db, "usage_intervals")
        await _assert_to_date_is_the_whole_history(db, T0 + timedelta(hours=2))
    finally:
        await db.dispose()


def _reference_window(group: tuple[str, ...], now: datetime, since: datetime | None, until: datetime | None,
                      tenant: str) -> tuple[str, dict[str, Any]]:
    """`usage_by`'s statement as it was written before the ended_s index served windows (its
    `coalesce(ended_s, end) > start`): the sums a window must keep giving."""
    end = min(metering.epoch_s(until), metering.epoch_s(now)) if until is not None else metering.epoch_s(now)
    start = metering.epoch_s(since) if since is not None else 0.0
    names = {"tenant": "tenant_id", "deployment": "deployment", "accelerator_model": "accelerator_model",
             "zone": "zone_id"}
    keys = ", ".join(names[g] for g in group)
    seconds = ("(CASE WHEN coalesce(ended_s, :end) < :end THEN coalesce(ended_s, :end) ELSE :end END"
               " - CASE WHEN started_s > :start THEN started_s ELSE :start END)")
    sql = (f"SELECT {keys}, sum({seconds} * accelerator_milli / 1000.0), "
           f"sum({seconds} * (load_power_w + idle_share_w)) "
           f"FROM usage_intervals WHERE started_s < :end AND coalesce(ended_s, :end) > :start "
           f"{'AND tenant_id = :tenant ' if tenant else ''}GROUP BY {keys}")
    return sql, {"end": end, "start": start, "tenant": tenant}


async def test_a_window_sums_what_it_summed_and_reads_its_intervals_by_their_end(database: Database) -> None:
    """`maiactl usage --since/--until`: every window (open-ended, in the future, empty, reversed by
    a `now` before `since`) sums what the statement before this change summed; a recent window
    reads its intervals through the ended_s index, not the whole table."""
    rng = random.Random(12)
    base = metering.epoch_s(T0)
    rows = []
    for i in range(400):
        started = base + rng.uniform(0, 30 * 86_400)
        rows.append(_interval(rng, i, started, None if rng.random() < 0.1 else started + rng.uniform(0, 86_400)))
    async with database.unit_of_work() as uow:
        await uow.session.execute(insert(m.UsageInterval.__table__), rows)
        await uow.commit()
    at = lambda days: T0 + timedelta(days=days)  # noqa: E731
    windows = [(None, None, 31), (at(3), None, 31), (None, at(10), 31), (at(5), at(6), 31), (at(20), at(40), 25),
               (at(29), at(30), 31), (at(10), at(11), 8), (at(40), at(50), 31)]
    full = ("tenant", "deployment", "accelerator_model", "zone")
    async with database.unit_of_work() as uow:
        for since, until, now_days in windows:
            for group, tenant in ((full, ""), (("tenant",), ""), (full, "lab")):
                sql, params = _reference_window(group, at(now_days), since, until, tenant)
                reference = {tuple(row[:-2]): pytest.approx((float(row[-2]), float(row[-1])), rel=1e-9, abs=1e-6)
                             for row in await uow.session.execute(text(sql), params)}
                got = await metering.usage_by(uow.session, group, now=at(now_days), since=since, until=until,
                                              tenant=tenant)
                assert {tuple(getattr(t, g) for g in group): (t.accelerator_seconds, t.energy_j)
                        for t in got} == reference, (since, until, now_days, group, tenant)

    seen: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        seen.append((statement, parameters))

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        async with database.unit_of_work() as uow:
            await metering.usage_by(uow.session, full, now=at(31), since=at(30), until=at(31))
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)
    [(sql, params)] = [(sql, params) for sql, params in seen if "usage_intervals" in sql]
    async with database.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql("SET enable_seqscan = off")  # would an index serve it? (a small table)
            plan = "\n".join(row[0] for row in await conn.exec_driver_sql(f"EXPLAIN {sql}", params))
        else:
            await conn.exec_driver_sql("ANALYZE")
            plan = "\n".join(row[-1] for row in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "ix_usage_intervals_ended_s" in plan and "ix_usage_intervals_tenant_started" not in plan, plan


async def test_an_interval_closed_by_a_clock_behind_its_opener_ends_where_it_began(database: Database) -> None:
    """Controllers' clocks differ: an interval opened by a leader 2 minutes ahead and closed by
    the next (or its node's shards stopped by it) would end before it began, and its negative
    seconds and joules be summed into the totals, whose counters must never go back. It ends
    where it began: it counts nothing, and the totals stay the whole history."""
    rng = random.Random(7)
    ahead = metering.epoch_s(T0) + 120.0
    async with database.unit_of_work() as uow:
        await uow.session.execute(insert(m.UsageInterval.__table__),
                                  [_interval(rng, 1, ahead), _interval(rng, 2, ahead)])
        await uow.commit()
    async with database.unit_of_work() as uow:
        await metering.stop_intervals(uow.session, [1], T0)
        node = await uow.session.scalar(select(m.UsageInterval.node_id).where(m.UsageInterval.placement_id == 2))
        await metering.stop_intervals_on_node(uow.session, node, T0)
        await uow.commit()
    async with database.unit_of_work() as uow:
        ends = (await uow.session.execute(select(m.UsageInterval.started_s, m.UsageInterval.ended_s))).all()
        assert sorted(ends) == [(ahead, ahead), (ahead, ahead)]
        sums = await _closed_sums(uow.session)
        assert sums and all(value == (0.0, 0.0) for value in sums.values()), sums
    await _assert_to_date_is_the_whole_history(database, T0 + timedelta(hours=1), "closed by a clock behind")
