"""The reconciler's full pass over a cluster without deployments gives the plan `solve` would,
without the solver: `planning.nothing_to_place` (the solver's import is most of a controller's
start; tests/test_import_weight.py checks that such a pass leaves it unimported)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from controller.usecases import planning
from scheduler import Plan, Problem, plan_to_dict, problem_to_dict, solve
from scheduler.model import Node, Options, Rack, Row, Tenant, Zone

TOPOLOGY = dict(zones=(Zone("z1"),), rows=(Row("r1", "z1", power_budget_w=10_000.0),),
                racks=(Rack("k1", "r1"), Rack("k2", "r1")))
NODES = (Node("n1", "k1", 8), Node("n2", "k1", 8, state="cordoned"), Node("n3", "k2", 4, state="down"),
         Node("n4", "k2", 8, accelerator_model="maia-100", hbm_gib=64.0, idle_power_w=90.0))


def without_solve_ms(plan: Plan) -> dict:
    doc = plan_to_dict(plan)
    doc.get("stats", {}).pop("solve_ms", None)
    return doc


@pytest.mark.parametrize("problem", [
    Problem(nodes=(), deployments=()),
    Problem(nodes=NODES, deployments=(), tenants=(Tenant("a"), Tenant("b", isolation="dedicated_node")), **TOPOLOGY),
    Problem(nodes=NODES, deployments=(), options=Options(mode="online", allow_preemption=True), **TOPOLOGY),
], ids=["nothing at all", "nodes and tenants, no deployments", "online with preemption"])
def test_a_full_pass_without_deployments_gives_the_solvers_plan(problem: Problem) -> None:
    doc = planning.with_options(problem_to_dict(problem), time_limit_ms=500)
    got = asyncio.run(planning.solve_online_first(doc, time_limit_ms=500))
    online = dataclasses.replace(problem, options=dataclasses.replace(problem.options, mode="online"))
    expected = solve(online, time_limit_ms=500)
    assert got.placements == () and got.status == "optimal"
    assert without_solve_ms(got) == without_solve_ms(expected)
