"""PostgreSQL's lock order between a Register batch and a plan commit (store/changes.py).

A scoped plan commit (`plans.commit._commit_locking_last`, the generation writers' lock shared) locks
isolation_state's row at its first placement write (the isolation trigger), then its deployments'
rows, then the rows of the nodes it lands shards on (their assignment generations). A Register
batch (the same lock shared) that changes a node's hardware wrote the node's row (its ORM UPDATE)
and then waited for isolation_state's row (the trigger): when the commit lands a shard on that
node, each waited for the other and PostgreSQL aborted one as a deadlock (SQLSTATE 40P01). The
batch now locks isolation_state's row before its nodes' rows, as the commit does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from controller.domain.values import NodeInfo
from controller.identity import Principal
from controller.store import plans
from controller.store.db import Database
from controller.usecases import agents
from scheduler import Plan

from .test_commit_plan import (
    BURST, CLUSTER, KEPT, P, TRAIN, WEB, _behind_a_held_row, _flush, _ids, _reports, _seeded, _state,
)

POSTGRES = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
ADMIN = Principal("admin")
# TRAIN's two shards land on n2 (a scoped commit: it writes before it takes the generation's row).
LANDS_ON_N2 = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))
TRAIN_ROW = "SELECT id FROM deployments WHERE name = 'train' FOR NO KEY UPDATE"


def _one_line(transaction: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """`transaction`, its error told on one line (the database's, not an autoflush's note)."""
    async def run() -> None:
        try:
            await transaction()
        except Exception as exc:
            error = getattr(exc, "orig", None) or exc  # the database's error, not SQLAlchemy's notes
            raise AssertionError(f"{type(exc).__name__}: {str(error).splitlines()[0]}") from exc
    return run


@POSTGRES
@pytest.mark.parametrize("hardware", ["cpu_milli", "accelerator_model", "a node added"])
async def test_a_register_batch_that_changes_a_nodes_hardware_and_a_plan_commit_landing_on_it_both_commit(
        database: Database, hardware: str) -> None:
    """TRAIN's row held: the commit inserts its shards on n2 (isolation_state's row locked) and waits
    for it; then n2 re-registers with more CPU (isolation's trigger) or another accelerator model
    (capacity's, which takes isolation_state first: 0023), or as it was in a batch that adds n5 (the
    INSERT's trigger). Before, the batch held n2's row and waited for isolation_state, the commit for
    n2's row once TRAIN's was let go: deadlock detected."""
    snapshot = await _seeded(database)
    changed = {"cpu_milli": {"cpu_milli": 9000}, "accelerator_model": {"accelerator_model": "maia-200"},
               "a node added": {}}[hardware]
    added = [agents.Register(ADMIN, NodeInfo("n5", "rack1", 4))] if hardware == "a node added" else []

    async def commit() -> None:
        async with database.unit_of_work() as uow:
            await plans.commit_plan(uow.session, snapshot, LANDS_ON_N2, scope={TRAIN}, actor="test")
            await uow.commit()

    async def register() -> None:
        async with database.unit_of_work() as uow:
            outcomes = await agents.register_nodes(
                uow, [agents.Register(ADMIN, NodeInfo("n2", "rack1", 4, **changed)), *added], heartbeat_interval_ms=1000)
        assert all(isinstance(outcome, agents.Registered) for outcome in outcomes), outcomes

    errors = await _behind_a_held_row(database, TRAIN_ROW, _one_line(commit), _one_line(register))
    assert errors == []
    after = await _state(database)
    assert {key[1:]: where[0] for key, where in after["placements"].items() if key[0] == TRAIN} == {
        (0, 0): "n2", (0, 1): "n2"}


# WEB's replica 1 on n3's last accelerator: n3 registering with two releases it.
ON_N3S_LAST: dict[str, Any] = {**CLUSTER, "placements": [
    {**p, "accelerator_indices": [3]} if (p["deployment"], p["replica"]) == (WEB, 1) else p
    for p in CLUSTER["placements"]]}


@POSTGRES
async def test_a_register_batch_releasing_a_nodes_shards_and_a_plan_commit_removing_them_both_commit(
        database: Database) -> None:
    """The commit removes WEB's replica 1 (on n3) and BURST's shard, in ascending id, and waits for
    BURST's (held); then n3 registers with two accelerators, which releases WEB's replica 1. Before,
    the batch took isolation_state's row (its node's, then the trigger's), then waited for that
    shard, which the commit held while it waited for isolation_state's row (its DELETE's trigger)
    once BURST's was let go: deadlock detected. The batch now locks the shards it releases first."""
    snapshot = await _seeded(database, ON_N3S_LAST)
    ids = {key[:2]: where[4] for key, where in (await _state(database))["placements"].items()}
    assert ids[(WEB, 1)] < ids[(BURST, 0)]

    async def commit() -> None:
        async with database.unit_of_work() as uow:
            await plans.commit_plan(uow.session, snapshot, Plan("optimal", (P(WEB, 0, 0, "n1", 0),)),
                                    scope={WEB, BURST}, actor="test")
            await uow.commit()

    async def register() -> None:
        async with database.unit_of_work() as uow:
            [outcome] = await agents.register_nodes(
                uow, [agents.Register(ADMIN, NodeInfo("n3", "rack2", 2))], heartbeat_interval_ms=1000)
        assert isinstance(outcome, agents.Registered), outcome

    errors = await _behind_a_held_row(database, f"SELECT id FROM placements WHERE id = {ids[(BURST, 0)]} "
                                                "FOR NO KEY UPDATE", _one_line(commit), _one_line(register))
    assert errors == []
    after = await _state(database)
    assert sorted(after["placements"]) == [(WEB, 0, 0)]
    assert [kind for kind, *_ in after["events"] if kind == "node.placements_released"] == []  # none left to it


# WEB's replica 0 on n1's last accelerator, BURST's shard on n3 (all four): n1 and n3 registering
# with two release both; WEB's shard has the lower id.
ON_N1_AND_N3: dict[str, Any] = {**CLUSTER, "placements": [
    {"deployment": WEB, "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [3]},
    {"deployment": WEB, "replica": 1, "shard": 0, "node": "n4", "accelerator_indices": [0]},
    {"deployment": BURST, "replica": 0, "shard": 0, "node": "n3", "accelerator_indices": [0, 1, 2, 3]}]}


@POSTGRES
async def test_a_register_batch_shrinking_two_nodes_and_a_report_flush_both_commit(database: Database) -> None:
    """BURST's row held: the flush writes BURST's shard (on n3) and waits for it; then n1 and n3
    register with two accelerators. Before, the batch released node by node: WEB's shard on n1,
    WEB's row, n1's row (its assignment generation), then n3's shards, where it waited for BURST's,
    which the flush held while it waited, BURST's row let go, for n1's row (n1's heartbeat): deadlock
    detected. Now every shrunk node's placements are locked first, in ascending id."""
    await _seeded(database, ON_N1_AND_N3)
    ids = await _ids(database, "SELECT d.name, p.id FROM placements p JOIN deployments d ON d.id = p.deployment_id "
                               "WHERE p.node_id IN ('n1', 'n3')")
    assert ids["web"] < ids["burst"]

    async def register() -> None:
        async with database.unit_of_work() as uow:
            outcomes = await agents.register_nodes(uow, [agents.Register(ADMIN, NodeInfo("n1", "rack1", 2)),
                                                         agents.Register(ADMIN, NodeInfo("n3", "rack2", 2))],
                                                   heartbeat_interval_ms=1000)
        assert all(isinstance(outcome, agents.Registered) for outcome in outcomes), outcomes

    errors = await _behind_a_held_row(database, "SELECT id FROM deployments WHERE name = 'burst' FOR NO KEY UPDATE",
                                      _one_line(lambda: _flush(database, _reports(("n3", "b", "burst", 0, 0)),
                                                               beats=("n1",))),
                                      _one_line(register))
    assert errors == []
    after = await _state(database)
    assert sorted(after["placements"]) == [(WEB, 1, 0)]
    assert sorted((object_id, data) for kind, object_id, data, _ in after["events"]
                  if kind == "node.placements_released") == [
        ("n1", {"shards": [[WEB, 0, 0]]}), ("n3", {"shards": [[BURST, 0, 0]]})]
