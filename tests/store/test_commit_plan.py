"""commit_plan, the plan applier: a plan's changes written in one transaction, each replica it
places re-checked against the committed state (what no longer fits is left out and re-queued)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError

from controller.domain.changes import ChangeKind, ClusterChange
from controller.store.db import Database
from controller.store import audit, pg_driver, plans, sqlite_driver
from controller.store.plans import check as plan_check, commit as plan_commit
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.plans import (
    TEMPLATE_REPLACED, CommitResult, bump_cluster_generation, commit_plan, preempted_reason,
)
from controller.store.snapshot import Snapshot, load_snapshot
from controller.domain.values import deployment_key
from scheduler import Move, Placement as PlanPlacement, Plan, Preemption, Reason, Unplaced
from scheduler import plan_to_dict, problem_from_dict, solve

from bench.checking import check_state

from .seed import TWO_RACKS, dump, seed_problem

EXAMPLES = Path("/work/shared/placement/examples")
# Deployments are named by their keys TENANT/NAME in snapshots, plans and commit results.
WEB, TRAIN, BURST = "a/web", "a/train", "b/burst"

# Two racks of two 4-accelerator nodes, two tenants; WEB runs (2 replicas x 1 shard),
# TRAIN (1 replica x 2 shards) is new, BURST is preemptible and runs.
CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [
        {"id": "n1", "rack": "rack1", "accelerators": 4},
        {"id": "n2", "rack": "rack1", "accelerators": 4},
        {"id": "n3", "rack": "rack2", "accelerators": 4},
        {"id": "n4", "rack": "rack2", "accelerators": 4},
    ],
    "tenants": [{"id": "a"}, {"id": "b"}],
    "deployments": [
        {"id": WEB, "tenant": "a", "replicas": 2, "shards_per_replica": 1, "shard": {"accelerators": 1}},
        {"id": TRAIN, "tenant": "a", "replicas": 1, "shards_per_replica": 2, "shard": {"accelerators": 2}},
        {"id": BURST, "tenant": "b", "replicas": 1, "shards_per_replica": 1, "shard": {"accelerators": 4},
         "preemptible": True},
    ],
    "placements": [
        {"deployment": WEB, "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]},
        {"deployment": WEB, "replica": 1, "shard": 0, "node": "n3", "accelerator_indices": [0]},
        {"deployment": BURST, "replica": 0, "shard": 0, "node": "n4", "accelerator_indices": [0, 1, 2, 3]},
    ],
}


def P(deployment: str, replica: int, shard: int, node: str, *indices: int, milli: int | None = None) -> PlanPlacement:
    return PlanPlacement(deployment, replica, shard, node, tuple(indices), milli)


KEPT = (P(WEB, 0, 0, "n1", 0), P(WEB, 1, 0, "n3", 0), P(BURST, 0, 0, "n4", 0, 1, 2, 3))


async def _seeded(database: Database, doc: dict[str, Any] = CLUSTER) -> Snapshot:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, doc)
        await uow.commit()
    async with database.unit_of_work() as uow:
        return await load_snapshot(uow.session)


async def _commit(database: Database, snapshot: Snapshot, plan: Plan) -> CommitResult:
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snapshot, plan, actor="test")
        await uow.commit()
    return result


@dataclass(frozen=True)
class _Dep:
    phase: m.DeploymentPhase
    generation: int
    reasons: list[dict[str, Any]]


async def _state(database: Database) -> dict[str, Any]:
    async with database.unit_of_work() as uow:
        s = uow.session
        return {
            "generation": (await s.execute(select(m.ClusterState.generation))).scalar_one(),
            "placements": {
                (deployment_key(t, name), p.replica, p.shard):
                    (p.node_id, tuple(p.accelerator_indices), p.phase, p.generation, p.id)
                for p, t, name in await s.execute(
                    select(m.Placement, m.Deployment.tenant_id, m.Deployment.name).join(m.Deployment))
            },
            "deployments": {deployment_key(d.tenant_id, d.name): _Dep(d.phase, d.generation, d.reasons)
                            for d in (await s.execute(select(m.Deployment))).scalars()},
            "nodes": {n.id: n.assignment_generation for n in (await s.execute(select(m.Node))).scalars()},
            "events": [(e.kind, e.object_id, e.data, e.actor)
                       for e in (await s.execute(select(m.Event).order_by(m.Event.id))).scalars()],
        }


async def test_new_placements_are_inserted_and_generations_bumped(database: Database) -> None:
    snap = await _seeded(database)
    before = await _state(database)
    plan = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))

    result = await _commit(database, snap, plan)

    # TRAIN was pending and never placed: its first placement, seconds after its creation.
    assert set(result.first_placed_after_s) == {TRAIN} and result.first_placed_after_s[TRAIN] >= 0
    assert replace(result, first_placed_after_s={}) == CommitResult(
        changed_nodes={"n2"}, changed_deployments={TRAIN}, generation=1,
        updated_deployments=set(), deleted_deployments=set(),
        shards={(TRAIN, 0, 0): ("n2", (0, 1), None), (TRAIN, 0, 1): ("n2", (2, 3), None)})
    after = await _state(database)
    assert after["generation"] == 1
    train = after["deployments"][TRAIN]
    assert (train.phase, train.generation, train.reasons) == (m.DeploymentPhase.SCHEDULED, 1, [])
    assert after["placements"][(TRAIN, 0, 0)][:4] == ("n2", (0, 1), m.ShardPhase.ASSIGNED, 1)
    assert after["placements"][(TRAIN, 0, 1)][:4] == ("n2", (2, 3), m.ShardPhase.ASSIGNED, 1)
    # Untouched rows, deployments and nodes stay exactly as they were.
    for key in (WEB, 0, 0), (WEB, 1, 0), (BURST, 0, 0):
        assert after["placements"][key] == before["placements"][key]
    assert after["deployments"][WEB].generation == 0
    assert after["nodes"] == {**before["nodes"], "n2": before["nodes"]["n2"] + 1}
    assert after["events"] == [
        ("deployment.placed", TRAIN, {"replicas": [0], "nodes": ["n2"]}, "test"),
    ]


async def test_what_the_session_holds_pending_is_written_before_the_plan(database: Database) -> None:
    # The commit's statements are Core; the session flushes the caller's pending ORM changes
    # before them too (SQLAlchemy autoflushes before Core statements), so that the plan is checked
    # against them. Here WEB marked DELETING in the session: the commit reads it so and releases
    # its shards, as it does a committed one's.
    snap = await _seeded(database)
    plan = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))
    async with database.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "a", "web")
        row.phase = m.DeploymentPhase.DELETING
        result = await commit_plan(uow.session, snap, plan, actor="test")
        await uow.commit()
    after = await _state(database)
    assert not [key for key in after["placements"] if key[0] == WEB]
    assert after["placements"][(TRAIN, 0, 0)][:2] == ("n2", (0, 1))
    assert result.changed_nodes == {"n1", "n2", "n3"}


async def test_a_plan_that_changes_nothing_writes_nothing(database: Database) -> None:
    snap = await _seeded(database)
    async with database.unit_of_work() as uow:
        before = await dump(uow.session)
    # TRAIN stays unplaced with the reasons it already had: no write, no event, no bump.
    reasons = (Reason("CAPACITY", "0/4 nodes fit: 4 capacity", None),)
    plan = Plan("feasible", KEPT, unplaced=(Unplaced(TRAIN, 1, reasons),))
    first = await _commit(database, snap, plan)
    assert first.updated_deployments == {TRAIN} and first.generation == 0
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
        middle = await dump(uow.session)
    assert len(middle["events"]) == 1 and middle["placements"] == before["placements"]

    second = await _commit(database, snap, plan)

    assert second == CommitResult(set(), set(), 0)
    async with database.unit_of_work() as uow:
        assert await dump(uow.session) == middle


async def test_moves_update_rows_in_place_and_bump_both_nodes(database: Database) -> None:
    snap = await _seeded(database)
    before = await _state(database)
    plan = Plan("optimal", (P(WEB, 0, 0, "n2", 1), P(WEB, 1, 0, "n3", 0), P(BURST, 0, 0, "n4", 0, 1, 2, 3)),
                moved=(Move(WEB, 0, 0, "n1", "n2"),))

    result = await _commit(database, snap, plan)

    assert (result.changed_nodes, result.changed_deployments) == ({"n1", "n2"}, {WEB})
    after = await _state(database)
    node, indices, phase, generation, row_id = after["placements"][(WEB, 0, 0)]
    assert (node, indices, phase, generation) == ("n2", (1,), m.ShardPhase.ASSIGNED, 1)
    assert row_id == before["placements"][(WEB, 0, 0)][4]  # the same row, updated
    assert after["placements"][(WEB, 1, 0)] == before["placements"][(WEB, 1, 0)]
    assert after["deployments"][WEB].phase is m.DeploymentPhase.SCHEDULED
    assert after["nodes"]["n1"] == before["nodes"]["n1"] + 1 and after["nodes"]["n3"] == before["nodes"]["n3"]
    assert after["events"] == [
        ("shard.moved", WEB, {"replica": 0, "shard": 0, "from": "n1", "to": "n2"}, "test"),
    ]


async def test_preemption_deletes_rows_and_records_why(database: Database) -> None:
    snap = await _seeded(database)
    reasons = (Reason("CAPACITY", "rack2: 0 accelerators free, 4 needed", "rack2"),)
    plan = Plan(
        "optimal",
        KEPT[:2] + (P(TRAIN, 0, 0, "n4", 0, 1), P(TRAIN, 0, 1, "n4", 2, 3)),
        unplaced=(Unplaced(BURST, 1, reasons),),
        preempted=(Preemption(BURST, 0),),
    )

    result = await _commit(database, snap, plan)

    assert result.changed_nodes == {"n4"} and result.changed_deployments == {TRAIN, BURST}
    after = await _state(database)
    assert (BURST, 0, 0) not in after["placements"]
    burst = after["deployments"][BURST]
    assert burst.phase is m.DeploymentPhase.PENDING and burst.generation == 1
    assert burst.reasons == [preempted_reason([0]),  # told why first
                             {"code": "CAPACITY", "message": "rack2: 0 accelerators free, 4 needed", "scope": "rack2"}]
    kinds = [(kind, name) for kind, name, _, _ in after["events"]]
    assert kinds == [("deployment.placed", TRAIN), ("deployment.preempted", BURST),  # by key: a/... before b/...
                     ("deployment.unplaceable", BURST)]
    assert after["events"][2][2] == {"replicas": 1, "reasons": burst.reasons[1:]}  # the solver's why


@pytest.mark.parametrize("scoped", [False, True])
async def test_no_victim_goes_for_a_claimant_the_recheck_turned_away(database: Database, scoped: bool) -> None:
    """A plan preempted BURST for TRAIN, whose replica no longer fits (it lands on WEB's
    accelerator n3[0]): TRAIN is re-queued, and BURST, evicted for it, stays where it runs (it
    was stopped for a plan thrown away, by the fast path's passes during rolling updates)."""
    snap = await _seeded(database)
    plan = Plan("optimal", KEPT[:2] + (P(TRAIN, 0, 0, "n4", 0, 1), P(TRAIN, 0, 1, "n3", 0, 1)),
                unplaced=(Unplaced(BURST, 1, (Reason("CAPACITY", "no room"),)),), preempted=(Preemption(BURST, 0),))
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, plan, actor="test", claimants={(BURST, 0): TRAIN},
                                   scope={WEB, TRAIN, BURST} if scoped else None)
        await uow.commit()
    assert set(result.requeued) == {(TRAIN, 0)} and "ACCELERATOR" in result.requeued[(TRAIN, 0)][0]
    after = await _state(database)
    assert after["placements"][(BURST, 0, 0)][:2] == ("n4", (0, 1, 2, 3))  # not preempted
    assert (TRAIN, 0, 0) not in after["placements"] and not result.shards
    assert [e[0] for e in after["events"]] == ["deployment.requeued"]  # no deployment.preempted
    assert all(r["code"] != "PREEMPTED" for r in after["deployments"][BURST].reasons)


