"""The warm session (scheduler/session.py) against `solve()` and the independent checker.

Property tests play random event sequences (arrivals, departures, cordons, nodes going down,
coming up, added, shrunk and removed, contract changes) into one `Session`. After every event the
change it made, read as a plan over the state before it, must pass the checker; and every
arrival is compared with `solve()` on the same state (the session's snapshot with the arrival
pending, online mode):
  * with best-fit scoring the two make the very same decision (placements, reasons);
  * with FGD scoring (what the session learnt of the workload differs from one problem's)
    they may pick other nodes, but a deployment the session cannot place a replica of is
    unplaceable for `solve()` too, and the other way round.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from builders import dep, node, placed, problem  # noqa: E402
from checker import check_plan  # noqa: E402
from strategies import problems  # noqa: E402

from scheduler import (Node, Plan, Problem, Reason, Tenant, Unplaced, plan_to_dict,  # noqa: E402
                       problem_from_dict, problem_to_dict, solve)
from scheduler.session import ClusterDelta, Decision, Session  # noqa: E402

Doc = dict[str, Any]
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
PLACEHOLDER = (Reason("CAPACITY", "left unplaced by an earlier decision"),)


def with_arrival(snapshot: Problem, arrival: Any) -> Problem:
    return dataclasses.replace(snapshot, deployments=snapshot.deployments + (arrival,))


def change_as_plan(before: Problem, after: Problem, decisions: list[Decision]) -> Doc:
    """What the session did between two snapshots, as a plan over `before`: the whole
    resulting placement set, every deployment short of replicas (the decisions' reasons,
    else a placeholder: earlier decisions worded those), preemptions and moves."""
    placed_now: dict[str, set[int]] = {}
    for p in after.placements:
        placed_now.setdefault(p.deployment, set()).add(p.replica)
    reasons = {d.deployment: d.unplaced.reasons for d in decisions if d.unplaced is not None}
    unplaced = tuple(
        Unplaced(d.id, d.replicas - len(placed_now.get(d.id, ())),
                 reasons.get(d.id, PLACEHOLDER))
        for d in before.deployments if d.replicas > len(placed_now.get(d.id, ())))
    was = {(p.deployment, p.replica) for p in before.placements}
    new = {(p.deployment, p.replica) for p in after.placements} - was
    status = "infeasible" if unplaced and not new and not any(d.moved for d in decisions) \
        else "feasible"
    plan = Plan(status=status, placements=after.placements, unplaced=unplaced,
                preempted=tuple(v for d in decisions for v in d.preempted),
                moved=tuple(m for d in decisions for m in d.moved))
    return plan_to_dict(plan)


def assert_valid(before: Problem, after: Problem, decisions: list[Decision]) -> None:
    doc = problem_to_dict(before)
    plan = change_as_plan(before, after, decisions)
    violations = check_plan(doc, plan)
    assert not violations, (violations, plan)


def only_pending(state: Problem, target: Any) -> Problem:
    """The state with `target` the one deployment short of replicas: the others keep just
    what they have placed (an online `solve()` would otherwise place them too)."""
    have: dict[str, int] = {}
    for p in {(p.deployment, p.replica) for p in state.placements}:
        have[p[0]] = have.get(p[0], 0) + 1
    others = tuple(dataclasses.replace(d, replicas=have[d.id],
                                       min_replicas=min(d.min_replicas, have[d.id]))
                   for d in state.deployments if d.id != target.id and d.id in have)
    return dataclasses.replace(state, deployments=others + (target,))


def solve_arrival(state: Problem, arrival: Any) -> Plan:
    return solve(only_pending(state, arrival), time_limit_ms=2000)


# ---- random event sequences ---------------------------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Doc, list[tuple[str, int]]]:
    """A random cluster with some work running, the rest of its deployments arriving, and
    events in between (each an action and a number that picks its target)."""
    doc = draw(problems(modes=("online",), max_nodes=6, max_deployments=6))
    doc["options"].pop("batch_size", None)
    actions = st.sampled_from(["arrive"] * 4 + ["depart", "scale", "cordon", "uncordon",
                                                 "down", "up", "add_node", "remove_node",
                                                 "shrink", "contract", "retry"])
    events = draw(st.lists(st.tuples(actions, st.integers(0, 1000)), min_size=1, max_size=12))
    return doc, events


def split_arrivals(doc: Doc) -> tuple[Problem, list[Any]]:
    """The problem with only its running deployments, and the others as arrivals."""
    problem_ = problem_from_dict(copy.deepcopy(doc))
    running = {p.deployment for p in problem_.placements}
    start = dataclasses.replace(
        problem_, deployments=tuple(d for d in problem_.deployments if d.id in running))
    return start, [d for d in problem_.deployments if d.id not in running]


def play(doc: Doc, events: list[tuple[str, int]], exact: bool) -> None:
    start, arrivals = split_arrivals(doc)
    session = Session(start)
    before = dataclasses.replace(start, options=session.options)
    assert_valid(before, session.snapshot(), session.repaired_at_load)
    for action, k in events:
        state = session.snapshot()
        if currently_in_test_context():  # a property test's example, not a replayed one
            note(f"{action} {k}")
        live = [d for d in state.deployments]
        nodes = list(state.nodes)
        if action == "arrive" and arrivals:
            arrival = arrivals.pop(0)
            reference = solve_arrival(state, arrival)
            decision = session.place(arrival)
            assert_says_what_changed(state, session.snapshot(), decision)
            compare(arrival.id, decision, reference, exact, arrival.min_replicas)
            assert_valid(with_arrival(state, arrival), session.snapshot(), [decision])
        elif action == "retry" and session.pending():
            target = session.pending()[k % len(session.pending())]
            spec = next(d for d in state.deployments if d.id == target)
            reference = solve_arrival(state, spec)
            decision = session.place(target)
            assert_says_what_changed(state, session.snapshot(), decision)
            assert_valid(state, session.snapshot(), [decision])
            compare(target, decision, reference, exact, spec.min_replicas,
                    frozenset(p for p in state.placements if p.deployment == target))
        elif action == "depart" and live:
            session.release(live[k % len(live)].id)
        elif action == "scale" and live:
            d = live[k % len(live)]
            decision = session.place(dataclasses.replace(
                d, replicas=1 + k % 3, min_replicas=1))
            assert_says_what_changed(state, session.snapshot(), decision)
            assert_valid(dataclasses.replace(state, deployments=tuple(
                dd if dd.id != d.id else dataclasses.replace(d, replicas=1 + k % 3,
                                                               min_replicas=1)
                for dd in state.deployments), placements=tuple(
                p for p in state.placements if p.deployment != d.id or p.replica < 1 + k % 3)),
                session.snapshot(), [decision])
        elif action in ("cordon", "uncordon", "down", "up") and nodes:
            n = nodes[k % len(nodes)]
            new_state = {"cordon": "cordoned", "uncordon": "ready", "down": "down",
                         "up": "ready"}[action]
            if n.state == "down" and action in ("cordon", "uncordon"):
                new_state = "down"  # a cordon does not power a node on (down > cordoned, as in the controller)
            changed = dataclasses.replace(n, state=new_state)
            decisions = session.apply(ClusterDelta(nodes=(changed,)))
            before = dataclasses.replace(state, nodes=tuple(
                changed if x.id == n.id else x for x in state.nodes))
            assert_valid(before, session.snapshot(), decisions)
        elif action == "add_node":
            rack = state.racks[k % len(state.racks)].id
            new = Node(id=f"extra{k}", rack=rack, accelerators=1 + k % 4,
                       accelerator_model="m1", idle_power_w=0.0)
            assert session.apply(ClusterDelta(nodes=(new,))) == []
            assert_valid(session.snapshot(), session.snapshot(), [])
        elif action == "remove_node" and len(nodes) > 1:
            n = nodes[k % len(nodes)]
            decisions = session.apply(ClusterDelta(removed_nodes=(n.id,)))
            # Read over the state before: the removed node as if it went down.
            before = dataclasses.replace(state, nodes=tuple(
                dataclasses.replace(x, state="down") if x.id == n.id else x
                for x in state.nodes))
            after = session.snapshot()
            assert all(p.node != n.id for p in after.placements)
            assert_valid(before, dataclasses.replace(after, nodes=before.nodes), decisions)
        elif action == "shrink" and any(n.accelerators > 1 for n in nodes):
            n = [x for x in nodes if x.accelerators > 1][k % sum(
                1 for x in nodes if x.accelerators > 1)]
            smaller = dataclasses.replace(n, accelerators=n.accelerators - 1)
            decisions = session.apply(ClusterDelta(nodes=(smaller,)))
            after = session.snapshot()
            assert all(max(p.accelerator_indices, default=-1) < smaller.accelerators
                       for p in after.placements if p.node == n.id)
            # Shards on the accelerator that went away were placed again (or their gang).
            gone = {(p.deployment, p.replica, p.shard) for p in state.placements
                    if p.node == n.id and max(p.accelerator_indices, default=-1)
                    >= smaller.accelerators}
            redone = {(p.deployment, p.replica, p.shard) for d in decisions
                      for p in d.placements}
            stopped = {(d.deployment, r) for d in decisions for r in d.released}
            assert all(g in redone or g[:2] in stopped or
                       any(u.deployment == g[0] for u in [d.unplaced for d in decisions if
                                                          d.unplaced]) for g in gone)
            assert_valid(after, after, [])
        elif action == "contract" and state.tenants:
            t = state.tenants[k % len(state.tenants)]
            looser = dataclasses.replace(t, max_accelerators=None, max_power_w=None)
            assert session.apply(ClusterDelta(tenants=(looser,))) == []
        # Whatever happened, the session's state is a valid cluster on its own.
        now = session.snapshot()
        assert_valid(now, now, [])


def assert_says_what_changed(before: Problem, after: Problem, decision: Decision) -> None:
    """A `place` decision lists exactly what changed for its deployment: as `placements`, the
    shards of the replicas that run now and did not run so before (never one put back where it
    ran); as `released`, the replicas that ran and run no more (a scale-down included)."""
    dep = decision.deployment

    def replicas(state: Problem) -> dict[int, frozenset]:
        held: dict[int, set] = {}
        for p in state.placements:
            if p.deployment == dep:
                held.setdefault(p.replica, set()).add(p)
        return {r: frozenset(ps) for r, ps in held.items()}

    was, now = replicas(before), replicas(after)
    changed = {r for r, ps in now.items() if was.get(r) != ps}
    assert {p.replica for p in decision.placements} == changed, (decision, was, now)
    assert {p for p in decision.placements} == {p for r in changed for p in now[r]}
    assert set(decision.released) == set(was) - set(now), (decision, was, now)


def compare(dep_id: str, decision: Decision, reference: Plan, exact: bool,
            min_replicas: int, kept: frozenset = frozenset()) -> None:
    """The session's decision for one arrival against `solve()` on the same state."""
    ref_new = tuple(p for p in reference.placements if p.deployment == dep_id
                    and p not in kept)
    ref_unplaced = [u for u in reference.unplaced if u.deployment == dep_id]
    if exact:
        assert decision.placements == ref_new
        assert decision.unplaced == (ref_unplaced[0] if ref_unplaced else None)
        assert {(v.deployment, v.replica) for v in decision.preempted} == \
            {(v.deployment, v.replica) for v in reference.preempted}
    elif min_replicas == 1:
        assert bool(decision.placements) == bool(ref_new)


