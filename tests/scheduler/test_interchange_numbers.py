"""Numbers at the door: integer-valued floats are ints, integers the solver cannot hold are
refused, and slot counts never overflow.

JSON Schema calls any number without a fractional part an integer, so `replicas: 3.0` (or
`1e20`) passed validation and then ended in a TypeError or OverflowError traceback inside the
solver (`maiactl solve` exited 1, not 2); so did an integer past a float's range (json.loads
reads `1` and 400 zeros as one) in a number field. And a budget within QUANTITY_LIMIT over a
tiny shard (9e13 W over 1e-6 W, or no budget, 1e15, over 1e-5 W) held more slots than int64,
whose cast made them negative: a false POWER_RACK (or HBM) with numpy RuntimeWarnings. Each case
is a small inline document; the property test holds any schema-valid document with floats in
its integer fields to the plan its ints get.
"""

from __future__ import annotations

import copy
import json
import math
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import SHARED, refusal, set_at, solve_doc
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from strategies import problems

from scheduler import plan_to_dict, problem_from_dict, problem_to_dict, solve

Doc = dict[str, Any]
WALL_LIMIT_MS = 120_000  # far above the time limit: the plan does not depend on the clock


def doc(mode: str = "batch", **options: Any) -> Doc:
    """Two racks of one 4-accelerator node each (n1 in r1, n2 in r2), tenant t: a gang spread
    one replica per rack, and fractions of which one runs on n2 (a new document each time)."""
    return copy.deepcopy({
        "version": 1,
        "zones": [{"id": "z1"}],
        "rows": [{"id": "w1", "zone": "z1"}],
        "racks": [{"id": "r1", "row": "w1"}, {"id": "r2", "row": "w1"}],
        "nodes": [{"id": "n1", "rack": "r1", "accelerators": 4, "cpu_milli": 64000,
                   "memory_mib": 262144},
                  {"id": "n2", "rack": "r2", "accelerators": 4, "cpu_milli": 64000,
                   "memory_mib": 262144}],
        "tenants": [{"id": "t"}],
        "deployments": [
            {"id": "t/gang", "tenant": "t", "replicas": 2, "min_replicas": 1,
             "shards_per_replica": 2, "locality": "rack", "priority": 5,
             "spread": {"domain": "rack", "max_per_domain": 1},
             "shard": {"accelerators": 1, "cpu_milli": 1000, "memory_mib": 1024}},
            {"id": "t/frac", "tenant": "t", "replicas": 3, "shards_per_replica": 1,
             "locality": "node", "shard": {"accelerators": 1, "accelerator_milli": 500}}],
        "placements": [{"deployment": "t/frac", "replica": 1, "shard": 0, "node": "n2",
                        "accelerator_indices": [3], "accelerator_milli": 500}],
        "options": {"mode": mode, "time_limit_ms": 2000, **options},
    })


def _get(problem: Doc, path: tuple[Any, ...]) -> Any:
    for part in path:
        problem = problem[part]
    return problem


def parsed(problem: Doc, *, validate: bool = True) -> str:
    """The problem as the solver reads it, written back as JSON text: 3 and 3.0 differ here."""
    return json.dumps(problem_to_dict(problem_from_dict(copy.deepcopy(problem),
                                                        validate=validate)))


def plan_of(problem: Doc) -> Doc:
    plan = plan_to_dict(solve(problem_from_dict(copy.deepcopy(problem)),
                              wall_limit_ms=WALL_LIMIT_MS))
    plan.pop("stats")
    return plan


def case_id(value: Any) -> str:
    """A readable test id: a path dotted, a number of 400 digits by its size."""
    if isinstance(value, tuple):
        return ".".join(map(str, value))
    if isinstance(value, int) and abs(value) >= 10 ** 19:
        return f"{'-' if value < 0 else ''}10^{len(str(abs(value))) - 1}"
    return repr(value) if isinstance(value, float) else str(value)[:24]


def maiactl_solve(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "problem.json"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "controller.cli.main", "solve", str(path),
                           "-o", "json"], capture_output=True, text=True, timeout=180)


# --- integer fields given as integer-valued floats ----------------------------------------------

