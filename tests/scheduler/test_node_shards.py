"""A node's `max_shards` (an interchange extension): the most shards it holds at once, whatever
each needs, as Kubernetes' max-pods. The controller's agents list a node's shards in one message
bounded by `SHARDS_PER_NODE_MAX`; tiny fractions (1 milli: 1,000 on one accelerator) and
host-only shards (no accelerator at all) reached past it, and the node's heartbeat was refused at
every reconnect. Every place a node's room is judged counts it: the filters (and so the greedy,
preemption and `explain`), CP-SAT over node classes, the joint batch assignment, a replica put
back (`room.restore`), the warm session, `violations.py` and the independent checker."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import pytest

from builders import check, dep, node, placed, problem, solve_doc
from scheduler import Plan, plan_to_dict, problem_from_dict, problem_to_dict, solve
from scheduler.cpsat import ClassModel, build
from scheduler.session import ClusterDelta, Session
from scheduler.solve import Solver
from scheduler.violations import find_violations


def per_node(plan: Plan) -> Counter[str]:
    return Counter(p.node for p in plan.placements)


def tiny_work(mode: str, **options: object) -> dict:
    """Two nodes capped at 5 and 3 shards, fractions of 1 milli and host-only shards: the
    accelerators would hold 3,000 fractions and the hosts any number of host-only shards."""
    return problem([node("n1", acc=2, max_shards=5), node("n2", acc=1, max_shards=3)],
                   [dep("f", replicas=6, accelerator_milli=1, locality="node"),
                    dep("h", acc=0, replicas=4, locality="node")], mode=mode, **options)


@pytest.mark.parametrize("mode, options", [("batch", {}), ("online", {}), ("online", {"batch_size": 4}),
                                           ("rebalance", {"max_moves": 4})])
def test_tiny_fractions_and_host_only_shards_stop_at_max_shards_and_say_why(mode: str, options: dict) -> None:
    plan = solve_doc(tiny_work(mode, **options))
    assert per_node(plan) == {"n1": 5, "n2": 3}
    [left] = plan.unplaced
    assert left.replicas == 2
    [reason] = left.reasons
    assert reason.code == "NODE_SHARDS"
    assert reason.message == ("0/2 nodes fit a shard: 2 NODE_SHARDS; shards per node: "
                              "n1 holds 5 of max_shards 5, n2 holds 3 of max_shards 3")


def test_a_gang_counts_its_own_shards_against_the_cap() -> None:
    """A 3-shard gang of host-only shards on one node of cap 2 does not fit; on a node of cap
    3 it does, and the message names the room the rule leaves."""
    plan = solve_doc(problem([node("n1", max_shards=2)], [dep("g", acc=0, shards=3, locality="node")]))
    assert not plan.placements
    [reason] = plan.unplaced[0].reasons
    assert (reason.code, reason.scope) == ("NODE_SHARDS", "n1")
    assert reason.message == ("a replica needs 3 shards in one node; NODE_SHARDS leaves node n1 room for 2: "
                              "shards per node: n1 holds 0 of max_shards 2")
    plan = solve_doc(problem([node("n1", max_shards=3)], [dep("g", acc=0, shards=3, locality="node")]))
    assert per_node(plan) == {"n1": 3}


def test_a_node_over_its_cap_keeps_its_shards_and_takes_no_new_one() -> None:
    """A cap lowered below what a node holds: what runs stays (as on a cordoned node), nothing
    new lands there."""
    doc = problem([node("n1", acc=2, max_shards=1), node("n2", acc=2)],
                  [dep("old", acc=0, replicas=3, locality="node"), dep("new", acc=0, replicas=2, locality="node")],
                  placements=[placed("old", "n1", [], replica=r) for r in range(3)])
    plan = solve_doc(doc)
    assert {(p.deployment, p.node) for p in plan.placements} == {("old", "n1"), ("new", "n2")}


def test_without_a_cap_the_plan_is_the_same_as_with_one_that_cannot_bind() -> None:
    """4,096 on every node (what the controller says) of a problem whose nodes hold a few shards:
    the same plan as without it, CP-SAT model included (no constraint added, no class split)."""
    from builders import busy_problem
    doc = busy_problem()
    capped = copy.deepcopy(doc)
    for n in capped["nodes"]:
        n["max_shards"] = 4096
    plain, bounded = solve_doc(doc), solve_doc(capped)
    assert plain.placements == bounded.placements and plain.unplaced == bounded.unplaced
    assert plain.stats.get("classes") == bounded.stats.get("classes")
    assert plain.stats.get("vars") == bounded.stats.get("vars")


def _model(doc: dict) -> ClassModel:
    solver = Solver(problem_from_dict(doc), 2000)
    pending = {d: list(range(dep.replicas)) for d, dep in enumerate(solver.state.deps)}
    m = build(solver.state, pending, 0, solver.state)
    assert isinstance(m, ClassModel)
    return m


def test_cpsat_adds_the_cap_only_where_it_could_bind() -> None:
    # Each deployment alone is held to the cap by its slots; the two together only by the model's
    # constraint, added where the pairs' upper bounds pass a class's room.
    fractions = [dep("f", replicas=40, accelerator_milli=10, locality="node"),
                 dep("h", acc=0, replicas=40, locality="node")]
    loose = _model(problem([node(f"n{i}", acc=1, max_shards=4096) for i in range(2)], fractions))
    tight = _model(problem([node(f"n{i}", acc=1, max_shards=8) for i in range(2)], fractions))
    none = _model(problem([node(f"n{i}", acc=1) for i in range(2)], fractions))
    size = [len(m.model.proto.constraints) for m in (none, loose, tight)]
    assert size[0] == size[1] and size[2] == size[1] + len(tight.classes)


def test_cpsat_places_no_more_than_the_cap_across_deployments() -> None:
    """Two deployments of fractions each fit a node's slots alone; together they pass its cap.
    The model's answer (kept when it beats the greedy) must respect it too."""
    doc = problem([node(f"n{i}", acc=2, max_shards=6) for i in range(3)],
                  [dep("a", replicas=8, accelerator_milli=100, locality="node"),
                   dep("b", replicas=8, accelerator_milli=50, locality="node", priority=1),
                   dep("g", acc=0, shards=2, locality="rack")])
    plan = solve_doc(doc)
    assert max(per_node(plan).values()) <= 6
    assert sum(per_node(plan).values()) == 18