async def test_victims_kept_for_a_claimant_turned_away_judge_its_other_replicas_again(database: Database) -> None:
    """TRAIN (2 replicas of a whole node) preempted BURST for its replica 0 (on n4) and places
    replica 1 on n3, where WEB runs: replica 1 is turned away, so BURST stays, and replica 0,
    judged again with BURST on n4, is turned away too."""
    doc = {**CLUSTER, "deployments": [d if d["id"] != TRAIN else {**d, "replicas": 2, "shards_per_replica": 1,
                                                                       "shard": {"accelerators": 4}}
                                      for d in CLUSTER["deployments"]]}
    snap = await _seeded(database, doc)
    plan = Plan("optimal", KEPT[:2] + (P(TRAIN, 0, 0, "n4", 0, 1, 2, 3), P(TRAIN, 1, 0, "n3", 0, 1, 2, 3)),
                preempted=(Preemption(BURST, 0),))
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, plan, actor="test", claimants={(BURST, 0): TRAIN})
        await uow.commit()
    assert set(result.requeued) == {(TRAIN, 0), (TRAIN, 1)}
    after = await _state(database)
    assert after["placements"][(BURST, 0, 0)][:2] == ("n4", (0, 1, 2, 3))
    assert not any(key[0] == TRAIN for key in after["placements"])
    assert not any(e[0] == "deployment.preempted" for e in after["events"])


async def test_a_victim_deployment_is_spared_whole_or_not_at_all(database: Database) -> None:
    """BURST (2 replicas, min_replicas 2) lost replica 0 to TRAIN and replica 1 to OTHER. TRAIN is
    turned away (it lands on WEB's accelerator): replica 0 is kept, and so is replica 1, or BURST
    would run one replica, below its minimum; OTHER, judged again with it there, is turned away."""
    other = "a/other"
    doc = {**CLUSTER,
           "deployments": [*(d if d["id"] != TRAIN else {**d, "shards_per_replica": 1, "shard": {"accelerators": 4}}
                             for d in CLUSTER["deployments"] if d["id"] != BURST),
                           {"id": other, "tenant": "a", "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": 4}},
                           {"id": BURST, "tenant": "b", "replicas": 2, "min_replicas": 2, "shards_per_replica": 1,
                            "shard": {"accelerators": 4}, "preemptible": True}],
           "placements": [*CLUSTER["placements"],
                          {"deployment": BURST, "replica": 1, "shard": 0, "node": "n2", "accelerator_indices": [0, 1, 2, 3]}]}
    snap = await _seeded(database, doc)
    plan = Plan("optimal", KEPT[:2] + (P(TRAIN, 0, 0, "n3", 0, 1, 2, 3), P(other, 0, 0, "n2", 0, 1, 2, 3)),
                preempted=(Preemption(BURST, 0), Preemption(BURST, 1)))
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, plan, actor="test",
                                   claimants={(BURST, 0): TRAIN, (BURST, 1): other})
        await uow.commit()
    assert set(result.requeued) == {(TRAIN, 0), (other, 0)}
    after = await _state(database)
    assert [after["placements"][(BURST, r, 0)][0] for r in (0, 1)] == ["n4", "n2"]
    assert not any(e[0] == "deployment.preempted" for e in after["events"])


async def test_reasons_that_change_only_in_their_numbers_are_stored_without_a_new_event(database: Database) -> None:
    """A waiting deployment's reasons count nodes ("0/4 nodes fit a shard: 3 CAPACITY, 1
    NODE_STATE"): each node going suspect and back wrote an unplaceable event of every waiting
    deployment (29 a minute for two). The reasons are kept up to date; an event says when the
    rules change."""
    snap = await _seeded(database)

    def waiting(*reasons: Reason) -> Plan:
        return Plan("feasible", KEPT, unplaced=(Unplaced(BURST, 1, reasons),))

    async def unplaceable() -> list[str]:
        return [e[2]["reasons"][0]["message"] for e in (await _state(database))["events"]
                if e[0] == "deployment.unplaceable"]

    await _commit(database, snap, waiting(Reason("CAPACITY", "0/4 nodes fit a shard: 4 CAPACITY")))
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    await _commit(database, snap, waiting(Reason("CAPACITY", "0/4 nodes fit a shard: 3 CAPACITY, 1 NODE_STATE")))
    assert (await _state(database))["deployments"][BURST].reasons[0]["message"].endswith("1 NODE_STATE")
    assert await unplaceable() == ["0/4 nodes fit a shard: 4 CAPACITY"]
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    await _commit(database, snap, waiting(Reason("QUOTA_ACCELERATORS", "tenant over its cap")))
    assert await unplaceable() == ["0/4 nodes fit a shard: 4 CAPACITY", "tenant over its cap"]


async def test_a_second_preemption_names_the_first_ones_replicas_still_waiting(database: Database) -> None:
    """Two gangs each preempted replicas of one deployment: its PREEMPTED reason named the last
    pass's alone, while the first's waited too."""
    doc = {**CLUSTER, "deployments": [d if d["id"] != BURST else {**d, "replicas": 2} for d in CLUSTER["deployments"]],
           "placements": [*CLUSTER["placements"], {"deployment": BURST, "replica": 1, "shard": 0, "node": "n2",
                                                    "accelerator_indices": [0, 1, 2, 3]}]}
    snap = await _seeded(database, doc)
    why = (Reason("CAPACITY", "no room"),)
    await _commit(database, snap, Plan("feasible", KEPT[:2] + (P(BURST, 1, 0, "n2", 0, 1, 2, 3),),
                                       unplaced=(Unplaced(BURST, 1, why),), preempted=(Preemption(BURST, 0),)))
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    [waiting] = [r["replica"] for r in snap.problem["placements"] if r["deployment"] == BURST]
    await _commit(database, snap, Plan("feasible", KEPT[:2], unplaced=(Unplaced(BURST, 2, why),),
                                       preempted=(Preemption(BURST, waiting),)))
    burst = (await _state(database))["deployments"][BURST]
    assert burst.reasons[0]["code"] == "PREEMPTED" and burst.reasons[0]["message"].startswith("replica(s) [0, 1] ")
    # One placed again: the reason kept names the other alone (it named both till the next preemption).
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    await _commit(database, snap, Plan("feasible", KEPT[:2] + (P(BURST, 0, 0, "n4", 0, 1, 2, 3),),
                                       unplaced=(Unplaced(BURST, 1, why),)))
    burst = (await _state(database))["deployments"][BURST]
    assert [r["code"] for r in burst.reasons] == ["PREEMPTED", "CAPACITY"]
    assert len(burst.reasons[0]["replicas"]) == 1


async def test_shards_on_a_down_node_are_replaced(database: Database) -> None:
    snap = await _seeded(database)
    # web replica 1 lost its node and could not be placed again; replica 0 stays.
    plan = Plan("feasible", (KEPT[0], KEPT[2]),
                unplaced=(Unplaced(WEB, 1, (Reason("NODE_STATE", "n3 is down"),)),))
    result = await _commit(database, snap, plan)
    assert result.changed_nodes == {"n3"}
    after = await _state(database)
    web = after["deployments"][WEB]
    assert (web.phase, web.generation) == (m.DeploymentPhase.DEGRADED, 1)  # what is left runs, a replica short
    assert web.reasons == [{"code": "NODE_STATE", "message": "n3 is down"}]
    assert [e[:3] for e in after["events"]][0] == ("deployment.replicas_removed", WEB, {"replicas": [1]})