INTEGER_FIELDS = [  # (path, mode, options): every integer field of the schema, in a mode using it
    (("deployments", 0, "replicas"), "batch", {}),
    (("deployments", 0, "min_replicas"), "batch", {}),
    (("deployments", 0, "shards_per_replica"), "batch", {}),
    (("deployments", 0, "priority"), "batch", {}),
    (("deployments", 0, "spread", "max_per_domain"), "batch", {}),
    (("deployments", 0, "shard", "accelerators"), "batch", {}),
    (("deployments", 0, "shard", "cpu_milli"), "batch", {}),
    (("deployments", 0, "shard", "memory_mib"), "batch", {}),
    (("deployments", 1, "shard", "accelerator_milli"), "online", {}),
    (("nodes", 0, "accelerators"), "batch", {}),
    (("nodes", 1, "cpu_milli"), "batch", {}),
    (("nodes", 1, "memory_mib"), "batch", {}),
    (("placements", 0, "replica"), "online", {}),
    (("placements", 0, "shard"), "online", {}),
    (("placements", 0, "accelerator_indices", 0), "online", {}),
    (("placements", 0, "accelerator_milli"), "online", {}),
    (("options", "time_limit_ms"), "batch", {}),
    (("options", "max_moves"), "rebalance", {"max_moves": 2}),
    (("options", "batch_size"), "online", {"batch_size": 2}),
]


@pytest.mark.parametrize(("path", "mode", "options"), INTEGER_FIELDS,
                         ids=[case_id(p) for p, _, _ in INTEGER_FIELDS])
def test_an_integer_valued_float_is_read_as_its_int(path: tuple[Any, ...], mode: str,
                                                    options: Doc) -> None:
    # Before: kept as a float, it ended in a TypeError inside the solver (slice indices,
    # range(), CP-SAT's "Linear constraints only accept integer values") or, for the rest, sat
    # in the model waiting for a code path that indexes with it.
    ints = doc(mode, **options)
    floats = set_at(doc(mode, **options), path, float(_get(ints, path)))
    assert parsed(floats) == parsed(ints)
    assert plan_of(floats) == plan_of(ints)


def test_without_the_schema_integer_valued_floats_are_ints_too() -> None:
    # `validate=False` (the controller's own snapshot) converts the same way.
    ints = doc("online", batch_size=2)
    floats = copy.deepcopy(ints)
    for path, _, _ in INTEGER_FIELDS:
        if path[0] != "options":
            set_at(floats, path, float(_get(ints, path)))
    floats["options"] = {"mode": "online", "time_limit_ms": 2000.0, "batch_size": 2.0}
    assert parsed(floats, validate=False) == parsed(ints, validate=False)


def test_maiactl_solve_takes_integer_valued_floats(tmp_path: Path) -> None:
    # Before: `replicas: 3.0` exited 1 with a TypeError traceback.
    floats = set_at(doc(), ("deployments", 1, "replicas"), 3.0)
    result = maiactl_solve(tmp_path, json.dumps(floats))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert sorted((p["deployment"], p["replica"]) for p in plan["placements"]) == sorted(
        (p["deployment"], p["replica"]) for p in plan_of(doc())["placements"])


# --- integers the solver cannot hold ------------------------------------------------------------

PAST_BOUNDS = [  # (path, value, message)
    (("nodes", 0, "accelerators"), 1e20,
     "1e+20 is greater than the maximum of 1024 (the most accelerators a node may have)"),
    (("nodes", 0, "accelerators"), 10 ** 20,
     "1e+20 is greater than the maximum of 1024 (the most accelerators a node may have)"),
    (("nodes", 0, "accelerators"), 1025,
     "1025 is greater than the maximum of 1024 (the most accelerators a node may have)"),
    (("deployments", 0, "shard", "accelerators"), 10 ** 20,
     "1e+20 is greater than the maximum of 1024 (the most accelerators a node may have)"),
    (("deployments", 0, "replicas"), 10 ** 20,
     "1e+20 is greater than the maximum of 1048576 (the most replicas or shards the solver "
     "lists)"),
    (("deployments", 0, "replicas"), 2 ** 20 + 1,
     "1048577 is greater than the maximum of 1048576 (the most replicas or shards the solver "
     "lists)"),
    (("deployments", 0, "shards_per_replica"), 1e20,
     "1e+20 is greater than the maximum of 1048576 (the most replicas or shards the solver "
     "lists)"),
    (("deployments", 0, "spread", "max_per_domain"), 10 ** 20,
     "1e+20 is greater than the maximum of 1048576 (the most replicas or shards the solver "
     "lists)"),
    (("deployments", 0, "priority"), 2 ** 63,
     "9223372036854775808 is greater than the maximum of 9223372036854775807 (the largest "
     "64-bit integer)"),
    (("deployments", 0, "priority"), -2 ** 63,
     "-9223372036854775808 is less than the minimum of -9223372036854775807"),
    (("options", "time_limit_ms"), 10 ** 400,
     "about 1e+400 is greater than the maximum of 9223372036854775807 (the largest 64-bit "
     "integer)"),
    (("options", "batch_size"), 1e20,
     "1e+20 is greater than the maximum of 9223372036854775807 (the largest 64-bit integer)"),
    (("options", "max_moves"), 2 ** 63,
     "9223372036854775808 is greater than the maximum of 9223372036854775807 (the largest "
     "64-bit integer)"),
]