@settings(max_examples=60, **COMMON)
@given(scenarios())
def test_session_matches_solve_with_best_fit(monkeypatch_bestfit: None,
                                             scenario: tuple[Doc, list]) -> None:
    play(*scenario, exact=True)


@settings(max_examples=40, **COMMON)
@given(scenarios())
def test_session_with_fgd_places_what_solve_places(scenario: tuple[Doc, list]) -> None:
    play(*scenario, exact=False)


@pytest.fixture(scope="module")
def monkeypatch_bestfit() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAIA_SCORER", "bestfit")
        yield


# ---- examples -----------------------------------------------------------------------------

def session_of(doc: Doc) -> Session:
    return Session(problem_from_dict(doc))


def test_arrivals_are_decided_on_the_kept_state_and_departures_free_room() -> None:
    s = session_of(problem([node("n1", acc=4)], [], tenants=[{"id": "t1"}]))
    first = s.place(problem_from_dict(problem(
        [node("n1")], [dep("a", acc=3)])).deployments[0])
    assert [(p.node, p.accelerator_indices) for p in first.placements] == [("n1", (0, 1, 2))]
    b = problem_from_dict(problem([node("n1")], [dep("b", acc=2)])).deployments[0]
    second = s.place(b)
    assert second.placements == ()
    assert second.unplaced is not None and second.unplaced.reasons[0].code == "CAPACITY"
    assert s.pending() == ["b"]
    s.release("a")
    assert "a" not in s
    again = s.place("b")
    assert [(p.node, p.accelerator_indices) for p in again.placements] == [("n1", (0, 1))]
    assert s.pending() == []


