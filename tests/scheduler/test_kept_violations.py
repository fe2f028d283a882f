"""`solve(check_kept=True)`: the plan's stats list the hard rules that the existing placements
it keeps break (`stats.kept_violations`, `stats.kept_violations_total`); the solver keeps such
placements and its status does not count them. Isolation, capacity and power as the watchdog
judges them; gangs, locality, spread, models and quotas over the replicas the plan keeps."""

from __future__ import annotations

import json

import jsonschema
from referencing import Registry, Resource

from builders import SHARED, dep, node, placed, problem
from scheduler import Plan, plan_to_dict, problem_from_dict, solve
from scheduler.emit import kept_violations

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


TWO_RACKS = dict(racks=[{"id": "r1", "row": "w1"}, {"id": "r2", "row": "w1"}])


def _kept(plan: Plan) -> list[tuple[str, str, list[str]]]:
    return [(v["rule"], v["scope"], v["tenants"]) for v in plan.stats["kept_violations"]]


def test_a_replica_kept_across_two_racks_breaks_its_locality() -> None:
    doc = problem([node("n1", "r1"), node("n2", "r2")], [dep("x", "a", shards=2)], **TWO_RACKS,
                  placements=[placed("x", "n1", [0]), placed("x", "n2", [0], shard=1)])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert len(plan.placements) == 2  # kept as it runs
    assert _kept(plan) == [("LOCALITY", "deployment x replica 0", ["a"])]
    assert plan.stats["kept_violations"][0]["message"] == \
        "x replica 0 runs in racks r1, r2; its locality keeps it in one rack"


def test_replicas_kept_past_their_spread_are_listed() -> None:
    # Replicas 0 and 1 run in rack r1 (at most 1 a rack); the solver places replica 2 in r2.
    doc = problem([node("n1", "r1"), node("n2", "r2")],
                  [dep("x", "a", replicas=3, spread={"domain": "rack", "max_per_domain": 1})], **TWO_RACKS,
                  placements=[placed("x", "n1", [0]), placed("x", "n1", [1], replica=1)])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert {p.node for p in plan.placements if p.replica == 2} == {"n2"}
    assert _kept(plan) == [("SPREAD", "rack r1", ["a"])]
    assert "rack r1 holds 2 replicas of x > 1" in plan.stats["kept_violations"][0]["message"]


def test_a_shard_kept_on_a_node_of_a_model_its_deployment_no_longer_takes_is_listed() -> None:
    doc = problem([node("n1", model="m2")], [dep("x", "a", accelerator_models=["m1"])],
                  placements=[placed("x", "n1", [0])])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert _kept(plan) == [("ACCELERATOR_MODEL", "node n1", ["a"])]


def test_a_quota_lowered_below_what_the_tenant_runs_is_listed_for_that_tenant_only() -> None:
    # Tenant a runs 2 accelerators at 300 W each; its contract now says 1.5 and 500 W. Tenant
    # b's new replica is placed beside them and breaks nothing.
    doc = problem([node("n1")], [dep("x", "a", replicas=3, power_w=300), dep("y", "b", power_w=300)],
                  tenants=[{"id": "a", "max_accelerators": 1.5, "max_power_w": 500},
                           {"id": "b", "max_accelerators": 1, "max_power_w": 300}],
                  placements=[placed("x", "n1", [0]), placed("x", "n1", [1], replica=1)])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert {p.deployment for p in plan.placements} == {"x", "y"}
    assert _kept(plan) == [("QUOTA_ACCELERATORS", "tenant a", ["a"]), ("QUOTA_POWER", "tenant a", ["a"])]
    assert [v["message"] for v in plan.stats["kept_violations"]] == [
        "tenant a holds 2 accelerators > 1.5 max_accelerators", "tenant a draws 600 W > 500 W max_power_w"]


def test_a_gang_the_plan_keeps_in_part_is_listed() -> None:
    """The solver makes a gang given in part whole (`repair`) or drops it; a plan that kept one
    in part would break the gang rule, and the check says so."""
    doc = problem([node("n1")], [dep("x", "a", shards=3)],
                  placements=[placed("x", "n1", [0]), placed("x", "n1", [1], shard=1), placed("x", "n1", [2], shard=2)])
    model = problem_from_dict(doc)
    plan = Plan(status="feasible", placements=model.placements[:2])
    [gang] = kept_violations(model, plan)
    assert (gang.rule, gang.scope, gang.tenants) == ("GANG", "deployment x replica 0", ("a",))
    assert gang.message == "x replica 0 runs shards 0, 1 of its 3: a replica runs all its shards or none"


def test_a_gang_given_in_part_and_made_whole_by_the_plan_is_not_listed() -> None:
    doc = problem([node("n1")], [dep("x", "a", shards=2)], placements=[placed("x", "n1", [0])])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert sorted(p.shard for p in plan.placements) == [0, 1]  # repaired beside its kept shard
    assert (plan.stats["kept_violations"], plan.stats["kept_violations_total"]) == ([], 0)


def test_kept_replicas_within_their_gang_locality_spread_models_and_quotas_list_none() -> None:
    # Replica 0 runs whole in r1; replica 1 is new, in r2. Tenant a ends exactly at its caps.
    doc = problem([node("n1", "r1"), node("n2", "r2")],
                  [dep("x", "a", replicas=2, shards=2, power_w=100, accelerator_models=["maia-100"],
                       spread={"domain": "rack", "max_per_domain": 1})], **TWO_RACKS,
                  tenants=[{"id": "a", "max_accelerators": 4, "max_power_w": 400}],
                  placements=[placed("x", "n1", [0]), placed("x", "n1", [1], shard=1)])
    plan = solve(problem_from_dict(doc), check_kept=True)
    assert len(plan.placements) == 4
    assert (plan.stats["kept_violations"], plan.stats["kept_violations_total"]) == ([], 0)
