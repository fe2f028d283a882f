"""Hypothesis strategies for random small placement problems, as interchange-format dicts.

Why dicts and not the solver's dataclasses: the property tests feed the solver through its
public entry point (`problem_from_dict`) and grade the answer with the independent checker, so
nothing here depends on how the solver models the problem.

Existing placements are built by trying random replica→node assignments and keeping those the
checker accepts, so every generated problem starts from a valid state.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Any, Iterator, Sequence

from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from checker import MONOTONE_RULES, check_plan  # noqa: E402

Doc = dict[str, Any]

MODELS = ("m1", "m2")
FRACTIONS = (250, 500, 700)


@dataclass(frozen=True)
class ShardChoice:
    """Where one shard of a replica goes: a node, and for a fraction the accelerator index."""

    node: str
    index: int | None = None


@dataclass(frozen=True)
class ReplicaChoice:
    deployment: str
    replica: int
    shards: tuple[ShardChoice, ...]


def is_fractional(shard: Doc) -> bool:
    return shard["accelerators"] == 1 and shard.get("accelerator_milli", 1000) < 1000


def materialize(problem: Doc, fixed: Sequence[Doc],
                choices: Sequence[ReplicaChoice]) -> list[Doc] | None:
    """Concrete placements for `choices` on top of `fixed`, or None if indices run out.

    Fractions take the index they chose; whole-accelerator shards then take the lowest indices
    nobody uses. Every other rule is left to the checker.
    """
    nodes = {n["id"]: n for n in problem["nodes"]}
    deps = {d["id"]: d for d in problem["deployments"]}
    used: dict[str, set[int]] = {n: set() for n in nodes}
    for p in fixed:
        used[p["node"]].update(p["accelerator_indices"])
    out = [dict(p) for p in fixed]
    pending_whole: list[tuple[ReplicaChoice, int, ShardChoice]] = []
    for rc in choices:
        shard = deps[rc.deployment]["shard"]
        for s, sc in enumerate(rc.shards):
            if is_fractional(shard):
                used[sc.node].add(sc.index or 0)
                out.append({"deployment": rc.deployment, "replica": rc.replica, "shard": s,
                            "node": sc.node, "accelerator_indices": [sc.index or 0],
                            "accelerator_milli": shard["accelerator_milli"]})
            else:
                pending_whole.append((rc, s, sc))
    for rc, s, sc in pending_whole:
        want = deps[rc.deployment]["shard"]["accelerators"]
        free = [i for i in range(nodes[sc.node]["accelerators"]) if i not in used[sc.node]]
        if len(free) < want:
            return None
        idx = free[:want]
        used[sc.node].update(idx)
        out.append({"deployment": rc.deployment, "replica": rc.replica, "shard": s,
                    "node": sc.node, "accelerator_indices": idx})
    return out


def plan_doc(problem: Doc, placements: list[Doc]) -> Doc:
    """A plan around `placements`, with unplaced[] accounting for every missing replica."""
    placed: dict[str, set[int]] = {}
    for p in placements:
        placed.setdefault(p["deployment"], set()).add(p["replica"])
    unplaced = []
    for d in problem["deployments"]:
        missing = d["replicas"] - len(placed.get(d["id"], set()))
        if missing > 0:
            unplaced.append({"deployment": d["id"], "replicas": missing,
                             "reasons": [{"code": "CAPACITY", "message": "does not fit"}]})
    return {"status": "feasible", "placements": placements, "unplaced": unplaced,
            "preempted": [], "moved": [], "stats": {"solve_ms": 0}}


def shard_choices(problem: Doc, deployment: Doc, allowed_nodes: Sequence[str] | None = None
                  ) -> Iterator[tuple[ShardChoice, ...]]:
    """Every distinct way to put one replica's shards on nodes (whole shards are symmetric)."""
    nodes = [n for n in problem["nodes"]
             if allowed_nodes is None or n["id"] in allowed_nodes]
    if is_fractional(deployment["shard"]):
        slots = [ShardChoice(n["id"], i) for n in nodes for i in range(n["accelerators"])]
    else:
        slots = [ShardChoice(n["id"]) for n in nodes]
    yield from combinations_with_replacement(slots, deployment["shards_per_replica"])


def _existing_placements(problem: Doc, rnd: random.Random, attempts: int) -> list[Doc]:
    """Random valid existing placements on the cluster as if every node were ready."""
    probe = dict(problem)
    probe["nodes"] = [{**n, "state": "ready"} for n in problem["nodes"]]
    probe["placements"] = []
    fixed: list[Doc] = []
    taken: set[tuple[str, int]] = set()
    for _ in range(attempts):
        d = rnd.choice(problem["deployments"])
        free_replicas = [r for r in range(d["replicas"]) if (d["id"], r) not in taken]
        if not free_replicas:
            continue
        options = list(shard_choices(probe, d))
        if not options:
            continue
        rc = ReplicaChoice(d["id"], free_replicas[0], rnd.choice(options))
        trial = materialize(probe, fixed, [rc])
        if trial is None or check_plan(probe, plan_doc(probe, trial), validate_schema=False,
                                       rules=MONOTONE_RULES):
            continue
        fixed = trial
        taken.add((d["id"], rc.replica))
    # Deployments left below min_replicas would force a plan to break a rule: drop them.
    counts: dict[str, int] = {}
    for dep_id, _r in taken:
        counts[dep_id] = counts.get(dep_id, 0) + 1
    mins = {d["id"]: d.get("min_replicas", 1) for d in problem["deployments"]}
    return [p for p in fixed if counts[p["deployment"]] >= mins[p["deployment"]]]


