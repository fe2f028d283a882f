"""Reasons for what does not fit: codes from the spec, binding numbers, aggregated."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings

from builders import SHARED, codes, dep, messages, node, placed, placed_count, problem, solve_doc
from strategies import problems

from scheduler import emit, problem_from_dict, solve
from scheduler.explain import explain


def test_tiny_unplaceable_gives_the_three_reasons() -> None:
    doc = json.loads((SHARED / "examples" / "tiny-unplaceable.problem.json").read_text())
    plan = solve_doc(doc)
    [claude] = [u for u in plan.unplaced if u.deployment == "claude-serving"]
    by_code = {r.code: r for r in claude.reasons}
    assert {"POWER_RACK", "EXCLUSION", "NODE_STATE"} <= set(by_code)
    power = by_code["POWER_RACK"]
    assert power.scope == "rack-a1"
    assert "1200 W used + 5600 W needed > 6500 W budget" in power.message
    assert "6800 W" in power.message  # the smallest budget that would make it fit
    assert "rack-a2" in by_code["EXCLUSION"].message
    assert "msft-internal" in by_code["EXCLUSION"].message
    assert "a2-n2" in by_code["NODE_STATE"].message


def test_node_counts_are_aggregated_per_reason() -> None:
    nodes = [node(f"c{i}", state="cordoned") for i in range(3)] + \
        [node(f"s{i}", model="old") for i in range(2)]
    plan = solve_doc(problem(nodes, [dep("d", accelerator_models=["maia-100"])]))
    assert codes(plan, "d") == {"NODE_STATE", "ACCELERATOR_MODEL"}
    assert "0/5 nodes fit a shard: 3 NODE_STATE, 2 ACCELERATOR_MODEL" in messages(plan, "d")


def test_every_unplaced_replica_is_counted() -> None:
    plan = solve_doc(problem([node("n1")], [dep("d", acc=4, replicas=3, locality="node")]))
    assert [(u.deployment, u.replicas) for u in plan.unplaced] == [("d", 2)]
    assert all(r.message for u in plan.unplaced for r in u.reasons)


def burst_node(preemptible: bool = True, burst_priority: int = 0, **options) -> dict:
    """n1 full of two 2-accelerator replicas of `burst`; `svc` needs the whole node."""
    return problem([node("n1", acc=4), node("n2", acc=2)],
                   [dep("burst", acc=2, replicas=2, preemptible=preemptible,
                        priority=burst_priority),
                    dep("other", acc=1, preemptible=True),
                    dep("svc", acc=4, priority=5)],
                   placements=[placed("burst", "n1", [0, 1], replica=0),
                               placed("burst", "n1", [2, 3], replica=1),
                               placed("other", "n2", [0])], **options)


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_unplaced_names_the_preemption_that_would_fit_it(mode: str) -> None:
    plan = solve_doc(burst_node(mode=mode))
    assert plan.preempted == () and len(plan.placements) == 3  # a hint only: nothing evicted
    [hinted] = [r for u in plan.unplaced if u.deployment == "svc" for r in u.reasons
                if "preempting" in r.message]
    assert hinted.code == "CAPACITY"
    assert hinted.message.endswith(
        "; 1 more replica fits after preempting 2 replicas of burst (allow_preemption is off)")


@pytest.mark.parametrize("case", [dict(preemptible=False), dict(burst_priority=5)],
                         ids=["not-preemptible", "not-lower-priority"])
def test_no_preemption_hint_without_preemptible_lower_priority_work(case: dict) -> None:
    plan = solve_doc(burst_node(**case))
    assert codes(plan, "svc") == {"CAPACITY"}
    assert "preempting" not in messages(plan, "svc")


def test_no_preemption_hint_when_preemption_is_allowed() -> None:
    plan = solve_doc(burst_node(allow_preemption=True))
    assert placed_count(plan, "svc") == 1
    assert "allow_preemption is off" not in " ".join(
        r.message for u in plan.unplaced for r in u.reasons)


def raised_min_replicas(**options) -> dict:
    """Four whole-node slots: `m` runs 2 replicas (min_replicas raised to 3, of 3), `blk`
    (higher priority) the other two nodes, and one more node is cordoned."""
    nodes = [node(f"n{i}", acc=4) for i in range(4)] + [node("c0", acc=4, state="cordoned")]
    return problem(nodes, [dep("m", acc=4, replicas=3, min_replicas=3, locality="node", priority=10),
                           dep("blk", acc=4, replicas=2, locality="node", priority=50)],
                   placements=[placed("m", "n0", [0, 1, 2, 3]), placed("m", "n1", [0, 1, 2, 3], replica=1),
                               placed("blk", "n2", [0, 1, 2, 3]), placed("blk", "n3", [0, 1, 2, 3], replica=1)],
                   **options)


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_a_deployment_short_of_min_replicas_is_told_so(mode: str) -> None:
    # Two of three replicas fit (the nodes `m` ran on): fewer than min_replicas placed means none
    # are, so none run. The reasons name min_replicas first (the node filters' ones alone said
    # "2/5 nodes fit a shard", nothing about why those two stay empty), one reason per code.
    plan = solve_doc(raised_min_replicas(mode=mode))
    assert placed_count(plan, "m") == 0 and placed_count(plan, "blk") == 2
    [m] = [u for u in plan.unplaced if u.deployment == "m"]
    assert m.replicas == 3 and [r.code for r in m.reasons] == ["CAPACITY", "NODE_STATE"]
    assert m.reasons[0].message.startswith(
        "min_replicas 3 not reachable: room for at most 2 replica(s) of m now; "
        "fewer than min_replicas placed means none are; 2/5 nodes fit a shard")


def test_a_session_gives_the_same_reason_as_solve() -> None:
    from scheduler import problem_from_dict
    from scheduler.session import Session

    doc = raised_min_replicas(mode="online")
    session = Session(problem_from_dict(doc))
    decision = session.place("m")
    assert decision.released == (0, 1) and not decision.placements
    assert decision.unplaced == next(u for u in solve_doc(doc).unplaced if u.deployment == "m")


def test_a_quota_short_of_min_replicas_is_named_with_the_need() -> None:
    doc = problem([node(f"n{i}", acc=4) for i in range(4)],
                  [dep("m", acc=4, replicas=3, min_replicas=3, locality="node")],
                  tenants=[{"id": "t1", "max_accelerators": 8}])
    plan = solve_doc(doc)
    assert placed_count(plan, "m") == 0
    assert codes(plan, "m") == {"CAPACITY", "QUOTA_ACCELERATORS"}
    assert "room for at most 2 replica(s)" in messages(plan, "m")
    assert "0 accelerators + 12 needed > 8 max_accelerators" in messages(plan, "m")


def test_a_preempted_deployment_gets_one_capacity_reason_led_by_its_preemption() -> None:
    """low (preemptible) fills the one node; vip (priority 10) preempts it. low's reasons: one
    per code, the CAPACITY one saying first that its replica was preempted, then why none fits
    (two CAPACITY reasons used to be listed, the preemption's ahead of the node filters')."""
    doc = problem(nodes=[node("n1", acc=4)],
                  deployments=[dep("low", tenant="t0", acc=4, preemptible=True),
                               dep("vip", tenant="t1", acc=4, priority=10)],
                  placements=[{"deployment": "low", "replica": 0, "shard": 0, "node": "n1",
                               "accelerator_indices": [0, 1, 2, 3]}],
                  mode="rebalance", allow_preemption=True)
    plan = solve_doc(doc)
    assert [p.deployment for p in plan.preempted] == ["low"]
    [low] = [u for u in plan.unplaced if u.deployment == "low"]
    reason_codes = [r.code for r in low.reasons]
    assert sorted(reason_codes) == sorted(set(reason_codes)), low.reasons
    capacity = [r.message for r in low.reasons if r.code == "CAPACITY"]
    assert len(capacity) == 1 and capacity[0].startswith("1 replica(s) preempted for higher-priority"), low.reasons
    assert "nodes fit a shard" in capacity[0], low.reasons  # the node filters' count, joined to it


def test_a_capacity_reason_says_what_the_nodes_it_names_have_free() -> None:
    """'need 4 free accelerator(s): n1 full' read as wrong where n1 had 3 of them free."""
    doc = problem([node("n1", rack="r0", acc=4), node("n2", rack="r0", acc=2)],
                  [dep("small", acc=1, locality="node"), dep("big", acc=4, locality="node")],
                  placements=[placed("small", "n1", [0])])
    assert "need 4 free accelerator(s) on one node: n1 has 3, n2 has 2" in messages(solve_doc(doc), "big")
    full = problem([node("n1", rack="r0", acc=1)],
                   [dep("small", acc=1, locality="node"), dep("more", acc=1, locality="node")],
                   placements=[placed("small", "n1", [0])])
    assert "need 1 free accelerator(s): n1 full" in messages(solve_doc(full), "more")


def test_a_node_without_accelerators_is_said_to_have_none_not_to_be_full() -> None:
    nodes = [node("host", acc=0), node("n1", acc=1)]
    doc = problem(nodes, [dep("run", locality="node"), dep("more", locality="node"),
                          dep("half", accelerator_milli=500, tenant="t2", locality="node")],
                  placements=[placed("run", "n1", [0])])
    plan = solve_doc(doc)
    assert "need 1 free accelerator(s): n1 full; host has no accelerators" in messages(plan, "more")
    assert "need 500 milli of an accelerator: n1 full; host has no accelerators" in messages(plan, "half")
    alone = solve_doc(problem([node("host", acc=0)], [dep("more", locality="node")]))
    assert "need 1 free accelerator(s): host has no accelerators" in messages(alone, "more")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems(modes=("batch", "rebalance")))
def test_batch_reasons_say_the_cluster_the_plan_leaves(doc: dict) -> None:
    """Without preemption, what a batch solve says of a deployment it leaves short is said of
    the cluster its plan leaves. The greedy's reasons were kept after CP-SAT's answer (or the
    moves') was adopted instead: a rack said to hold a tenant the plan put elsewhere, a tenant
    said to hold 0 accelerators the plan gave 3.5. And those of a deployment the greedy tried
    before others took more room said a cluster emptier than the plan's."""
    doc["options"]["allow_preemption"] = False
    said: dict[str, list[tuple[str, str]]] = {}
    fresh: dict[str, list[tuple[str, str]]] = {}
    emitted = emit.unplaced_with_reasons

    def recorded(solver, preempted, only=None):  # noqa: ANN001, ANN202
        for d in range(len(solver.state.deps)) if only is None else only:
            if solver.pending(d):
                fresh[solver.state.deps[d].id] = [(r.code, r.message) for r in explain(solver.state, d)]
        unplaced, limited = emitted(solver, preempted, only)
        said.update((u.deployment, [(r.code, r.message) for r in u.reasons]) for u in unplaced)
        return unplaced, limited

    with mock.patch.object(emit, "unplaced_with_reasons", recorded):
        solve(problem_from_dict(copy.deepcopy(doc)), time_limit_ms=2000)
    def same(told: list[tuple[str, str]], now: list[tuple[str, str]]) -> bool:
        told = [(c, m) for c, m in told if c != "TIME_LIMIT"]  # the clock's, not the cluster's
        # A message may end with a hint (`emit.preemption_hints`: what preempting would fit).
        return len(told) == len(now) and all(c == c2 and m.startswith(m2) for (c, m), (c2, m2) in zip(told, now))

    stale = {d: (said[d], fresh[d]) for d in said if not same(said[d], fresh[d])}
    assert not stale, stale


def test_an_id_of_the_documents_starting_with_an_underscore_is_named() -> None:
    """Ids are any string: `_n1` was told as "the only node (none declared)", scope None, as if
    it were a row or zone the document left out (implied under an internal id)."""
    plan = solve_doc(problem([node("_n1", rack="_r1", acc=2), node("_n2", rack="_r2", acc=2),
                              node("_n3", rack="_r2", acc=1)],
                             [dep("g", acc=1, shards=3, locality="node"), dep("h", acc=1, shards=4, locality="rack")]))
    said = {u.deployment: [(r.code, r.message, r.scope) for r in u.reasons] for u in plan.unplaced}
    assert ("LOCALITY", "locality node: a replica needs 3 shards in one node; the best, _n1, has room for 2",
            "_n1") in said["g"]
    assert ("LOCALITY", "locality rack: a replica needs 4 shards in one rack; the best, _r2, has room for 3",
            "_r2") in said["h"]