async def test_phase_follows_shard_status(database: Database) -> None:
    snap = await _seeded(database)
    plan = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))
    await _commit(database, snap, plan)
    # Agents report the new shards running; the next (unchanged) plan marks the deployment RUNNING.
    async with database.unit_of_work() as uow:
        for p in (await uow.session.execute(select(m.Placement))).scalars():
            p.phase = m.ShardPhase.RUNNING
        await uow.commit()
        snap = await load_snapshot(uow.session)
    result = await _commit(database, snap, plan)
    assert result.updated_deployments == {TRAIN} and result.changed_deployments == set()
    after = await _state(database)
    assert after["deployments"][TRAIN].phase is m.DeploymentPhase.RUNNING
    assert after["deployments"][WEB].phase is m.DeploymentPhase.RUNNING  # seeded RUNNING, untouched


async def test_deleting_deployments_release_their_shards(database: Database) -> None:
    snap0 = await _seeded(database)
    async with database.unit_of_work() as uow:
        burst = (await uow.session.execute(select(m.Deployment).where(m.Deployment.name == "burst"))).scalar_one()
        burst.phase = m.DeploymentPhase.DELETING
        await bump_cluster_generation(uow.session)
        await uow.commit()
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    assert [d["id"] for d in snap.problem["deployments"]] == [WEB, TRAIN]
    assert BURST not in {p["deployment"] for p in snap.problem["placements"]}

    result = await _commit(database, snap, Plan("optimal", KEPT[:2]))

    assert result.deleted_deployments == {BURST} and result.changed_nodes == {"n4"}
    assert result.generation == snap.generation + 1
    after = await _state(database)
    assert BURST not in after["deployments"]
    assert not any(key[0] == BURST for key in after["placements"])
    assert after["events"][-1][:3] == ("deployment.deleted", BURST, {"shards": 1})


async def test_a_stale_plan_lands_what_still_fits_and_requeues_the_rest(database: Database) -> None:
    four_webs = [{**CLUSTER["deployments"][0], "replicas": 4}, *CLUSTER["deployments"][1:]]
    snap = await _seeded(database, {**CLUSTER, "deployments": four_webs})
    # While the plan is solved, another commit places TRAIN on n2[0,1] and n1[2,3].
    async with database.unit_of_work() as uow:
        other = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n1", 2, 3)))
        await commit_plan(uow.session, snap, other, actor="other")
        await uow.commit()
    before = await _state(database)
    # The stale plan still sees n1 and n2 free: web 2 on n1[2] now conflicts, web 3 on n2[3] fits.
    plan = Plan("optimal", KEPT + (P(WEB, 2, 0, "n1", 2), P(WEB, 3, 0, "n2", 3)))

    result = await _commit(database, snap, plan)

    assert result.stale and set(result.requeued) == {(WEB, 2)}
    why = result.requeued[(WEB, 2)][0]
    assert "n1[2]" in why and "whole-accelerator" in why
    after = await _state(database)
    assert (WEB, 2, 0) not in after["placements"]
    assert after["placements"][(WEB, 3, 0)][:2] == ("n2", (3,))
    for key in before["placements"]:  # nothing the other commit wrote is undone
        assert after["placements"][key][:2] == before["placements"][key][:2]
    assert after["events"][-2:] == [
        ("deployment.placed", WEB, {"replicas": [3], "nodes": ["n2"]}, "test"),
        ("deployment.requeued", WEB, {"replicas": [2], "why": [why]}, "test"),
    ]


async def test_a_stale_plan_leaves_replicas_others_changed_since_to_the_next_pass(database: Database) -> None:
    snap = await _seeded(database)
    async with database.unit_of_work() as uow:  # another commit moved web 0 meanwhile
        await commit_plan(uow.session, snap, Plan("optimal", (P(WEB, 0, 0, "n2", 0),) + KEPT[1:]), actor="other")
        await uow.commit()
    # The stale plan wants web 0 elsewhere and removes burst: burst goes, web 0 stays where the
    # other commit put it.
    result = await _commit(database, snap, Plan("optimal", (P(WEB, 0, 0, "n1", 3), KEPT[1]),
                                                preempted=(Preemption(BURST, 0),)))
    assert result.stale and set(result.requeued) == {(WEB, 0)}
    after = await _state(database)
    assert after["placements"][(WEB, 0, 0)][:2] == ("n2", (0,))
    assert (BURST, 0, 0) not in after["placements"]


async def test_a_plan_naming_unknown_nodes_lands_the_rest(database: Database) -> None:
    snap = await _seeded(database)
    result = await _commit(database, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n9", 0, 1),
                                                                    P(TRAIN, 0, 1, "n2", 0, 1))))
    assert set(result.requeued) == {(TRAIN, 0)} and "n9 is gone" in result.requeued[(TRAIN, 0)][0]
    assert not result.stale
    after = await _state(database)
    assert not any(key[0] == TRAIN for key in after["placements"])


async def test_concurrent_commits_of_one_snapshot_never_double_book(database: Database) -> None:
    snap = await _seeded(database)
    plan_a = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))
    plan_b = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n1", 2, 3), P(TRAIN, 0, 1, "n2", 0, 1)))
    outcomes = await asyncio.gather(_commit(database, snap, plan_a), _commit(database, snap, plan_b))
    # One lands train; the other finds it placed since its snapshot and leaves it alone.
    assert sorted(bool(o.requeued) for o in outcomes) == [False, True]
    after = await _state(database)
    assert after["generation"] == 1
    assert sum(1 for key in after["placements"] if key[0] == TRAIN) == 2


async def test_concurrent_plans_that_fit_alone_but_not_together_commit_a_checker_clean_state(
        database: Database) -> None:
    # Two tenants' new deployments, each within rack1's power budget alone, over it together.
    doc = {**TWO_RACKS, "racks": [{"id": "rack1", "row": "row1", "power_budget_w": 1000},
                                  {"id": "rack2", "row": "row1"}],
           "nodes": [{"id": n, "rack": "rack1", "accelerators": 4, "idle_power_w": 0} for n in ("n1", "n2")],
           "tenants": [{"id": "a"}, {"id": "b"}],
           "deployments": [{"id": name, "tenant": tenant, "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": 2, "power_w": 300}} for name, tenant in (("a1", "a"), ("b1", "b"))],
           "placements": []}
    snap = await _seeded(database, doc)
    plans = [Plan("optimal", (P("a/a1", 0, 0, "n1", 0, 1),)), Plan("optimal", (P("b/b1", 0, 0, "n2", 0, 1),))]
    outcomes = await asyncio.gather(*(_commit(database, snap, plan) for plan in plans))

    turned_away = [why for o in outcomes for why in o.requeued.values()]
    assert len(turned_away) == 1 and turned_away[0][0].startswith("POWER: rack rack1 draws 1200 W")
    async with database.unit_of_work() as uow:
        committed = await load_snapshot(uow.session)
    assert len(committed.problem["placements"]) == 1
    assert check_state(committed.problem, committed.problem["placements"]) == []


@pytest.mark.parametrize("large", [False, True], ids=["small-on-the-loop", "large-on-a-worker"])
async def test_a_stale_plan_onto_a_node_cordoned_since_is_requeued(database: Database,
                                                                  monkeypatch: pytest.MonkeyPatch, large: bool) -> None:
    # A small re-check is short Python holding the GIL: on the loop's thread, not a worker's (which
    # holds the GIL just as long, after a hand-over each way: docs/benchmarks.md, `gilthreads`); a
    # large one (an unscoped commit's at thousands of nodes: tens of ms to seconds) on a worker's,
    # so that the loop still gets its turns meanwhile.
    import threading
    from controller.store import recheck as recheck_module

    threads: list[threading.Thread] = []

    def recheck(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return recheck_module.recheck(*args)

    monkeypatch.setattr(plan_check, "recheck", recheck)
    if large:  # this one's (4 nodes, 3 shards, 1 replica) counts as large
        monkeypatch.setattr(plan_check, "RECHECK_ON_LOOP_MAX", 0, raising=False)
    snap = await _seeded(database)
    async with database.unit_of_work() as uow:
        await repo.set_node_cordoned(uow.session, "n2", True)
        await bump_cluster_generation(uow.session)
        await uow.commit()
    result = await _commit(database, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1),
                                                                    P(TRAIN, 0, 1, "n2", 2, 3))))
    assert result.stale and result.requeued == {(TRAIN, 0): ("node n2 is cordoned: it takes no new shards",)}
    assert not any(key[0] == TRAIN for key in (await _state(database))["placements"])
    assert threads and all((thread is threading.main_thread()) is not large for thread in threads)


async def test_a_new_replica_of_a_template_replaced_since_the_snapshot_is_requeued(database: Database) -> None:
    snap = await _seeded(database)
    async with database.unit_of_work() as uow:  # an update rolled TRAIN to revision 2 meanwhile
        train = (await uow.session.scalars(select(m.Deployment).where(m.Deployment.name == "train"))).one()
        train.template_revision = 2
        await bump_cluster_generation(uow.session)
        await uow.commit()
    result = await _commit(database, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1),
                                                                    P(TRAIN, 0, 1, "n2", 2, 3))))
    assert result.requeued == {(TRAIN, 0): (TEMPLATE_REPLACED,)}


