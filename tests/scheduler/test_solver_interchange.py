"""The interchange format: validation errors, schemas, the shared examples, purity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from builders import SHARED, dep, node, placed, problem, solve_doc
from scheduler import (Deployment, ProblemError, ShardSpec, Spread, deployment_to_dict, plan_to_dict,
                       problem_from_dict, solve)
from scheduler.interchange import deployment_from_dict, shard_spec_from_dict

SCHEMAS = Path(__file__).resolve().parents[2] / "scheduler" / "schemas"


def error_of(doc: dict) -> ProblemError:
    with pytest.raises(ProblemError) as info:
        problem_from_dict(doc)
    return info.value


def test_unknown_tenant_names_path_and_value() -> None:
    doc = problem([node("n1")], [dep("a"), dep("b"), dep("c"), dep("d")],
                  tenants=[{"id": "t1"}])
    doc["deployments"][3]["tenant"] = "acme"
    assert str(error_of(doc)) == "deployments[3].tenant: unknown tenant 'acme'"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["nodes"][0].update(rack="nowhere"), "nodes[0].rack"),
    (lambda d: d["racks"][0].update(row="nowhere"), "racks[0].row"),
    (lambda d: d["rows"][0].update(zone="nowhere"), "rows[0].zone"),
    (lambda d: d["nodes"].append(dict(d["nodes"][0])), "nodes[1].id"),
    (lambda d: d["placements"].append(placed("ghost", "n1", [0])), "placements[0].deployment"),
    (lambda d: d["placements"].append(placed("a", "n9", [0])), "placements[0].node"),
    (lambda d: d["placements"].append(placed("a", "n1", [0], replica=5)),
     "placements[0].replica"),
    (lambda d: d["placements"].append(placed("a", "n1", [0], shard=1)), "placements[0].shard"),
    (lambda d: d["placements"].append(placed("a", "n1", [7])),
     "placements[0].accelerator_indices[0]"),
    (lambda d: d["tenants"][0].update(excludes=["ghost"]), "tenants[0].excludes[0]"),
    (lambda d: d["deployments"][0].update(replicas=0), "deployments[0].replicas"),
])
def test_referential_and_schema_errors(mutate, field: str) -> None:
    doc = problem([node("n1")], [dep("a")])
    mutate(doc)
    err = error_of(doc)
    assert err.field == field
    assert str(err).startswith(field + ":")


def _reason_codes(plan_schema: dict) -> list:
    return plan_schema["properties"]["unplaced"]["items"]["properties"]["reasons"]["items"]["properties"]["code"]["enum"]


def _without_extensions(name: str, schema: dict) -> dict:
    """A shipped schema less this repo's documented extensions (scheduler/interchange.py): a node's
    `max_shards` and its reason code NODE_SHARDS. What is left is the shared contract's."""
    if name == "problem.schema.json":
        schema["$defs"]["node"]["properties"].pop("max_shards")
    else:
        _reason_codes(schema).remove("NODE_SHARDS")
    return schema


@pytest.mark.parametrize("name", ["problem.schema.json", "plan.schema.json"])
def test_shipped_schemas_are_the_shared_ones_and_the_extensions(name: str) -> None:
    shipped = json.loads((SCHEMAS / name).read_text())
    assert _without_extensions(name, shipped) == json.loads((SHARED / name).read_text())


def test_a_node_max_shards_is_an_optional_integer_of_at_least_one() -> None:
    assert problem_from_dict(problem([node("n1")], [dep("a")])).nodes[0].max_shards is None
    assert problem_from_dict(problem([node("n1", max_shards=4096)], [dep("a")])).nodes[0].max_shards == 4096
    assert problem_from_dict(problem([node("n1", max_shards=3.0)], [dep("a")])).nodes[0].max_shards.__class__ is int
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ProblemError) as info:
            problem_from_dict(problem([node("n1", max_shards=bad)], [dep("a")]))
        assert info.value.field == "nodes[0].max_shards"


def _plan_validator() -> jsonschema.protocols.Validator:
    from referencing import Registry, Resource
    problem_schema = json.loads((SCHEMAS / "problem.schema.json").read_text())
    plan_schema = json.loads((SCHEMAS / "plan.schema.json").read_text())
    registry = Registry().with_resources(
        [("problem.schema.json", Resource.from_contents(problem_schema))])
    return jsonschema.Draft202012Validator(plan_schema, registry=registry)


@pytest.mark.parametrize("path", sorted((SHARED / "examples").glob("*.problem.json")),
                         ids=lambda p: p.name)
def test_every_shared_example_solves_to_a_valid_plan(path: Path) -> None:
    doc = json.loads(path.read_text())
    plan = solve_doc(doc, time_limit_ms=1000)
    _plan_validator().validate(plan_to_dict(plan))


@pytest.mark.parametrize("shard", [
    ShardSpec(accelerators=1, accelerator_milli=250),
    ShardSpec(accelerators=4, hbm_gib=16.5, cpu_milli=4000, memory_mib=1024, power_w=412.5,
              accelerator_models=("maia-100", "maia-200")),
    ShardSpec(accelerators=2, accelerator_models=()),  # no model accepted, unlike None (any)
])
def test_a_deployment_reads_back_as_it_was_written(shard: ShardSpec) -> None:
    deployment = Deployment("t/web", "t", 3, 2, shard, min_replicas=2, locality="row",
                            spread=Spread("zone", 1), priority=5, preemptible=True)
    doc = json.loads(json.dumps(deployment_to_dict(deployment)))
    assert shard_spec_from_dict(doc["shard"]) == shard
    assert deployment_from_dict(doc) == deployment


def test_a_shard_reads_the_schema_defaults_and_floats_whatever_number_json_holds() -> None:
    shard = shard_spec_from_dict({"accelerators": 2, "hbm_gib": 16, "power_w": 300})
    assert repr(shard) == repr(ShardSpec(accelerators=2, accelerator_milli=1000, hbm_gib=16.0, cpu_milli=0,
                                         memory_mib=0, power_w=300.0, accelerator_models=None))


def test_moved_items_use_from_and_to() -> None:
    doc = problem([node("n1", state="down"), node("n2")], [dep("a", locality="node")],
                  placements=[placed("a", "n1", [0])])
    out = plan_to_dict(solve_doc(doc))
    _plan_validator().validate(out)
    # Re-placing a shard a down node lost is reported as a move from the down node.
    assert out["moved"] == [{"deployment": "a", "replica": 0, "shard": 0, "from": "n1",
                             "to": "n2"}]


def test_scheduler_imports_nothing_impure() -> None:
    code = ("import sys, scheduler, scheduler.solve, scheduler.cpsat; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('grpc', 'sqlalchemy', 'alembic', 'controller', 'maia')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == "[]"
