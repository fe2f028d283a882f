"""TIME_LIMIT: a solve whose deadline cut the search short says so and returns its best plan.

Deterministic: the deadline is set in the past (or CP-SAT is made to report UNKNOWN), never
raced against the clock.
"""

from __future__ import annotations

import copy

import pytest
from ortools.sat.python import cp_model

from builders import check, codes, dep, hbm_bound_pairing, node, placed, placed_count, problem, solve_doc
from scheduler import Plan, plan_to_dict, problem_from_dict
from scheduler.solve import Solver


def solve_expired(doc: dict) -> Plan:
    """Solve with the deadline already passed when the solve starts; the plan must check."""
    solver = Solver(problem_from_dict(copy.deepcopy(doc)), None)
    solver.deadline = solver.t0
    plan = solver.run()
    assert check(doc, plan_to_dict(plan)) == []
    return plan


def time_limit_message(plan: Plan, deployment: str) -> str:
    [reason] = [r for u in plan.unplaced if u.deployment == deployment for r in u.reasons
                if r.code == "TIME_LIMIT"]
    assert reason.scope is None
    return reason.message


def two_big() -> dict:
    return problem([node("n1", acc=4)], [dep("a", acc=4), dep("b", acc=4)])


def test_cpsat_skipped_for_lack_of_time_says_time_limit() -> None:
    plan = solve_expired(two_big())
    [left] = [u.deployment for u in plan.unplaced]
    assert {"TIME_LIMIT", "CAPACITY"} <= codes(plan, left)  # in addition, not instead
    assert time_limit_message(plan, left) == (
        f"solve stopped at its 2000 ms time limit before proving {left} could not be placed; "
        "best plan found so far returned")
    assert plan.stats["time_limit_hit"] is True
    assert plan.status == "feasible"
    assert placed_count(plan, "a") + placed_count(plan, "b") == 1  # the best plan, kept


def test_a_solve_with_time_to_spare_has_no_time_limit() -> None:
    plan = solve_doc(two_big())
    assert "TIME_LIMIT" not in codes(plan, "a") | codes(plan, "b")
    assert plan.stats["time_limit_hit"] is False


def stopped_unknown(monkeypatch, *, by_clock: bool) -> None:
    """Every CP-SAT search stops before any solution, by its wall-clock ceiling or (not
    `by_clock`) by its deterministic budget."""
    monkeypatch.setattr(cp_model.CpSolver, "solve", lambda self, model, *a: cp_model.UNKNOWN)
    monkeypatch.setattr(cp_model.CpSolver, "wall_time", property(
        lambda self: self.parameters.max_time_in_seconds if by_clock else 0.0))


def test_cpsat_stopped_before_any_solution_says_time_limit(monkeypatch) -> None:
    stopped_unknown(monkeypatch, by_clock=False)
    plan = solve_doc(two_big())
    [left] = [u.deployment for u in plan.unplaced]
    assert "TIME_LIMIT" in codes(plan, left)
    assert plan.stats["cpsat"] == "unknown" and plan.stats["time_limit_hit"] is True
    assert plan.status == "feasible"
    assert "clock_cut" not in plan.stats  # its budget ended it: the same on any machine


def test_searches_the_wall_clock_stopped_say_so(monkeypatch) -> None:
    """CP-SAT over node classes and the exact pairing of the batch's fractions, both stopped by
    the clock: the plan may differ on a faster machine (`clock_cut`, `joint_clock_cut`)."""
    stopped_unknown(monkeypatch, by_clock=True)
    plan = solve_doc(hbm_bound_pairing())
    assert plan.stats["cpsat"] == "unknown" and plan.stats["clock_cut"] is True
    assert plan.stats["joint_clock_cut"] == 1


def test_searches_their_budgets_stopped_are_not_clock_cut(monkeypatch) -> None:
    stopped_unknown(monkeypatch, by_clock=False)
    plan = solve_doc(hbm_bound_pairing())
    assert plan.stats["cpsat"] == "unknown"
    assert "clock_cut" not in plan.stats and "joint_clock_cut" not in plan.stats


def test_searches_the_deadline_left_no_time_say_so() -> None:
    """Past the deadline, CP-SAT and the exact pairing are not run: the clock decided."""
    plan = solve_expired(hbm_bound_pairing())
    assert plan.stats["cpsat"] == "skipped: no time left" and plan.stats["clock_cut"] is True
    assert plan.stats["joint_clock_cut"] == 1


def burst_full() -> dict:
    return problem([node("n1", acc=4)],
                   [dep("burst", acc=4, preemptible=True), dep("svc", acc=4, priority=5)],
                   placements=[placed("burst", "n1", [0, 1, 2, 3])],
                   mode="online", allow_preemption=True)


def test_preemption_cut_by_the_deadline_says_time_limit() -> None:
    plan = solve_expired(burst_full())
    assert "TIME_LIMIT" in codes(plan, "svc")
    assert "svc" in time_limit_message(plan, "svc")
    assert plan.preempted == ()
    # Nothing new was placed, but nothing was proved either: not "infeasible".
    assert plan.status == "feasible" and plan.stats["time_limit_hit"] is True
    assert plan.stats["clock_cut"] is True
    # With time, the same problem preempts and places svc.
    assert placed_count(solve_doc(burst_full()), "svc") == 1


def test_rebalance_cut_by_the_deadline_says_time_limit(monkeypatch) -> None:
    monkeypatch.setattr(Solver, "improve_with_cpsat", lambda self, base, wanted: None)
    doc = problem([node("n1", acc=4), node("n2", acc=4)],
                  [dep("s1", acc=2), dep("s2", acc=2), dep("big", acc=4, locality="node")],
                  placements=[placed("s1", "n1", [0, 1]), placed("s2", "n2", [0, 1])],
                  mode="rebalance", max_moves=1)
    plan = solve_expired(doc)
    assert "TIME_LIMIT" in codes(plan, "big") and plan.moved == ()
    assert plan.stats["time_limit_hit"] is True
    # With time, one move makes room.
    assert placed_count(solve_doc(doc), "big") == 1


def test_a_wall_limit_moves_the_deadline_not_the_budgets() -> None:
    """`wall_limit_ms` (the golden plans' far ceiling): the deterministic budgets stay planned
    for the time limit, so the plan is the one the time limit gives when the clock never cuts."""
    far = Solver(problem_from_dict(two_big()), 5000, wall_limit_ms=600_000)
    assert far.budget_s == 5.0 and far.deadline - far.t0 == pytest.approx(600.0)
    near = Solver(problem_from_dict(two_big()), 5000)
    assert near.budget_s == 5.0 and near.deadline - near.t0 == pytest.approx(5.0)
    doc = hbm_bound_pairing()
    plans = [plan_to_dict(solve_doc(doc, time_limit_ms=5000, **kw)) for kw in ({"wall_limit_ms": 600_000}, {})]
    assert [{k: v for k, v in p.items() if k != "stats"} for p in plans] == \
        [{k: v for k, v in plans[1].items() if k != "stats"}] * 2
