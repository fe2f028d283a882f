"""PostgreSQL's lock order (store/changes.py): each table's rows in ascending id, in every
transaction that writes more than one, as a plan commit and a report flush take them
(tests/store/test_commit_plan.py provokes theirs). Here the other writers of placements,
deployments and nodes over a list: the node lifecycle's health changes, a release of placements
(rollouts, failed replicas), a drain, the nodes' assignment generations moved by a quarantine, a
batch of deletions; and the ORM's deletions of a deployment's placements after its row's update
(a quarantine; shards beyond a node's accelerators were too, until those were released by
statements in the table order). Each test holds a row, starts a report flush that waits for it, then the writer,
which (the rows in the other order, as its statement's scan or its list found them) took a row
the flush wants next and waited for the held one: PostgreSQL aborted one of the two as a deadlock.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from controller.domain.liveness import Transition
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.release import stop_placements
from controller.usecases import liveness

from .test_commit_plan import (
    BURST, PLACED_TWO, TRAIN, WEB, _behind_a_held_row, _flush, _ids, _reports, _rewritten, _seeded, _state,
)

POSTGRES = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
_PLACEMENT_IDS = ("SELECT d.name || '/' || p.replica || '/' || p.shard, p.id FROM placements p "
                  "JOIN deployments d ON d.id = p.deployment_id")


async def _in_transaction(database: Database, write: Any) -> None:
    async with database.unit_of_work() as uow:
        await write(uow.session)
        await uow.commit()


@POSTGRES
async def test_the_node_lifecycle_writes_nodes_health_in_ascending_id(database: Database) -> None:
    """Health changes come in the liveness read's order, then evictions longest silent first: here
    n3's before n2's. The flush beats n2 and n3."""
    await _seeded(database)
    changes = [Transition("n3", "suspect", "silent", was="up"), Transition("n2", "suspect", "silent", was="up")]

    async def apply() -> None:
        async with database.unit_of_work() as uow:
            assert await liveness.apply_transitions(uow, changes, m.utcnow()) == changes

    errors = await _behind_a_held_row(database, "SELECT id FROM nodes WHERE id = 'n2' FOR NO KEY UPDATE",
                                      lambda: _flush(database, [], beats=("n2", "n3")), apply)
    assert errors == []
    async with database.unit_of_work() as uow:
        assert {node_id: health for node_id, _, health, _, _ in await repo.node_liveness_rows(uow.session)
                if node_id in ("n2", "n3")} == {"n2": m.NodeHealth.SUSPECT, "n3": m.NodeHealth.SUSPECT}


@POSTGRES
@pytest.mark.parametrize("table", ["placements", "nodes"])
async def test_a_release_of_placements_locks_them_and_their_nodes_in_ascending_id(database: Database,
                                                                                   table: str) -> None:
    """WEB's replica 1 (on n3) and BURST's shard (on n4) released: the placements DELETE and the
    nodes' UPDATE over their lists, the lower id's row rewritten (its new version last in the heap,
    where their scans found it last). The flush reports on both shards, or beats both nodes."""
    await _seeded(database)
    ids = await _ids(database, _PLACEMENT_IDS)
    web, burst = ids["web/1/0"], ids["burst/0/0"]
    assert web < burst
    if table == "placements":
        await _rewritten(database, f"UPDATE placements SET message = message WHERE id = {web}")
        held = f"SELECT id FROM placements WHERE id = {web} FOR NO KEY UPDATE"
        flush = _reports(("n3", "a", "web", 1, 0), ("n4", "b", "burst", 0, 0))
        beats: tuple[str, ...] = ()
    else:
        await _rewritten(database, "UPDATE nodes SET hostname = hostname WHERE id = 'n3'")
        held = "SELECT id FROM nodes WHERE id = 'n3' FOR NO KEY UPDATE"
        flush, beats = [], ("n3", "n4")
    errors = await _behind_a_held_row(
        database, held, lambda: _flush(database, flush, beats=beats),
        lambda: _in_transaction(database, lambda s: stop_placements(s, [web, burst], {"n3", "n4"}, m.utcnow(),
                                                                        [WEB, BURST])))
    assert errors == []
    after = await _state(database)
    assert (WEB, 1, 0) not in after["placements"] and (BURST, 0, 0) not in after["placements"]


@POSTGRES
async def test_the_assignment_generations_of_nodes_move_in_ascending_id(database: Database) -> None:
    """`bump_node_assignment_generations` (a quarantine, a quarantined deployment released, a
    node's shards released) over n3 and n4, n3 rewritten; the flush beats both."""
    await _seeded(database)
    before = (await _state(database))["nodes"]
    await _rewritten(database, "UPDATE nodes SET hostname = hostname WHERE id = 'n3'")
    errors = await _behind_a_held_row(
        database, "SELECT id FROM nodes WHERE id = 'n3' FOR NO KEY UPDATE",
        lambda: _flush(database, [], beats=("n3", "n4")),
        lambda: _in_transaction(database, lambda s: repo.bump_node_assignment_generations(s, ["n4", "n3"])))
    assert errors == []
    after = (await _state(database))["nodes"]
    assert {n: after[n] - before[n] for n in ("n3", "n4")} == {"n3": 1, "n4": 1}


@POSTGRES
@pytest.mark.parametrize("table", ["placements", "deployments"])
async def test_a_drain_locks_the_nodes_placements_and_their_deployments_in_ascending_id(
        database: Database, table: str) -> None:
    """n2 drained: its placements deleted by node, their deployments' generations moved over a
    list, the lower id's row rewritten (found last by the scans: the heap's, the node index's). The flush reports on TRAIN's two
    shards, both on n2; or on a shard of WEB and one of TRAIN left on n1 (and locks the two
    deployments in ascending id to write their phases), each with a shard on n2."""
    if table == "placements":
        await _seeded(database, PLACED_TWO)
        ids = await _ids(database, _PLACEMENT_IDS)
        low, high = ids["train/0/0"], ids["train/0/1"]
        assert low < high
        for node in ("n3", "n2"):  # a new version of the row and of its node's index entry, both last
            await _rewritten(database, f"UPDATE placements SET node_id = '{node}' WHERE id = {low}")
        held = f"SELECT id FROM placements WHERE id = {low} FOR NO KEY UPDATE"
        flush = _reports(("n2", "a", "train", 0, 0), ("n2", "a", "train", 0, 1))
    else:
        await _seeded(database, {**PLACED_TWO, "placements": [
            {"deployment": WEB, "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]},
            {"deployment": WEB, "replica": 1, "shard": 0, "node": "n2", "accelerator_indices": [0]},
            {"deployment": TRAIN, "replica": 0, "shard": 0, "node": "n2", "accelerator_indices": [1]},
            {"deployment": TRAIN, "replica": 0, "shard": 1, "node": "n1", "accelerator_indices": [1]}]})
        deployments = await _ids(database, "SELECT name, id FROM deployments")
        assert deployments["web"] < deployments["train"]
        await _rewritten(database, f"UPDATE deployments SET phase = phase WHERE id = {deployments['web']}")
        held = f"SELECT id FROM deployments WHERE id = {deployments['web']} FOR NO KEY UPDATE"
        flush = _reports(("n1", "a", "web", 0, 0), ("n1", "a", "train", 0, 1))
    errors = await _behind_a_held_row(
        database, held, lambda: _flush(database, flush),
        lambda: _in_transaction(database, lambda s: repo.remove_placements_on_node(s, "n2")))
    assert errors == []
    assert not [key for key, placed in (await _state(database))["placements"].items() if placed[0] == "n2"]


@POSTGRES
async def test_a_batch_of_deletions_marks_its_deployments_in_ascending_id(database: Database) -> None:
    """WEB and TRAIN marked DELETING in one UPDATE over their list, WEB's row rewritten (found last
    by the scan); the flush reports on a shard of each and locks their rows in ascending id."""
    from types import SimpleNamespace

    await _seeded(database, PLACED_TWO)
    deployments = await _ids(database, "SELECT name, id FROM deployments")
    assert deployments["web"] < deployments["train"]
    await _rewritten(database, f"UPDATE deployments SET phase = phase WHERE id = {deployments['web']}")
    rows: Any = [SimpleNamespace(id=deployments[name]) for name in ("web", "train")]
    errors = await _behind_a_held_row(
        database, f"SELECT id FROM deployments WHERE id = {deployments['web']} FOR NO KEY UPDATE",
        lambda: _flush(database, _reports(("n1", "a", "web", 0, 0), ("n2", "a", "train", 0, 1))),
        lambda: _in_transaction(database, lambda s: repo.set_deleting(s, rows)))
    assert errors == []
    after = (await _state(database))["deployments"]
    assert after[WEB].phase is after[TRAIN].phase is m.DeploymentPhase.DELETING


@POSTGRES
@pytest.mark.parametrize("release", ["quarantine", "beyond"])
async def test_a_deployments_placements_released_by_the_orm_are_locked_before_its_row(database: Database,
                                                                                      release: str) -> None:
    """WEB quarantined, or its shard on n3 released (n3 registered again with no accelerators): the
    ORM's flush wrote WEB's row, then deleted its placements (a release now deletes them first, by
    statement: `repo.release_placements_beyond`). The flush reports on WEB's replica 1
    and BURST's shard (BURST's row held: it waits for it, holding WEB's shard), then locks WEB's
    and BURST's rows."""
    await _seeded(database)
    ids = await _ids(database, _PLACEMENT_IDS)
    assert ids["web/1/0"] < ids["burst/0/0"]

    async def released(session: Any) -> None:
        if release == "quarantine":
            assert await repo.quarantine_deployment(session, WEB, "test", datetime.now(timezone.utc)) == {"n1", "n3"}
        else:
            assert await repo.release_placements_beyond(session, {"n3": 0}) == {"n3": [[WEB, 1, 0]]}

    errors = await _behind_a_held_row(
        database, f"SELECT id FROM placements WHERE id = {ids['burst/0/0']} FOR NO KEY UPDATE",
        lambda: _flush(database, _reports(("n3", "a", "web", 1, 0), ("n4", "b", "burst", 0, 0))),
        lambda: _in_transaction(database, released))
    assert errors == []
    assert (WEB, 1, 0) not in (await _state(database))["placements"]