def test_the_checker_refuses_a_plan_past_a_nodes_cap() -> None:
    doc = tiny_work("batch")
    plan = plan_to_dict(solve(problem_from_dict(copy.deepcopy(doc))))
    extra = {"deployment": "h", "replica": 3, "shard": 0, "node": "n2", "accelerator_indices": []}
    plan["placements"].append(extra)
    plan["unplaced"][0]["replicas"] -= 1
    plan["status"], plan["stats"] = "feasible", {"solve_ms": 1.0}
    assert [v.rule for v in check(doc, plan)] == ["NODE_SHARDS"]


def test_the_checker_lets_a_node_stay_over_a_lowered_cap_with_what_it_kept() -> None:
    doc = problem([node("n1", acc=2, max_shards=1)], [dep("old", acc=0, replicas=2, locality="node")],
                  placements=[placed("old", "n1", [], replica=r) for r in range(2)])
    kept = {"status": "infeasible", "placements": doc["placements"], "unplaced": [], "preempted": [], "moved": []}
    assert check(doc, kept) == []


def test_find_violations_names_a_node_past_its_cap() -> None:
    doc = problem([node("n1", acc=2, max_shards=2), node("n2", acc=2)], [dep("h", acc=0, replicas=3)],
                  placements=[placed("h", "n1", [], replica=r) for r in range(3)])
    found = find_violations(problem_from_dict(doc))
    assert [(v.rule, v.scope, v.tenants, v.message) for v in found] == [
        ("NODE_SHARDS", "node n1", ("t1",), "node n1: 3 shards placed > 2 max_shards")]
    doc["nodes"][0].pop("max_shards")
    assert find_violations(problem_from_dict(doc)) == []


