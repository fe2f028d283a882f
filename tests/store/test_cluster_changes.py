"""The cluster change log (store/changes.py): every generation bump says what it changed, in
its own transaction; a reader above a generation gets every change since, or learns that one
is missing (pruned, or a bump that logged nothing) and reads the whole cluster."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from controller.domain.changes import ChangeKind, ClusterChange
from controller.store import changes
from controller.store.db import Database
from controller.store import repositories as repo
from controller.store.models import Base, ClusterChangeRow, ClusterState, Deployment, DeploymentPhase
from controller.store.plans import bump_cluster_generation, read_changes_since
from controller.store.marks import deferred_writes
from controller.store.sqlite_driver import counted_trips

from .seed import TWO_RACKS, seed_problem


async def test_each_bump_logs_what_it_changed(database: Database) -> None:
    async with database.unit_of_work() as uow:
        assert await bump_cluster_generation(uow.session, ClusterChange.nodes(["n2", "n1", "n2"])) == 1
        await bump_cluster_generation(uow.session, ClusterChange.deployment_deleted("t1/chat"))
        await bump_cluster_generation(uow.session)  # said nothing: OTHER
        await uow.commit()
    async with database.unit_of_work() as uow:
        since = await read_changes_since(uow.session, 0)
        later = await read_changes_since(uow.session, 2)
        none = await read_changes_since(uow.session, 3)
    assert since.generation == 3 and since.complete
    assert since.changes == {1: [(ChangeKind.NODE, "n1"), (ChangeKind.NODE, "n2")],
                             2: [(ChangeKind.DEPLOYMENT_DELETED, "t1/chat")],
                             3: [(ChangeKind.OTHER, None)]}
    assert later.complete and later.changes == {3: [(ChangeKind.OTHER, None)]}
    assert none.complete and none.changes == {}


async def test_a_rolled_back_bump_leaves_no_change(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await bump_cluster_generation(uow.session, ClusterChange.node("n1"))
        # not committed
    async with database.unit_of_work() as uow:
        since = await read_changes_since(uow.session, 0)
    assert since.generation == 0 and since.changes == {} and since.complete


async def test_a_generation_without_its_change_is_incomplete(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await bump_cluster_generation(uow.session, ClusterChange.node("n1"))
        await changes.move_generation(uow.session, 1)  # a writer that logs nothing (an older controller)
        await bump_cluster_generation(uow.session, ClusterChange.node("n2"))
        await uow.commit()
    async with database.unit_of_work() as uow:
        assert not (await read_changes_since(uow.session, 0)).complete
        assert (await read_changes_since(uow.session, 2)).complete
        assert not (await read_changes_since(uow.session, 5)).complete  # ahead of the database: never trusted


async def _bump_unread(session, change: ClusterChange) -> None:
    with deferred_writes():
        await changes.bump_cluster_generation_unread(session, change)


@pytest.mark.parametrize("bump", [bump_cluster_generation, _bump_unread], ids=["read", "unread"])
async def test_old_generations_are_pruned(database: Database, monkeypatch, bump) -> None:
    monkeypatch.setattr(changes, "CHANGES_KEPT", 3)
    monkeypatch.setattr(changes, "_PRUNE_EVERY", 5)
    async with database.unit_of_work() as uow:
        for i in range(1, 11):
            await bump(uow.session, ClusterChange.node(f"n{i}"))
        await uow.commit()
    async with database.unit_of_work() as uow:
        kept = sorted((await uow.session.execute(select(ClusterChangeRow.generation))).scalars())
        since = await read_changes_since(uow.session, 7)
        behind = await read_changes_since(uow.session, 1)
    assert kept == [8, 9, 10]  # the bump to 10 pruned up to 7 (the bump to 5 up to 2)
    assert since.complete and not behind.complete


async def test_changes_up_to_a_generation_read_before_stop_there(database: Database) -> None:
    """A reconcile pass reads the generation first, then the changes up to it (no second read
    of the generation): a later bump is left for the next pass."""
    async with database.unit_of_work() as uow:
        for node in ("n1", "n2", "n3"):
            await bump_cluster_generation(uow.session, ClusterChange.node(node))
        await uow.commit()
    async with database.unit_of_work() as uow:
        upto = await read_changes_since(uow.session, 0, generation=2)
    assert upto.generation == 2 and upto.complete
    assert upto.changes == {1: [(ChangeKind.NODE, "n1")], 2: [(ChangeKind.NODE, "n2")]}


async def test_the_generation_and_the_schedulable_count_read_together(database: Database) -> None:
    """One statement for what `read_cluster_generation` and `count_schedulable_deployments`
    say apart: deployments being deleted or quarantined are not counted."""
    doc = {**TWO_RACKS, "nodes": [{"id": "n1", "rack": "rack1", "accelerators": 4}],
           "tenants": [{"id": "t1"}],
           "deployments": [{"id": f"t1/d{i}", "tenant": "t1", "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": 1}} for i in range(4)]}
    async with database.unit_of_work() as uow:
        assert await changes.read_generation_and_schedulable(uow.session) == (0, 0)
        await seed_problem(uow.session, doc)
        rows = list((await uow.session.execute(select(Deployment).order_by(Deployment.id))).scalars())
        rows[1].phase = DeploymentPhase.DELETING
        rows[2].phase = DeploymentPhase.QUARANTINED
        await bump_cluster_generation(uow.session, ClusterChange.node("n1"))
        await bump_cluster_generation(uow.session, ClusterChange.node("n1"))
        await uow.commit()
    async with database.unit_of_work() as uow:
        both = await changes.read_generation_and_schedulable(uow.session)
        assert both == (await repo.read_cluster_generation(uow.session),
                        await repo.count_schedulable_deployments(uow.session)) == (2, 2)


async def test_an_unread_bump_logs_its_change_at_the_generation_it_moved_to_without_a_trip(database: Database) -> None:
    """On SQLite inside `deferred_writes` the bump, its change rows and the pruning go to SQLite
    with the commit (a delete batch's writes: no trip of their own while it holds the writer)."""
    async with database.unit_of_work() as uow:
        await bump_cluster_generation(uow.session, ClusterChange.node("n1"))
        with counted_trips() as trips:
            await _bump_unread(uow.session, ClusterChange.deployment_deleted("t1/b", "t1/a"))
            await _bump_unread(uow.session, ClusterChange())
        await uow.commit()
    if database.url.startswith("sqlite"):
        assert trips == []
    async with database.unit_of_work() as uow:
        since = await read_changes_since(uow.session, 0)
    assert since.generation == 3 and since.complete
    assert since.changes == {1: [(ChangeKind.NODE, "n1")],
                             2: [(ChangeKind.DEPLOYMENT_DELETED, "t1/a"), (ChangeKind.DEPLOYMENT_DELETED, "t1/b")],
                             3: [(ChangeKind.OTHER, None)]}


async def test_an_unread_bump_without_the_generation_row_fails_its_transaction(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await uow.session.execute(delete(ClusterState))
        await uow.commit()
    with pytest.raises((IntegrityError, changes.MissingGeneration)):
        async with database.unit_of_work() as uow:
            await _bump_unread(uow.session, ClusterChange.node("n1"))
            await uow.commit()
    async with database.unit_of_work() as uow:
        assert list((await uow.session.execute(select(ClusterChangeRow.id))).scalars()) == []


def _pruning_steps(generation: int, rows_below_cut: int) -> int:
    """SQLite virtual machine steps of `bump_cluster_generation_unread`'s pruning at `generation`
    (CHANGES_KEPT 10, _PRUNE_EVERY 100) over a log with `rows_below_cut` rows it may prune."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine, tables=[ClusterState.__table__, ClusterChangeRow.__table__])
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    with engine.begin() as conn:
        conn.execute(insert(ClusterState), [{"id": 1, "generation": generation}])
        if rows_below_cut:
            conn.execute(insert(ClusterChangeRow), [{"generation": 1 + i % (generation - 10), "kind": "node"}
                                                    for i in range(rows_below_cut)])
        conn.connection.dbapi_connection.set_progress_handler(step, 1)
        conn.execute(changes._PRUNE_AT_CURRENT, {"every": 100, "kept": 10})
        conn.connection.dbapi_connection.set_progress_handler(None, 1)
    engine.dispose()
    return steps


def test_an_unread_bump_not_due_to_prune_does_not_walk_the_rows_it_would_prune() -> None:
    """The unread pruning runs with every bump (whether its generation is due is the database's
    to say): one that is not due costs the same however many rows lie below the cut (up to
    `_PRUNE_EVERY` generations' of them between prunes), not a visit to each, held under SQLite's writer."""
    assert _pruning_steps(150, 5_000) == _pruning_steps(150, 500)
    assert _pruning_steps(200, 5_000) > _pruning_steps(200, 500)  # due: it prunes them
