"""Problem documents that contradict themselves are refused at the door, naming the JSON path.

`problem_from_dict` used to accept existing placements that could never have run together (two
whole shards on one accelerator, two tenants' fractions on one, fractions past 1000 milli, a
placement shaped unlike its shard), a spread over a domain the spec does not know, a tenant excluding itself, and
NaN or infinite numbers (`json.loads` takes them); the solver then answered with plans the
independent checker rejects, or with reasons about limits nobody set. Each case here is a small
inline document and the exact refusal it gets. What today's rules merely forbid (a cordoned
node, a stricter contract, an overdrawn budget) stays a valid problem: the last tests hold that.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builders import SHARED, refusal, set_at, solve_doc
from scheduler import ProblemError, problem_from_dict, solve

Doc = dict[str, Any]


def doc(*, deployments: list[Doc], placements: list[Doc], tenants: list[Doc] | None = None,
        nodes: list[Doc] | None = None) -> Doc:
    """Two racks of one 2-accelerator node each (n1 in r1, n2 in r2), tenants t and u (a new
    document each time: tests change it)."""
    return copy.deepcopy({
        "version": 1,
        "zones": [{"id": "z1"}],
        "rows": [{"id": "w1", "zone": "z1"}],
        "racks": [{"id": "r1", "row": "w1"}, {"id": "r2", "row": "w1"}],
        "nodes": nodes if nodes is not None else [
            {"id": "n1", "rack": "r1", "accelerators": 2},
            {"id": "n2", "rack": "r2", "accelerators": 2}],
        "tenants": tenants if tenants is not None else [{"id": "t"}, {"id": "u"}],
        "deployments": deployments,
        "placements": placements,
        "options": {"mode": "batch", "time_limit_ms": 2000},
    })


WHOLE = {"id": "t/x", "tenant": "t", "replicas": 2, "shards_per_replica": 1,
         "locality": "node", "shard": {"accelerators": 1}}
HALF = {"id": "t/f", "tenant": "t", "replicas": 3, "shards_per_replica": 1,
        "locality": "node", "shard": {"accelerators": 1, "accelerator_milli": 500}}
SIXTY = {"id": "t/g", "tenant": "t", "replicas": 2, "shards_per_replica": 1,
         "locality": "node", "shard": {"accelerators": 1, "accelerator_milli": 600}}
OTHER_HALF = {"id": "u/f", "tenant": "u", "replicas": 1, "shards_per_replica": 1,
              "locality": "node", "shard": {"accelerators": 1, "accelerator_milli": 500}}


def at(deployment: str, node: str, indices: list[int], replica: int = 0, **extra: Any) -> Doc:
    return {"deployment": deployment, "replica": replica, "shard": 0, "node": node,
            "accelerator_indices": indices, **extra}


# --- A. existing placements that could never have run together --------------------------------

def test_two_whole_shards_on_one_accelerator_are_refused() -> None:
    error = refusal(doc(deployments=[WHOLE], placements=[
        at("t/x", "n1", [0]), at("t/x", "n1", [0], replica=1)]))
    assert (error.field, error.value) == ("placements[1]", 0)
    assert str(error) == ("placements[1]: node n1 accelerator 0 is already held whole by "
                          "placements[0] (t/x replica 0 shard 0)")


def test_a_whole_shard_over_an_index_of_a_wider_one_is_refused() -> None:
    wide = {"id": "t/w", "tenant": "t", "replicas": 1, "shards_per_replica": 1,
            "shard": {"accelerators": 2}}
    error = refusal(doc(deployments=[wide, WHOLE], placements=[
        at("t/w", "n1", [0, 1]), at("t/x", "n1", [1])]))
    assert str(error) == ("placements[1]: node n1 accelerator 1 is already held whole by "
                          "placements[0] (t/w replica 0 shard 0)")


def test_a_fraction_on_an_accelerator_held_whole_is_refused() -> None:
    error = refusal(doc(deployments=[WHOLE, HALF], placements=[
        at("t/x", "n1", [0]), at("t/f", "n1", [0], accelerator_milli=500)]))
    assert str(error) == ("placements[1]: node n1 accelerator 0 is already held whole by "
                          "placements[0] (t/x replica 0 shard 0)")


def test_a_whole_shard_on_an_accelerator_shared_by_fractions_is_refused() -> None:
    error = refusal(doc(deployments=[WHOLE, HALF], placements=[
        at("t/f", "n2", [1], accelerator_milli=500),
        at("t/f", "n2", [1], replica=1, accelerator_milli=500),
        at("t/x", "n2", [1])]))
    assert str(error) == ("placements[2]: node n2 accelerator 1 already holds fractions of "
                          "placements[0] (t/f replica 0 shard 0) and 1 more, so no shard can "
                          "hold it whole")


def test_fractions_of_two_tenants_on_one_accelerator_are_refused() -> None:
    error = refusal(doc(deployments=[HALF, OTHER_HALF], placements=[
        at("t/f", "n2", [0], accelerator_milli=500), at("u/f", "n2", [0], accelerator_milli=500)]))
    assert str(error) == ("placements[1]: node n2 accelerator 0 already holds a fraction of "
                          "tenant t (placements[0] (t/f replica 0 shard 0)); accelerators are "
                          "never shared between tenants")


def test_fractions_over_1000_milli_on_one_accelerator_are_refused() -> None:
    error = refusal(doc(deployments=[SIXTY], placements=[
        at("t/g", "n1", [0], accelerator_milli=600),
        at("t/g", "n1", [0], replica=1, accelerator_milli=600)]))
    assert str(error) == ("placements[1]: node n1 accelerator 0 would hold 1200 milli > 1000: "
                          "600 here on top of 600 held by placements[0] (t/g replica 0 shard 0)")


def test_fractions_of_two_deployments_over_1000_milli_are_refused() -> None:
    error = refusal(doc(deployments=[HALF, SIXTY], placements=[
        at("t/f", "n1", [1]), at("t/g", "n1", [1])]))  # omitted milli: the shards' 500 and 600
    assert str(error) == ("placements[1]: node n1 accelerator 1 would hold 1100 milli > 1000: "
                          "600 here on top of 500 held by placements[0] (t/f replica 0 shard 0)")


@pytest.mark.parametrize("milli", [700, 250, 1000])
def test_a_fraction_placed_with_another_milli_than_its_shard_is_refused(milli: int) -> None:
    error = refusal(doc(deployments=[HALF], placements=[
        at("t/f", "n1", [0], accelerator_milli=milli)]))
    assert (error.field, error.value) == ("placements[0].accelerator_milli", milli)
    assert error.message == f"{milli} milli where deployment 't/f' asks for 500 of an accelerator"


def test_an_omitted_milli_of_a_fraction_is_its_shards() -> None:
    # One accelerator: the running half and a new one share it. Read as 1000 milli (as before),
    # the running replica filled the accelerator, one replica fewer was placed, and the plan
    # kept "1000 milli" the checker refuses.
    problem = doc(nodes=[{"id": "n1", "rack": "r1", "accelerators": 1}],
                  deployments=[dict(HALF, replicas=2)], placements=[at("t/f", "n1", [0])])
    assert problem_from_dict(copy.deepcopy(problem)).placements[0].accelerator_milli == 500
    plan = solve_doc(problem)
    assert sorted((p.replica, p.accelerator_indices, p.accelerator_milli)
                  for p in plan.placements) == [(0, (0,), 500), (1, (0,), 500)]


def test_a_milli_where_the_spec_gives_it_no_meaning_is_read_as_a_whole_accelerator() -> None:
    """`accelerator_milli` means a fraction with `accelerators: 1` only (the spec; the checker
    reads it so): on a shard of 2 or of none it is 1000, and a placement of such a shard carries
    none (the parser refused both, which the schema accepts). The two whole accelerators of n1
    are held: the new replica goes to n2 whole."""
    pair = dict(WHOLE, id="t/p", replicas=2, shard={"accelerators": 2, "accelerator_milli": 500})
    host = {"id": "t/h", "tenant": "t", "replicas": 1, "shards_per_replica": 1, "locality": "node",
            "shard": {"accelerators": 0, "accelerator_milli": 250}}
    problem = doc(deployments=[pair, host], placements=[
        at("t/p", "n1", [0, 1], accelerator_milli=500), at("t/h", "n1", [], accelerator_milli=250)])
    parsed = problem_from_dict(copy.deepcopy(problem))
    assert [d.shard.accelerator_milli for d in parsed.deployments] == [1000, 1000]
    assert [p.accelerator_milli for p in parsed.placements] == [None, None]
    plan = solve_doc(problem)  # the checker agrees
    assert sorted((p.deployment, p.replica, p.node, p.accelerator_indices, p.accelerator_milli)
                  for p in plan.placements) == [("t/h", 0, "n1", (), None), ("t/p", 0, "n1", (0, 1), None),
                                                ("t/p", 1, "n2", (0, 1), None)]


def test_an_omitted_milli_counts_as_the_shards_in_the_occupancy() -> None:
    problem = doc(deployments=[HALF], placements=[
        at("t/f", "n1", [0]), at("t/f", "n1", [0], replica=1), at("t/f", "n1", [0], replica=2)])
    assert str(refusal(problem)) == (
        "placements[2]: node n1 accelerator 0 would hold 1500 milli > 1000: 500 here on top of "
        "1000 held by placements[0] (t/f replica 0 shard 0) and 1 more")


# --- B. spread over no domain ----------------------------------------------------------------

def test_a_spread_over_domain_none_is_no_limit_and_another_word_is_refused() -> None:
    """The spec's schema gives `spread.domain` the domain list `locality` has, "none" included: a
    document saying it is valid (it was refused), and a spread over no failure domain limits
    nothing: the same plan as without one. A word outside the list is refused."""
    nowhere = dict(WHOLE, spread={"domain": "none", "max_per_domain": 1})
    assert problem_from_dict(doc(deployments=[nowhere], placements=[])).deployments[0].spread is None
    spread, plain = (solve_doc(doc(deployments=[d], placements=[])) for d in (nowhere, WHOLE))
    assert (spread.placements, spread.unplaced) == (plain.placements, plain.unplaced)
    error = refusal(doc(deployments=[dict(WHOLE, spread={"domain": "galaxy", "max_per_domain": 1})], placements=[]))
    assert (error.field, error.value) == ("deployments[0].spread.domain", "galaxy")
    assert error.message == "'galaxy' is not one of ['node', 'rack', 'row', 'zone', 'none']"


# --- C. a tenant excluding itself ------------------------------------------------------------

def test_a_tenant_excluding_itself_is_refused() -> None:
    error = refusal(doc(deployments=[WHOLE], placements=[],
                        tenants=[{"id": "t", "excludes": ["u", "t"]}, {"id": "u"}]))
    assert (error.field, error.value) == ("tenants[0].excludes[1]", "t")
    assert error.message == "tenant t cannot exclude itself"


# --- D. numbers the solver cannot compute with ------------------------------------------------

@pytest.mark.parametrize(("path", "field"), [
    (("racks", 0, "power_budget_w"), "racks[0].power_budget_w"),
    (("rows", 0, "power_budget_w"), "rows[0].power_budget_w"),
    (("nodes", 1, "idle_power_w"), "nodes[1].idle_power_w"),
    (("nodes", 0, "hbm_gib"), "nodes[0].hbm_gib"),
    (("tenants", 1, "max_power_w"), "tenants[1].max_power_w"),
    (("tenants", 0, "max_accelerators"), "tenants[0].max_accelerators"),
    (("tenants", 0, "reserved_accelerators"), "tenants[0].reserved_accelerators"),
    (("deployments", 0, "shard", "power_w"), "deployments[0].shard.power_w"),
    (("deployments", 0, "shard", "hbm_gib"), "deployments[0].shard.hbm_gib"),
])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_number_that_is_not_finite_is_refused(path: tuple[Any, ...], field: str,
                                                 value: float) -> None:
    error = refusal(set_at(doc(deployments=[WHOLE], placements=[]), path, value))
    assert error.field == field
    assert error.message == f"{value} is not a finite number"


def test_minus_infinity_is_refused_without_the_schema() -> None:
    with pytest.raises(ProblemError) as caught:
        problem_from_dict(set_at(doc(deployments=[WHOLE], placements=[]),
                               ("nodes", 0, "idle_power_w"), -math.inf), validate=False)
    assert str(caught.value) == "nodes[0].idle_power_w: -inf is not a finite number"


@pytest.mark.parametrize(("path", "field", "value"), [
    (("racks", 0, "power_budget_w"), "racks[0].power_budget_w", 1e308),
    (("deployments", 0, "shard", "power_w"), "deployments[0].shard.power_w", 1e16),
    (("nodes", 0, "memory_mib"), "nodes[0].memory_mib", 1e300),  # 1e300 is an integer to JSON
    (("deployments", 0, "shard", "cpu_milli"), "deployments[0].shard.cpu_milli", 10 ** 20),
])
def test_a_number_too_large_to_compute_with_is_refused(path: tuple[Any, ...], field: str,
                                                       value: float) -> None:
    # 1e308 W gave a false POWER_RACK (int64 overflow), 1e16 W a QUOTA_POWER for a tenant
    # without a cap: the solver's "not limited" is 1e15.
    error = refusal(set_at(doc(deployments=[WHOLE], placements=[]), path, value))
    assert error.field == field
    assert error.message == (f"{value:g} is too large: a quantity must stay below 1e+14 "
                             "(leave the field out for no limit)")


def test_the_quantity_bound_sits_between_the_controllers_limits_and_no_limit() -> None:
    from controller import limits
    from scheduler.interchange import QUANTITY_LIMIT
    from scheduler.topology import UNLIMITED

    # A snapshot the controller built from values it validated is never refused for size.
    largest = max(limits.HBM_GIB_MAX, limits.CPU_MILLI_MAX, limits.MEMORY_MIB_MAX,
                  limits.POWER_W_MAX, limits.ACCELERATORS_QUANTITY_MAX, limits.TENANT_POWER_W_MAX)
    assert largest < QUANTITY_LIMIT < UNLIMITED / 2


def test_maiactl_solve_refuses_nan_with_the_path_and_exit_2(tmp_path: Path) -> None:
    text = json.dumps(doc(deployments=[WHOLE], placements=[]))
    text = text.replace('"id": "r1", "row": "w1"', '"id": "r1", "row": "w1", "power_budget_w": NaN')
    path = tmp_path / "nan.problem.json"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "controller.cli.main", "solve", str(path),
                             "-o", "json"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert "racks[0].power_budget_w: nan is not a finite number" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_maiactl_solve_refuses_a_held_accelerator_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "conflict.problem.json"
    path.write_text(json.dumps(doc(deployments=[WHOLE], placements=[
        at("t/x", "n1", [0]), at("t/x", "n1", [0], replica=1)])))
    result = subprocess.run([sys.executable, "-m", "controller.cli.main", "solve", str(path),
                             "-o", "json"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(
        "placements[1]: node n1 accelerator 0 is already held whole by placements[0] "
        "(t/x replica 0 shard 0)")
    assert "Traceback" not in result.stderr


# --- what stays valid ------------------------------------------------------------------------

def test_running_work_that_todays_rules_forbid_is_still_a_valid_problem() -> None:
    # A cordoned node, tenants that now exclude each other or want their racks alone, an
    # overdrawn rack budget and a tenant over its caps: what runs is a fact, the solver keeps
    # or moves it. Fractions of one tenant filling an accelerator exactly are fine, and a down
    # node holds nothing, so what its placements claim is not counted. (Passes before the fix
    # too: it guards against refusing too much.)
    problem = doc(
        nodes=[{"id": "n1", "rack": "r1", "accelerators": 2, "state": "cordoned"},
               {"id": "n2", "rack": "r1", "accelerators": 2, "idle_power_w": 100},
               {"id": "n3", "rack": "r2", "accelerators": 2, "state": "down"}],
        tenants=[{"id": "t", "isolation": "dedicated_rack", "excludes": ["u"],
                  "max_accelerators": 1, "max_power_w": 10}, {"id": "u"}],
        deployments=[dict(WHOLE, shard={"accelerators": 1, "power_w": 700}), HALF, OTHER_HALF],
        placements=[at("t/x", "n1", [0]),
                    at("t/f", "n2", [1], accelerator_milli=500),
                    at("t/f", "n2", [1], replica=1, accelerator_milli=500),
                    at("u/f", "n1", [1], accelerator_milli=500),
                    at("t/x", "n3", [0], replica=1),
                    at("t/f", "n3", [0], replica=2, accelerator_milli=500)])
    problem["racks"][0]["power_budget_w"] = 100
    parsed = problem_from_dict(copy.deepcopy(problem))
    assert len(parsed.placements) == 6
    plan = solve(parsed)
    kept = {(p.deployment, p.replica) for p in plan.placements}
    assert {("t/f", 0), ("t/f", 1), ("u/f", 0)} <= kept  # kept where they run


EXAMPLES = sorted((SHARED / "examples").glob("*.problem.json")) if (SHARED / "examples").is_dir() \
    else []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_shared_examples_still_load_and_solve(path: Path) -> None:
    problem = json.loads(path.read_text())
    solve_doc(problem, time_limit_ms=5000)