def test_max_shards_round_trips_and_absent_stays_absent() -> None:
    doc = problem([node("n1", max_shards=7), node("n2")], [dep("a")])
    back = problem_to_dict(problem_from_dict(doc))
    assert [n.get("max_shards") for n in back["nodes"]] == [7, None]
    assert problem_from_dict(back) == problem_from_dict(doc)


def test_the_warm_session_counts_the_cap_as_solve_does() -> None:
    """Arrivals decided on the kept state stop at the cap, departures give room back, and a
    node whose cap changes is rebuilt with it."""
    start = problem_from_dict(problem([node("n1", acc=1, max_shards=3)], [dep("seed", acc=0)]))
    session = Session(dataclasses.replace(start, deployments=()))
    arrival = problem_from_dict(problem([node("n1")], [dep("f", replicas=5, accelerator_milli=1, locality="node")]))
    decision = session.place(arrival.deployments[0])
    assert len(decision.placements) == 3 and decision.unplaced is not None
    assert [r.code for r in decision.unplaced.reasons] == ["NODE_SHARDS"]
    reference = solve(dataclasses.replace(start, deployments=arrival.deployments), time_limit_ms=2000)
    assert reference.unplaced[0].reasons == decision.unplaced.reasons
    session.release("f", [0])
    assert len(session.place("f").placements) == 1
    wider = dataclasses.replace(start.nodes[0], max_shards=5)
    session.apply(ClusterDelta(nodes=(wider,)))
    assert len(session.place("f").placements) == 2
    assert len(session.snapshot().placements) == 5


def test_a_preemption_trial_puts_a_victim_back_only_within_the_cap() -> None:
    """A high-priority gang needs the one node's shard room: host-only preemptible work makes
    way, and what is spared is put back only while the cap holds (`room.restore`)."""
    doc = problem([node("n1", acc=2, max_shards=4)],
                  [dep("low", acc=0, replicas=4, locality="node", preemptible=True),
                   dep("vip", acc=0, shards=2, locality="node", priority=10)],
                  placements=[placed("low", "n1", [], replica=r) for r in range(4)], allow_preemption=True)
    plan = solve_doc(doc)
    assert per_node(plan) == {"n1": 4}
    assert len(plan.preempted) == 2


def test_node_classes_tell_rooms_apart_only_up_to_what_may_be_placed() -> None:
    """Two nodes alike but for how many host-only shards they hold (1 and 2, of 4096): one
    class for a model placing a few shards, as without a cap; two where the rooms could bind."""
    from scheduler.classes import node_classes
    doc = problem([node("n1", max_shards=4096), node("n2", max_shards=4096)], [dep("h", acc=0, replicas=3)],
                  placements=[placed("h", "n1", [], replica=0), placed("h", "n2", [], replica=1),
                              placed("h", "n2", [], replica=2)])
    state = Solver(problem_from_dict(doc), 2000).state
    assert len(node_classes(state, horizon=8)) == 1
    assert len(node_classes(state, horizon=5000)) == 2


def test_a_node_nominated_for_a_waiting_deployment_counts_only_the_shards_its_cap_lets_it_hold() -> None:
    from scheduler.nominate import empty_slots

    doc = problem([node("n1", acc=8, max_shards=2), node("n2", acc=8)], [dep("d", acc=1, replicas=8)],
                  tenants=[{"id": "t1"}])
    solver = Solver(problem_from_dict(doc), 1000)
    assert empty_slots(solver.state, 0).tolist() == [2, 8]
