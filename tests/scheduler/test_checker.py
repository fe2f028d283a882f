"""Proves the plan checker catches each rule it claims to check.

Every case is a small hand-made problem with a valid plan (the checker must accept it) and a
minimally corrupted plan (the checker must reject it with exactly that rule). A checker that
accepted everything would pass the property tests; these tests are what make it trustworthy.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import checker as C  # noqa: E402  (a sibling helper module, not a package)
from checker import check_plan  # noqa: E402

EXAMPLES = Path("/work/shared/placement/examples")

Doc = dict[str, Any]


# --- builders ------------------------------------------------------------------------------

def node(id: str, rack: str, *, state: str = "ready", model: str = "m1", accelerators: int = 4,
         **kw: Any) -> Doc:
    base = {"id": id, "rack": rack, "state": state, "accelerators": accelerators,
            "accelerator_model": model, "hbm_gib": 64, "cpu_milli": 16000,
            "memory_mib": 65536, "idle_power_w": 100}
    base.update(kw)
    return base


def cluster() -> Doc:
    """z1/w1/{r1:{n1,n2}, r2:{n3, n5 cordoned, n6 down}}, z2/w2/r3:{n4 (model m2)}."""
    return {
        "version": 1,
        "zones": [{"id": "z1"}, {"id": "z2"}],
        "rows": [{"id": "w1", "zone": "z1", "power_budget_w": 20000},
                 {"id": "w2", "zone": "z2"}],
        "racks": [{"id": "r1", "row": "w1", "power_budget_w": 10000},
                  {"id": "r2", "row": "w1"}, {"id": "r3", "row": "w2"}],
        "nodes": [node("n1", "r1"), node("n2", "r1"), node("n3", "r2"),
                  node("n4", "r3", model="m2"), node("n5", "r2", state="cordoned"),
                  node("n6", "r2", state="down")],
        "tenants": [{"id": "a", "isolation": "shared"}, {"id": "b", "isolation": "shared"}],
        "deployments": [],
        "placements": [],
        "options": {"mode": "batch"},
    }


def dep(id: str, tenant: str = "a", *, replicas: int = 1, shards: int = 1, acc: int = 1,
        locality: str = "rack", **shard_and_more: Any) -> Doc:
    shard_keys = {"accelerator_milli", "hbm_gib", "cpu_milli", "memory_mib", "power_w",
                  "accelerator_models"}
    shard = {"accelerators": acc}
    d: Doc = {"id": id, "tenant": tenant, "replicas": replicas, "shards_per_replica": shards,
              "locality": locality}
    for k, v in shard_and_more.items():
        (shard if k in shard_keys else d)[k] = v
    d["shard"] = shard
    return d


def pl(deployment: str, replica: int, shard: int, node_id: str, indices: list[int],
       milli: int | None = None) -> Doc:
    p: Doc = {"deployment": deployment, "replica": replica, "shard": shard, "node": node_id,
              "accelerator_indices": indices}
    if milli is not None:
        p["accelerator_milli"] = milli
    return p


def problem(deployments: list[Doc], *, placements: list[Doc] | None = None,
            tenants: list[Doc] | None = None, options: Doc | None = None,
            edit: Callable[[Doc], None] | None = None) -> Doc:
    doc = cluster()
    doc["deployments"] = deployments
    doc["placements"] = placements or []
    if tenants:
        doc["tenants"] += tenants
    if options:
        doc["options"] = options
    if edit:
        edit(doc)
    return doc


def plan(prob: Doc, placements: list[Doc], **extra: Any) -> Doc:
    """A plan whose unplaced[] accounts for every replica not placed (reason CAPACITY)."""
    placed: dict[str, set[int]] = {}
    for p in placements:
        placed.setdefault(p["deployment"], set()).add(p["replica"])
    unplaced = []
    for d in prob["deployments"]:
        missing = d["replicas"] - len(placed.get(d["id"], set()))
        if missing > 0:
            unplaced.append({"deployment": d["id"], "replicas": missing, "reasons": [
                {"code": "CAPACITY", "message": f"{missing} replicas do not fit"}]})
    doc: Doc = {"status": "feasible", "placements": placements, "unplaced": unplaced,
                "preempted": [], "moved": [], "stats": {"solve_ms": 1.0}}
    doc.update(extra)
    return doc


@dataclass
class Case:
    """One rule, one valid plan, one minimally corrupted plan."""

    rule: str
    name: str
    problem: Doc
    valid: Doc
    corrupt: Doc
    also: frozenset[str] = field(default_factory=frozenset)  # other rules the corruption implies
    schema: bool = True


def case(rule: str, name: str, prob: Doc, good: list[Doc], broken: list[Doc], *,
         good_extra: Doc | None = None, broken_extra: Doc | None = None,
         also: tuple[str, ...] = (), schema: bool = True) -> Case:
    return Case(rule, name, prob, plan(prob, good, **(good_extra or {})),
                plan(prob, broken, **(broken_extra or {})), frozenset(also), schema)


# --- the cases, one block per rule ---------------------------------------------------------

def build_cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append

    # SCHEMA: the plan must validate against plan.schema.json.
    p = problem([dep("d")])
    good = plan(p, [pl("d", 0, 0, "n1", [0])])
    bad = copy.deepcopy(good)
    bad["status"] = "great"
    add(Case(C.SCHEMA, "unknown status", p, good, bad))
    bad = copy.deepcopy(good)
    bad["placements"][0]["accelerator_indices"] = [-1]
    add(Case(C.SCHEMA, "negative index", p, good, bad))
    p2 = problem([dep("d", replicas=2)])
    good2 = plan(p2, [pl("d", 0, 0, "n1", [0])])
    bad = copy.deepcopy(good2)
    bad["unplaced"][0]["reasons"][0]["code"] = "BAD_LUCK"
    add(Case(C.SCHEMA, "unknown reason code", p2, good2, bad))
    bad = copy.deepcopy(good2)
    bad["unplaced"][0]["reasons"] = []
    add(Case(C.SCHEMA, "unplaced without reasons", p2, good2, bad))

    # REFERENCE: known deployment and node, replica and shard in range.
    p = problem([dep("d", replicas=2, shards=1)])
    add(case(C.REFERENCE, "unknown deployment", p, [pl("d", 0, 0, "n1", [0])],
             [pl("d", 0, 0, "n1", [0]), pl("ghost", 0, 0, "n1", [1])]))
    add(case(C.REFERENCE, "unknown node", p, [pl("d", 0, 0, "n1", [0])],
             [pl("d", 0, 0, "n99", [0])], also=(C.UNPLACED,)))
    add(case(C.REFERENCE, "replica out of range", p,
             [pl("d", 0, 0, "n1", [0]), pl("d", 1, 0, "n1", [1])],
             [pl("d", 0, 0, "n1", [0]), pl("d", 2, 0, "n1", [1])], also=(C.UNPLACED,)))
    add(case(C.REFERENCE, "shard out of range", p, [pl("d", 0, 0, "n1", [0])],
             [pl("d", 0, 0, "n1", [0]), pl("d", 0, 1, "n1", [1])]))

    # DUPLICATE: one (deployment, replica, shard) placed twice.
    p = problem([dep("d")])
    add(case(C.DUPLICATE, "same shard twice", p, [pl("d", 0, 0, "n1", [0])],
             [pl("d", 0, 0, "n1", [0]), pl("d", 0, 0, "n2", [0])]))

    # GANG: a placed replica has all its shards.
    p = problem([dep("g", shards=2)])
    add(case(C.GANG, "half a gang", p, [pl("g", 0, 0, "n1", [0]), pl("g", 0, 1, "n1", [1])],
             [pl("g", 0, 0, "n1", [0])]))
    # ... and a replica the problem places incomplete (its second 3-accelerator shard fits on no
    # node beside the first) may be dropped whole (no KEPT breach), not kept partial.
    half = pl("g", 0, 0, "n1", [0, 1, 2])
    p = problem([dep("g", shards=2, acc=3, locality="node")], placements=[half])
    add(case(C.GANG, "an incomplete input gang kept partial", p, [], [half]))

    # MIN_REPLICAS: 0 or at least min_replicas.
    p = problem([dep("m", replicas=3, min_replicas=2, locality="node")])
    add(case(C.MIN_REPLICAS, "one of min two", p,
             [pl("m", 0, 0, "n1", [0]), pl("m", 1, 0, "n1", [1])],
             [pl("m", 0, 0, "n1", [0])]))
    add(case(C.MIN_REPLICAS, "none placed is fine, one is not", p, [],
             [pl("m", 2, 0, "n2", [3])]))

    # INDICES: in range, as many as the shard needs, one for a fraction, milli as declared.
    p = problem([dep("w2", acc=2), dep("f", acc=1, accelerator_milli=500),
                 dep("h", acc=0, cpu_milli=1000)])
    good_pl = [pl("w2", 0, 0, "n1", [0, 1]), pl("f", 0, 0, "n1", [2], 500),
               pl("h", 0, 0, "n1", [])]
    add(case(C.INDICES, "too few indices", p, good_pl,
             [pl("w2", 0, 0, "n1", [0]), *good_pl[1:]]))
    add(case(C.INDICES, "index out of range", p, good_pl,
             [pl("w2", 0, 0, "n1", [0, 4]), *good_pl[1:]]))
    add(case(C.INDICES, "repeated index", p, good_pl,
             [pl("w2", 0, 0, "n1", [1, 1]), *good_pl[1:]], also=(C.EXCLUSIVE_ACCELERATOR,)))
    add(case(C.INDICES, "fraction on two accelerators", p, good_pl,
             [good_pl[0], pl("f", 0, 0, "n1", [2, 3], 500), good_pl[2]]))
    add(case(C.INDICES, "fraction with the wrong milli", p, good_pl,
             [good_pl[0], pl("f", 0, 0, "n1", [2], 300), good_pl[2]]))
    add(case(C.INDICES, "host-only shard with an accelerator", p, good_pl,
             [*good_pl[:2], pl("h", 0, 0, "n1", [3])]))

    # EXCLUSIVE_ACCELERATOR: a whole-accelerator shard owns its index alone.
    p = problem([dep("x", replicas=2, locality="node"), dep("f", accelerator_milli=300)])
    add(case(C.EXCLUSIVE_ACCELERATOR, "two whole shards on one index", p,
             [pl("x", 0, 0, "n1", [0]), pl("x", 1, 0, "n1", [1])],
             [pl("x", 0, 0, "n1", [0]), pl("x", 1, 0, "n1", [0])]))
    add(case(C.EXCLUSIVE_ACCELERATOR, "a fraction beside a whole shard", p,
             [pl("x", 0, 0, "n1", [0]), pl("f", 0, 0, "n1", [1], 300)],
             [pl("x", 0, 0, "n1", [0]), pl("f", 0, 0, "n1", [0], 300)]))

    # SHARED_ACCELERATOR: fractions share only within a tenant, up to 1000 milli.
    p = problem([dep("fa", "a", replicas=2, accelerator_milli=600, locality="node"),
                 dep("fa2", "a", accelerator_milli=400), dep("fb", "b", accelerator_milli=400)])
    add(case(C.SHARED_ACCELERATOR, "two tenants on one accelerator", p,
             [pl("fa", 0, 0, "n1", [0], 600), pl("fa2", 0, 0, "n1", [0], 400),
              pl("fb", 0, 0, "n1", [1], 400)],
             [pl("fa", 0, 0, "n1", [0], 600), pl("fb", 0, 0, "n1", [0], 400)]))
    add(case(C.SHARED_ACCELERATOR, "over 1000 milli", p,
             [pl("fa", 0, 0, "n1", [0], 600), pl("fa", 1, 0, "n1", [1], 600)],
             [pl("fa", 0, 0, "n1", [0], 600), pl("fa", 1, 0, "n1", [0], 600)]))

    # HBM: per accelerator, summed over the fractions sharing it.
    p = problem([dep("big", hbm_gib=80), dep("ok", hbm_gib=64)],
                edit=lambda d: d["nodes"].append(node("n7", "r3", hbm_gib=96)))
    add(case(C.HBM, "whole shard over hbm", p,
             [pl("big", 0, 0, "n7", [0]), pl("ok", 0, 0, "n1", [0])],
             [pl("big", 0, 0, "n1", [1]), pl("ok", 0, 0, "n1", [0])]))
    p = problem([dep("f", replicas=2, accelerator_milli=400, hbm_gib=40, locality="node")])
    add(case(C.HBM, "fractions over hbm", p,
             [pl("f", 0, 0, "n1", [0], 400), pl("f", 1, 0, "n1", [1], 400)],
             [pl("f", 0, 0, "n1", [0], 400), pl("f", 1, 0, "n1", [0], 400)]))
    p = problem([dep("f", hbm_gib=500)],
                edit=lambda d: d["nodes"].append(node("n7", "r3", hbm_gib=None)))
    for n in p["nodes"]:
        if n["id"] == "n7":
            del n["hbm_gib"]  # undeclared: not limited
    add(case(C.HBM, "undeclared hbm is unlimited", p, [pl("f", 0, 0, "n7", [0])],
             [pl("f", 0, 0, "n1", [0])]))

    # CPU and MEMORY: per node, summed.
    p = problem([dep("c", replicas=2, cpu_milli=10000, locality="node")])
    add(case(C.CPU, "cpu over the node", p,
             [pl("c", 0, 0, "n1", [0]), pl("c", 1, 0, "n2", [0])],
             [pl("c", 0, 0, "n1", [0]), pl("c", 1, 0, "n1", [1])]))
    p = problem([dep("m", replicas=2, memory_mib=40000, locality="node")])
    add(case(C.MEMORY, "memory over the node", p,
             [pl("m", 0, 0, "n1", [0]), pl("m", 1, 0, "n2", [0])],
             [pl("m", 0, 0, "n1", [0]), pl("m", 1, 0, "n1", [1])]))

    # NODE_SHARDS (an extension: a node's max_shards), host-only shards; one kept over a
    # lowered cap stays, a new one on top breaks it.
    def cap(limit: int) -> Callable[[Doc], None]:
        def edit(doc: Doc) -> None:
            doc["nodes"][0]["max_shards"] = limit
        return edit
    p = problem([dep("h", replicas=3, acc=0, locality="node")], edit=cap(2))
    add(case(C.NODE_SHARDS, "shards over the node's max_shards", p,
             [pl("h", 0, 0, "n1", []), pl("h", 1, 0, "n1", []), pl("h", 2, 0, "n2", [])],
             [pl("h", 0, 0, "n1", []), pl("h", 1, 0, "n1", []), pl("h", 2, 0, "n1", [])]))
    kept = [pl("h", 0, 0, "n1", []), pl("h", 1, 0, "n1", [])]
    p = problem([dep("h", replicas=3, acc=0, locality="node")], placements=kept, edit=cap(1))
    add(case(C.NODE_SHARDS, "a new shard on a node kept over its max_shards", p,
             [*kept, pl("h", 2, 0, "n2", [])], [*kept, pl("h", 2, 0, "n1", [])]))

    # ACCELERATOR_MODEL.
    p = problem([dep("m2only", accelerator_models=["m2"])])
    add(case(C.ACCELERATOR_MODEL, "wrong model", p, [pl("m2only", 0, 0, "n4", [0])],
             [pl("m2only", 0, 0, "n1", [0])]))
    # ... a shard kept on a node re-modelled under it stays, a new one there does not.
    kept = [pl("m2only", 0, 0, "n1", [0])]
    p = problem([dep("m2only", replicas=2, locality="node", accelerator_models=["m2"])],
                placements=kept)
    add(case(C.ACCELERATOR_MODEL, "a new shard beside one kept on a wrong model", p,
             [*kept, pl("m2only", 1, 0, "n4", [0])], [*kept, pl("m2only", 1, 0, "n2", [0])]))

    # NODE_STATE: nothing on down nodes, nothing new on cordoned ones.
    old = pl("d", 0, 0, "n5", [0])
    p = problem([dep("d", replicas=2, locality="node")], placements=[old])
    add(case(C.NODE_STATE, "new shard on a cordoned node", p,
             [old, pl("d", 1, 0, "n3", [0])], [old, pl("d", 1, 0, "n5", [1])]))
    p = problem([dep("d")])
    add(case(C.NODE_STATE, "shard on a down node", p, [pl("d", 0, 0, "n1", [0])],
             [pl("d", 0, 0, "n6", [0])]))

    # LOCALITY: all shards of a replica in one domain of the asked level.
    for level, same, other in (("node", "n1", "n2"), ("rack", "n2", "n3"),
                               ("row", "n3", "n4"), ("zone", "n3", "n4")):
        p = problem([dep("g", shards=2, locality=level)])
        add(case(C.LOCALITY, f"locality {level}", p,
                 [pl("g", 0, 0, "n1", [0]), pl("g", 0, 1, same, [1])],
                 [pl("g", 0, 0, "n1", [0]), pl("g", 0, 1, other, [1])]))
    # ... a replica kept across racks (its locality tightened) stays so, but no shard of it
    # moves (in rebalance mode) or is placed again (after a down node) outside the racks its
    # kept shards hold: the solver repairs it beside its first surviving shard.
    across = [pl("g", 0, 0, "n1", [0]), pl("g", 0, 1, "n3", [0])]
    p = problem([dep("g", shards=2)], placements=across, options={"mode": "rebalance"})
    add(case(C.LOCALITY, "a shard of a replica kept across racks moved to another", p, across,
             [across[0], pl("g", 0, 1, "n4", [0])], broken_extra={"moved": [
                 {"deployment": "g", "replica": 0, "shard": 1, "from": "n3", "to": "n4"}]}))
    p = problem([dep("g", shards=3)], placements=[*across, pl("g", 0, 2, "n6", [0])])
    add(case(C.LOCALITY, "a lost shard of a replica kept across racks placed in a third", p,
             [*across, pl("g", 0, 2, "n1", [1])], [*across, pl("g", 0, 2, "n4", [0])]))

    # SPREAD: at most max_per_domain replicas per domain.
    p = problem([dep("s", replicas=2, locality="node",
                     spread={"domain": "rack", "max_per_domain": 1})])
    add(case(C.SPREAD, "two replicas in one rack", p,
             [pl("s", 0, 0, "n1", [0]), pl("s", 1, 0, "n3", [0])],
             [pl("s", 0, 0, "n1", [0]), pl("s", 1, 0, "n2", [0])]))
    # ... a rack kept over a tightened spread takes no further replica.
    kept = [pl("s", 0, 0, "n1", [0]), pl("s", 1, 0, "n2", [0])]
    p = problem([dep("s", replicas=3, locality="node",
                     spread={"domain": "rack", "max_per_domain": 1})], placements=kept)
    add(case(C.SPREAD, "a new replica in a rack kept over max_per_domain", p,
             [*kept, pl("s", 2, 0, "n3", [0])], [*kept, pl("s", 2, 0, "n1", [1])]))

    # ISOLATION: dedicated_node and dedicated_rack.
    p = problem([dep("dn", "c"), dep("sa", "a")],
                tenants=[{"id": "c", "isolation": "dedicated_node"}])
    add(case(C.ISOLATION, "dedicated_node shares a node", p,
             [pl("dn", 0, 0, "n1", [0]), pl("sa", 0, 0, "n2", [0])],
             [pl("dn", 0, 0, "n1", [0]), pl("sa", 0, 0, "n1", [1])]))
    p = problem([dep("dr", "d"), dep("sa", "a")],
                tenants=[{"id": "d", "isolation": "dedicated_rack"}])
    add(case(C.ISOLATION, "dedicated_rack shares a rack", p,
             [pl("dr", 0, 0, "n1", [0]), pl("sa", 0, 0, "n3", [0])],
             [pl("dr", 0, 0, "n1", [0]), pl("sa", 0, 0, "n2", [0])]))

    # EXCLUSION: symmetric, at rack level; either side listing the other is enough.
    for lister in ("e", "a"):
        tenants = [{"id": "e", "excludes": ["a"] if lister == "e" else []}]
        edit = None
        if lister == "a":
            def edit(d: Doc) -> None:
                d["tenants"][0]["excludes"] = ["e"]
        p = problem([dep("de", "e"), dep("da", "a")], tenants=tenants, edit=edit)
        add(case(C.EXCLUSION, f"excludes listed by {lister}", p,
                 [pl("de", 0, 0, "n1", [0]), pl("da", 0, 0, "n3", [0])],
                 [pl("de", 0, 0, "n1", [0]), pl("da", 0, 0, "n2", [0])]))

    # ZONE: tenant data residency.
    p = problem([dep("z", "f")], tenants=[{"id": "f", "zones": ["z2"]}])
    add(case(C.ZONE, "outside the tenant's zones", p, [pl("z", 0, 0, "n4", [0])],
             [pl("z", 0, 0, "n1", [0])]))

    # QUOTA_ACCELERATORS: whole accelerators plus fractions as milli/1000.
    p = problem([dep("q", "g", acc=2), dep("qf", "g", replicas=2, accelerator_milli=500,
                                            locality="node")],
                tenants=[{"id": "g", "max_accelerators": 2.5}])
    add(case(C.QUOTA_ACCELERATORS, "over max_accelerators", p,
             [pl("q", 0, 0, "n1", [0, 1]), pl("qf", 0, 0, "n1", [2], 500)],
             [pl("q", 0, 0, "n1", [0, 1]), pl("qf", 0, 0, "n1", [2], 500),
              pl("qf", 1, 0, "n1", [3], 500)]))
    # ... a tenant kept over a lowered quota (2 of max 1) takes nothing more.
    kept = [pl("q", 0, 0, "n1", [0]), pl("q", 1, 0, "n1", [1])]
    p = problem([dep("q", "g", replicas=3, locality="node")], placements=kept,
                tenants=[{"id": "g", "max_accelerators": 1}])
    add(case(C.QUOTA_ACCELERATORS, "a new accelerator for a tenant kept over its max", p,
             kept, [*kept, pl("q", 2, 0, "n2", [0])]))

    # QUOTA_POWER: a fraction draws power_w x milli / 1000.
    p = problem([dep("w", "g", acc=2, power_w=400),
                 dep("wf", "g", replicas=2, accelerator_milli=500, power_w=400,
                     locality="node")],
                tenants=[{"id": "g", "max_power_w": 1000}])
    add(case(C.QUOTA_POWER, "over max_power_w", p,
             [pl("w", 0, 0, "n1", [0, 1]), pl("wf", 0, 0, "n1", [2], 500)],
             [pl("w", 0, 0, "n1", [0, 1]), pl("wf", 0, 0, "n1", [2], 500),
              pl("wf", 1, 0, "n1", [3], 500)]))
    kept = [pl("w", 0, 0, "n1", [0]), pl("w", 1, 0, "n1", [1])]  # 800 W of max 500
    p = problem([dep("w", "g", replicas=3, power_w=400, locality="node")], placements=kept,
                tenants=[{"id": "g", "max_power_w": 500}])
    add(case(C.QUOTA_POWER, "new power for a tenant kept over its max_power_w", p,
             kept, [*kept, pl("w", 2, 0, "n2", [0])]))

    # POWER_RACK: idle of the rack's non-down nodes plus shard power.
    def rack_budget(budget: float) -> Callable[[Doc], None]:
        def edit(d: Doc) -> None:
            d["racks"][0]["power_budget_w"] = budget
        return edit
    p = problem([dep("p", replicas=2, acc=4, power_w=1000, locality="node")],
                edit=rack_budget(8100))
    add(case(C.POWER_RACK, "rack over budget", p,
             [pl("p", 0, 0, "n1", [0, 1, 2, 3]), pl("p", 1, 0, "n3", [0, 1, 2, 3])],
             [pl("p", 0, 0, "n1", [0, 1, 2, 3]), pl("p", 1, 0, "n2", [0, 1, 2, 3])]))

    # ... and a rack its kept work already holds over budget (n6 came back up: 300 W idle in
    # r2 plus p's 1000 W) may stay so, but takes no new power.
    def r2_overdrawn(d: Doc) -> None:
        d["racks"][1]["power_budget_w"] = 1200
        d["nodes"][5]["state"] = "ready"
    kept = pl("p", 0, 0, "n3", [0])
    p = problem([dep("p", power_w=1000), dep("q", power_w=100), dep("idle")],
                placements=[kept], edit=r2_overdrawn)
    add(case(C.POWER_RACK, "new power in a rack already over budget", p,
             [kept, pl("idle", 0, 0, "n3", [1])], [kept, pl("q", 0, 0, "n3", [1])]))

    # POWER_ROW: w1 = r1 + r2 (idle n1, n2, n3, n5 = 400 W).
    def row_budget(d: Doc) -> None:
        d["rows"][0]["power_budget_w"] = 8000
    p = problem([dep("p", replicas=2, acc=4, power_w=1000, locality="node")], edit=row_budget)
    add(case(C.POWER_ROW, "row over budget", p,
             [pl("p", 0, 0, "n1", [0, 1, 2, 3]), pl("p", 1, 0, "n4", [0, 1, 2, 3])],
             [pl("p", 0, 0, "n1", [0, 1, 2, 3]), pl("p", 1, 0, "n3", [0, 1, 2, 3])]))

    # KEPT: existing placements stay (node and indices) unless moved or preempted.
    old = pl("k", 0, 0, "n1", [2])
    p = problem([dep("k"), dep("new")], placements=[old])
    add(case(C.KEPT, "existing placement dropped", p,
             [old, pl("new", 0, 0, "n2", [0])], [pl("new", 0, 0, "n2", [0])]))
    add(case(C.KEPT, "existing placement moved silently", p,
             [old], [pl("k", 0, 0, "n2", [2])]))
    add(case(C.KEPT, "existing placement changed accelerators", p,
             [old], [pl("k", 0, 0, "n1", [0])]))

    # MOVES: only in rebalance mode, at most max_moves, true to the placements.
    move = {"deployment": "k", "replica": 0, "shard": 0, "from": "n1", "to": "n2"}
    for mode in ("batch", "online"):
        p = problem([dep("k")], placements=[old], options={"mode": mode})
        add(case(C.MOVES, f"move in {mode} mode", p, [old], [pl("k", 0, 0, "n2", [0])],
                 broken_extra={"moved": [move]}))
    p = problem([dep("k")], placements=[old], options={"mode": "rebalance", "max_moves": 1})
    add(case(C.MOVES, "move with the wrong origin", p, [pl("k", 0, 0, "n2", [0])],
             [pl("k", 0, 0, "n2", [0])], good_extra={"moved": [move]},
             broken_extra={"moved": [{**move, "from": "n3"}]}))
    p = problem([dep("k")], placements=[old], options={"mode": "rebalance", "max_moves": 0})
    add(case(C.MOVES, "over max_moves", p, [old], [pl("k", 0, 0, "n2", [0])],
             broken_extra={"moved": [move]}))

    # PREEMPTION: only preemptible, only when allowed, only if running, only for better work.
    burst = pl("burst", 0, 0, "n1", [0, 1, 2, 3])
    deps = [dep("burst", "b", acc=4, preemptible=True), dep("vip", "a", acc=4, priority=10)]
    allow = {"mode": "batch", "allow_preemption": True}
    pre = {"preempted": [{"deployment": "burst", "replica": 0}]}
    vip = pl("vip", 0, 0, "n1", [0, 1, 2, 3])

    def unplaced_burst(extra: Doc) -> Doc:
        return {**extra, "unplaced": [{"deployment": "burst", "replicas": 1, "reasons": [
            {"code": "CAPACITY", "message": "preempted"}]}]}
    p = problem(deps, placements=[burst], options=allow)
    p_no = problem(deps, placements=[burst], options={"mode": "batch"})
    add(Case(C.PREEMPTION, "preemption not allowed", p_no, plan(p_no, [burst]),
             plan(p_no, [vip], **pre)))
    deps_np = [dep("burst", "b", acc=4), deps[1]]
    p_np = problem(deps_np, placements=[burst], options=allow)
    add(Case(C.PREEMPTION, "deployment not preemptible", p_np, plan(p_np, [burst]),
             plan(p_np, [vip], **pre)))
    deps_low = [deps[0], dep("vip", "a", acc=4, priority=0)]
    p_low = problem(deps_low, placements=[burst], options=allow)
    add(Case(C.PREEMPTION, "preempted for nothing better", p_low, plan(p_low, [burst]),
             plan(p_low, [vip], **pre)))
    add(Case(C.PREEMPTION, "preempted replica still running", p, plan(p, [vip], **pre),
             plan(p, [burst, pl("vip", 0, 0, "n2", [0, 1, 2, 3])], **pre)))

    # Reserved work (not preemptible, no higher priority) may preempt only while its tenant
    # is below its reservation: here tenant a already holds its 4 reserved accelerators.
    p_full = reservation_problem(reserved=4)
    add(Case(C.PREEMPTION, "reserved tenant already at its reservation", p_full,
             plan(p_full, [VIP_HELD, burst]),
             plan(p_full, [VIP_HELD, VIP_AGAIN], **pre)))

    # UNPLACED: unplaced[] accounts for exactly the replicas not placed, with reasons.
    p = problem([dep("u", replicas=3, locality="node")])
    good = plan(p, [pl("u", 0, 0, "n1", [0])])
    bad = copy.deepcopy(good)
    bad["unplaced"][0]["replicas"] = 1
    add(Case(C.UNPLACED, "miscounted unplaced", p, good, bad))
    bad = copy.deepcopy(good)
    bad["unplaced"] = []
    add(Case(C.UNPLACED, "missing unplaced", p, good, bad))
    bad = copy.deepcopy(good)
    bad["unplaced"].append({"deployment": "ghost", "replicas": 1,
                            "reasons": [{"code": "CAPACITY", "message": "x"}]})
    add(Case(C.UNPLACED, "unknown deployment in unplaced", p, good, bad))
    bad = copy.deepcopy(good)
    bad["unplaced"][0]["reasons"][0]["code"] = "BAD_LUCK"
    add(Case(C.UNPLACED, "invalid code (schema off)", p, good, bad, schema=False))

    # STATUS: infeasible means nothing new was placed.
    p = problem([dep("s")])
    good = plan(p, [], status="infeasible")
    bad = plan(p, [pl("s", 0, 0, "n1", [0])], status="infeasible")
    add(Case(C.STATUS, "infeasible yet placed", p, good, bad))
    # STATUS: optimal reaches the bound it reports; objective is the placed weight.
    one = [pl("s", 0, 0, "n1", [0])]  # 1 shard x 1000 milli x (0 - 0 + 1)
    add(Case(C.STATUS, "optimal below its own bound", p,
             plan(p, one, status="optimal", stats={"solve_ms": 1.0, "best_bound": 1000}),
             plan(p, [], status="optimal", stats={"solve_ms": 1.0, "best_bound": 1000})))
    add(Case(C.STATUS, "objective is not the placed weight", p,
             plan(p, one, stats={"solve_ms": 1.0, "objective": 1000}),
             plan(p, one, stats={"solve_ms": 1.0, "objective": 2000})))
    return cases


VIP_HELD = pl("vip", 0, 0, "n2", [0, 1, 2, 3])
VIP_AGAIN = pl("vip", 1, 0, "n1", [0, 1, 2, 3])


def reservation_problem(reserved: int) -> Doc:
    """Tenant a (reserved accelerators) runs vip replica 0; replica 1 fits only where b's
    preemptible burst runs. Same priorities: only the reservation can justify preempting."""
    def reserve(d: Doc) -> None:
        d["tenants"][0]["reserved_accelerators"] = reserved
    return problem([dep("vip", "a", acc=4, replicas=2, locality="node"),
                    dep("burst", "b", acc=4, preemptible=True)],
                   placements=[VIP_HELD, pl("burst", 0, 0, "n1", [0, 1, 2, 3])],
                   options={"mode": "batch", "allow_preemption": True}, edit=reserve)


CASES = build_cases()


@pytest.mark.parametrize("c", CASES, ids=[f"{c.rule}-{c.name}" for c in CASES])
def test_valid_plan_passes(c: Case) -> None:
    assert check_plan(c.problem, c.valid, validate_schema=c.schema) == []


@pytest.mark.parametrize("c", CASES, ids=[f"{c.rule}-{c.name}" for c in CASES])
def test_corrupted_plan_fails_with_its_rule(c: Case) -> None:
    violations = check_plan(c.problem, c.corrupt, validate_schema=c.schema)
    rules = {v.rule for v in violations}
    assert c.rule in rules, violations
    assert rules <= {c.rule} | c.also, violations


def test_every_rule_has_a_case() -> None:
    assert {c.rule for c in CASES} == set(C.ALL_RULES)


def test_spec_example_plan_passes() -> None:
    prob = json.loads((EXAMPLES / "tiny.problem.json").read_text())
    good = json.loads((EXAMPLES / "tiny.plan.json").read_text())
    assert check_plan(prob, good) == []


def test_down_node_idle_power_is_not_counted() -> None:
    def r2_budget(d: Doc) -> None:
        d["racks"][1]["power_budget_w"] = 1200  # n3 + n5 idle = 200 W; n6 is down
    p = problem([dep("p", power_w=1000)], edit=r2_budget)
    assert check_plan(p, plan(p, [pl("p", 0, 0, "n3", [0])])) == []
    p["nodes"][5]["state"] = "ready"  # n6 back up: its idle power now counts
    assert {v.rule for v in check_plan(p, plan(p, [pl("p", 0, 0, "n3", [0])]))} == {C.POWER_RACK}


def test_kept_placement_on_cordoned_node_is_fine() -> None:
    old = pl("d", 0, 0, "n5", [1])
    p = problem([dep("d")], placements=[old])
    assert check_plan(p, plan(p, [old])) == []


def test_replica_broken_by_down_node_may_be_replaced_in_batch_mode() -> None:
    lost = [pl("g", 0, 0, "n3", [0]), pl("g", 0, 1, "n6", [0])]
    p = problem([dep("g", shards=2)], placements=lost)
    again = [pl("g", 0, 0, "n3", [0]), pl("g", 0, 1, "n3", [1])]
    moved = [{"deployment": "g", "replica": 0, "shard": 1, "from": "n6", "to": "n3"}]
    assert check_plan(p, plan(p, again)) == []
    assert check_plan(p, plan(p, again, moved=moved)) == []
    assert check_plan(p, plan(p, [])) == []  # or dropped, with an unplaced entry


def test_min_replicas_wins_over_keeping_survivors() -> None:
    old = [pl("m", 0, 0, "n1", [0]), pl("m", 1, 0, "n6", [0])]
    p = problem([dep("m", replicas=2, min_replicas=2, locality="node")], placements=old)
    assert check_plan(p, plan(p, [])) == []
    assert {v.rule for v in check_plan(p, plan(p, [old[0]]))} == {C.MIN_REPLICAS}


def test_valid_preemption_passes() -> None:
    burst = pl("burst", 0, 0, "n1", [0, 1, 2, 3])
    p = problem([dep("burst", "b", acc=4, preemptible=True),
                 dep("vip", "a", acc=4, priority=10)],
                placements=[burst], options={"mode": "batch", "allow_preemption": True})
    good = plan(p, [pl("vip", 0, 0, "n1", [0, 1, 2, 3])],
                preempted=[{"deployment": "burst", "replica": 0}])
    assert check_plan(p, good) == []


def test_a_replica_a_down_node_broke_may_preempt_to_be_placed_again() -> None:
    """A higher-priority replica whose node is down is placed again where preemptible work ran:
    the repair is new work (the spec: shards on down nodes must be placed again), so it justifies
    the preemption as a new replica would. The checker took only replicas with no earlier
    placement as new, and refused the solver's plan."""
    lost = pl("vip", 0, 0, "n6", [0, 1, 2, 3])
    p = problem([dep("vip", "a", acc=4, priority=10), dep("burst", "b", acc=4, preemptible=True)],
                placements=[lost, pl("burst", 0, 0, "n1", [0, 1, 2, 3])],
                options={"mode": "batch", "allow_preemption": True})
    repaired = pl("vip", 0, 0, "n1", [0, 1, 2, 3])
    moved = [{"deployment": "vip", "replica": 0, "shard": 0, "from": "n6", "to": "n1"}]
    assert check_plan(p, plan(p, [repaired], moved=moved, preempted=[{"deployment": "burst", "replica": 0}])) == []
    same_priority = problem([dep("vip", "a", acc=4), dep("burst", "b", acc=4, preemptible=True)],
                            placements=[lost, pl("burst", 0, 0, "n1", [0, 1, 2, 3])],
                            options={"mode": "batch", "allow_preemption": True})
    assert {v.rule for v in check_plan(same_priority, plan(same_priority, [repaired], moved=moved, preempted=[
        {"deployment": "burst", "replica": 0}]))} == {C.PREEMPTION}  # still only for better work


