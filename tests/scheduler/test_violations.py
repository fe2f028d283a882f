"""find_violations: each isolation/capacity rule caught on hand-made placements, nothing flagged
on what the solver places (property over the generated problems of the solver's own tests); the
same of find_workload_violations (gangs, locality, spread, models, quotas), whose rules
find_violations leaves out."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from builders import dep, node, placed, problem
from scheduler import plan_to_dict, problem_from_dict, solve
from scheduler.interchange import placement_from_dict
from scheduler.violations import PlacementScopes, find_power_violations, find_violations, find_workload_violations
from strategies import problems


def _rules(doc: dict) -> list[tuple[str, str, tuple[str, ...]]]:
    # The placements join the model after the interchange's checks, as the controller's re-check
    # puts them together (controller/store/recheck.py): problem_from_dict refuses placements that
    # could never have run together (two on one whole accelerator, ...), which is what is judged.
    model = problem_from_dict({**doc, "placements": []})
    model = replace(model, placements=tuple(placement_from_dict(p) for p in doc["placements"]))
    return [(v.rule, v.scope, v.tenants) for v in find_violations(model)]


TWO_RACKS = dict(racks=[{"id": "r1", "row": "w1"}, {"id": "r2", "row": "w2"}],
                 rows=[{"id": "w1", "zone": "z1"}, {"id": "w2", "zone": "z2"}])
NODES = [node("n1", "r1", hbm_gib=32, cpu_milli=1000, memory_mib=1024), node("n2", "r1"), node("n3", "r2")]


@pytest.mark.parametrize("tenants, deployments, placements, expected", [
    pytest.param([{"id": "a", "isolation": "dedicated_node"}, {"id": "b"}], [dep("x", "a"), dep("y", "b")],
                 [placed("x", "n1", [0]), placed("y", "n1", [1])], [("ISOLATION", "node n1", ("a", "b"))],
                 id="dedicated_node shared"),
    pytest.param([{"id": "a", "isolation": "dedicated_rack"}, {"id": "b"}], [dep("x", "a"), dep("y", "b")],
                 [placed("x", "n1", [0]), placed("y", "n2", [0])], [("ISOLATION", "rack r1", ("a", "b"))],
                 id="dedicated_rack shared"),
    pytest.param([{"id": "a", "excludes": ["b"]}, {"id": "b"}], [dep("x", "a"), dep("y", "b")],
                 [placed("x", "n1", [0]), placed("y", "n2", [0])], [("EXCLUSION", "rack r1", ("a", "b"))],
                 id="excluded tenants in one rack"),
    pytest.param([{"id": "a", "zones": ["z2"]}], [dep("x", "a")], [placed("x", "n1", [0])],
                 [("ZONE", "node n1", ("a",))], id="outside the tenant's zones"),
    pytest.param([{"id": "a"}, {"id": "b"}], [dep("x", "a", accelerator_milli=500), dep("y", "b", accelerator_milli=500)],
                 [placed("x", "n2", [0], milli=500), placed("y", "n2", [0], milli=500)],
                 [("ACCELERATOR", "node n2[0]", ("a", "b"))], id="two tenants on one accelerator"),
    pytest.param([{"id": "a"}], [dep("x", "a", accelerator_milli=600, replicas=2)],
                 [placed("x", "n2", [0], milli=600), placed("x", "n2", [0], replica=1, milli=600)],
                 [("ACCELERATOR", "node n2[0]", ("a",))], id="fractions over 1000 milli"),
    pytest.param([{"id": "a"}], [dep("x", "a", replicas=2)],
                 [placed("x", "n2", [0]), placed("x", "n2", [0], replica=1)],
                 [("ACCELERATOR", "node n2[0]", ("a",))], id="a whole accelerator twice"),
    pytest.param([{"id": "a"}], [dep("x", "a", hbm_gib=48, cpu_milli=800, memory_mib=800, replicas=2)],
                 [placed("x", "n1", [0]), placed("x", "n1", [1], replica=1)],
                 [("CPU", "node n1", ("a",)), ("HBM", "node n1", ("a",)), ("HBM", "node n1", ("a",)),
                  ("MEMORY", "node n1", ("a",))], id="host and HBM over-committed"),
    pytest.param([{"id": "a"}], [dep("x", "a", hbm_gib=20, accelerator_milli=500, replicas=2)],
                 [placed("x", "n1", [0], milli=500), placed("x", "n1", [0], replica=1, milli=500)],
                 [("HBM", "node n1[0]", ("a",))], id="fractions over an accelerator's HBM"),
    pytest.param([{"id": "a"}, {"id": "b"}], [dep("x", "a"), dep("y", "b")],
                 [placed("x", "n1", [0]), placed("y", "n1", [1])], [], id="shared tenants side by side"),
])
def test_each_rule(tenants: list, deployments: list, placements: list, expected: list) -> None:
    doc = problem(NODES, deployments, tenants=tenants, placements=placements, **TWO_RACKS)
    assert _rules(doc) == expected


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems())
def test_what_the_solver_places_is_never_flagged(doc: dict) -> None:
    plan = plan_to_dict(solve(problem_from_dict(copy.deepcopy(doc)), time_limit_ms=2000))
    assert _rules({**doc, "placements": plan["placements"]}) == []
    assert find_power_violations(problem_from_dict({**doc, "placements": plan["placements"]})) == []
    assert find_workload_violations(problem_from_dict({**doc, "placements": plan["placements"]})) == []


SPREAD_RACK = {"domain": "rack", "max_per_domain": 1}


@pytest.mark.parametrize("tenants, deployments, placements, expected", [
    pytest.param([{"id": "a"}], [dep("x", "a", shards=2)], [placed("x", "n1", [0])],
                 [("GANG", "deployment x replica 0", ("a",))], id="a gang placed in part"),
    pytest.param([{"id": "a"}], [dep("x", "a", shards=2)], [placed("x", "n1", [0]), placed("x", "n3", [0], shard=1)],
                 [("LOCALITY", "deployment x replica 0", ("a",))], id="a rack-local gang in two racks"),
    pytest.param([{"id": "a"}], [dep("x", "a", shards=2, locality="node")],
                 [placed("x", "n1", [0]), placed("x", "n2", [0], shard=1)],
                 [("LOCALITY", "deployment x replica 0", ("a",))], id="a node-local gang on two nodes"),
    pytest.param([{"id": "a"}], [dep("x", "a", replicas=2, spread=SPREAD_RACK)],
                 [placed("x", "n1", [0]), placed("x", "n2", [0], replica=1)],
                 [("SPREAD", "rack r1", ("a",))], id="two replicas in a rack spread one per rack"),
    pytest.param([{"id": "a"}], [dep("x", "a", replicas=2, shards=2, locality="none", spread=SPREAD_RACK)],
                 [placed("x", "n1", [0]), placed("x", "n3", [0], shard=1),
                  placed("x", "n3", [1], replica=1), placed("x", "n3", [2], replica=1, shard=1)],
                 [("SPREAD", "rack r2", ("a",))], id="a replica counts in every rack its shards touch"),
    pytest.param([{"id": "a"}], [dep("x", "a", accelerator_models=["m1"])], [placed("x", "n1", [0])],
                 [("ACCELERATOR_MODEL", "node n1", ("a",))], id="a node of another model"),
    pytest.param([{"id": "a"}], [dep("x", "a", replicas=3, accelerator_models=["m1"])],
                 [placed("x", "n1", [0]), placed("x", "n1", [1], replica=1), placed("x", "n3", [0], replica=2)],
                 [("ACCELERATOR_MODEL", "node n1", ("a",)), ("ACCELERATOR_MODEL", "node n3", ("a",))],
                 id="one a node and deployment, however many of its shards the node holds"),
    pytest.param([{"id": "a", "max_accelerators": 1.5}], [dep("x", "a", replicas=2, accelerator_milli=800)],
                 [placed("x", "n1", [0], milli=800), placed("x", "n1", [1], replica=1, milli=800)],
                 [("QUOTA_ACCELERATORS", "tenant a", ("a",))], id="fractions over max_accelerators"),
    pytest.param([{"id": "a", "max_power_w": 500}], [dep("x", "a", acc=2, power_w=300)], [placed("x", "n1", [0, 1])],
                 [("QUOTA_POWER", "tenant a", ("a",))], id="over max_power_w"),
    pytest.param([{"id": "a", "max_accelerators": 2, "max_power_w": 600}],
                 [dep("x", "a", replicas=2, shards=2, locality="none", power_w=300, accelerator_models=["maia-100"],
                      spread=SPREAD_RACK)],
                 [placed("x", "n1", [0]), placed("x", "n1", [1], shard=1)], [], id="within every rule"),
])
def test_each_workload_rule(tenants: list, deployments: list, placements: list, expected: list) -> None:
    doc = problem(NODES, deployments, tenants=tenants, placements=placements, **TWO_RACKS)
    assert [(v.rule, v.scope, v.tenants) for v in find_workload_violations(problem_from_dict(doc))] == expected
    assert _rules(doc) == []  # none of them is find_violations' (the watchdog's and the re-check's)


def test_workload_messages_name_the_binding_numbers() -> None:
    nodes = [node("n1", "r1", model="m3"), node("n2", "r1"), node("n3", "r2")]
    doc = problem(nodes, [dep("x", "a", replicas=3, shards=2, spread=SPREAD_RACK, power_w=100,
                              accelerator_models=["maia-100", "m2"])],
                  tenants=[{"id": "a", "max_accelerators": 2, "max_power_w": 250}], **TWO_RACKS,
                  placements=[placed("x", "n1", [0]), placed("x", "n3", [0], shard=1),
                              placed("x", "n2", [1], replica=1)])
    messages = {v.rule: v.message for v in find_workload_violations(problem_from_dict(doc))}
    assert messages == {
        "GANG": "x replica 1 runs shards 0 of its 2: a replica runs all its shards or none",
        "LOCALITY": "x replica 0 runs in racks r1, r2; its locality keeps it in one rack",
        "SPREAD": "rack r1 holds 2 replicas of x > 1, its spread's max_per_domain",
        "ACCELERATOR_MODEL": "x replica 0 shard 0 runs on n1 (model m3); it needs maia-100|m2",
        "QUOTA_ACCELERATORS": "tenant a holds 3 accelerators > 2 max_accelerators",
        "QUOTA_POWER": "tenant a draws 300 W > 250 W max_power_w",
    }


def test_power_over_a_rack_or_row_budget() -> None:
    # n1 and n2 (r1, row w1) idle at 100 W each; a 300 W shard on each: r1 draws 800 W.
    nodes = [node("n1", "r1", idle_power_w=100), node("n2", "r1", idle_power_w=100), node("n3", "r2", state="down",
                                                                                       idle_power_w=100)]
    racks = [{"id": "r1", "row": "w1", "power_budget_w": 700}, {"id": "r2", "row": "w1"}]
    rows = [{"id": "w1", "zone": "z1", "power_budget_w": 750}]
    doc = problem(nodes, [dep("x", "a", power_w=300, replicas=2)], tenants=[{"id": "a"}], racks=racks, rows=rows,
                  placements=[placed("x", "n1", [0]), placed("x", "n2", [0], replica=1)])
    found = find_power_violations(problem_from_dict(doc))
    assert [(v.rule, v.scope, v.tenants) for v in found] == [("POWER", "rack r1", ("a",)), ("POWER", "row w1", ("a",))]
    assert found[0].message == "rack r1 draws 800 W, over its budget of 700 W"  # a down node draws nothing


def test_placement_scopes_name_every_scope_a_violation_of_that_shard_can_have() -> None:
    doc = problem(NODES, [dep("x", "a")], tenants=[{"id": "a"}], **TWO_RACKS)
    scopes = PlacementScopes(problem_from_dict(doc))
    assert scopes.of("n1", (0, 2)) == {"node n1", "node n1[0]", "node n1[2]", "rack r1", "row w1"}
    assert scopes.of("n9", (1,)) == {"node n9", "node n9[1]"}  # unknown: a REFERENCE violation's scope


def test_an_isolation_or_exclusion_names_what_each_tenant_has_there() -> None:
    """The watchdog's alarm said "rack r1 holds tenants a and b, which exclude each other": the
    operator had to search every placement of the rack for the deployments and nodes."""
    doc = problem([node("n1", rack="r1"), node("n2", rack="r1")],
                      [dep("web", tenant="a"), dep("api", tenant="b"), dep("db", tenant="c")],
                      tenants=[{"id": "a", "excludes": ["b"]}, {"id": "b"}, {"id": "c", "isolation": "dedicated_node"}],
                      placements=[placed("web", "n1", [0]), placed("api", "n2", [0]), placed("db", "n2", [1])])
    messages = {v.rule: v.message for v in find_violations(problem_from_dict(doc, validate=False))}
    assert messages["EXCLUSION"] == ("rack r1 holds tenants a and b, which exclude each other "
                                     "(a: web on n1; b: api on n2)")
    assert messages["ISOLATION"] == ("node n2 holds tenant c (dedicated_node) together with b (b: api; c: db)")
