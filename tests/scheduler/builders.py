"""Small builders for solver tests: interchange documents in a few keyword arguments.

Every builder returns plain dicts of the interchange format, so tests go through
`problem_from_dict` (validation included) exactly like the controller does.

    doc = problem(nodes=[node("n1", acc=4)], deployments=[dep("d", acc=1, replicas=2)])
    plan = solve_doc(doc)
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

from scheduler import Plan, ProblemError, plan_to_dict, problem_from_dict, solve

Doc = dict[str, Any]
sys.path.insert(0, str(Path(__file__).parent))
from checker import spec_dir  # noqa: E402

SHARED = spec_dir()  # the contract folder: $MAIA_PLACEMENT_SPEC_DIR or /work/shared/placement


def node(id: str, rack: str = "r1", acc: int = 4, state: str = "ready", **kw: Any) -> Doc:
    return {"id": id, "rack": rack, "state": state, "accelerators": acc,
            "accelerator_model": kw.pop("model", "maia-100"), **kw}


def dep(id: str, tenant: str = "t1", acc: int = 1, replicas: int = 1, shards: int = 1,
        locality: str = "rack", **kw: Any) -> Doc:
    shard = {"accelerators": acc}
    for key in ("accelerator_milli", "hbm_gib", "cpu_milli", "memory_mib", "power_w",
                "accelerator_models"):
        if key in kw:
            shard[key] = kw.pop(key)
    return {"id": id, "tenant": tenant, "replicas": replicas, "shards_per_replica": shards,
            "shard": shard, "locality": locality, **kw}


def placed(deployment: str, node: str, indices: list[int], replica: int = 0, shard: int = 0,
           milli: int | None = None) -> Doc:
    out: Doc = {"deployment": deployment, "replica": replica, "shard": shard, "node": node,
                "accelerator_indices": indices}
    if milli is not None:
        out["accelerator_milli"] = milli
    return out


def problem(nodes: list[Doc], deployments: list[Doc], *, racks: list[Doc] | None = None,
            rows: list[Doc] | None = None, zones: list[Doc] | None = None,
            tenants: list[Doc] | None = None, placements: list[Doc] | None = None,
            **options: Any) -> Doc:
    """A whole problem; racks/rows/zones/tenants default to one plain one each."""
    rack_ids = list(dict.fromkeys(n["rack"] for n in nodes))
    racks = racks if racks is not None else [{"id": r, "row": "w1"} for r in rack_ids]
    rows = rows if rows is not None else [{"id": "w1", "zone": "z1"}]
    zones = zones if zones is not None else [{"id": z} for z in dict.fromkeys(
        r["zone"] for r in rows)]
    tenant_ids = list(dict.fromkeys(d["tenant"] for d in deployments))
    tenants = tenants if tenants is not None else [{"id": t} for t in tenant_ids]
    return {"version": 1, "zones": zones, "rows": rows, "racks": racks, "nodes": nodes,
            "tenants": tenants, "deployments": deployments, "placements": placements or [],
            "options": {"mode": "batch", "time_limit_ms": 2000, **options}}


def hbm_bound_pairing() -> Doc:
    """Found by test_tiny_instances_place_the_exhaustive_optimum (main 45cc275, issue 9 part
    5): in batch mode the 32 GiB node takes none of the 40 GiB fractions; the greedy (biggest
    first) put a 700 on each of the other two accelerators (1.4) and CP-SAT over node classes,
    whose fraction capacity is summed per class, did not pair the two 500s: the optimum is
    both 500s on one accelerator and a 700 on the other (1.7)."""
    return problem([node("n0", acc=1), node("n1", acc=1), node("n2", acc=1, hbm_gib=32)],
                   [dep("a", replicas=2, accelerator_milli=500, hbm_gib=40, locality="node"),
                    dep("b", replicas=2, accelerator_milli=700, hbm_gib=40, locality="node")])


def solve_doc(doc: Doc, **kw: Any) -> Plan:
    """Solve, and insist the plan passes the independent checker."""
    plan = solve(problem_from_dict(copy.deepcopy(doc)), **kw)
    violations = check(doc, plan_to_dict(plan))
    assert violations == [], violations
    return plan


def set_at(problem: Doc, path: tuple[Any, ...], value: Any) -> Doc:
    """`problem` with the value at `path` (keys and list indices) set to `value`, in place."""
    target = problem
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return problem


def refusal(problem: Doc, *, validate: bool = True) -> ProblemError:
    """How `problem_from_dict` refuses `problem` (the test fails when it takes it)."""
    with pytest.raises(ProblemError) as caught:
        problem_from_dict(problem, validate=validate)
    return caught.value


def check(doc: Doc, plan_doc: Doc) -> list[Any]:
    from checker import check_plan  # tests/scheduler/checker.py, written independently
    return check_plan(doc, plan_doc)


def move_beats_preemption() -> Doc:
    """vip (tenant t1, which excludes t0) fits only in rack rb, where d0 replica 0 runs: moving
    that replica to na (1 move, 0 preemptions) keeps everything running; preempting does not."""
    return {
        "zones": [{"id": "z"}], "rows": [{"id": "w", "zone": "z"}],
        "racks": [{"id": "ra", "row": "w"}, {"id": "rb", "row": "w"}],
        "nodes": [{"id": "na", "rack": "ra", "accelerators": 4},
                  {"id": "nb", "rack": "rb", "accelerators": 2}],
        "tenants": [{"id": "t0"}, {"id": "t1", "excludes": ["t0"]}],
        "deployments": [
            {"id": "d0", "tenant": "t0", "replicas": 2, "shards_per_replica": 1,
             "preemptible": True, "shard": {"accelerators": 2}},
            {"id": "vip", "tenant": "t1", "priority": 10, "replicas": 1,
             "shards_per_replica": 1, "shard": {"accelerators": 1}}],
        "placements": [
            {"deployment": "d0", "replica": r, "shard": 0, "node": n,
             "accelerator_indices": [0, 1]} for r, n in ((0, "nb"), (1, "na"))],
        "options": {"mode": "rebalance", "allow_preemption": True}}


def busy_problem(**options: Any) -> Doc:
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


def placed_count(plan: Plan, deployment: str) -> int:
    return len({p.replica for p in plan.placements if p.deployment == deployment})


def codes(plan: Plan, deployment: str) -> set[str]:
    return {r.code for u in plan.unplaced if u.deployment == deployment for r in u.reasons}


def messages(plan: Plan, deployment: str) -> str:
    return " | ".join(r.message for u in plan.unplaced if u.deployment == deployment
                      for r in u.reasons)