@pytest.mark.parametrize(("path", "value", "message"), PAST_BOUNDS,
                         ids=[f"{case_id(p)}={case_id(v)}" for p, v, _ in PAST_BOUNDS])
def test_an_integer_past_the_solvers_bound_is_refused_with_its_path(
        path: tuple[Any, ...], value: float, message: str) -> None:
    # Before: valid to the schema, then an OverflowError (accelerators: building the node
    # arrays; shards: a list of them), a solve that never ended (replicas: every pending one
    # listed), or a TypeError from CP-SAT (max_per_domain).
    error = refusal(set_at(doc(), path, value))
    where = ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")
    assert (error.field, error.message) == (where, message)


def test_the_integer_bounds_themselves_are_accepted() -> None:
    from scheduler.interchange import ACCELERATORS_LIMIT, COUNT_LIMIT, INT64_MAX

    problem = set_at(doc(), ("nodes", 0, "accelerators"), ACCELERATORS_LIMIT)
    set_at(problem, ("deployments", 1, "replicas"), COUNT_LIMIT)
    set_at(problem, ("deployments", 0, "spread", "max_per_domain"), COUNT_LIMIT)
    set_at(problem, ("deployments", 0, "priority"), -INT64_MAX)
    set_at(problem, ("options", "max_moves"), INT64_MAX)
    parsed_problem = problem_from_dict(problem)
    assert parsed_problem.nodes[0].accelerators == ACCELERATORS_LIMIT


def test_the_integer_bounds_sit_above_the_controllers_limits() -> None:
    # A snapshot the controller built from values it validated is never refused for size.
    from controller import limits
    from scheduler.interchange import ACCELERATORS_LIMIT, COUNT_LIMIT, INT64_MAX

    assert max(limits.NODE_ACCELERATORS_MAX, limits.SHARD_ACCELERATORS_MAX) <= ACCELERATORS_LIMIT
    assert max(limits.REPLICAS_MAX, limits.SHARDS_PER_REPLICA_MAX) <= COUNT_LIMIT
    assert limits.PRIORITY_MAX <= INT64_MAX


NUMBER_FIELDS = [  # (path, field): number fields, and integer ones bounded as quantities
    (("nodes", 0, "hbm_gib"), "nodes[0].hbm_gib"),
    (("nodes", 0, "idle_power_w"), "nodes[0].idle_power_w"),
    (("nodes", 0, "cpu_milli"), "nodes[0].cpu_milli"),
    (("racks", 0, "power_budget_w"), "racks[0].power_budget_w"),
    (("tenants", 0, "max_power_w"), "tenants[0].max_power_w"),
    (("tenants", 0, "reserved_accelerators"), "tenants[0].reserved_accelerators"),
    (("deployments", 0, "shard", "power_w"), "deployments[0].shard.power_w"),
    (("deployments", 0, "shard", "hbm_gib"), "deployments[0].shard.hbm_gib"),
]


@pytest.mark.parametrize(("path", "field"), NUMBER_FIELDS,
                         ids=[case_id(p) for p, _ in NUMBER_FIELDS])
def test_a_number_past_a_floats_range_is_refused_not_a_crash(path: tuple[Any, ...],
                                                              field: str) -> None:
    # Before: OverflowError ("int too large to convert to float") from float() or
    # math.isfinite, before the quantity bound could word it.
    error = refusal(set_at(doc(), path, 10 ** 400))
    assert (error.field, error.message) == (field, (
        "about 1e+400 is too large: a quantity must stay below 1e+14 (leave the field out for "
        "no limit)"))


UNCHECKED = [  # (path, value, field, message): without the schema
    (("deployments", 0, "replicas"), 2.5, "deployments[0].replicas", "2.5 is not an integer"),
    (("deployments", 0, "shard", "cpu_milli"), 0.5, "deployments[0].shard.cpu_milli",
     "0.5 is not an integer"),
    (("options", "batch_size"), math.nan, "options.batch_size", "nan is not an integer"),
    (("nodes", 1, "accelerators"), 10 ** 20, "nodes[1].accelerators",
     "1e+20 is greater than the maximum of 1024 (the most accelerators a node may have)"),
]


