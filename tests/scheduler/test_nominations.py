"""Nominated nodes (the problem's `nominations`, an extension of the interchange format): nodes
kept for a deployment waiting at the head of the line take no new shard of another deployment
of that priority or lower, in `solve()` (greedy and CP-SAT) and in a warm session; the
nominated deployment and higher priorities may use them; the reasons say so; the independent
checker refuses a plan that places against a nomination; and `choose_nodes` picks them."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from builders import dep, node, placed, problem, refusal  # noqa: E402
from checker import NODE_STATE, check_plan  # noqa: E402

from scheduler import plan_to_dict, problem_from_dict, problem_to_dict, solve  # noqa: E402
from scheduler.classes import node_classes  # noqa: E402
from scheduler.interchange import deployment_from_dict  # noqa: E402
from scheduler.model import Nomination  # noqa: E402
from scheduler.nominate import choose_nodes  # noqa: E402
from scheduler.session import Session  # noqa: E402
from scheduler.solve import Solver  # noqa: E402


def _nodes_of(plan, deployment: str) -> set[str]:
    return {p.node for p in plan.placements if p.deployment == deployment}


def _four_nodes(**kw) -> list[dict]:
    return [node(f"n{i}", rack="r1" if i < 2 else "r2", **kw) for i in range(4)]


def test_a_nominated_node_takes_no_shard_of_equal_or_lower_priority_and_the_reason_says_whose_it_is() -> None:
    doc = problem(_four_nodes(), [dep("small", acc=4, replicas=3, locality="node")])
    doc["nominations"] = [{"deployment": "big", "priority": 0, "nodes": ["n0", "n1"]}]
    plan = solve(problem_from_dict(doc))
    assert _nodes_of(plan, "small") == {"n2", "n3"}
    [unplaced] = plan.unplaced
    assert unplaced.reasons[0].code == "NODE_STATE"
    assert "nominated for big (priority 0" in unplaced.reasons[0].message and "n0, n1" in unplaced.reasons[0].message
    assert check_plan(doc, plan_to_dict(plan)) == []
    # Without the nomination the third replica fits: the nomination is what kept it off.
    assert not solve(problem_from_dict({**doc, "nominations": []})).unplaced


def test_the_nominated_deployment_and_higher_priorities_may_use_the_nodes() -> None:
    nodes = _four_nodes()
    doc = problem(nodes, [dep("big", acc=4, replicas=2, locality="node", priority=3),
                          dep("urgent", acc=4, replicas=1, locality="node", priority=5)])
    doc["nominations"] = [{"deployment": "big", "priority": 3, "nodes": ["n0", "n1", "n2", "n3"]}]
    plan = solve(problem_from_dict(doc))
    assert len(_nodes_of(plan, "big")) == 2 and len(_nodes_of(plan, "urgent")) == 1
    assert not plan.unplaced
    assert check_plan(doc, plan_to_dict(plan)) == []


def test_what_runs_on_a_nominated_node_stays_and_nothing_new_joins_it() -> None:
    doc = problem([node("n0")], [dep("small", acc=1, replicas=1, locality="node"),
                                 dep("other", acc=1, replicas=1, locality="node")],
                  placements=[placed("small", "n0", [0])], mode="online")
    doc["nominations"] = [{"deployment": "big", "priority": 0, "nodes": ["n0"]}]
    plan = solve(problem_from_dict(doc))
    assert [(p.deployment, p.node, p.accelerator_indices) for p in plan.placements] == [("small", "n0", (0,))]
    assert [u.deployment for u in plan.unplaced] == ["other"]
    assert check_plan(doc, plan_to_dict(plan)) == []


def test_cpsat_sees_nominated_nodes_as_classes_of_their_own() -> None:
    doc = problem(_four_nodes(), [dep("a", acc=4, replicas=4, locality="node")])
    doc["nominations"] = [{"deployment": "big", "priority": 0, "nodes": ["n0"]}]
    solver = Solver(problem_from_dict(doc), 2000)
    classes = {frozenset(c.nodes) for c in node_classes(solver.state)}
    assert frozenset({0}) in classes and frozenset({0, 1}) not in classes  # n0 and n1 were one class
    plan = solve(problem_from_dict(doc))
    assert _nodes_of(plan, "a") == {"n1", "n2", "n3"}
    assert check_plan(doc, plan_to_dict(plan)) == []


def test_the_checker_refuses_a_new_shard_on_a_node_nominated_for_another() -> None:
    doc = problem(_four_nodes(), [dep("a", acc=1, priority=2), dep("b", acc=1, priority=3)])
    doc["nominations"] = [{"deployment": "big", "priority": 2, "nodes": ["n0"]}]
    plan = {"status": "feasible", "placements": [placed("a", "n0", [0]), placed("b", "n0", [1])], "unplaced": []}
    violations = check_plan(doc, plan)
    assert [v.rule for v in violations] == [NODE_STATE]  # a (priority 2) may not; b (3) may
    assert "nominated for big" in violations[0].message


def test_nominations_round_trip_and_bad_ones_are_refused_with_their_path() -> None:
    doc = problem(_four_nodes(), [dep("a")])
    doc["nominations"] = [{"deployment": "big", "priority": 7, "nodes": ["n1", "n3"]}]
    assert problem_from_dict(doc).nominations == (Nomination("big", 7, ("n1", "n3")),)
    assert problem_to_dict(problem_from_dict(doc))["nominations"] == doc["nominations"]
    assert "nominations" not in problem_to_dict(problem_from_dict({**doc, "nominations": []}))
    cases = [
        ([{"deployment": "big", "priority": 0, "nodes": ["n9"]}], "nominations[0].nodes[0]", "unknown node"),
        ([{"deployment": "big", "nodes": ["n0"]}, {"deployment": "c", "nodes": ["n0"]}],
         "nominations[1].nodes[0]", "already nominated for big"),
        ([{"deployment": "big", "nodes": ["n0", "n1", "n0"]}], "nominations[0].nodes[2]", "listed twice"),
        ([{"deployment": "big", "nodes": [3]}], "nominations[0].nodes[0]", "unknown node"),
        ([{"deployment": "big", "priority": True, "nodes": ["n0"]}], "nominations[0].priority", "integer"),
        ([{"deployment": "", "nodes": ["n0"]}], "nominations[0].deployment", "non-empty"),
        ([{"deployment": "big", "priority": 1.5, "nodes": ["n0"]}], "nominations[0].priority", "integer"),
        ([{"deployment": "big", "nodes": "n0"}], "nominations[0]", "a nomination is"),
        ({"deployment": "big"}, "nominations[0]", "a nomination is"),
    ]
    for value, path, words in cases:
        error = refusal({**doc, "nominations": value})
        assert error.field == path and words in str(error), (value, error)


def test_choose_nodes_takes_the_domain_with_the_most_room_now_and_only_as_many_nodes_as_a_replica_needs() -> None:
    nodes = [node(f"a{i}", rack="ra") for i in range(4)] + [node(f"b{i}", rack="rb") for i in range(4)]
    # Rack ra has 3 free accelerators, rack rb 6: a 6-shard gang waits least in rb.
    busy = [placed(f"s{k}", f"a{k // 4}", [k % 4]) for k in range(13)] + \
           [placed(f"s{13 + k}", f"b{k // 4}", [k % 4]) for k in range(10)]
    deployments = [dep(f"s{k}", acc=1, locality="node") for k in range(23)] + \
                  [dep("big", acc=1, shards=6, locality="rack")]
    solver = Solver(problem_from_dict(problem(nodes, deployments, placements=busy, mode="online")), 2000)
    d = solver.topo.deployment_index["big"]
    chosen = [solver.topo.node_ids[n] for n in choose_nodes(solver.state, d)]
    # b3 (4 free) then b2 (2 free): 8 accelerators once emptied, and all 6 needed free now.
    assert sorted(chosen) == ["b2", "b3"]
    # A whole-node shard at locality node: the emptiest node that could hold it.
    wide = solver.state.add_deployment(deployment_from_dict(dep("wide", acc=4, locality="node")))
    assert [solver.topo.node_ids[n] for n in choose_nodes(solver.state, wide)] == ["b3"]


def test_choose_nodes_finds_nothing_for_a_replica_no_domain_could_hold_and_skips_others_nominations() -> None:
    nodes = [node(f"a{i}", rack="ra") for i in range(2)]
    doc = problem(nodes, [dep("huge", acc=1, shards=9, locality="rack"), dep("fits", acc=1, shards=4)])
    solver = Solver(problem_from_dict(doc), 2000)
    assert choose_nodes(solver.state, 0) == []  # 8 accelerators in the rack, 9 needed
    solver.topo.nominate([Nomination("other", 0, ("a0",))])
    assert [solver.topo.node_ids[n] for n in choose_nodes(solver.state, 1)] == ["a1"]


def test_between_domains_as_full_choose_nodes_takes_the_one_gangs_hold_least() -> None:
    # Racks ra and rb both full: ra held by a placed 8-shard gang, rb by single-accelerator work.
    # A gang that leaves only whole would keep the next gang waiting: rb is nominated.
    nodes = [node(f"{r}{i}", rack=f"r{r}") for r in "ab" for i in range(2)]
    busy = [placed("gang0", f"a{k // 4}", [k % 4], shard=k) for k in range(8)] + \
           [placed(f"s{k}", f"b{k // 4}", [k % 4]) for k in range(8)]
    deployments = [dep("gang0", acc=1, shards=8), dep("gang1", acc=1, shards=8)] + \
                  [dep(f"s{k}", acc=1, locality="node") for k in range(8)]
    solver = Solver(problem_from_dict(problem(nodes, deployments, placements=busy, mode="online")), 2000)
    d = solver.topo.deployment_index["gang1"]
    assert sorted(solver.topo.node_ids[n] for n in choose_nodes(solver.state, d)) == ["b0", "b1"]
    # At locality node likewise: a whole-node shard is nominated a node of single-accelerator work.
    wide = solver.state.add_deployment(deployment_from_dict(dep("wide", acc=4, locality="node")))
    assert [solver.topo.node_ids[n][0] for n in choose_nodes(solver.state, wide)] == ["b"]


def test_in_a_domain_the_fewest_nodes_go_before_nodes_gangs_hold_least() -> None:
    # One rack, all full: an 8-accelerator node a gang holds, two 6-accelerator nodes of singles.
    nodes = [node("big", acc=8), node("m0", acc=6), node("m1", acc=6)]
    busy = [placed("gang0", "big", [k], shard=k) for k in range(8)] + \
           [placed(f"s{k}", f"m{k // 6}", [k % 6]) for k in range(12)]
    deployments = [dep("gang0", acc=1, shards=8), dep("gang1", acc=1, shards=8)] + \
                  [dep(f"s{k}", acc=1, locality="node") for k in range(12)]
    solver = Solver(problem_from_dict(problem(nodes, deployments, placements=busy, mode="online")), 2000)
    d = solver.topo.deployment_index["gang1"]
    assert [solver.topo.node_ids[n] for n in choose_nodes(solver.state, d)] == ["big"]  # not 12 for 8


def test_choose_nodes_zones_apart_keeps_to_zones_where_no_other_deployment_holds_nodes() -> None:
    # Zone z1: racks ra (most room) and rb; zone z2: rack rc (less room).
    nodes = [node(f"{r}{i}", rack=f"r{r}") for r in "abc" for i in range(2)]
    busy = [placed("s0", "c0", [0]), placed("s1", "c1", [0])]
    doc = problem(nodes, [dep("gang", acc=1, shards=4), dep("s0", acc=1, locality="node"),
                          dep("s1", acc=1, locality="node")], placements=busy, mode="online",
                  racks=[{"id": "ra", "row": "w1"}, {"id": "rb", "row": "w1"}, {"id": "rc", "row": "w2"}],
                  rows=[{"id": "w1", "zone": "z1"}, {"id": "w2", "zone": "z2"}])
    solver = Solver(problem_from_dict(doc), 2000)
    names = solver.topo.node_ids
    d = solver.topo.deployment_index["gang"]

    def zone_of_choice(zones_apart: bool = False) -> str | None:
        chosen = {names[n][0] for n in choose_nodes(solver.state, d, zones_apart=zones_apart)}
        return None if not chosen else "z2" if chosen == {"c"} else "z1" if chosen <= {"a", "b"} else str(chosen)

    assert zone_of_choice() == "z1"  # the most room
    solver.topo.nominate([Nomination("other", 0, ("b0",))])  # another deployment's node in z1
    assert zone_of_choice() == "z1"  # nodes apart are enough
    assert zone_of_choice(zones_apart=True) == "z2"
    solver.topo.nominate([Nomination("other", 0, ("b0",)), Nomination("third", 0, ("c0",))])
    assert zone_of_choice(zones_apart=True) is None  # every zone holds another's nodes
    solver.topo.nominate([Nomination("gang", 0, ("a0",)), Nomination("third", 0, ("c0",))])
    assert zone_of_choice(zones_apart=True) == "z1"  # its own nodes do not count


def _full_cluster(n_racks: int = 4, per_rack: int = 4) -> tuple[dict, list[str]]:
    nodes = [node(f"r{r}n{i}", rack=f"r{r}") for r in range(n_racks) for i in range(per_rack)]
    smalls, placements = [], []
    for k, n in enumerate(nodes):
        for a in range(4):
            name = f"s{k}-{a}"
            smalls.append(dep(name, acc=1, locality="node"))
            placements.append(placed(name, n["id"], [a]))
    return problem(nodes, smalls, placements=placements, mode="online"), [d["id"] for d in smalls]


def _churn(nominate: bool, steps: int, seed: int) -> int | None:
    """A full cluster where every step one single-accelerator deployment leaves and a new one
    arrives, and an 8-shard gang (one rack) waits: the step the gang was placed at, or None."""
    doc, running = _full_cluster()
    session = Session(problem_from_dict(doc))
    gang = deployment_from_dict(dep("gang", acc=1, shards=8, locality="rack"))
    assert session.place(gang).placements == ()
    if nominate:
        session.nominate([Nomination("gang", 0, session.nominees("gang"))])
    rng = random.Random(seed)
    for step in range(steps):
        gone = running.pop(rng.randrange(len(running)))
        session.release(gone)
        name = f"new{step}"
        if session.place(deployment_from_dict(dep(name, acc=1, locality="node"))).placements:
            running.append(name)
        if session.place("gang").placements:
            return step
    return None


def test_a_waiting_gang_behind_a_stream_of_small_arrivals_is_placed_only_with_nominated_nodes() -> None:
    for seed in (1, 2, 3):
        assert _churn(nominate=False, steps=300, seed=seed) is None  # each freed accelerator is taken again
        placed_at = _churn(nominate=True, steps=300, seed=seed)
        assert placed_at is not None, seed


def test_a_session_keeps_single_shards_off_nominated_nodes_and_lets_them_go_when_the_nomination_ends() -> None:
    doc = problem([node("n0"), node("n1")], [dep("x", acc=1, locality="node")])
    session = Session(problem_from_dict(doc))
    session.nominate([Nomination("big", 0, ("n0",))])
    nodes = set()
    for k in range(4):
        nodes |= {p.node for p in session.place(deployment_from_dict(dep(f"one{k}", acc=1, locality="node"))).placements}
    assert nodes == {"n1"}
    assert session.place(deployment_from_dict(dep("five", acc=1, locality="node"))).placements == ()
    assert session.snapshot().nominations == (Nomination("big", 0, ("n0",)),)
    session.nominate([])
    assert {p.node for p in session.place("five").placements} == {"n0"}
    assert session.snapshot().nominations == ()


def test_nominees_of_an_id_the_session_does_not_know_is_none_and_the_session_goes_on() -> None:
    session = Session(problem_from_dict(problem([node("n0")], [dep("x", acc=1)])))
    assert session.nominees("nobody") == ()
    assert session.nominees("x") == ("n0",)


def test_a_session_keeps_nominated_nodes_from_lower_priorities_only_whatever_order_they_come_in() -> None:
    doc = problem([node("n0"), node("n1")], [dep("x", acc=1, locality="node")])
    session = Session(problem_from_dict(doc))
    session.nominate([Nomination("big", 3, ("n0",))])

    def one(name: str, priority: int) -> set[str]:
        d = deployment_from_dict(dep(name, acc=1, locality="node", priority=priority))
        return {p.node for p in session.place(d).placements}

    assert [one(f"low{k}", 3) for k in range(4)] == [{"n1"}] * 4  # the same priority: kept off n0
    assert one("low4", 0) == set()
    assert one("high", 4) == {"n0"}  # a higher priority (same tenant and shape) may go there
    assert one("low5", 3) == set()  # and the lower ones still may not
    assert one("high2", 9) == {"n0"}


def test_a_session_follows_nominations_ending_beside_others_that_stay() -> None:
    # n1 is b's (priority 3); a's n0 and n2 are full but for one accelerator of n2.
    doc = problem([node("n0", acc=1), node("n1"), node("n2")],
                  [dep(f"x{k}", acc=1, locality="node") for k in range(4)],
                  placements=[placed("x0", "n0", [0])] + [placed(f"x{k}", "n2", [k - 1]) for k in range(1, 4)],
                  mode="online")
    session = Session(problem_from_dict(doc))
    session.nominate([Nomination("a", 5, ("n0",)), Nomination("b", 3, ("n1",))])

    def one(name: str, priority: int) -> set[str]:
        d = deployment_from_dict(dep(name, acc=1, locality="node", priority=priority))
        return {p.node for p in session.place(d).placements}

    assert one("four", 4) == {"n2"}  # b's n1 admits a priority 4 too; the fuller n2 is the better fit
    session.nominate([Nomination("b", 3, ("n1",))])  # a ends (n1's nomination stays, first in the list now)
    assert one("three", 3) == set()  # n1 refuses priority 3 still: the candidates kept for "four" are not its
    assert one("five", 5) == {"n1"}
    assert session.snapshot().nominations == (Nomination("b", 3, ("n1",)),)


def test_nominations_keep_only_the_nodes_a_session_has_and_a_node_named_twice_goes_to_the_later() -> None:
    session = Session(problem_from_dict(problem([node("n0"), node("n1")], [dep("x", acc=1)])))
    session.nominate([Nomination("a", 1, ("n0", "gone")), Nomination("b", 2, ("n0", "n1"))])
    assert session.snapshot().nominations == (Nomination("a", 1, ()), Nomination("b", 2, ("n0", "n1")))
    problem_from_dict(problem_to_dict(session.snapshot()))  # a document the interchange takes back
