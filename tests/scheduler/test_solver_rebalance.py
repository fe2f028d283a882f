"""Rebalance with preemption allowed: moves come before preemptions, kept shards stay put."""

from __future__ import annotations

import pytest
from builders import busy_problem, dep, move_beats_preemption, placed_count, solve_doc

from scheduler import plan_to_dict, problem_from_dict, room
from scheduler.solve import Solver


def test_rebalance_moves_a_replica_rather_than_preempting_it() -> None:
    doc = move_beats_preemption()
    plan = solve_doc(doc)  # the independent checker runs inside
    assert plan.preempted == ()
    assert [(m.deployment, m.replica, m.to_node) for m in plan.moved] == [("d0", 0, "na")]


def test_a_move_onto_a_node_does_not_shift_the_replica_kept_there() -> None:
    doc = {
        "nodes": [{"id": "n1", "rack": "r2", "accelerators": 1},
                  {"id": "n2", "rack": "r1", "state": "cordoned", "accelerators": 2},
                  {"id": "n3", "rack": "r0", "accelerators": 4},
                  {"id": "n4", "rack": "r1", "state": "cordoned", "accelerators": 2},
                  {"id": "n5", "rack": "r1", "accelerators": 1}],
        "tenants": [{"id": "t0"}, {"id": "t1", "excludes": ["t0"]}],
        "deployments": [
            {"id": "d0", "tenant": "t0", "replicas": 3, "shards_per_replica": 1,
             "shard": {"accelerators": 2}, "locality": "zone", "min_replicas": 2,
             "preemptible": True},
            {"id": "vip0", "tenant": "t1", "priority": 10, "replicas": 1,
             "shards_per_replica": 2, "locality": "none", "shard": {"accelerators": 1}}],
        "placements": [
            {"deployment": "d0", "replica": r, "shard": 0, "node": n,
             "accelerator_indices": [0, 1]} for r, n in ((0, "n4"), (1, "n3"), (2, "n2"))],
        "options": {"mode": "rebalance", "allow_preemption": True}}
    plan = solve_doc(doc)  # the checker's KEPT rule: a kept shard keeps its indices
    # vip0 (t1 excludes t0) needs two accelerators in racks free of t0. Preempting d0's
    # replica 1 alone clears rack r0 and keeps d0 at its min_replicas (2); preempting the two
    # replicas in rack r1 instead would drop d0 below min_replicas and lose all three.
    assert [(p.deployment, p.replica) for p in plan.preempted] == [("d0", 1)]
    kept = sorted((p.replica, p.node, p.accelerator_indices) for p in plan.placements
                  if p.deployment == "d0")
    assert kept == [(0, "n4", (0, 1)), (2, "n2", (0, 1))]
    assert placed_count(plan, "vip0") == 1


def _rack_gangs_problem() -> dict:
    """A busy cluster (builders.busy_problem) in rebalance mode, where one move makes room,
    plus a gang no rack can hold even emptied (20 shards, racks of 16 accelerators)."""
    doc = busy_problem(mode="rebalance", allow_preemption=True, max_moves=6)
    doc["deployments"].append(dep("huge", acc=1, shards=20, locality="rack", priority=5))
    return doc


def test_domains_no_trial_could_fit_are_skipped_with_the_same_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Removing work only frees room, so a domain where the replica does not fit even with
    # every candidate removed is skipped (its trials counted as spent): the searches give
    # the plan they gave running every trial.
    doc = _rack_gangs_problem()
    said_no = []
    real_can_fit = room._domain_can_fit

    def spy(*args: object) -> bool:
        ok = real_can_fit(*args)  # type: ignore[arg-type]
        said_no.append(not ok)
        return ok

    monkeypatch.setattr(room, "_domain_can_fit", spy)
    skipping = plan_to_dict(Solver(problem_from_dict(doc), None, use_cpsat=False).run())
    assert any(said_no)
    monkeypatch.setattr(room, "_domain_can_fit", lambda *args: True)
    monkeypatch.setattr(room, "_may_fit", lambda *args: True)
    running_all = plan_to_dict(Solver(problem_from_dict(doc), None, use_cpsat=False).run())
    assert skipping["preempted"] or skipping["moved"]  # the searches found something
    for part in ("placements", "preempted", "moved", "unplaced"):
        assert skipping[part] == running_all[part]


def test_the_cpsat_pipeline_takes_over_the_greedy_pipelines_moves_when_it_kept_its_answer(
        ) -> None:
    # vip fits nowhere before moves, so CP-SAT cannot beat the greedy answer: the stages
    # after it would repeat the greedy pipeline's, whose outcome (one move) is taken over.
    doc = move_beats_preemption()
    plan = solve_doc(doc)
    assert plan.stats["pipeline"] == "cpsat"
    assert "after_cpsat" in plan.stats
    greedy = Solver(problem_from_dict(doc), None, use_cpsat=False).run()
    assert (plan.placements, plan.moved, plan.preempted) == (
        greedy.placements, greedy.moved, greedy.preempted)