@st.composite
def problems(draw: st.DrawFn, *, max_nodes: int = 6, max_accelerators: int = 4,
             max_deployments: int = 5, max_replicas: int = 3, max_shards: int = 3,
             max_tenants: int = 3, host_only: bool = True, modes: Sequence[str] = (
                 "batch", "batch", "online", "rebalance"),
             equal_priority: bool = False, existing: bool = True,
             down_with_existing: bool = True, fractional_gangs: bool = True,
             existing_attempts: int = 6) -> Doc:
    """A random small, valid problem document (see the module docstring)."""
    n_zones = draw(st.integers(1, 3))
    zones = [{"id": f"z{i}"} for i in range(n_zones)]
    n_rows = draw(st.integers(1, 3))
    rows: list[Doc] = [{"id": f"w{i}", "zone": f"z{draw(st.integers(0, n_zones - 1))}"}
                       for i in range(n_rows)]
    n_racks = draw(st.integers(1, 4))
    racks: list[Doc] = [{"id": f"r{i}", "row": f"w{draw(st.integers(0, n_rows - 1))}"}
                        for i in range(n_racks)]
    n_nodes = draw(st.integers(1, max_nodes))
    nodes: list[Doc] = []
    for i in range(n_nodes):
        n: Doc = {"id": f"n{i}", "rack": f"r{draw(st.integers(0, n_racks - 1))}",
                  "state": "ready",
                  "accelerators": draw(st.integers(1, max_accelerators)),
                  "accelerator_model": draw(st.sampled_from(MODELS)),
                  "idle_power_w": draw(st.sampled_from([0, 100, 300]))}
        if draw(st.booleans()):
            n["hbm_gib"] = draw(st.sampled_from([32, 64]))
        if draw(st.booleans()):
            n["cpu_milli"] = draw(st.sampled_from([8000, 32000]))
        if draw(st.booleans()):
            n["memory_mib"] = draw(st.sampled_from([65536, 262144]))
        if draw(st.integers(0, 3)) == 0:  # an extension (interchange.py): small, so it binds
            n["max_shards"] = draw(st.integers(1, 4))
        nodes.append(n)

    # Power budgets around what the hardware could draw, so they bind sometimes.
    idle_by_rack: dict[str, float] = {}
    for n in nodes:
        idle_by_rack[n["rack"]] = idle_by_rack.get(n["rack"], 0) + n["idle_power_w"]
    for r in racks:
        if draw(st.booleans()):
            r["power_budget_w"] = idle_by_rack.get(r["id"], 0) + draw(
                st.sampled_from([0, 500, 1500, 4000]))
    for w in rows:
        if draw(st.integers(0, 3)) == 0:
            idle = sum(idle_by_rack.get(r["id"], 0) for r in racks if r["row"] == w["id"])
            w["power_budget_w"] = idle + draw(st.sampled_from([500, 2000, 6000]))

    n_tenants = draw(st.integers(1, max_tenants))
    tenant_ids = [f"t{i}" for i in range(n_tenants)]
    tenants: list[Doc] = []
    for t in tenant_ids:
        td: Doc = {"id": t, "isolation": draw(st.sampled_from(
            ["shared", "shared", "dedicated_node", "dedicated_rack"]))}
        others = [o for o in tenant_ids if o != t]
        if others and draw(st.integers(0, 3)) == 0:
            td["excludes"] = draw(st.lists(st.sampled_from(others), min_size=1, unique=True))
        if draw(st.integers(0, 3)) == 0:
            td["zones"] = draw(st.lists(st.sampled_from([z["id"] for z in zones]), min_size=1,
                                        unique=True))
        if draw(st.integers(0, 3)) == 0:
            td["max_accelerators"] = draw(st.sampled_from([1, 2.5, 4, 8]))
        if draw(st.integers(0, 3)) == 0:
            td["max_power_w"] = draw(st.sampled_from([500, 1500, 4000]))
        if draw(st.integers(0, 3)) == 0:
            td["reserved_accelerators"] = draw(st.sampled_from([2, 4]))
        tenants.append(td)

    n_deps = draw(st.integers(1, max_deployments))
    deployments: list[Doc] = []
    shared_priority = draw(st.sampled_from([None, 0, 5]))
    for i in range(n_deps):
        fractional = draw(st.integers(0, 3)) == 0
        shard: Doc
        if fractional:
            shard = {"accelerators": 1, "accelerator_milli": draw(st.sampled_from(FRACTIONS))}
        else:
            low = 0 if host_only else 1
            shard = {"accelerators": draw(st.integers(low, min(2, max_accelerators)))}
        if draw(st.booleans()):
            shard["hbm_gib"] = draw(st.sampled_from([16, 40, 64]))
        if draw(st.booleans()):
            shard["cpu_milli"] = draw(st.sampled_from([1000, 4000, 16000]))
        if draw(st.integers(0, 2)) == 0:
            shard["memory_mib"] = draw(st.sampled_from([16384, 131072]))
        if draw(st.booleans()):
            shard["power_w"] = draw(st.sampled_from([100, 400, 700]))
        if draw(st.integers(0, 3)) == 0:
            shard["accelerator_models"] = draw(st.lists(st.sampled_from(MODELS), min_size=1,
                                                        unique=True))
        replicas = draw(st.integers(1, max_replicas))
        d: Doc = {"id": f"d{i}", "tenant": draw(st.sampled_from(tenant_ids)),
                  "replicas": replicas,
                  "shards_per_replica": 1 if fractional and not fractional_gangs
                  else draw(st.integers(1, max_shards)),
                  "shard": shard,
                  "locality": draw(st.sampled_from(["node", "rack", "rack", "row", "zone",
                                                    "none"]))}
        if draw(st.integers(0, 2)) == 0:
            d["min_replicas"] = draw(st.integers(1, replicas))
        if draw(st.integers(0, 3)) == 0:
            d["spread"] = {"domain": draw(st.sampled_from(["node", "rack", "row", "zone"])),
                           "max_per_domain": draw(st.integers(1, 2))}
        if equal_priority:
            if shared_priority is not None:
                d["priority"] = shared_priority
        else:
            d["priority"] = draw(st.sampled_from([0, 0, 1, 10]))
            d["preemptible"] = draw(st.integers(0, 3)) == 0
        deployments.append(d)

    doc: Doc = {"version": 1, "zones": zones, "rows": rows, "racks": racks, "nodes": nodes,
                "tenants": tenants, "deployments": deployments, "placements": []}
    if existing:
        rnd = draw(st.randoms(use_true_random=False))
        doc["placements"] = _existing_placements(doc, rnd, attempts=draw(st.integers(0, existing_attempts)))

    # Node states come after the placements: cordoned keeps them, down loses them.
    holding = {p["node"] for p in doc["placements"]}
    for n in nodes:
        if not down_with_existing and n["id"] in holding:
            n["state"] = draw(st.sampled_from(["ready", "ready", "cordoned"]))
        else:
            n["state"] = draw(st.sampled_from(["ready", "ready", "ready", "cordoned", "down"]))

    mode = draw(st.sampled_from(list(modes)))
    options: Doc = {"mode": mode, "time_limit_ms": 2000}
    if mode == "rebalance":
        options["max_moves"] = draw(st.integers(0, 3))
    if mode == "online" and draw(st.booleans()):
        options["batch_size"] = draw(st.integers(1, 3))
    if not equal_priority and draw(st.booleans()):
        options["allow_preemption"] = True
    doc["options"] = options
    return doc


