"""Accelerators that failed (a node's `unhealthy_accelerators`, an extension of the interchange
format): no shard is placed on one, by `solve()` or a warm session; a shard that runs on one is
lost and placed again, as on a down node; the independent checker refuses a plan using one."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from builders import dep, node, placed, problem  # noqa: E402
from checker import INDICES, check_plan  # noqa: E402

from scheduler import ProblemError, plan_to_dict, problem_from_dict, problem_to_dict, solve  # noqa: E402
from scheduler.session import ClusterDelta, Session  # noqa: E402


def _indices(plan, deployment: str) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((p.node, p.accelerator_indices) for p in plan.placements if p.deployment == deployment)


def test_a_failed_accelerator_takes_no_shard_and_a_node_short_of_healthy_ones_none_that_needs_them() -> None:
    doc = problem([node("n1", unhealthy_accelerators=[1]), node("n2", rack="r2", unhealthy_accelerators=[0, 3])],
                  [dep("three", acc=3), dep("four", acc=4)])
    plan = solve(problem_from_dict(doc))
    assert _indices(plan, "three") == [("n1", (0, 2, 3))]
    assert _indices(plan, "four") == [] and plan.unplaced[0].deployment == "four"
    assert plan.unplaced[0].reasons[0].code == "CAPACITY"
    assert "n2 has 2 (2 failed)" in plan.unplaced[0].reasons[0].message  # what its count leaves out
    assert check_plan(doc, plan_to_dict(plan)) == []


def test_a_shard_running_on_a_failed_accelerator_is_placed_again() -> None:
    doc = problem([node("n1", unhealthy_accelerators=[0]), node("n2")],
                  [dep("svc", acc=2, replicas=2, shards=1)],
                  placements=[placed("svc", "n1", [0, 1], replica=0), placed("svc", "n2", [0, 1], replica=1)],
                  mode="online")
    plan = solve(problem_from_dict(doc))
    placements = {p.replica: (p.node, p.accelerator_indices) for p in plan.placements}
    assert placements[1] == ("n2", (0, 1))  # kept
    assert 0 in placements and placements[0] != ("n1", (0, 1))  # placed again, off the failed accelerator
    assert not (placements[0][0] == "n1" and 0 in placements[0][1])
    assert check_plan(doc, plan_to_dict(plan)) == []


def test_the_checker_refuses_a_plan_placing_on_a_failed_accelerator() -> None:
    doc = problem([node("n1", unhealthy_accelerators=[2])], [dep("a", acc=1)])
    plan = {"status": "feasible", "placements": [placed("a", "n1", [2])], "unplaced": []}
    assert [v.rule for v in check_plan(doc, plan)] == [INDICES]


def test_a_session_repairs_a_shard_whose_accelerator_failed_and_then_avoids_it() -> None:
    doc = problem([node("n1")], [dep("a", acc=1), dep("b", acc=2)])
    s = Session(problem_from_dict({**doc, "deployments": doc["deployments"][:1]}))
    first = s.place(problem_from_dict(doc).deployments[0])
    [(at, (index,))] = [(p.node, p.accelerator_indices) for p in first.placements]
    n1 = problem_from_dict(doc).nodes[0]
    decisions = s.apply(ClusterDelta(nodes=(dataclasses.replace(n1, unhealthy_accelerators=(index,)),)))
    moved = [p for d in decisions for p in d.placements if p.deployment == "a"]
    assert moved and all(index not in p.accelerator_indices for p in moved)
    b = s.place(problem_from_dict(doc).deployments[1])
    assert b.placements and all(index not in p.accelerator_indices for p in b.placements)
    taken = {i for p in s.snapshot().placements for i in p.accelerator_indices}
    assert index not in taken and len(taken) == 3


def test_the_field_is_read_back_and_checked() -> None:
    doc = problem([node("n1", unhealthy_accelerators=[3, 1])], [dep("a")])
    assert problem_to_dict(problem_from_dict(doc))["nodes"][0]["unhealthy_accelerators"] == [3, 1]
    for bad, message in (([4], "not an index of node 'n1'"), ([1, 1], "accelerator 1 listed twice"),
                         (["2"], "not an index"), (7, "not an index")):
        with pytest.raises(ProblemError, match=message) as info:
            problem_from_dict(problem([node("n1", unhealthy_accelerators=bad)], [dep("a")]))
        assert "nodes[0].unhealthy_accelerators" in str(info.value)
