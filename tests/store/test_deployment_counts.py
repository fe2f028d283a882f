"""The schedulable deployments, and each tenant's deployments, as the database's triggers count
them (migrations 0016, 0017).

`changes.schedulable_count` reads the count the triggers keep instead of counting the
deployments; here every kind of write that changes it (inserts of one and of many rows, phase
moves into and out of DELETING and QUARANTINED, moves between schedulable phases, deletes) is
checked against a real count, on both backends, and on PostgreSQL writers that change it at the
same time neither wait for each other nor lose a change (a rolled-back one counts nothing).
"""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.migrate import alembic_config

from .migrating import upgrade_past

_LEAVING = (m.DeploymentPhase.DELETING, m.DeploymentPhase.QUARANTINED)


def _rows(names: list[str], phase: m.DeploymentPhase = m.DeploymentPhase.PENDING, tenant: str = "t1") -> list[dict]:
    return [{"name": name, "tenant_id": tenant, "replicas": 1, "min_replicas": 1, "shards_per_replica": 1,
             "shard_accelerators": 1, "shard_accelerator_milli": 1000, "shard_hbm_gib": 0.0, "shard_cpu_milli": 0,
             "shard_memory_mib": 0, "shard_power_w": 0.0, "shard_accelerator_models": [],
             "locality": m.Domain.NODE, "priority": 0, "preemptible": False, "phase": phase} for name in names]


async def _insert(session: AsyncSession, names: list[str], phase: m.DeploymentPhase = m.DeploymentPhase.PENDING,
                  tenant: str = "t1") -> None:
    await session.execute(insert(m.Deployment.__table__), _rows(names, phase, tenant))


async def _counts(database: Database, *, tenants: bool = True) -> tuple[int, int]:
    """(the triggers' count, a real count of the schedulable deployments), read in a fresh unit of
    work; each tenant's deployments as the triggers count them are checked against a real count
    (`tenants`: counted there, migration 0017)."""
    async with database.unit_of_work() as uow:
        kept = await repo.count_schedulable_deployments(uow.session)
        real = await uow.session.scalar(select(func.count()).select_from(m.Deployment)
                                        .where(m.Deployment.phase.not_in(_LEAVING)))
        by_tenant = dict((await uow.session.execute(select(m.Deployment.tenant_id, func.count())
                                                    .group_by(m.Deployment.tenant_id))).all())
        for tenant in ("t1", "t2") if tenants else ():
            assert await repo.count_tenant_deployments(uow.session, tenant) == by_tenant.get(tenant, 0), tenant
    return kept, int(real or 0)


async def _add_tenant(session: AsyncSession, tenant: str) -> None:
    """A tenant row of the columns every revision these tests run at has (the ORM writes every
    column the model has, a later migration's too)."""
    await session.execute(insert(m.Tenant.__table__).values(id=tenant, isolation=m.Isolation.SHARED, excludes=[],
                                                            zones=[]))


async def _tenant(database: Database) -> None:
    async with database.unit_of_work() as uow:
        for tenant in ("t1", "t2"):
            await _add_tenant(uow.session, tenant)
        await uow.commit()


async def test_the_count_follows_every_write_that_changes_it(database: Database) -> None:
    await _tenant(database)
    phase = m.Deployment.phase
    steps = [
        lambda s: _insert(s, [f"d{i}" for i in range(6)]),  # many rows, one statement
        lambda s: _insert(s, ["lone"]),
        lambda s: _insert(s, ["other"], m.DeploymentPhase.DELETING, tenant="t2"),  # another tenant's, born leaving
        lambda s: _insert(s, ["gone"], m.DeploymentPhase.DELETING),  # born leaving: not counted
        lambda s: s.execute(update(m.Deployment).where(m.Deployment.name.in_(["d0", "d1"]))
                            .values(phase=m.DeploymentPhase.DELETING)),
        lambda s: s.execute(update(m.Deployment).where(m.Deployment.name == "d2")
                            .values(phase=m.DeploymentPhase.QUARANTINED)),
        lambda s: s.execute(update(m.Deployment).where(m.Deployment.name == "d2")  # released
                            .values(phase=m.DeploymentPhase.PENDING)),
        lambda s: s.execute(update(m.Deployment).where(phase.not_in(_LEAVING))  # no count changes
                            .values(phase=m.DeploymentPhase.RUNNING)),
        lambda s: s.execute(update(m.Deployment).where(m.Deployment.name == "d1")  # between leaving phases
                            .values(phase=m.DeploymentPhase.QUARANTINED)),
        lambda s: s.execute(delete(m.Deployment).where(m.Deployment.name.in_(["d0", "d3", "other"]))),  # one counted
        lambda s: s.execute(delete(m.Deployment)),
    ]
    seen = []
    for step in steps:
        async with database.unit_of_work() as uow:
            await step(uow.session)
            await uow.commit()
        kept, real = await _counts(database)
        assert kept == real
        seen.append(kept)
    assert seen == [6, 7, 7, 7, 5, 4, 5, 5, 5, 4, 0]
    async with database.unit_of_work() as uow:  # a single writer folds what it added at once
        assert await uow.session.scalar(select(func.count()).select_from(m.DeploymentCountDelta)) == 0