@pytest.mark.parametrize(("path", "value", "field", "message"), UNCHECKED,
                         ids=[f"{case_id(p)}={case_id(v)}" for p, v, _, _ in UNCHECKED])
def test_without_the_schema_integers_are_still_checked(path: tuple[Any, ...], value: float,
                                                      field: str, message: str) -> None:
    # The schema refuses 2.5 and NaN in an integer field; a caller that skips it got a TypeError
    # from the solver instead of a ProblemError.
    error = refusal(set_at(doc(), path, value), validate=False)
    assert (error.field, error.message) == (field, message)


def test_maiactl_solve_refuses_a_huge_integer_with_one_line_and_exit_2(tmp_path: Path) -> None:
    # Before: exit 1 and an OverflowError traceback from building the node arrays.
    result = maiactl_solve(tmp_path, json.dumps(set_at(doc(), ("nodes", 0, "accelerators"),
                                                     1e20)))
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr == ("error: nodes[0].accelerators: 1e+20 is greater than the maximum of "
                             "1024 (the most accelerators a node may have)\n")


def test_maiactl_solve_refuses_a_400_digit_number_with_one_line_and_exit_2(
        tmp_path: Path) -> None:
    text = json.dumps(set_at(doc(), ("nodes", 0, "hbm_gib"), 7)).replace(
        '"hbm_gib": 7', '"hbm_gib": 1' + "0" * 400)
    result = maiactl_solve(tmp_path, text)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr == ("error: nodes[0].hbm_gib: about 1e+400 is too large: a quantity must "
                             "stay below 1e+14 (leave the field out for no limit)\n")


# --- slot counts past int64 ---------------------------------------------------------------------

def test_power_slots_read_a_budget_past_int64_slots_as_unlimited() -> None:
    from scheduler.filters import BIG, power_slots

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast"
        assert power_slots(np.array([9e13, 1e15, -5.0]), 1e-6).tolist() == [BIG, BIG, 0]
        assert power_slots(np.array([1400.0, 1399.0, 0.0]), 700.0).tolist() == [2, 1, 0]


def tiny(shard: Doc, *, mode: str, racks: list[Doc] | None = None,
         tenants: list[Doc] | None = None, nodes: list[Doc] | None = None,
         replicas: int = 2, shards: int = 1, locality: str = "node") -> Doc:
    """One rack r1 of nodes (default: n1 with 2 accelerators), one deployment t/x."""
    return {"version": 1,
            "racks": racks or [{"id": "r1", "row": "w1"}],
            "rows": [{"id": "w1", "zone": "z1"}],
            "nodes": nodes or [{"id": "n1", "rack": "r1", "accelerators": 2}],
            "tenants": tenants or [{"id": "t"}],
            "deployments": [{"id": "t/x", "tenant": "t", "replicas": replicas,
                             "shards_per_replica": shards, "locality": locality,
                             "shard": shard}],
            "options": {"mode": mode, "time_limit_ms": 2000}}


