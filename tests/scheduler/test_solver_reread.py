"""Re-reading existing placements: the vectorised load and the plan's unchanged-replica path."""

from __future__ import annotations

import dataclasses
import importlib
import random

import numpy as np

from builders import dep, node, placed, problem
from scheduler import problem_from_dict, solve
from scheduler.state import ClusterState

solve_mod = importlib.import_module("scheduler.solve")


def _loaded_doc(seed: int) -> dict:
    """A small cluster filled by one online solve: whole, fractional, host-only and gangs."""
    rng = random.Random(seed)
    nodes = [node(f"n{i}", rack=f"r{i // 4}", acc=4, hbm_gib=64, cpu_milli=64000,
                  memory_mib=262144) for i in range(16)]
    deps = []
    for i in range(30):
        kind = rng.choice(["whole", "frac", "host", "gang"])
        if kind == "whole":
            deps.append(dep(f"w{i}", acc=rng.choice([1, 2]), replicas=rng.randint(1, 3),
                            locality="node", hbm_gib=8, cpu_milli=2000))
        elif kind == "frac":
            deps.append(dep(f"f{i}", acc=1, accelerator_milli=rng.choice([250, 500]),
                            replicas=rng.randint(1, 4), locality="node", hbm_gib=4))
        elif kind == "host":
            deps.append(dep(f"h{i}", acc=0, replicas=2, locality="node", cpu_milli=1000))
        else:
            deps.append(dep(f"g{i}", acc=1, shards=rng.choice([4, 8]), locality="rack",
                            spread={"domain": "node", "max_per_domain": 2}))
    racks = [{"id": f"r{k}", "row": "w1", "power_budget_w": 1e6} for k in range(4)]
    doc = problem(nodes, deps, racks=racks, mode="online")
    plan = solve(problem_from_dict(doc))
    return {**doc, "placements": [dataclasses.asdict(p) for p in plan.placements]}


def _fix(p: dict) -> dict:
    p = dict(p)
    p["accelerator_indices"] = list(p["accelerator_indices"])
    if p["accelerator_milli"] is None:
        del p["accelerator_milli"]
    return p


def test_load_matches_add_replica() -> None:
    for seed in range(5):
        doc = _loaded_doc(seed)
        doc["placements"] = [_fix(p) for p in doc["placements"]]
        s = solve_mod.Solver(problem_from_dict(doc), None)
        twin = ClusterState(s.topo)
        for (d, r), shards in s.state.replicas.items():
            twin.add_replica(d, r, dict(shards))
        for name in ("acc_free", "acc_hbm", "acc_owner", "cpu_free", "mem_free", "node_tenant",
                     "rack_tenant", "rack_power", "row_power", "tenant_milli", "tenant_power"):
            assert np.allclose(getattr(s.state, name), getattr(twin, name)), name
        assert s.state.replicas == twin.replicas and s.state.by_dep == twin.by_dep
        assert {k: v.tolist() for k, v in s.state.spread_count.items()} == \
            {k: v.tolist() for k, v in twin.spread_count.items()}


def test_noop_returns_the_given_placements_in_order() -> None:
    doc = _loaded_doc(1)
    doc["placements"] = [_fix(p) for p in doc["placements"]]
    prob = problem_from_dict(doc)
    shuffled = list(prob.placements)
    random.Random(3).shuffle(shuffled)
    prob = dataclasses.replace(prob, placements=tuple(shuffled))
    plan = solve(prob)
    assert not plan.moved
    assert sorted(map(id, plan.placements)) == sorted(map(id, prob.placements))  # as given
    order = {d.id: i for i, d in enumerate(prob.deployments)}
    keys = [(order[p.deployment], p.replica, p.shard) for p in plan.placements]
    assert keys == sorted(keys)


def test_milli_on_a_whole_shard_is_re_emitted_without_it() -> None:
    doc = problem([node("n1")], [dep("d", acc=1, replicas=1)],
                  placements=[placed("d", "n1", [2], milli=1000)])
    plan = solve(problem_from_dict(doc))
    (p,) = plan.placements
    assert p.accelerator_milli is None and p.accelerator_indices == (2,) and not plan.moved


def test_shard_on_a_down_node_is_moved_and_reported() -> None:
    doc = problem([node("n1", state="down"), node("n2")], [dep("d", acc=1, shards=2)],
                  placements=[placed("d", "n1", [0], shard=0), placed("d", "n2", [0], shard=1)])
    plan = solve(problem_from_dict(doc))
    assert [(m.shard, m.from_node, m.to_node) for m in plan.moved] == [(0, "n1", "n2")]
    assert sorted((p.shard, p.node) for p in plan.placements) == [(0, "n2"), (1, "n2")]


def test_solve_leaves_the_cyclic_collector_as_it_found_it() -> None:
    import gc
    doc = problem([node("n1")], [dep("d", acc=1)])
    assert gc.isenabled()
    solve(problem_from_dict(doc))
    assert gc.isenabled()
    gc.disable()
    try:
        solve(problem_from_dict(doc))
        assert not gc.isenabled()
    finally:
        gc.enable()