def test_adopted_placements_are_held_as_if_the_session_had_placed_them() -> None:
    doc = problem([node("n1", acc=4), node("n2", acc=4)], [dep("a", acc=2, replicas=2), dep("b", acc=4)],
                  tenants=[{"id": "t1"}])
    s = session_of({**doc, "deployments": []})
    plan = solve(problem_from_dict(doc))  # placed elsewhere (a committed solve)
    deps = {d.id: d for d in problem_from_dict(doc).deployments}
    for name in ("a", "b"):
        s.adopt(deps[name], [p for p in plan.placements if p.deployment == name])
    assert sorted(s.snapshot().placements, key=str) == sorted(plan.placements, key=str)
    third = problem_from_dict(problem([node("n1")], [dep("c", acc=1)])).deployments[0]
    assert s.place(third).unplaced is not None  # the adopted shards hold every accelerator
    s.apply(ClusterDelta(nodes=(Node("n3", "r1", 4),)))
    moved = [dataclasses.replace(p, node="n3") for p in plan.placements if p.deployment == "b"]
    s.adopt(deps["b"], moved)  # a replica the session holds is replaced where it is now
    assert {p.node for p in s.snapshot().placements if p.deployment == "b"} == {"n3"}
    assert s.place("c").placements  # where b was


def test_unknown_tenant_and_shape_changes_are_refused() -> None:
    s = session_of(problem([node("n1")], [dep("a")]))
    other = problem_from_dict(problem([node("n1")], [dep("x", tenant="t9")],
                                      tenants=[{"id": "t9"}])).deployments[0]
    with pytest.raises(Exception, match="unknown tenant"):
        s.place(other)
    s.place("a")
    bigger = problem_from_dict(problem([node("n1")], [dep("a", acc=2)])).deployments[0]
    with pytest.raises(Exception, match="may change in place"):
        s.place(bigger)
    with pytest.raises(Exception, match="unknown deployment"):
        s.release("nope")