def test_reserved_tenant_below_its_reservation_may_preempt() -> None:
    p = reservation_problem(reserved=8)
    good = plan(p, [VIP_HELD, VIP_AGAIN], preempted=[{"deployment": "burst", "replica": 0}])
    assert check_plan(p, good) == []


def test_reserved_work_below_its_reservation_may_preempt_for_its_first_replica_of_several() -> None:
    """Tenant a (reserved 4, nothing held) places two new replicas of 4 accelerators; the first
    needs the node b's burst holds. Its tenant was below its reservation when the plan began, so
    the preemption is allowed, although with both replicas placed a holds more than it reserved."""
    p = problem([dep("vip", "a", acc=4, replicas=2, locality="node"),
                 dep("burst", "b", acc=4, preemptible=True)],
                placements=[pl("burst", 0, 0, "n1", [0, 1, 2, 3])],
                options={"mode": "batch", "allow_preemption": True},
                edit=lambda d: d["tenants"][0].update(reserved_accelerators=4))
    good = plan(p, [VIP_AGAIN, pl("vip", 0, 0, "n2", [0, 1, 2, 3])],
                preempted=[{"deployment": "burst", "replica": 0}])
    assert check_plan(p, good) == []


def test_placed_accelerators_counts_fractions() -> None:
    p = problem([dep("w", acc=2), dep("f", accelerator_milli=250)])
    doc = plan(p, [pl("w", 0, 0, "n1", [0, 1]), pl("f", 0, 0, "n1", [2], 250)])
    assert C.placed_accelerators(p, doc) == {"w": 2.0, "f": 0.25}