def solved_without_warnings(problem: Doc) -> list[tuple[str, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = solve_doc(problem, wall_limit_ms=WALL_LIMIT_MS)
    assert plan.unplaced == (), plan.unplaced
    return sorted({(p.deployment, p.replica) for p in plan.placements})


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_micro_watt_shard_fits_under_a_huge_rack_budget(mode: str) -> None:
    # Before: 9e13 W / 1e-6 W = 9e19 slots, past int64: a false POWER_RACK ("0 W used + 0 W
    # needed > 90000000000.0 kW budget").
    problem = tiny({"accelerators": 1, "power_w": 1e-6}, mode=mode,
                   racks=[{"id": "r1", "row": "w1", "power_budget_w": 9e13}])
    assert solved_without_warnings(problem) == [("t/x", 0), ("t/x", 1)]


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_tiny_shard_fits_where_nothing_limits_it(mode: str) -> None:
    # No budget reads as 1e15 W and no HBM as 1e15 GiB: before, 1e-5 W and 1e-6 GiB shards
    # overflowed them into a false POWER_RACK and a false HBM.
    problem = tiny({"accelerators": 1, "accelerator_milli": 500, "power_w": 1e-5,
                    "hbm_gib": 1e-6}, mode=mode)
    assert solved_without_warnings(problem) == [("t/x", 0), ("t/x", 1)]


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_gang_of_vanishing_power_fits_under_a_tenant_cap(mode: str) -> None:
    # Before: OverflowError ("cannot convert float infinity to integer") from the tenant's
    # power room; the gang's rack and row budgets (the greedy placer's fill) had the same.
    problem = tiny({"accelerators": 1, "power_w": 1e-300}, mode=mode, replicas=1, shards=2,
                   locality="rack", tenants=[{"id": "t", "max_power_w": 9e13}],
                   racks=[{"id": "r1", "row": "w1", "power_budget_w": 9e13}])
    assert solved_without_warnings(problem) == [("t/x", 0)]


def test_preempting_for_a_shard_of_vanishing_power() -> None:
    # The preemption trial's power test (`room._may_fit`) divides by the shard's power too.
    problem = tiny({"accelerators": 1, "power_w": 1e-300}, mode="batch", replicas=1,
                   racks=[{"id": "r1", "row": "w1", "power_budget_w": 9e13}])
    problem["deployments"][0]["priority"] = 10
    problem["deployments"].append({"id": "t/low", "tenant": "t", "replicas": 2,
                                   "shards_per_replica": 1, "locality": "node",
                                   "preemptible": True, "shard": {"accelerators": 1}})
    problem["placements"] = [
        {"deployment": "t/low", "replica": r, "shard": 0, "node": "n1",
         "accelerator_indices": [r]} for r in range(2)]
    problem["options"]["allow_preemption"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = solve_doc(problem, wall_limit_ms=WALL_LIMIT_MS)
    assert ("t/x", 0) in {(p.deployment, p.replica) for p in plan.placements}
    assert len(plan.preempted) == 1


# --- property: floats in integer fields change nothing ------------------------------------------

SCHEMA = json.loads((SHARED / "problem.schema.json").read_text())


def _resolve(schema: Doc) -> Doc:
    while "$ref" in schema:
        target: Any = SCHEMA
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = target
    return schema


def floated(value: Any, schema: Doc, rnd: random.Random, share: float) -> Any:
    """`value` with each int the schema types "integer" turned into its float, with
    probability `share`."""
    schema = _resolve(schema)
    if schema.get("type") == "integer" and value.__class__ is int:
        return float(value) if rnd.random() < share else value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: floated(v, props[k], rnd, share) if k in props else v
                for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [floated(v, schema["items"], rnd, share) for v in value]
    return value


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems(), st.randoms(use_true_random=False), st.sampled_from([0.5, 1.0]))
def test_integer_valued_floats_solve_to_the_plan_of_their_ints(problem: Doc, rnd: random.Random,
                                                              share: float) -> None:
    floats = floated(problem, SCHEMA, rnd, share)
    note(f"floats: {json.dumps(floats)}")
    assert parsed(floats) == parsed(problem)  # schema-valid (validated), and read as ints
    assert plan_of(floats) == plan_of(problem)


@pytest.mark.parametrize("mode", ["batch", "online"])
@pytest.mark.parametrize(("hbm", "share", "replicas", "shards"), [(0.3, 0.1, 3, 1), (0.3, 0.1, 1, 3), (0.7, 0.1, 7, 1)])
def test_fractions_whose_hbm_adds_up_exactly_fit(mode: str, hbm: float, share: float, replicas: int,
                                                 shards: int) -> None:
    """Fractions of one accelerator whose `hbm_gib` add up to its HBM exactly fit (three 0.1 GiB
    shards in 0.3 GiB): the floating-point sum 0.3 - 0.1 - 0.1 (0.0999...) and the quotient
    0.3 / 0.1 (2.999...) refused the last one with a false HBM reason, where power and quotas
    allow for rounding and the checker accepts the plan."""
    problem = {
        "version": 1, "zones": [{"id": "z1"}], "rows": [{"id": "w1", "zone": "z1"}], "racks": [{"id": "r1", "row": "w1"}],
        "nodes": [{"id": "n1", "rack": "r1", "accelerators": 1, "hbm_gib": hbm}],
        "tenants": [{"id": "t"}],
        "deployments": [{"id": "t/h", "tenant": "t", "replicas": replicas, "shards_per_replica": shards,
                         "locality": "node", "min_replicas": 1,
                         "shard": {"accelerators": 1, "accelerator_milli": 100, "hbm_gib": share}}],
        "options": {"mode": mode, "time_limit_ms": 2000},
    }
    plan = solve_doc(problem)
    assert len(plan.placements) == replicas * shards and not plan.unplaced, plan.unplaced