def test_cordon_is_in_place_and_worded_like_solve() -> None:
    doc = problem([node("n1"), node("n2")], [dep("a", acc=4, replicas=2)])
    s = session_of(doc)
    n1 = problem_from_dict(doc).nodes[0]
    assert s.apply(ClusterDelta(nodes=(dataclasses.replace(n1, state="cordoned"),))) == []
    assert s.rebuilds == 0
    decision = s.place("a")
    assert len({p.replica for p in decision.placements}) == 1
    reference = solve(dataclasses.replace(s.snapshot(), placements=()))
    assert "n1 (cordoned)" in decision.unplaced.reasons[0].message
    assert decision.unplaced.reasons[0].message == reference.unplaced[0].reasons[0].message


def test_a_node_going_down_repairs_its_gangs_beside_their_siblings() -> None:
    doc = problem([node("n1"), node("n2"), node("n3", rack="r2")],
                  [dep("a", acc=2, shards=2)],
                  placements=[placed("a", "n1", [0, 1], shard=0),
                              placed("a", "n2", [0, 1], shard=1)])
    s = session_of(doc)
    n2 = problem_from_dict(doc).nodes[1]
    decisions = s.apply(ClusterDelta(nodes=(dataclasses.replace(n2, state="down"),)))
    assert len(decisions) == 1 and decisions[0].released == ()
    assert [(m.shard, m.from_node, m.to_node) for m in decisions[0].moved] == [(1, "n2", "n1")]
    assert {p.node for p in s.snapshot().placements} == {"n1"}


