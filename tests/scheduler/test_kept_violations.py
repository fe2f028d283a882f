"""`solve(check_kept=True)`: the plan's stats list the hard rules that the existing placements
it keeps break (`stats.kept_violations`, `stats.kept_violations_total`); the solver keeps such
placements and its status does not count them."""

from __future__ import annotations

import json

import jsonschema
from referencing import Registry, Resource

from builders import SHARED, dep, node, placed, problem
from scheduler import plan_to_dict, problem_from_dict, solve

DEDICATED = [{"id": "a", "isolation": "dedicated_node"}, {"id": "b"}]


def _valid(plan_doc: dict) -> None:
    plan_schema = json.loads((SHARED / "plan.schema.json").read_text())
    problem_schema = json.loads((SHARED / "problem.schema.json").read_text())
    registry = Registry().with_resource(problem_schema["$id"], Resource.from_contents(problem_schema))
    jsonschema.Draft202012Validator(plan_schema, registry=registry).validate(plan_doc)


def _shared_node(**kw) -> dict:
    """Tenant a (dedicated_node) shares n1 with b; nothing is pending."""
    return problem([node("n1"), node("n2")], [dep("x", "a"), dep("y", "b")], tenants=DEDICATED,
                   placements=[placed("x", "n1", [0]), placed("y", "n1", [1])], **kw)


def test_a_kept_isolation_breach_is_listed_with_its_rule_and_scope() -> None:
    plan = solve(problem_from_dict(_shared_node()), check_kept=True)
    assert plan.status == "optimal"  # nothing was pending: the status does not count the breach
    assert plan.stats["kept_violations_total"] == 1
    [kept] = plan.stats["kept_violations"]
    assert (kept["rule"], kept["scope"], kept["tenants"]) == ("ISOLATION", "node n1", ["a", "b"])
    assert "tenant a (dedicated_node)" in kept["message"]
    _valid(plan_to_dict(plan))


def test_a_clean_problem_lists_none_and_the_default_solve_does_not_check() -> None:
    doc = problem([node("n1"), node("n2")], [dep("x", "a"), dep("y", "b", replicas=2)], tenants=DEDICATED,
                  placements=[placed("x", "n1", [0]), placed("y", "n2", [1])])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert (plan.stats["kept_violations"], plan.stats["kept_violations_total"]) == ([], 0)
    _valid(plan_to_dict(plan))
    assert "kept_violations" not in solve(problem_from_dict(_shared_node())).stats


def test_a_breach_whose_placements_were_placed_again_is_not_listed() -> None:
    """Placements on a down node are placed anew (not kept): the input's breach there is gone."""
    doc = problem([node("n1", state="down"), node("n2"), node("n3")], [dep("x", "a"), dep("y", "b")],
                  tenants=DEDICATED, placements=[placed("x", "n1", [0]), placed("y", "n1", [1])])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert {p.node for p in plan.placements} <= {"n2", "n3"}
    assert (plan.stats["kept_violations"], plan.stats["kept_violations_total"]) == ([], 0)


def test_a_rack_over_its_power_budget_by_kept_shards_is_listed() -> None:
    doc = problem([node("n1", idle_power_w=100)], [dep("x", "a", acc=2, power_w=300)],
                  racks=[{"id": "r1", "row": "w1", "power_budget_w": 500}], tenants=[{"id": "a"}],
                  placements=[placed("x", "n1", [0, 1])])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert [(v["rule"], v["scope"]) for v in plan.stats["kept_violations"]] == [("POWER", "rack r1")]


def test_many_breaches_are_counted_and_the_first_few_listed() -> None:
    from scheduler.emit import KEPT_VIOLATIONS_LISTED

    many = KEPT_VIOLATIONS_LISTED + 5
    doc = problem([node(f"n{i}") for i in range(many)], [dep("x", "a", replicas=many)],
                  tenants=[{"id": "a", "zones": ["z2"]}], rows=[{"id": "w1", "zone": "z1"}],
                  zones=[{"id": "z1"}, {"id": "z2"}],
                  placements=[placed("x", f"n{i}", [0], replica=i) for i in range(many)])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert plan.stats["kept_violations_total"] == many
    assert len(plan.stats["kept_violations"]) == KEPT_VIOLATIONS_LISTED
    assert {v["rule"] for v in plan.stats["kept_violations"]} == {"ZONE"}


def test_a_budget_idle_power_alone_exceeds_is_no_kept_shards_breach() -> None:
    # Rack r1's budget 500 W, its node idling at 600 W: over with no shard at all. A kept shard
    # drawing nothing there breaks nothing; one drawing power on a rack within budget would.
    doc = problem([node("n1", acc=4, idle_power_w=600)], [dep("a", acc=0, cpu_milli=100)],
                  racks=[{"id": "r1", "row": "w1", "power_budget_w": 500}], tenants=[{"id": "t1"}],
                  placements=[placed("a", "n1", [])])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert plan.stats["kept_violations"] == [] and plan.stats["kept_violations_total"] == 0