def test_lists_left_out_are_implied_as_the_interchange_implies_them() -> None:
    """A document without racks (or rows) puts its racks in the one row listed and its rows in
    the one zone: read as absent, the checker refused a tenant's own zone (ZONE: in zone None)
    and never checked a row's power budget."""
    zoned = {"zones": [{"id": "z1"}], "nodes": [{"id": "n1", "rack": "r1", "accelerators": 2}],
             "tenants": [{"id": "t", "zones": ["z1"]}],
             "deployments": [{"id": "d", "tenant": "t", "replicas": 1, "shards_per_replica": 1,
                              "shard": {"accelerators": 1}}]}
    on_n1 = {"deployment": "d", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]}
    plan = {"status": "feasible", "placements": [on_n1], "unplaced": [], "preempted": [], "moved": [], "stats": {}}
    assert check_plan(zoned, plan) == []
    budgeted = {"rows": [{"id": "w1", "zone": "z1", "power_budget_w": 500}],
                "nodes": [{"id": f"n{i}", "rack": f"r{i}", "accelerators": 2, "idle_power_w": 100} for i in (1, 2)],
                "deployments": [{"id": "d", "tenant": "t", "replicas": 2, "shards_per_replica": 1,
                                 "shard": {"accelerators": 1, "power_w": 200}}]}
    plan["placements"] = [on_n1, dict(on_n1, replica=1, node="n2")]  # 2 x 100 idle + 2 x 200 > 500
    assert [v.rule for v in check_plan(budgeted, plan)] == ["POWER_ROW"]


def test_an_incomplete_input_gang_is_dropped_whole_or_completed_with_its_shards_kept() -> None:
    """Only dropping an incomplete gang whole is exempt from KEPT: completed, its placed shards
    stay where they ran (moved silently is KEPT, kept partial is GANG)."""
    half = pl("g", 0, 0, "n1", [0])
    p = problem([dep("g", shards=2, locality="node")], placements=[half])
    assert check_plan(p, plan(p, [])) == []
    assert check_plan(p, plan(p, [half, pl("g", 0, 1, "n1", [1])])) == []
    moved = [pl("g", 0, 0, "n2", [0]), pl("g", 0, 1, "n2", [1])]
    assert {v.rule for v in check_plan(p, plan(p, moved))} == {C.KEPT}
    assert {v.rule for v in check_plan(p, plan(p, [half]))} == {C.GANG}