def test_contract_changes_apply_to_the_next_decision() -> None:
    doc = problem([node("n1", acc=8)], [dep("a", acc=1, replicas=4)],
                  tenants=[{"id": "t1", "max_accelerators": 2}])
    s = session_of(doc)
    first = s.place("a")
    assert first.unplaced.replicas == 2
    assert first.unplaced.reasons[0].code == "QUOTA_ACCELERATORS"
    s.apply(ClusterDelta(tenants=(Tenant("t1", max_accelerators=3),)))
    assert s.place("a").unplaced.replicas == 1


def test_arrivals_through_the_session_are_one_online_solve() -> None:
    """The FGD protocol's premise: arrivals placed one `place()` at a time, FGD scoring
    included, give exactly the placements of one online `solve()` listing them in order."""
    import json

    from builders import SHARED
    doc = json.loads((SHARED / "examples" / "openb-mini.problem.json").read_text())
    problem_ = problem_from_dict(doc)
    online = solve(problem_)
    session = Session(dataclasses.replace(problem_, deployments=()))
    decisions = [session.place(d) for d in problem_.deployments]
    assert set(session.snapshot().placements) == set(online.placements)
    assert [d.unplaced for d in decisions if d.unplaced] == list(online.unplaced)


def test_a_repair_that_its_deployment_then_stops_is_neither_placed_nor_moved() -> None:
    """Found by test_session_matches_solve_with_best_fit: replica 1 of a gang loses a shard on
    a down node and is repaired beside its survivor, but replica 0 cannot be placed (the
    tenant's cap), so the deployment is short of min_replicas and keeps none: the repair's
    decision must not report replica 1 placed or moved (the checker's MOVES rule)."""
    shard = {"accelerators": 1, "accelerator_milli": 250, "cpu_milli": 4000, "memory_mib": 16384}
    down = {"id": "n0", "rack": "r0", "state": "down", "accelerators": 1, "accelerator_model": "m1", "idle_power_w": 0}
    doc = {
        "version": 1, "zones": [{"id": "z0"}], "rows": [{"id": "w0", "zone": "z0"}],
        "racks": [{"id": "r0", "row": "w0"}],
        "nodes": [down, dict(down, id="n1", state="ready", cpu_milli=8000)],
        "tenants": [{"id": "t0", "isolation": "shared", "max_accelerators": 1}],
        "deployments": [{"id": "d0", "tenant": "t0", "replicas": 2, "shards_per_replica": 2, "shard": shard,
                         "locality": "rack", "min_replicas": 2, "preemptible": True}],
        "placements": [{"deployment": "d0", "replica": r, "shard": sh, "node": node, "accelerator_indices": [0],
                        "accelerator_milli": 250}
                       for r, sh, node in ((0, 0, "n0"), (0, 1, "n0"), (1, 0, "n0"), (1, 1, "n1"))],
        "options": {"mode": "online", "time_limit_ms": 2000},
    }
    before = problem_from_dict(doc)
    session = Session(before)
    assert session.placements_of("d0") == ()
    (decision,) = session.repaired_at_load
    assert not decision.placements and not decision.moved
    assert_valid(before, session.snapshot(), session.repaired_at_load)


def test_a_node_coming_up_into_a_full_row_keeps_what_runs_there(monkeypatch_bestfit: None) -> None:
    """Found by test_session_matches_solve_with_best_fit: n0 is down, so its 100 W of idle power
    is not drawn (the spec) and d0's three 200 W replicas fill row w1's 600 W; then n0 comes up
    and the row draws 700 W. No rule lets a plan drop or preempt kept work for a budget, so the
    session keeps what runs, as `solve()` does, and puts no more power in the row: d1 (200 W)
    is refused there with POWER_ROW, d2 (no power) still fits. The checker reads the 700 W, made
    of kept placements and idle power alone, as the problem's overdraw, not the change's."""
    doc = problem([node("n0", acc=1, state="down", idle_power_w=100), node("n1", acc=4)],
                  [dep("d0", replicas=3, locality="node", power_w=200), dep("d1", power_w=200),
                   dep("d2")],
                  rows=[{"id": "w1", "zone": "z1", "power_budget_w": 600}], mode="online")
    play(doc, [("arrive", 0), ("up", 0), ("arrive", 0), ("arrive", 0)], exact=True)

    start, (d0, d1, d2) = split_arrivals(doc)
    session = Session(start)
    session.place(d0)
    n0 = next(n for n in start.nodes if n.id == "n0")
    assert session.apply(ClusterDelta(nodes=(dataclasses.replace(n0, state="ready"),))) == []
    assert len(session.placements_of("d0")) == 3
    refused = session.place(d1)
    assert refused.placements == ()
    assert [r.code for r in refused.unplaced.reasons] == ["POWER_ROW"]
    assert "row w1 power: 700 W used + 200 W needed > 600 W budget" in \
        refused.unplaced.reasons[0].message
    assert session.place(d2).placements


