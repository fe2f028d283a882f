"""A solver that spends its time limit never loses to the greedy with moves, and repeated
solves of one problem give one plan (deterministic CP-SAT)."""

from __future__ import annotations

import pytest
from builders import dep, move_beats_preemption, node, placed, problem, solve_doc

from scheduler import plan_to_dict
from scheduler.solve import Solver

def test_the_greedy_pipeline_wins_when_the_cpsat_pipeline_places_less(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The CP-SAT pipeline loses its moves (as when CP-SAT used the time they needed), so it
    # preempts a replica of d0 for vip; the greedy pipeline moves d0 and keeps both.
    real = Solver.rebalance

    def rebalance(self: Solver) -> None:
        if not self.use_cpsat:
            real(self)
        else:
            self.moves_used = 0

    monkeypatch.setattr(Solver, "rebalance", rebalance)
    plan = solve_doc(move_beats_preemption())
    assert plan.stats["pipeline"] == "greedy"
    assert plan.preempted == ()
    assert [(m.deployment, m.replica, m.to_node) for m in plan.moved] == [("d0", 0, "na")]
    greedy, full = plan.stats["greedy_pipeline_value"], plan.stats["cpsat_pipeline_value"]
    assert greedy[0] > full[0]


def test_ties_keep_the_cpsat_pipeline() -> None:
    plan = solve_doc(move_beats_preemption())
    assert plan.stats["pipeline"] == "cpsat"
    assert plan.stats["greedy_pipeline_value"] == plan.stats["cpsat_pipeline_value"]
    assert plan.preempted == ()


def busy_problem(**options: object) -> dict:
    """Gangs and fractions competing for 4 racks of 4 nodes, some already used."""
    nodes = [node(f"n{r}{i}", rack=f"r{r}", acc=4) for r in range(4) for i in range(4)]
    deployments = [dep("old", acc=2, replicas=5, locality="node", preemptible=True)]
    deployments += [dep(f"g{i}", acc=1, shards=8 + 2 * i, locality="rack", priority=i % 3)
                    for i in range(5)]
    deployments += [dep(f"f{i}", acc=1, replicas=3, locality="node", accelerator_milli=250 * (
        1 + i % 3), priority=1) for i in range(6)]
    held = [placed("old", f"n{r}0", [0, 1], replica=r) for r in range(4)]
    held.append(placed("old", "n11", [2, 3], replica=4))
    return problem(nodes, deployments, placements=held, **options)


@pytest.mark.parametrize("options", [{"mode": "batch"},
                                     {"mode": "rebalance", "allow_preemption": True,
                                      "max_moves": 4}])
def test_repeated_solves_give_the_same_plan(options: dict) -> None:
    doc = busy_problem(**options)
    plans = [solve_doc(doc) for _ in range(3)]
    assert plans[0].stats.get("cpsat") in ("optimal", "feasible")  # CP-SAT did run
    first = plan_to_dict(plans[0])
    for p in plans[1:]:
        again = plan_to_dict(p)
        assert (again["placements"], again["preempted"], again["moved"]) == (
            first["placements"], first["preempted"], first["moved"])