def tiny_problems() -> st.SearchStrategy[Doc]:
    """Instances small enough for the exhaustive search: one priority level, batch mode,
    no host-only shards, nothing on down nodes."""
    return problems(max_nodes=3, max_accelerators=2, max_deployments=3, max_replicas=2,
                    max_shards=2, max_tenants=2, host_only=False, modes=("batch",),
                    equal_priority=True, down_with_existing=False, fractional_gangs=False)


@st.composite
def preemption_problems(draw: st.DrawFn) -> Doc:
    """A crowded cluster of preemptible low-priority work, then important arrivals.

    What runs is made preemptible at priority 0; one new deployment arrives with priority 10,
    another for a tenant with a reservation; preemption is allowed.
    """
    doc = draw(problems(modes=("batch", "batch", "rebalance"), existing_attempts=14,
                        max_deployments=3))
    running = {p["deployment"] for p in doc["placements"]}
    for d in doc["deployments"]:
        if d["id"] in running:
            d["preemptible"] = True
            d["priority"] = 0
    tenant_ids = [t["id"] for t in doc["tenants"]]
    reserved = draw(st.sampled_from(tenant_ids))
    for t in doc["tenants"]:
        if t["id"] == reserved:
            t["reserved_accelerators"] = draw(st.sampled_from([2, 4, 8]))
    for i, (tenant, priority) in enumerate([(draw(st.sampled_from(tenant_ids)), 10),
                                            (reserved, 0)]):
        doc["deployments"].append({
            "id": f"vip{i}", "tenant": tenant, "priority": priority, "preemptible": False,
            "replicas": draw(st.integers(1, 2)), "shards_per_replica": draw(st.integers(1, 2)),
            "locality": draw(st.sampled_from(["node", "rack", "none"])),
            "shard": {"accelerators": draw(st.integers(1, 2))}})
    doc["options"]["allow_preemption"] = True
    return doc