def test_each_decision_has_a_solves_trial_budget_not_a_share_of_the_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preemption search's trial budget was the session's, spent over its whole life: once
    gone, no arrival preempted again, each told CAPACITY though a victim was there."""
    import importlib

    monkeypatch.setattr(importlib.import_module("scheduler.solve"), "ROOM_TRIALS", 4)
    nodes = [node(f"n{i}", rack="r1") for i in range(8)]
    bg = dep("bg", tenant="burst", acc=4, replicas=8, locality="node", preemptible=True)
    s = session_of(problem(nodes, [bg], tenants=[{"id": "burst"}, {"id": "gold"}],
                           placements=[placed("bg", f"n{i}", [0, 1, 2, 3], replica=i) for i in range(8)],
                           mode="online", allow_preemption=True))
    claims = problem_from_dict(problem(nodes, [dep(f"x{i}", tenant="gold", acc=4, locality="node", priority=50)
                                               for i in range(6)], tenants=[{"id": "gold"}])).deployments
    decisions = [s.place(x) for x in claims]
    assert [len(d.placements) for d in decisions] == [1] * 6
    assert [len(d.preempted) for d in decisions] == [1] * 6


def test_a_replica_released_then_placed_again_may_preempt_what_took_its_node() -> None:
    # A's replica 1 stops (failed, say), B takes its node; placed again, A preempts B. The search
    # meant to keep a short deployment's running replicas in place read the session's first load:
    # it tried to put replica 1 back on n1, under B, and no victim could make room (found in review).
    s = session_of(problem([node("n0", rack="r0", acc=2), node("n1", rack="r0", acc=2)],
                           [dep("A", tenant="a", acc=2, replicas=2, priority=5, locality="node"),
                            dep("B", tenant="b", acc=2, preemptible=True, locality="node")],
                           placements=[placed("A", "n0", [0, 1], replica=0), placed("A", "n1", [0, 1], replica=1)],
                           mode="online", allow_preemption=True))
    s.release("A", [1])
    assert [p.node for p in s.place("B").placements] == ["n1"]
    again = s.place("A")
    assert [(p.deployment, p.replica) for p in again.preempted] == [("B", 0)]
    assert [(p.replica, p.node) for p in again.placements] == [(1, "n1")]


def _kept_in_step_cases() -> dict[str, Any]:
    """Sessions whose solver read its running replicas from the first load alone (found in
    review): replicas the session adopted or placed itself, and ones it stopped since."""
    def two_of_a(**extra: Any) -> Doc:
        return problem([node(f"n{i}", acc=2) for i in range(extra.pop("nodes", 3))],
                       [dep("A", tenant="a", acc=2, replicas=extra.pop("replicas", 2),
                            min_replicas=extra.pop("min_replicas", 2), priority=5, locality="node"),
                        *extra.pop("others", [])],
                       mode="online", allow_preemption=True, **extra)

    def adopted() -> tuple[Session, Problem]:
        # A runs on n2 and n1, committed elsewhere (adopted); replica 1 stops and B takes n0, n1:
        # placed again, A preempts B and must keep replica 0 on n2 (it was put back from scratch
        # on n0, a move without a `moved` entry).
        doc = two_of_a(others=[dep("B", tenant="b", acc=2, replicas=2, preemptible=True, locality="node")])
        prob = problem_from_dict(doc)
        a, b = prob.deployments
        s = Session(dataclasses.replace(prob, deployments=()))
        s.adopt(a, problem_from_dict({**doc, "placements": [placed("A", "n2", [0, 1], replica=0),
                                                            placed("A", "n1", [0, 1], replica=1)]}).placements)
        s.release("A", [1])
        s.place(b)
        return s, s.snapshot()

    def placed_by_the_session() -> tuple[Session, Problem]:
        doc = two_of_a(nodes=4, replicas=3, min_replicas=3,
                       others=[dep("B", tenant="b", acc=2, preemptible=True, locality="node"),
                               dep("B2", tenant="b", acc=2, preemptible=True, locality="node")])
        prob = problem_from_dict(doc)
        a, b, b2 = prob.deployments
        s = Session(dataclasses.replace(prob, deployments=()))
        s.place(a)
        s.release("A", [0, 1])
        s.place(b)
        s.place("A")
        s.release("A", [0])
        s.place(b2)
        return s, s.snapshot()

    def stopped_since() -> tuple[Session, Problem]:
        # A's replica 1 fails, C takes its node; A cannot reach min_replicas and stops replica 0
        # too, whose node D takes. Later B (preemptible) runs on n2 and n1 frees: A must preempt B
        # (it was held to put replica 0 back on n0, under D, and no trial could succeed).
        doc = two_of_a(others=[dep("X", tenant="c", acc=2, locality="node")],
                       placements=[placed("A", "n0", [0, 1], replica=0), placed("A", "n1", [0, 1], replica=1),
                                   placed("X", "n2", [0, 1])],
                       tenants=[{"id": "a"}, {"id": "b"}, {"id": "c"}])
        s = Session(problem_from_dict(doc))

        def other(name: str, tenant: str, **kw: Any) -> Any:
            return problem_from_dict(problem([node("n0")], [dep(name, tenant=tenant, acc=2, locality="node",
                                                                **kw)])).deployments[0]

        s.release("A", [1])
        s.place(other("C", "c"))
        assert s.place("A").released == (0,)
        s.place(other("D", "c"))
        s.release("X")
        s.place(other("B", "b", preemptible=True))
        s.release("C")
        return s, s.snapshot()

    return {"adopted": adopted, "placed by the session": placed_by_the_session, "stopped since": stopped_since}


@pytest.mark.parametrize("case", ["adopted", "placed by the session", "stopped since"])
def test_a_short_deployment_placed_again_keeps_its_running_replicas_and_may_preempt(
        monkeypatch_bestfit: None, case: str) -> None:
    s, before = _kept_in_step_cases()[case]()
    reference = solve(before)
    decision = s.place("A")
    after = s.snapshot()
    assert_valid(before, after, [decision])
    assert sorted((p.deployment, p.replica, p.node) for p in after.placements) == \
        sorted((p.deployment, p.replica, p.node) for p in reference.placements)
    assert [(v.deployment, v.replica) for v in decision.preempted] == \
        [(v.deployment, v.replica) for v in reference.preempted]


def test_a_scale_down_through_place_says_the_replicas_it_released() -> None:
    doc = problem([node("n1", acc=4)], [dep("a", acc=1, replicas=3)], tenants=[{"id": "t1"}],
                  placements=[placed("a", "n1", [i], replica=i) for i in range(3)])
    s = session_of(doc)
    a = problem_from_dict(doc).deployments[0]
    decision = s.place(dataclasses.replace(a, replicas=1))
    assert decision.released == (1, 2) and decision.placements == () and decision.unplaced is None
    assert [(p.replica, p.node) for p in s.snapshot().placements] == [(0, "n1")]
    grown = s.place(dataclasses.replace(a, replicas=2))  # placed again: new, nothing released
    assert [p.replica for p in grown.placements] == [1] and grown.released == ()


def test_a_replica_a_decision_takes_out_and_puts_back_where_it_ran_is_not_placed_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As a preemption trial may: its state holds the deployment's replicas anew, where they were.
    doc = problem([node("n1", acc=4)], [dep("a", acc=1, replicas=3)], tenants=[{"id": "t1"}],
                  placements=[placed("a", "n1", [i], replica=i) for i in range(2)])
    s = session_of(doc)
    solver = s._solver
    place_one = solver.place_one

    def held_anew(d: int, preempt: bool) -> None:
        shards = solver.state.remove_replica(d, 0)
        solver.state.add_replica(d, 0, dict(shards))
        place_one(d, preempt)

    monkeypatch.setattr(solver, "place_one", held_anew)
    decision = s.place("a")
    assert [p.replica for p in decision.placements] == [2]
    assert decision.released == () and decision.moved == ()
    assert sorted(p.replica for p in s.snapshot().placements) == [0, 1, 2]