async def test_solver_round_trip(database: Database) -> None:
    """Snapshot → real solver → commit → snapshot again: the stored placements are the plan's."""
    path = EXAMPLES / "tiny.problem.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    doc = json.loads(path.read_text())
    snap = await _seeded(database, doc)
    problem = {**snap.problem, "options": {"mode": "batch", "time_limit_ms": 2000}}
    plan = solve(problem_from_dict(problem))
    result = await _commit(database, snap, plan)
    assert result.generation == snap.generation + 1

    async with database.unit_of_work() as uow:
        again = await load_snapshot(uow.session)

    def key(p: dict[str, Any]) -> tuple[str, int, int]:
        return (p["deployment"], p["replica"], p["shard"])

    assert sorted(again.problem["placements"], key=key) == sorted(plan_to_dict(plan)["placements"], key=key)
    # Solving the committed state again changes nothing.
    replan = solve(problem_from_dict({**again.problem, "options": problem["options"]}))
    assert (await _commit(database, again, replan)).changed_nodes == set()


async def _audit_rows(database: Database) -> list[Any]:
    async with database.unit_of_work() as uow:
        return await audit.list_entries(uow.session)


async def test_decisions_that_preempt_move_or_place_work_are_audited_in_the_commit(database: Database) -> None:
    snap = await _seeded(database)
    plan = Plan(
        "optimal",
        (P(WEB, 0, 0, "n2", 1), KEPT[1], P(TRAIN, 0, 0, "n4", 0, 1), P(TRAIN, 0, 1, "n4", 2, 3)),
        unplaced=(Unplaced(BURST, 1, (Reason("CAPACITY", "rack2 is full", "rack2"),)),),
        preempted=(Preemption(BURST, 0),),
        moved=(Move(WEB, 0, 0, "n1", "n2"),),
    )
    await _commit(database, snap, plan)

    rows = await _audit_rows(database)
    assert [(r.action, r.object_id, r.tenant, r.actor, r.outcome) for r in rows] == [
        ("deployment.placed", TRAIN, "a", "test", "OK"),
        ("deployment.preempted", BURST, "b", "test", "OK"),
        ("shard.moved", WEB, "a", "test", "OK"),
    ]
    assert rows[2].detail == {"message": "moved replica 0 shard 0 from n1 to n2", "replica": 0, "shard": 0,
                              "from": "n1", "to": "n2"}
    assert len({r.request_id for r in rows}) == 1 and rows[0].request_id.startswith("plan-")
    async with database.unit_of_work() as uow:
        assert (await audit.verify_chain(uow.session)).intact


async def test_a_requeued_replica_is_not_audited(database: Database) -> None:
    snap = await _seeded(database)
    result = await _commit(database, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n9", 0, 1),
                                                                    P(TRAIN, 0, 1, "n2", 0, 1))))
    assert set(result.requeued) == {(TRAIN, 0)}
    assert await _audit_rows(database) == []


async def _judged_by(database: Database, monkeypatch: pytest.MonkeyPatch, change: ClusterChange,
                     edit: Any = None) -> tuple[CommitResult, int]:
    """A plan placing TRAIN on n2, committed after `change` (and `edit` of the rows) landed since
    its snapshot; with how many times the re-check read its document again."""
    snap = await _seeded(database)
    async with database.unit_of_work() as uow:
        if edit is not None:
            await edit(uow.session)
        await bump_cluster_generation(uow.session, change)
        await uow.commit()
    reads = 0
    real = plan_check.load_spec_doc

    async def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(plan_check, "load_spec_doc", counted)
    result = await _commit(database, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1),
                                                                    P(TRAIN, 0, 1, "n2", 2, 3))))
    return result, reads


async def _burst_deleting(session: Any) -> None:
    burst = (await session.scalars(select(m.Deployment).where(m.Deployment.name == "burst"))).one()
    burst.phase = m.DeploymentPhase.DELETING


async def test_a_plan_stale_by_deletions_only_is_judged_by_its_snapshots_specs(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion changes nothing a re-check judges by (topology, nodes, tenants, specs): the
    commit reads the change log, not the document (the usual staleness under load)."""
    result, reads = await _judged_by(database, monkeypatch, ClusterChange.deployment_deleted(BURST), _burst_deleting)
    assert result.stale and not result.requeued and reads == 0
    assert {key for key in (await _state(database))["placements"] if key[0] == TRAIN} == {(TRAIN, 0, 0), (TRAIN, 0, 1)}


async def _cordon_n2(session: Any) -> None:
    await repo.set_node_cordoned(session, "n2", True)


@pytest.mark.parametrize("change", [
    ClusterChange.node("n2"), ClusterChange.deployment(TRAIN), ClusterChange.placements(["a/unknown"]),
    ClusterChange.placements(), ClusterChange.tenant("a"), ClusterChange()])
async def test_a_plan_stale_by_other_changes_is_judged_by_the_document_read_again(
        database: Database, monkeypatch: pytest.MonkeyPatch, change: ClusterChange) -> None:
    """A node, a spec, a tenant, placements of a deployment the snapshot does not know (or of
    too many to name) or any other change since the snapshot: the document is read again (n2
    cordoned meanwhile: TRAIN is turned away)."""
    result, reads = await _judged_by(database, monkeypatch, change, _cordon_n2)
    assert result.stale and reads == 1
    assert result.requeued == {(TRAIN, 0): ("node n2 is cordoned: it takes no new shards",)}


@pytest.fixture
def sqlite_trips() -> Iterator[list[sqlite_driver.Trip]]:
    """Each trip to aiosqlite's thread from now on (store/sqlite_driver.py)."""
    with sqlite_driver.counted_trips() as seen:
        yield seen


@pytest.mark.parametrize("db_backend", ["sqlite"])  # trips to aiosqlite's thread: SQLite only
async def test_a_scoped_commit_on_sqlite_holds_the_writer_for_reads_and_trips_that_return_rows(
        database: Database, sqlite_trips: list[sqlite_driver.Trip]) -> None:
    assert database.is_sqlite
    snap = await _seeded(database)
    sqlite_trips.clear()
    plan = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))

    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, plan, scope={TRAIN}, actor="test")
        await uow.commit()

    assert result.changed_deployments == {TRAIN} and not result.requeued
    # Before the writer: the generation with the scope's deployments and their placements (one statement).
    read = [("SELECT cluster_state.generation -", 0)]
    # Under it, three trips for twelve statements: the generation's UPDATE (its lock) goes with
    # the scope's rows read again (the early check stands: nothing read for it), and only what
    # returns rows goes at once; the placements, the usage meter, the deployment, the node, the
    # change log, the event and the audit entry ride with the next of those, or with the commit.
    # Each trip: the statement it runs (its first words; "COMMIT"), the deferred writes with it.
    assert [(trip.statement, trip.deferred) for trip in sqlite_trips] == read + [
        ("SELECT cluster_state.generation -", 1),
        ("UPDATE audit_head SET", 6),  # RETURNING the chain's head
        ("COMMIT", 2),
    ]
    after = await _state(database)
    assert after["deployments"][TRAIN].phase is m.DeploymentPhase.SCHEDULED
    assert after["events"] == [("deployment.placed", TRAIN, {"replicas": [0], "nodes": ["n2"]}, "test")]


def _between_check_and_lock(monkeypatch: pytest.MonkeyPatch, work: Any) -> list[bool]:
    """Runs `work()` (another transaction) once, after a commit's early check and before it takes
    the generation's lock (on PostgreSQL, where the lock comes after the writes: before those);
    returns a list that gets one item per check of a plan's changes."""
    checks: list[bool] = []
    real_changes, real_move, real_land = plan_check._plan_changes, plan_commit.move_generation_unread, plan_commit._land

    async def counted(*args: Any, **kwargs: Any) -> Any:
        checks.append(True)
        return await real_changes(*args, **kwargs)

    async def interfere() -> None:
        if len(checks) == 1 and not getattr(interfere, "done", False):
            interfere.done = True  # type: ignore[attr-defined]
            await work()

    async def interfered(session: Any, by: int) -> None:
        await interfere()
        await real_move(session, by)

    async def landing(*args: Any, **kwargs: Any) -> Any:
        if kwargs["generation"] is None:  # the lock comes last
            await interfere()
        return await real_land(*args, **kwargs)

    monkeypatch.setattr(plan_check, "_plan_changes", counted)
    monkeypatch.setattr(plan_commit, "move_generation_unread", interfered)
    monkeypatch.setattr(plan_commit, "_land", landing)
    return checks


async def test_a_scoped_commit_checked_early_is_not_checked_again_when_nothing_changed(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = await _seeded(database)

    async def nothing() -> None:
        pass

    checks = _between_check_and_lock(monkeypatch, nothing)
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1),
                                                                              P(TRAIN, 0, 1, "n2", 2, 3))),
                                   scope={TRAIN}, actor="test")
        await uow.commit()
    assert len(checks) == 1 and result.changed_deployments == {TRAIN}


async def test_a_scoped_commit_checks_again_under_the_lock_when_the_cluster_moved_after_its_early_check(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = await _seeded(database)

    async def cordon() -> None:
        async with database.unit_of_work() as uow:
            await repo.set_node_cordoned(uow.session, "n2", True)
            await bump_cluster_generation(uow.session)
            await uow.commit()

    checks = _between_check_and_lock(monkeypatch, cordon)
    async with database.unit_of_work() as uow:  # the early check accepted n2
        result = await commit_plan(uow.session, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1),
                                                                              P(TRAIN, 0, 1, "n2", 2, 3))),
                                   scope={TRAIN}, actor="test")
        await uow.commit()
    assert len(checks) == 2
    assert result.stale and result.requeued == {(TRAIN, 0): ("node n2 is cordoned: it takes no new shards",)}
    assert not any(key[0] == TRAIN for key in (await _state(database))["placements"])