async def test_a_rolled_back_write_counts_nothing(database: Database) -> None:
    await _tenant(database)
    async with database.unit_of_work() as uow:
        await _insert(uow.session, ["a", "b"])
        await uow.rollback()
    assert await _counts(database) == (0, 0)


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_writers_at_once_never_wait_for_the_count_and_lose_nothing(database: Database) -> None:
    """PostgreSQL: the first writer folds and holds the fold until it ends; a second one meanwhile
    adds its change as a delta without waiting, and the count reads both as committed."""
    await _tenant(database)
    async with database.unit_of_work() as first:
        await _insert(first.session, ["first-a", "first-b"])  # folds: holds the lock and the count's row
        async with database.unit_of_work() as second:
            await asyncio.wait_for(_insert(second.session, ["second"]), 10)  # would wait on the row if it folded
            await asyncio.wait_for(second.commit(), 10)
        assert await _counts(database) == (1, 1)  # the second's delta, not folded, is counted
        async with database.unit_of_work() as uow:
            assert await uow.session.scalar(select(func.count()).select_from(m.DeploymentCountDelta)) == 1
        await first.rollback()
    assert await _counts(database) == (1, 1)
    async with database.unit_of_work() as third:
        await _insert(third.session, ["third"])
        await third.commit()
    assert await _counts(database) == (2, 2)
    async with database.unit_of_work() as uow:  # the third folded the second's delta with its own
        assert await uow.session.scalar(select(func.count()).select_from(m.DeploymentCountDelta)) == 0


async def test_the_migration_counts_the_deployments_already_there(db_url: str) -> None:
    cfg = alembic_config(db_url)
    await asyncio.to_thread(command.upgrade, cfg, "0015_deployments_name_index")
    db = Database(db_url)
    try:
        async with db.unit_of_work() as uow:
            await _add_tenant(uow.session, "t1")
            await _insert(uow.session, ["x", "y", "z"])
            await _insert(uow.session, ["w"], m.DeploymentPhase.DELETING)
            await uow.commit()
        await asyncio.to_thread(command.upgrade, alembic_config(db_url), "head")
        assert await _counts(db) == (3, 3)
        async with db.unit_of_work() as uow:
            assert (await uow.session.execute(text("SELECT id, schedulable FROM deployment_counts"))).all() == [(1, 3)]
    finally:
        await db.dispose()


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_write_in_flight_while_the_migration_runs_is_counted(db_url: str) -> None:
    """PostgreSQL, migrated by hand while an older controller still writes: a submit in flight when
    the migration starts, committed while the migration waits for its lock on the deployments,
    is in the count (neither missed by the first count nor counted twice)."""
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "0015_deployments_name_index")
    db = Database(db_url)
    try:
        await _tenant(db)
        async with db.unit_of_work() as writer:
            await _insert(writer.session, ["in-flight"])
            await upgrade_past(writer, db_url, db, "deployments")
        assert await _counts(db) == (1, 1)
    finally:
        await db.dispose()


_COUNTING_CALLS = text("SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions "
                       "WHERE funcname IN ('maia_count_deployments', 'maia_count_deployment_moves')")


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_updates_that_change_no_count_run_no_trigger(database: Database) -> None:
    """PostgreSQL (migration 0017): updates of deployments that move none into or out of the
    schedulable phases (a plan commit's phases and reasons, a report flush's: executemany, one
    statement per row) call none of the counting triggers' functions; a move that changes the
    count calls one per row moved, and the count stays exact."""
    await _tenant(database)
    async with database.unit_of_work() as uow:
        await _insert(uow.session, [f"d{i}" for i in range(4)])
        await uow.commit()
    table = m.Deployment.__table__
    by_name = update(table).where(table.c.name == bindparam("n"))
    async with database.unit_of_work() as uow:
        s = uow.session
        await s.execute(text("SET LOCAL track_functions = 'pl'"))  # this transaction's calls, as they happen
        await s.execute(by_name.values(phase=bindparam("p"), reasons=bindparam("r")),
                        [{"n": f"d{i}", "p": m.DeploymentPhase.RUNNING, "r": [{"code": "X", "message": str(i)}]}
                         for i in range(4)])
        await s.execute(update(table).values(reasons=[]))  # no phase in the statement at all
        assert await s.scalar(_COUNTING_CALLS) == 0
        await s.execute(by_name.values(phase=bindparam("p")), [{"n": "d0", "p": m.DeploymentPhase.DELETING},
                                                               {"n": "d1", "p": m.DeploymentPhase.QUARANTINED}])
        assert await s.scalar(_COUNTING_CALLS) == 2
        await uow.commit()
    assert await _counts(database) == (2, 2)


async def test_the_count_stays_exact_through_migration_0017_and_back(db_url: str) -> None:
    """Upgraded from 0016 with deployments there, downgraded back to it: the count follows
    deletions and releases under either revision's triggers."""
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "0016_deployment_counts")
    db = Database(db_url)
    table = m.Deployment.__table__
    leaving = update(table).where(table.c.name == bindparam("n"))
    try:
        await _tenant(db)
        async with db.unit_of_work() as uow:
            await _insert(uow.session, ["a", "b", "c"])
            await uow.commit()
        for revision, name, phase, expected in (("head", "a", m.DeploymentPhase.DELETING, 2),
                                                ("0016_deployment_counts", "b", m.DeploymentPhase.QUARANTINED, 1),
                                                ("head", "b", m.DeploymentPhase.PENDING, 2)):
            move = command.upgrade if revision == "head" else command.downgrade
            await asyncio.to_thread(move, alembic_config(db_url), revision)
            async with db.unit_of_work() as uow:
                await uow.session.execute(leaving.values(phase=phase), [{"n": name}])
                await uow.commit()
            assert await _counts(db, tenants=revision == "head") == (expected, expected)
    finally:
        await db.dispose()
