"""A node's deletion beside a plan commit that lands shards on that node (store/changes.py).

A scoped plan commit (`plans.commit._commit_locking_last`, the generation writers' lock shared) holds
isolation_state's row from its first placement write (here a DELETE, the isolation trigger) and
then inserts shards on a node, whose row its foreign key check locks `FOR KEY SHARE`. A node's
deletion deleted its row and then waited for isolation_state's row (the nodes' DELETE trigger): the
commit waited for the deleted row, the deletion for isolation_state, and PostgreSQL aborted one as a
deadlock (SQLSTATE 40P01). Taking isolation_state first would not do: a commit's INSERT locks the
node's row (its foreign key check, a row trigger) before the statement's isolation trigger waits
for isolation_state, and a commit that deletes or moves a shard on the node holds that shard's row
while it waits, both of which the deletion then waits for. So a node's deletion runs alone among
the transactions that move the generation (the generation writers' lock exclusive): it waits for
the commit to end, then releases the shards the commit landed. A commit whose node is deleted
between its check and its writes meets the foreign key (no longer the row's lock) and commits as
one that found the node gone: those replicas are re-queued, the rest of its plan lands. A node not
stored is NOT_FOUND without that lock (a plan commit in flight holds it); one deleted while the
deletion waited for it is NOT_FOUND from the read under it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from controller.errors import NotFound
from controller.identity import Principal
from controller.store import plans
from controller.store.plans import commit as plan_commit
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import nodes
from controller.usecases.ports import RecordingSignals
from scheduler import Plan

from .test_commit_plan import BURST, KEPT, P, TRAIN, WEB, _behind_a_held_row, _seeded, _state, _waiting_for_locks
from .test_register_lock_order import _one_line

POSTGRES = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
ADMIN = Principal("admin")
# WEB's replica 1 (on n3) removed, TRAIN's two shards placed on n2, which holds none: the commit's
# DELETE takes isolation_state's row, then its INSERT checks n2's row (the foreign key).
REMOVES_AND_LANDS_ON_N2 = Plan("optimal", (*(p for p in KEPT if (p.deployment, p.replica) != (WEB, 1)),
                                           P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))
ISOLATION_STATE = "SELECT id FROM isolation_state WHERE id = 1 FOR NO KEY UPDATE"


async def _delete(database: Database, node_id: str) -> list[str]:
    signals = RecordingSignals()
    async with database.unit_of_work() as uow:
        await nodes.delete_node(uow, ADMIN, node_id, signals)
    return signals.removed_nodes


@POSTGRES
async def test_a_nodes_deletion_and_a_plan_commit_landing_on_it_both_commit(database: Database) -> None:
    """isolation_state's row held: the commit deletes WEB's replica 1 and waits for it; then n2 (no
    shards) is deleted. Before, the deletion deleted n2's row and waited for isolation_state's row
    too; the commit, once it had it, waited for n2's row (its INSERT's foreign key): deadlock
    detected. Now the deletion waits for the commit (the generation writers' lock) and releases the
    shards it landed on n2."""
    snapshot = await _seeded(database)

    async def commit() -> None:
        async with database.unit_of_work() as uow:
            result = await plans.commit_plan(uow.session, snapshot, REMOVES_AND_LANDS_ON_N2, scope={WEB, TRAIN},
                                             actor="test")
            await uow.commit()
        assert result.requeued == {} and result.changed_nodes == {"n2", "n3"}

    async def delete() -> None:
        assert await _delete(database, "n2") == ["n2"]

    errors = await _behind_a_held_row(database, ISOLATION_STATE, _one_line(commit), _one_line(delete))
    assert errors == []
    after = await _state(database)
    assert "n2" not in after["nodes"]
    assert sorted(after["placements"]) == [(WEB, 0, 0), ("b/burst", 0, 0)]  # TRAIN's released with n2
    assert [(kind, data) for kind, object_id, data, _ in after["events"] if object_id == "n2"] == [
        ("node.deleted", {"released_shards": True})]


@POSTGRES
async def test_a_nodes_deletion_and_a_plan_commit_removing_its_shard_both_commit(database: Database) -> None:
    """BURST's shard held: the commit, which removes WEB's replica 1 (on n3) and moves BURST to n2,
    locks the two shards in ascending id (WEB's first) and waits for BURST's; then n3 is deleted.
    A deletion that took isolation_state's row before it read n3's shards waited for WEB's, which
    the commit held while, BURST's let go, its DELETE's trigger waited for isolation_state's row:
    deadlock detected (checked with that order instead of the generation writers' lock). Alone,
    the deletion waits for the commit and then finds n3 without shards."""
    snapshot = await _seeded(database)
    ids = {key[:2]: where[4] for key, where in (await _state(database))["placements"].items()}
    assert ids[(WEB, 1)] < ids[(BURST, 0)]
    plan = Plan("optimal", (P(WEB, 0, 0, "n1", 0), P(BURST, 0, 0, "n2", 0, 1, 2, 3)))

    async def commit() -> None:
        async with database.unit_of_work() as uow:
            result = await plans.commit_plan(uow.session, snapshot, plan, scope={WEB, BURST}, actor="test")
            await uow.commit()
        assert result.requeued == {} and result.changed_nodes == {"n2", "n3", "n4"}

    async def delete() -> None:
        assert await _delete(database, "n3") == ["n3"]

    errors = await _behind_a_held_row(database, f"SELECT id FROM placements WHERE id = {ids[(BURST, 0)]} "
                                                "FOR NO KEY UPDATE", _one_line(commit), _one_line(delete))
    assert errors == []
    after = await _state(database)
    assert "n3" not in after["nodes"]
    assert {key: where[0] for key, where in after["placements"].items()} == {(WEB, 0, 0): "n1", (BURST, 0, 0): "n2"}


@pytest.mark.parametrize("db_backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_plan_commit_whose_node_was_deleted_after_its_check_requeues_what_landed_there(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """n2 deleted once the scoped commit has checked its plan early (n2 was there): on PostgreSQL its
    INSERT on n2 meets the foreign key (its writes undone to its savepoint), and it commits as one
    that takes the generation's lock first, which judges the plan against the nodes as they are;
    on SQLite it reads again under the writer's lock. TRAIN is re-queued (n2 is gone), WEB's replica
    1 removed: no error, nothing of TRAIN written."""
    snapshot = await _seeded(database)
    real_check = plan_commit._check
    deleted: list[str] = []

    async def deleted_after_the_check(*args: Any, **kwargs: Any) -> Any:
        checked = await real_check(*args, **kwargs)
        if not deleted:
            deleted.extend(await _delete(database, "n2"))
        return checked

    monkeypatch.setattr(plan_commit, "_check", deleted_after_the_check)
    laps: list[str] = []
    async with database.unit_of_work() as uow:
        result = await plans.commit_plan(uow.session, snapshot, REMOVES_AND_LANDS_ON_N2, scope={WEB, TRAIN},
                                         actor="test", laps=laps.append)
        await uow.commit()
    assert deleted == ["n2"]
    if database.engine.dialect.name == "postgresql":  # undone at its writes (the INSERT), not after them
        assert laps[:2] == ["commit_early", "commit_undone"]
    assert result.requeued == {(TRAIN, 0): ("node n2 is gone: it takes no new shards",)}
    assert result.changed_nodes == {"n3"} and result.stale
    after = await _state(database)
    assert "n2" not in after["nodes"]
    assert sorted(after["placements"]) == [(WEB, 0, 0), ("b/burst", 0, 0)]
    assert [kind for kind, object_id, *_ in after["events"] if object_id == TRAIN] == ["deployment.requeued"]



@POSTGRES
async def test_deleting_a_node_not_stored_answers_while_a_plan_commit_holds_the_generation_lock(
        database: Database) -> None:
    """isolation_state's row held: a scoped commit (the generation writers' lock shared, with its
    BEGIN) waits for it. DeleteNode of a node not stored answers NOT_FOUND while the commit still
    waits, holding that lock; before, it waited for the lock exclusive (until the commit ended)
    and only then read that the node was not there."""
    snapshot = await _seeded(database)

    async def commit() -> None:
        async with database.unit_of_work() as uow:
            await plans.commit_plan(uow.session, snapshot, REMOVES_AND_LANDS_ON_N2, scope={WEB, TRAIN}, actor="test")
            await uow.commit()

    async with database.engine.connect() as holder:
        transaction = await holder.begin()
        assert (await holder.execute(text(ISOLATION_STATE))).all()
        committing = asyncio.create_task(_one_line(commit)())
        await _waiting_for_locks(database, 1)
        try:
            with pytest.raises(NotFound, match="node n9 not found"):
                await asyncio.wait_for(_delete(database, "n9"), 30)  # bound only against a hang
            answered_first = not committing.done()
        finally:
            await transaction.rollback()
            await asyncio.wait_for(committing, 60)
    assert answered_first  # answered while the commit held the lock
    assert "n2" in (await _state(database))["nodes"]


@pytest.mark.parametrize("db_backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_node_deleted_while_its_deletion_waits_for_the_lock_is_not_found(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """n2 is stored when its deletion first reads it, and deleted by another deletion before this
    one has the generation writers' lock: the read under the lock answers NOT_FOUND (not a delete
    of a row that is gone), and n2's deletion is recorded once."""
    await _seeded(database)
    alone = repo.moves_generation_alone
    deleted: list[str] = []
    other = asyncio.Event()

    async def deleted_first(session: Any) -> None:
        if not other.is_set():  # this deletion's: the other one (its own transaction) runs first
            other.set()
            deleted.extend(await _delete(database, "n2"))
        await alone(session)

    monkeypatch.setattr(repo, "moves_generation_alone", deleted_first)
    with pytest.raises(NotFound, match="node n2 not found"):
        await _delete(database, "n2")
    assert deleted == ["n2"]
    events = (await _state(database))["events"]
    assert [kind for kind, object_id, *_ in events if object_id == "n2"] == ["node.deleted"]