async def test_a_scoped_commit_writes_from_the_rows_under_the_lock_when_a_report_changed_them_since_its_early_check(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = await _seeded(database)
    plan = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))
    await _commit(database, snap, plan)
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)

    async def running() -> None:  # agents' reports: shard phases change, the generation does not
        async with database.unit_of_work() as uow:
            for p in (await uow.session.execute(select(m.Placement))).scalars():
                p.phase = m.ShardPhase.RUNNING
            await uow.commit()

    checks = _between_check_and_lock(monkeypatch, running)
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, plan, scope={TRAIN}, actor="test")
        await uow.commit()
    assert len(checks) == 2 and not result.stale
    assert result.updated_deployments == {TRAIN}
    assert (await _state(database))["deployments"][TRAIN].phase is m.DeploymentPhase.RUNNING


@pytest.mark.parametrize("db_backend", ["sqlite"])  # deferred writes: SQLite only
async def test_a_deferred_write_of_a_plan_commit_that_fails_fails_it_whole(database: Database) -> None:
    assert database.is_sqlite
    snap = await _seeded(database)
    async with database.unit_of_work() as uow:  # the nodes' UPDATE (deferred to the commit) fails
        await uow.session.execute(text("CREATE TRIGGER refuse BEFORE UPDATE OF assignment_generation ON nodes "
                                       "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        await uow.commit()
        before = await dump(uow.session)
    plan = Plan("optimal", KEPT[:2] + (P(TRAIN, 0, 0, "n4", 0, 1), P(TRAIN, 0, 1, "n4", 2, 3)),
                preempted=(Preemption(BURST, 0),))

    with pytest.raises(IntegrityError, match="refused"):
        await _commit(database, snap, plan)

    async with database.unit_of_work() as uow:
        assert await dump(uow.session) == before  # nothing of it: placements, meters, events, audit, generation
        await uow.session.execute(text("DROP TRIGGER refuse"))
        await uow.commit()
    result = await _commit(database, snap, plan)  # the writer was given back: the same plan commits
    assert result.changed_deployments == {TRAIN, BURST}


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_scoped_commit_on_postgres_writes_first_and_takes_the_generations_lock_last(
        database: Database) -> None:
    snap = await _seeded(database)
    plan = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))
    async with database.unit_of_work() as uow:
        with pg_driver.counted_trips() as trips:
            result = await commit_plan(uow.session, snap, plan, scope={TRAIN}, actor="test")
            await uow.commit()

    assert result.changed_deployments == {TRAIN} and result.generation == 1 and not result.requeued
    run = [trip.statement for trip in trips if trip.kind != "prepare"]
    locked = run.index("WITH moved AS")  # moves the generation (its lock) and reads the scope's rows again
    # The early read outside the transaction; the savepoint (undone to if the check fails) and the
    # generation writers' lock (shared, store/changes.py) in the BEGIN's message.
    assert run[:2] == ["SELECT cluster_state.generation -", "BEGIN; SAVEPOINT maia_plan_commit;"]
    assert "INSERT INTO placements" in run[2:locked]
    # Under the lock: the audit entries (the chain's head has a lock of its own, taken after this one)
    # with the events (by their own statement here: no head known yet), and the COMMIT.
    assert run[-1] == "COMMIT" and "INSERT INTO events" in run[locked + 1:-1]
    assert all(statement.startswith(("UPDATE audit_head", "INSERT INTO audit_log", "UPDATE /* maia:rowcount-unread",
                                     "INSERT INTO events"))
               for statement in run[locked + 1:-1])
    after = await _state(database)
    assert after["generation"] == 1 and after["deployments"][TRAIN].phase is m.DeploymentPhase.SCHEDULED
    async with database.unit_of_work() as uow:  # logged by the statement that moved the generation
        since = await plans.read_changes_since(uow.session, 0)
    assert since.complete and since.changes == {1: [(ChangeKind.PLACEMENTS, TRAIN)]}


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_scoped_commit_on_postgres_stands_when_only_deletions_moved_the_generation_under_its_writes(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = await _seeded(database)

    async def delete_burst() -> None:  # a delete batch: its deployment leaves, nothing else changes
        async with database.unit_of_work() as uow:
            await repo.set_deleting(uow.session, [r.row for r in await repo.deployments_named(uow.session, ["burst"])])
            await bump_cluster_generation(uow.session, ClusterChange.deployment_deleted(BURST))
            await uow.commit()

    checks = _between_check_and_lock(monkeypatch, delete_burst)
    rollbacks = []
    real_rollback = pg_driver.Savepoint.rollback

    async def rollback(self: pg_driver.Savepoint) -> None:
        rollbacks.append(True)
        await real_rollback(self)

    monkeypatch.setattr(pg_driver.Savepoint, "rollback", rollback)
    async with database.unit_of_work() as uow:
        result = await commit_plan(uow.session, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1),
                                                                              P(TRAIN, 0, 1, "n2", 2, 3))),
                                   scope={TRAIN}, actor="test")
        await uow.commit()
    assert len(checks) == 1 and rollbacks == []  # checked once, written once
    assert result.changed_deployments == {TRAIN} and result.generation == 2 and result.stale
    async with database.unit_of_work() as uow:
        since = await plans.read_changes_since(uow.session, 0)
    assert since.complete and since.changes == {1: [(ChangeKind.DEPLOYMENT_DELETED, BURST)],
                                                2: [(ChangeKind.PLACEMENTS, TRAIN)]}
    assert sum(1 for key in (await _state(database))["placements"] if key[0] == TRAIN) == 2


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_scoped_commit_on_postgres_does_not_write_over_the_deletion_of_a_deployment_it_places(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deletion of a deployment of the commit's scope lands between its early check and its
    writes: the commit's UPDATE of that deployment's row would write its phase over DELETING and
    its rows then read as written; it must not stand (the lock-first commit finds it DELETING)."""
    snap = await _seeded(database)

    async def delete_train() -> None:  # a delete batch of the very deployment the plan places
        async with database.unit_of_work() as uow:
            await repo.set_deleting(uow.session, [r.row for r in await repo.deployments_named(uow.session, ["train"])])
            await bump_cluster_generation(uow.session, ClusterChange.deployment_deleted(TRAIN))
            await uow.commit()

    _between_check_and_lock(monkeypatch, delete_train)
    async with database.unit_of_work() as uow:
        await commit_plan(uow.session, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1),
                                                                     P(TRAIN, 0, 1, "n2", 2, 3))),
                          scope={TRAIN}, actor="test")
        await uow.commit()
    after = await _state(database)
    assert TRAIN not in after["deployments"] or after["deployments"][TRAIN].phase is m.DeploymentPhase.DELETING
    assert not any(key[0] == TRAIN for key in after["placements"])  # nothing placed for a deployment deleted


async def _waits_for_a_lock(database: Database) -> bool:
    async with database.unit_of_work() as uow:
        return bool(await uow.session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_report_flush_and_a_plan_commit_at_once_on_postgres_do_not_deadlock(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agents' report flush writes a node's heartbeat and a shard's report in one transaction;
    a plan commit moves that shard onto that node. Whichever writes first, the other waits for it
    and both commit: they lock the tables they share in one order (a flush that locked the node
    first and the commit that locked the shard first waited for each other until PostgreSQL
    aborted one of them as a deadlock)."""
    from controller.domain.values import ShardReport
    from controller.usecases import agents

    snap = await _seeded(database)
    moved = (await _state(database))["placements"][(WEB, 1, 0)]
    first_written, go_on = asyncio.Event(), asyncio.Event()
    writes = 0

    def paused(real: Any) -> Any:  # the flush stops after its first write until told to go on
        async def write(*args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            writes += 1
            if writes > 1:
                await go_on.wait()
            await real(*args, **kwargs)
            first_written.set()
        return write

    monkeypatch.setattr(repo, "write_heartbeats", paused(repo.write_heartbeats))
    monkeypatch.setattr(repo, "write_reported_shards", paused(repo.write_reported_shards))

    async def flush() -> None:
        async with database.unit_of_work() as uow:
            await agents.flush_reports(uow, {"n2": agents.NodeBeat(m.utcnow(), 120.0)}, [
                ("n3", ShardReport("web", 1, 0, moved[3], "running", "up", tenant="a"))])

    async def move_web() -> None:  # WEB's replica 1 from n3 to n2
        async with database.unit_of_work() as uow:
            await commit_plan(uow.session, snap, Plan("optimal", (P(WEB, 0, 0, "n1", 0), P(WEB, 1, 0, "n2", 0),
                                                                  P(BURST, 0, 0, "n4", 0, 1, 2, 3))),
                              scope={WEB}, actor="test")
            await uow.commit()

    flushing = asyncio.create_task(flush())
    await asyncio.wait_for(first_written.wait(), 30)
    committing = asyncio.create_task(move_web())
    for _ in range(600):  # until the commit waits for the flush's lock, or is done
        if committing.done() or await _waits_for_a_lock(database):
            break
        await asyncio.sleep(0.05)
    go_on.set()
    outcomes = await asyncio.wait_for(asyncio.gather(flushing, committing, return_exceptions=True), 60)
    assert [str(o).splitlines()[0] for o in outcomes if isinstance(o, BaseException)] == []
    after = await _state(database)
    assert after["placements"][(WEB, 1, 0)][0] == "n2"


async def _waiting_for_locks(database: Database, count: int) -> None:
    """Until `count` backends of the test's database wait for a lock."""
    for _ in range(600):
        async with database.engine.connect() as conn:
            waiting = (await conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"))).scalar_one()
        if waiting >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} transaction(s) never waited for a lock")


async def _behind_a_held_row(database: Database, held: str, first: Any, second: Any) -> list[str]:
    """`first()` and then `second()` (each a transaction) run while a third transaction holds the
    row that `held` (a `SELECT ... FOR NO KEY UPDATE`) locks: `first` is started and waits for that
    row, then `second` is started and waits (for that row, or one `first` holds); then the row
    is let go. The first line of each error they end with (a deadlock: PostgreSQL aborts one)."""
    async with database.engine.connect() as holder:
        transaction = await holder.begin()
        assert (await holder.execute(text(held))).all()
        firsts = asyncio.create_task(first())
        await _waiting_for_locks(database, 1)
        seconds = asyncio.create_task(second())
        await _waiting_for_locks(database, 2)
        await transaction.rollback()
    outcomes = await asyncio.wait_for(asyncio.gather(firsts, seconds, return_exceptions=True), 60)
    return [str(o).splitlines()[0] for o in outcomes if isinstance(o, BaseException)]


def _reports(*shards: tuple[str, str, str, int, int]) -> list[tuple[str, Any]]:
    """(node, ShardReport running "up") of shards (node, tenant, deployment name, replica, shard)
    at their stored generations."""
    from controller.domain.values import ShardReport
    return [(node, ShardReport(name, replica, shard, 1, "running", "up", tenant=tenant))
            for node, tenant, name, replica, shard in shards]


async def _flush(database: Database, reports: list[tuple[str, Any]], beats: tuple[str, ...] = ()) -> None:
    from controller.usecases import agents
    async with database.unit_of_work() as uow:
        await agents.flush_reports(uow, {node: agents.NodeBeat(m.utcnow(), 100.0) for node in beats}, reports)


async def _committed(database: Database, snapshot: Snapshot, plan: Plan, scope: set[str]) -> None:
    async with database.unit_of_work() as uow:
        await commit_plan(uow.session, snapshot, plan, scope=scope, actor="test")
        await uow.commit()


async def _rewritten(database: Database, statement: str) -> None:
    """`statement` (an UPDATE that writes columns over themselves): those rows' new versions go to
    the end of their table's heap, where a sequential scan (a list's DELETE or UPDATE, a join's
    read) now finds them last."""
    async with database.engine.begin() as conn:
        await conn.execute(text(statement))


async def _ids(database: Database, query: str) -> dict[str, int]:
    async with database.engine.connect() as conn:
        return dict((await conn.execute(text(query))).all())  # type: ignore[arg-type]


# Each test of one order below runs twice: the rows as seeded, which the commit took in the other
# order than the flush before it locked them in ascending id, and the row the flush's read came to
# last rewritten (`_rewritten`), which the flush took in the other order than the commit before
# it did. Each side's order alone, left as it was, deadlocks one of the two.
ONE_ORDER = pytest.mark.parametrize("db_backend, rewritten", [
    pytest.param("postgres", False, marks=pytest.mark.postgres, id="as seeded"),
    pytest.param("postgres", True, marks=pytest.mark.postgres, id="rewritten")])


@ONE_ORDER
async def test_a_plan_commit_and_a_report_flush_lock_placements_in_one_order(database: Database,
                                                                            rewritten: bool) -> None:
    """The commit removes BURST's shard and moves WEB's replica 1 (a DELETE, then an UPDATE); the
    flush reports on both shards. Both lock the two rows in ascending id, so the one that waits
    holds neither, and both commit (PostgreSQL aborted one as a deadlock when the commit held
    BURST's row, deleted first, and the flush WEB's, the first its read returned; or, WEB's row
    rewritten, when the flush held BURST's, now read first, and the commit WEB's)."""
    snap = await _seeded(database)
    ids = await _ids(database, "SELECT d.name, p.id FROM placements p JOIN deployments d ON d.id = p.deployment_id "
                               "WHERE p.replica = 1 OR d.name = 'burst'")
    assert ids["web"] < ids["burst"]
    if rewritten:
        await _rewritten(database, f"UPDATE placements SET message = message WHERE id = {ids['web']}")
    errors = await _behind_a_held_row(
        database, f"SELECT id FROM placements WHERE id = {ids['web' if rewritten else 'burst']} FOR NO KEY UPDATE",
        lambda: _committed(database, snap, Plan("optimal", (P(WEB, 0, 0, "n1", 0), P(WEB, 1, 0, "n2", 0))),
                           {WEB, BURST}),
        lambda: _flush(database, _reports(("n3", "a", "web", 1, 0), ("n4", "b", "burst", 0, 0))))
    assert errors == []
    after = (await _state(database))["placements"]
    assert after[(WEB, 1, 0)][0] == "n2" and (BURST, 0, 0) not in after


# WEB and TRAIN placed, TRAIN's two shards on n2: stored keys a/train < a/web, ids web < train.
PLACED_TWO: dict[str, Any] = {
    **CLUSTER,
    "deployments": [{**d, "shard": {"accelerators": 1}} if d["id"] == TRAIN else d for d in CLUSTER["deployments"]],
    "placements": [
        {"deployment": WEB, "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]},
        {"deployment": WEB, "replica": 1, "shard": 0, "node": "n3", "accelerator_indices": [0]},
        {"deployment": TRAIN, "replica": 0, "shard": 0, "node": "n2", "accelerator_indices": [0]},
        {"deployment": TRAIN, "replica": 0, "shard": 1, "node": "n2", "accelerator_indices": [1]},
    ],
}


@ONE_ORDER
async def test_a_plan_commit_and_a_report_flush_lock_deployments_in_one_order(database: Database,
                                                                             rewritten: bool) -> None:
    """The commit moves a shard of WEB and one of TRAIN (both rows' generations move: an UPDATE
    each, written in the order of their keys, TRAIN's first); the flush reports on their other
    shards and locks both rows to write their phases (in the order its join returned them: WEB's
    placements first, or, rewritten, last). Both take the rows in ascending id, and both commit."""
    snap = await _seeded(database, PLACED_TWO)
    ids = await _ids(database, "SELECT name, id FROM deployments")
    assert ids["web"] < ids["train"]
    if rewritten:
        await _rewritten(database, f"UPDATE placements SET message = message WHERE deployment_id = {ids['web']}")
    plan = Plan("optimal", (P(WEB, 0, 0, "n1", 0), P(WEB, 1, 0, "n4", 0), P(TRAIN, 0, 0, "n2", 0),
                            P(TRAIN, 0, 1, "n1", 2)))
    errors = await _behind_a_held_row(
        database, f"SELECT id FROM deployments WHERE id = {ids['web' if rewritten else 'train']} FOR NO KEY UPDATE",
        lambda: _committed(database, snap, plan, {WEB, TRAIN}),
        lambda: _flush(database, _reports(("n1", "a", "web", 0, 0), ("n2", "a", "train", 0, 0))))
    assert errors == []
    after = (await _state(database))["placements"]
    assert (after[(WEB, 1, 0)][0], after[(TRAIN, 0, 1)][0]) == ("n4", "n1")


@ONE_ORDER
async def test_a_plan_commit_and_a_report_flush_lock_nodes_in_one_order(database: Database, rewritten: bool) -> None:
    """The commit moves WEB's replica 1 from n3 to n2 (both nodes' assignment generations move: one
    UPDATE over the list, in the order its scan finds them: n2 first, or, n2 rewritten, last); the
    flush writes heartbeats in the order the nodes beat (n3 first, or n2). Both write the rows in
    ascending id, and both commit."""
    snap = await _seeded(database)
    if rewritten:
        await _rewritten(database, "UPDATE nodes SET hostname = hostname WHERE id = 'n2'")
    errors = await _behind_a_held_row(
        database, f"SELECT id FROM nodes WHERE id = '{'n3' if rewritten else 'n2'}' FOR NO KEY UPDATE",
        lambda: _committed(database, snap, Plan("optimal", KEPT[:1] + (P(WEB, 1, 0, "n2", 0),) + KEPT[2:]), {WEB}),
        lambda: _flush(database, [], beats=("n2", "n3") if rewritten else ("n3", "n2")))
    assert errors == []
    assert (await _state(database))["placements"][(WEB, 1, 0)][0] == "n2"


async def test_a_scoped_commit_is_checked_again_when_a_shard_it_moves_was_removed_after_its_early_check(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's shards removed (a node deleted or evicted) between a commit's early check and the
    lock (on PostgreSQL, its writes), one of them a shard the plan moves: the commit is checked
    again under the lock and lands what holds, on both backends (PostgreSQL's UPDATE of the row
    gone failed the commit)."""
    snap = await _seeded(database)

    async def clear_n3() -> None:
        async with database.unit_of_work() as uow:
            await repo.remove_placements_on_node(uow.session, "n3")
            await bump_cluster_generation(uow.session, ClusterChange.node("n3"))
            await uow.commit()

    checks = _between_check_and_lock(monkeypatch, clear_n3)
    async with database.unit_of_work() as uow:  # WEB's replica 1 from n3 to n2
        result = await commit_plan(uow.session, snap, Plan("optimal", (P(WEB, 0, 0, "n1", 0), P(WEB, 1, 0, "n2", 0),
                                                                       P(BURST, 0, 0, "n4", 0, 1, 2, 3))),
                                   scope={WEB}, actor="test")
        await uow.commit()
    assert len(checks) == 2 and result.stale  # checked again, under the lock
    placed = (await _state(database))["placements"]  # the replica changed since the snapshot: the next pass decides
    assert (WEB, 1, 0) not in placed and placed[(WEB, 0, 0)][0] == "n1"


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_two_scoped_commits_placing_one_shard_at_once_on_postgres_land_one_and_requeue_the_other(
        database: Database) -> None:
    """Two controllers' passes (just after a leader change) commit the same placement of the same
    snapshot at once, each writing before it takes the generation's lock: the second one's INSERT
    waits for the first's row and, once that commits, meets its unique key. It must not fail: it
    goes lock first, reads the first one's shards and re-queues its own (CHANGED_SINCE)."""
    snap = await _seeded(database)
    plan = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))

    async def second() -> CommitResult:
        async with database.unit_of_work() as uow:
            result = await commit_plan(uow.session, snap, plan, scope={TRAIN}, actor="second")
            await uow.commit()
        return result

    async with database.unit_of_work() as uow:
        first = await commit_plan(uow.session, snap, plan, scope={TRAIN}, actor="first")
        committing = asyncio.create_task(second())
        for _ in range(600):  # until the second one's INSERT waits for the first one's rows
            if committing.done() or await _waits_for_a_lock(database):
                break
            await asyncio.sleep(0.05)
        assert not committing.done()
        await uow.commit()
    result = await asyncio.wait_for(committing, 60)

    assert first.changed_deployments == {TRAIN} and not first.requeued
    assert result.requeued == {(TRAIN, 0): (plans.CHANGED_SINCE,)} and result.changed_deployments == set()
    after = await _state(database)
    assert [after["placements"][(TRAIN, 0, s)][0] for s in (0, 1)] == ["n2", "n2"]
    assert after["generation"] == 1


async def _a_delete_batch_of_train(database: Database) -> None:
    """A delete batch: the deployment's row marked DELETING, then the generation moved."""
    from controller.usecases.deployments import mark_deleting

    async with database.unit_of_work() as uow:
        [train] = [r.row for r in await repo.deployments_named(uow.session, ["train"])]
        await mark_deleting(uow, [(train, "admin")])
        await uow.commit()


async def _a_cordon_of_n2(database: Database) -> None:
    """A cordon: the node's row written, then the generation moved (the ORM flushes the row at the bump)."""
    from controller.identity import Principal
    from controller.usecases import nodes
    from controller.usecases.ports import RecordingSignals

    async with database.unit_of_work() as uow:
        await nodes.cordon_node(uow, Principal("admin"), "n2", RecordingSignals(), set(), {})


async def _n2_down_by_liveness(database: Database) -> None:
    """Liveness: the node's health written, its work evicted, then the generation moved."""
    from controller.domain.liveness import Transition
    from controller.usecases import liveness

    async with database.unit_of_work() as uow:
        assert await liveness.apply_transitions(uow, [Transition("n2", "down", "silent", evict=True)], m.utcnow())


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("writer", [_a_delete_batch_of_train, _a_cordon_of_n2, _n2_down_by_liveness], ids=["delete", "cordon", "liveness"])
async def test_a_plan_commit_that_locks_first_and_a_writer_that_moves_the_generation_last_do_not_deadlock(
        database: Database, monkeypatch: pytest.MonkeyPatch, writer: Any) -> None:
    """An unscoped plan commit takes the generation's lock and reads; a delete batch, a cordon or
    liveness writes the row the commit is about to write (TRAIN's, n2's) and then waits for the
    generation's lock. Both must commit (the commit waiting for that row while holding the lock the
    writer waits for was a deadlock PostgreSQL broke after deadlock_timeout, aborting one)."""
    snap = await _seeded(database)
    read, go_on = asyncio.Event(), asyncio.Event()
    real_check = plan_commit._check

    async def paused(*args: Any) -> Any:  # the commit stops after its read (under the lock) until told to go on
        read.set()
        await go_on.wait()
        return await real_check(*args)

    monkeypatch.setattr(plan_commit, "_check", paused)
    committing = asyncio.create_task(_commit(database, snap, Plan(
        "optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))))
    await asyncio.wait_for(read.wait(), 30)
    writing = asyncio.create_task(writer(database))
    for _ in range(600):  # until the writer waits for a lock the commit holds
        if writing.done() or await _waits_for_a_lock(database):
            break
        await asyncio.sleep(0.05)
    assert not writing.done()
    go_on.set()
    outcomes = await asyncio.wait_for(asyncio.gather(committing, writing, return_exceptions=True), 60)
    assert [str(o).splitlines()[0] for o in outcomes if isinstance(o, BaseException)] == []
    assert outcomes[0].changed_deployments == {TRAIN}  # committed first, onto n2


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("scoped", [False, True], ids=["unscoped", "fallback"])
async def test_a_report_landing_between_a_plan_commits_read_and_its_write_is_not_written_over(
        database: Database, monkeypatch: pytest.MonkeyPatch, scoped: bool) -> None:
    """TRAIN (two replicas asked, one placed, its shards assigned) is told why its second replica
    waits: the commit writes its row, with the phase its shards give. Its agent reports them
    running (DEGRADED: all that is placed runs) after the commit read them and before it writes:
    the commit must write the phase of the shards as committed, not as it read them (it wrote
    SCHEDULED over the report's DEGRADED). Unscoped, or scoped and fallen back to the lock first."""
    from controller.domain.values import ShardReport
    from controller.usecases import agents

    snap = await _seeded(database)
    placed = KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3))
    await _commit(database, snap, Plan("optimal", placed))
    async with database.unit_of_work() as uow:
        await uow.session.execute(text("UPDATE deployments SET replicas = 2 WHERE name = 'train'"))
        await uow.commit()
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    generation = (await _state(database))["placements"][(TRAIN, 0, 0)][3]
    read, reported = asyncio.Event(), asyncio.Event()
    real_check = plan_commit._check
    checks: list[int] = []

    async def report_after_the_read(*args: Any) -> Any:  # the lock-first read is done (scoped: after the early one)
        checks.append(1)
        if len(checks) == (2 if scoped else 1):
            read.set()
            await reported.wait()
        return await real_check(*args)

    if scoped:  # the early check fails: a node cordoned in between (not one TRAIN is on)
        async def cordon_n4() -> None:
            async with database.unit_of_work() as uow:
                await repo.set_node_cordoned(uow.session, "n4", True)
                await bump_cluster_generation(uow.session, ClusterChange.node("n4"))
                await uow.commit()
        _between_check_and_lock(monkeypatch, cordon_n4)
    monkeypatch.setattr(plan_commit, "_check", report_after_the_read)

    async def commit() -> CommitResult:
        async with database.unit_of_work() as uow:
            result = await commit_plan(uow.session, snap, Plan("optimal", placed, unplaced=(
                Unplaced(TRAIN, 1, (Reason("NO_FIT", "no node has 4 free accelerators"),)),)),
                scope={TRAIN} if scoped else None, actor="test")
            await uow.commit()
        return result

    committing = asyncio.create_task(commit())
    await asyncio.wait_for(read.wait(), 30)
    async with database.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [("n2", ShardReport("train", 0, s, generation, "running", "", tenant="a"))
                                             for s in (0, 1)])
    assert (await _state(database))["deployments"][TRAIN].phase is m.DeploymentPhase.DEGRADED
    reported.set()
    result = await asyncio.wait_for(committing, 60)

    assert TRAIN in result.updated_deployments
    train = (await _state(database))["deployments"][TRAIN]
    assert train.phase is m.DeploymentPhase.DEGRADED
    assert [r["code"] for r in train.reasons] == ["NO_FIT"]


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_plan_commit_read_again_after_a_report_locks_the_shards_it_writes_in_ascending_id(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock-first commit moves WEB's replica 1 and writes TRAIN's row (why its second replica
    waits); a report on TRAIN's shard 0 (loading) lands between its read and its write, so it reads and
    writes again, TRAIN's shards locked first. A flush that reports on WEB's replica 1 (a lower id
    than TRAIN's shards) and TRAIN's shard 1 meanwhile took WEB's row and waited for TRAIN's: the
    commit, holding TRAIN's shards, then waited for WEB's (PostgreSQL aborted one as a deadlock).
    The second read locks the shards the first try wrote with TRAIN's, in ascending id."""
    from controller.domain.values import ShardReport
    from controller.usecases import agents

    await _seeded(database, PLACED_TWO)
    async with database.unit_of_work() as uow:
        await uow.session.execute(text("UPDATE deployments SET replicas = 2 WHERE name = 'train'"))
        await uow.commit()
    async with database.unit_of_work() as uow:
        snap = await load_snapshot(uow.session)
    ids = await _ids(database, "SELECT d.name || '/' || p.replica || '/' || p.shard, p.id FROM placements p "
                               "JOIN deployments d ON d.id = p.deployment_id")
    assert ids["web/1/0"] < ids["train/0/0"] < ids["train/0/1"]
    stored = (await _state(database))["placements"]
    reads = [asyncio.Event(), asyncio.Event()]
    go_on = [asyncio.Event(), asyncio.Event()]
    real_check = plan_commit._check

    async def paused(*args: Any) -> Any:  # each try's read done, its writes not begun
        tried = sum(read.is_set() for read in reads)
        reads[tried].set()
        await go_on[tried].wait()
        return await real_check(*args)

    monkeypatch.setattr(plan_commit, "_check", paused)

    async def commit() -> None:
        async with database.unit_of_work() as uow:
            await commit_plan(uow.session, snap, Plan("optimal", (
                P(WEB, 0, 0, "n1", 0), P(WEB, 1, 0, "n4", 0), P(TRAIN, 0, 0, "n2", 0), P(TRAIN, 0, 1, "n2", 1)),
                unplaced=(Unplaced(TRAIN, 1, (Reason("NO_FIT", "no node fits"),)),)), actor="test")
            await uow.commit()

    def report(node: str, key: tuple[str, int, int]) -> tuple[str, ShardReport]:
        return node, ShardReport(key[0].split("/")[1], key[1], key[2], stored[key][3], "loading", "",
                                 tenant=key[0].split("/")[0])

    committing = asyncio.create_task(commit())
    await asyncio.wait_for(reads[0].wait(), 30)
    async with database.unit_of_work() as uow:  # lands between the first try's read and its write
        await agents.flush_reports(uow, {}, [report("n2", (TRAIN, 0, 0))])
    go_on[0].set()
    await asyncio.wait_for(reads[1].wait(), 30)  # read again, TRAIN's shards locked
    flushing = asyncio.create_task(_flush(database, [report("n3", (WEB, 1, 0)), report("n2", (TRAIN, 0, 1))]))
    await _waiting_for_locks(database, 1)
    go_on[1].set()
    outcomes = await asyncio.wait_for(asyncio.gather(committing, flushing, return_exceptions=True), 60)
    assert [str(o).splitlines()[0] for o in outcomes if isinstance(o, BaseException)] == []
    after = (await _state(database))["placements"]
    assert after[(WEB, 1, 0)][0] == "n4" and after[(TRAIN, 0, 1)][2] is m.ShardPhase.LOADING


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_two_passes_whose_failures_step_wrote_nothing_fall_back_from_lock_last_at_once_without_deadlock(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconcile pass runs the failures' step (`handle_failures`) and then its fast plan commit in
    one transaction; with a failed replica still in its back-off the step writes nothing and the
    pass commits nothing in between. Two such passes at once (two controllers around a leader
    change), each scoped commit falling back from lock-last (the generation moved by another
    change under them), each takes the generation writers' lock exclusive: neither may hold it
    shared by then (the step took it shared; each upgrade then waited for the other's shared hold,
    a deadlock PostgreSQL broke after deadlock_timeout, aborting one pass)."""
    from datetime import timedelta

    from controller.domain.restarts import RestartPolicy
    from controller.store.failures import handle_failures

    snap = await _seeded(database)
    now = m.utcnow()
    async with database.unit_of_work() as uow:  # WEB's replica 1 failed; its back-off runs for a minute
        await uow.session.execute(text("UPDATE placements SET phase = 'failed' WHERE replica = 1 AND deployment_id = "
                                       "(SELECT id FROM deployments WHERE name = 'web')"))
        await uow.session.execute(text("UPDATE deployments SET failures = 1, restart_after = :at WHERE name = 'web'"),
                                  {"at": now + timedelta(seconds=60)})
        await uow.commit()
    early, both_early, fell_back = [], asyncio.Event(), []
    go_on, at_fallback = asyncio.Event(), asyncio.Barrier(2)
    real_last, real_first = plan_commit._commit_locking_last, plan_commit.moves_generation_first

    async def after_the_early_read(*args: Any, **kwargs: Any) -> Any:  # both wait, the generation moves
        early.append(1)
        if len(early) == 2:
            both_early.set()
        await go_on.wait()
        return await real_last(*args, **kwargs)

    async def together(session: Any) -> None:  # both fallbacks ask for the exclusive lock at once
        fell_back.append(1)
        await asyncio.wait_for(at_fallback.wait(), 30)
        await real_first(session)

    monkeypatch.setattr(plan_commit, "_commit_locking_last", after_the_early_read)
    monkeypatch.setattr(plan_commit, "moves_generation_first", together)

    async def a_pass(plan: Plan, scope: set[str]) -> CommitResult:
        async with database.unit_of_work() as uow:
            step = await handle_failures(uow.session, now=now, policy=RestartPolicy())
            assert not step.deployments and step.next_in_s is not None  # nothing written, nothing committed
            result = await commit_plan(uow.session, snap, plan, scope=scope, actor="test")
            await uow.commit()
        return result

    passes = [asyncio.create_task(a_pass(Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3))),
                                         {TRAIN})),
              asyncio.create_task(a_pass(Plan("optimal", (P(WEB, 0, 0, "n1", 0), P(WEB, 1, 0, "n1", 1),
                                                           P(BURST, 0, 0, "n4", 0, 1, 2, 3))), {WEB}))]
    await asyncio.wait_for(both_early.wait(), 30)
    async with database.unit_of_work() as uow:  # not deletions alone: each lock-last commit falls back
        await bump_cluster_generation(uow.session, ClusterChange())
        await uow.commit()
    go_on.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*passes, return_exceptions=True), 60)
    assert [str(o).splitlines()[0] for o in outcomes if isinstance(o, BaseException)] == []
    assert len(fell_back) == 2  # both fell back to the lock first, at once (else no race was run)
    placed = (await _state(database))["placements"]
    assert [placed[(TRAIN, 0, s)][0] for s in (0, 1)] == ["n2", "n2"]


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_report_flush_that_waited_for_a_commit_of_its_deployment_judges_it_by_the_shards_committed(
        database: Database) -> None:
    """A report flush writes a shard's report, then reads its deployment with the deployment's
    other shards, the row locked. A commit that removed one of those shards holds that row: the
    flush waits for it. PostgreSQL then hands back the row as the commit left it but the shards as
    the read's snapshot had them (only the locked row is read again), and the flush judged the
    deployment's phase by a shard that was gone: its phase must follow the shards committed."""
    from controller.domain.values import ShardReport
    from controller.usecases import agents

    await _seeded(database)
    generation = (await _state(database))["placements"][(WEB, 0, 0)][3]
    async with database.unit_of_work() as commit:  # WEB's replica 1 removed, its row written
        s = commit.session
        await s.execute(text("DELETE FROM placements WHERE replica = 1 AND deployment_id = "
                             "(SELECT id FROM deployments WHERE name = 'web')"))
        await s.execute(text("UPDATE deployments SET generation = generation + 1 WHERE name = 'web'"))

        async def flush() -> None:  # WEB's replica 0 fails
            async with database.unit_of_work() as uow:
                await agents.flush_reports(uow, {}, [("n1", ShardReport("web", 0, 0, generation, "failed", "oom",
                                                                        tenant="a"))])

        flushing = asyncio.create_task(flush())
        for _ in range(600):  # until the flush waits for WEB's row
            if flushing.done() or await _waits_for_a_lock(database):
                break
            await asyncio.sleep(0.05)
        assert not flushing.done()
        await commit.commit()
    await asyncio.wait_for(flushing, 60)
    async with database.unit_of_work() as uow:
        [web] = await repo.deployments_named(uow.session, ["web"])
    assert [(p.replica, p.phase) for p in web.placements] == [(0, m.ShardPhase.FAILED)]
    assert web.row.phase is repo.implied_phase(web.row, web.placements)


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_locking_read_of_deployments_that_waited_for_nothing_reads_once(database: Database) -> None:
    """The read again above is only for rows a commit wrote while the lock waited: a flush's usual
    locking read is one statement, and a row written before it began is not taken for one."""
    await _seeded(database)
    async with database.unit_of_work() as uow:
        await uow.session.execute(text("UPDATE deployments SET generation = generation + 1 WHERE name = 'web'"))
        await uow.commit()
    async with database.unit_of_work() as uow:
        with pg_driver.counted_trips() as trips:
            [web] = await repo.deployments_named(uow.session, ["web"], lock=True)
        await uow.commit()
    assert len(web.placements) == 2
    assert [t.statement for t in trips if t.kind == "execute"] == ["SELECT deployments.id, deployments.name,"]


async def test_shards_placed_again_into_a_running_replica_are_an_audited_decision(database: Database) -> None:
    """A node deleted (or registered again smaller) takes its shards' rows with it; the plan that
    places them again beside the replica's other shards was neither a new replica nor a move, so
    it had no event and no audit entry, though it starts a tenant's work."""
    half = {**CLUSTER, "placements": [*CLUSTER["placements"],
                                      {"deployment": TRAIN, "replica": 0, "shard": 0, "node": "n2",
                                       "accelerator_indices": [0, 1]}]}
    snap = await _seeded(database, half)
    plan = Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1), P(TRAIN, 0, 1, "n2", 2, 3)))
    await _commit(database, snap, plan)
    after = await _state(database)
    assert after["events"] == [("shard.placed", TRAIN, {"replica": 0, "shards": [1], "nodes": ["n2"]}, "test")]
    assert [(r.action, r.object_id, r.detail["shards"]) for r in await _audit_rows(database)] == [
        ("shard.placed", TRAIN, [1])]


async def test_a_shard_placed_again_into_a_replica_takes_the_revision_its_replica_has_now(database: Database) -> None:
    """TRAIN's replica lost shard 1; a plan solved then places it again. Meanwhile a rollback
    (`updates._adoptable`) made the replica's stored shards revision 3's: the shard was written
    at the snapshot's revision 1, a replica of two revisions, the older one without a spec (found
    by review). It takes the revision the replica's stored shards have."""
    doc = {**CLUSTER, "placements": [*CLUSTER["placements"],
                                     {"deployment": TRAIN, "replica": 0, "shard": 0, "node": "n2",
                                      "accelerator_indices": [0, 1]}]}
    snap = await _seeded(database, doc)
    async with database.unit_of_work() as uow:
        train = (await uow.session.scalars(select(m.Deployment).where(m.Deployment.name == "train"))).one()
        await uow.session.execute(update(m.Placement).where(m.Placement.deployment_id == train.id).values(revision=3))
        train.template_revision = 3
        await bump_cluster_generation(uow.session)
        await uow.commit()
    result = await _commit(database, snap, Plan("optimal", KEPT + (P(TRAIN, 0, 0, "n2", 0, 1),
                                                                    P(TRAIN, 0, 1, "n2", 2, 3))))
    assert not result.requeued
    async with database.unit_of_work() as uow:
        revisions = {(p.replica, p.shard): p.revision for p in (await uow.session.scalars(
            select(m.Placement).join(m.Deployment).where(m.Deployment.name == "train")))}
    assert revisions == {(0, 0): 3, (0, 1): 3}
