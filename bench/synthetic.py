"""Maia-shaped synthetic clusters: decision latency, placed demand and memory at scale.

A cluster of N nodes (4 accelerators each), 16 nodes to a rack with a power budget below full
load, racks in rows of 8 with their own budget, rows alternating between 2 zones, a few cordoned
and down nodes, and tenants of every isolation level (shared, dedicated_node, dedicated_rack,
an exclusion pair, a zone-restricted one and a capped one). The arrival stream mixes gangs of
8-64 shards, single-node replicas of 1-4 accelerators and fractional replicas.

Per size, in a child process (so its peak RSS is its own):
1. background: arrivals until `--fill` of the accelerators are requested, decided by ONE online
   `solve()` (throughput, decisions/s);
2. online latency: `--measure` further arrivals, one `solve()` each on the loaded cluster
   (and 5 calls with nothing new to place: what re-reading the whole state costs per call);
3. gang latency: 20 probe gangs of 64 shards, one `solve()` each (target: p99 <= 100 ms on
   4,096 nodes); probes are left out of the placed-demand figures. On the loaded cluster most
   probes do not fit, so their latencies are reported split into placed and refused; and 20
   more probes run on a copy of the background state thinned (whole deployments, latest
   arrivals dropped first) to `--gang-fill` of the accelerators held, where they have room
   (after step 4, so nothing else sees them);
4. batch latency: `--batches` batches of `--batch-size` arrivals, one batch-mode `solve()` each;
5. the same stream through the independent best-fit greedy (`bench.greedy`), for placed demand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.fgd import percentile
from bench.greedy import BestFitGreedy

Doc = dict[str, Any]
NODES_PER_RACK = 16
RACKS_PER_ROW = 8
ACCELERATORS = 4
IDLE_W = 600
SHARD_W = 700
RACK_LOAD_SHARE = 0.85  # rack budget: idle + this share of full accelerator load
ROW_SHARE = 0.9  # row budget: this share of the sum of its racks' budgets

TENANTS: list[Doc] = [
    {"id": "shared-a", "isolation": "shared"},
    {"id": "shared-b", "isolation": "shared", "excludes": ["rack-x"]},
    {"id": "node-x", "isolation": "dedicated_node"},
    {"id": "rack-x", "isolation": "dedicated_rack"},
    {"id": "eu-only", "isolation": "shared", "zones": ["z1"]},
    {"id": "capped", "isolation": "shared"},  # caps set per cluster size
]
TENANT_WEIGHTS = [30, 20, 15, 15, 10, 10]


@dataclass
class SizeResult:
    """What one cluster size measured (all latencies in ms)."""

    nodes: int
    accelerators: int
    background_arrivals: int
    background_s: float
    online_ms: list[float]
    gang64_ms: list[float]
    batch_ms: list[float]
    requested_acc: float
    solver_placed_acc: float
    greedy_placed_acc: float
    greedy_ms: list[float]
    gang64_placed: int
    noop_ms: list[float]
    peak_rss_mib: float
    violations: int | None = None
    gang64_placed_ms: list[float] = dataclasses.field(default_factory=list)  # loaded cluster
    gang64_refused_ms: list[float] = dataclasses.field(default_factory=list)
    room_gang64_ms: list[float] = dataclasses.field(default_factory=list)  # at --gang-fill
    room_gang64_placed: int = 0
    room_gang64_ok: list[bool] = dataclasses.field(default_factory=list)  # placed, per probe


def cluster(n_nodes: int, seed: int) -> Doc:
    rng = random.Random(seed)
    n_racks = max(1, n_nodes // NODES_PER_RACK)
    n_rows = max(1, (n_racks + RACKS_PER_ROW - 1) // RACKS_PER_ROW)
    rack_budget = NODES_PER_RACK * IDLE_W + RACK_LOAD_SHARE * NODES_PER_RACK * ACCELERATORS \
        * SHARD_W
    rows = [{"id": f"row{w:03d}", "zone": f"z{w % 2 + 1}",
             "power_budget_w": ROW_SHARE * RACKS_PER_ROW * rack_budget} for w in range(n_rows)]
    racks = [{"id": f"r{k:04d}", "row": f"row{k // RACKS_PER_ROW:03d}",
              "power_budget_w": rack_budget} for k in range(n_racks)]
    nodes = []
    for i in range(n_racks * NODES_PER_RACK):
        u = rng.random()
        nodes.append({"id": f"n{i:05d}", "rack": f"r{i // NODES_PER_RACK:04d}",
                      "state": "down" if u < 0.005 else "cordoned" if u < 0.015 else "ready",
                      "accelerators": ACCELERATORS, "accelerator_model": "maia-100",
                      "hbm_gib": 64, "cpu_milli": 96000, "memory_mib": 786432,
                      "idle_power_w": IDLE_W})
    tenants = [dict(t) for t in TENANTS]
    capacity = ACCELERATORS * len(nodes)
    tenants[-1]["max_accelerators"] = round(0.05 * capacity)
    tenants[-1]["max_power_w"] = 0.05 * capacity * SHARD_W
    return {"version": 1, "zones": [{"id": "z1"}, {"id": "z2"}], "rows": rows, "racks": racks,
            "nodes": nodes, "tenants": tenants, "deployments": [], "placements": []}


def arrival(rng: random.Random, i: int, kind: str | None = None) -> Doc:
    """One deployment of the synthetic mix (or of the given kind)."""
    tenant = rng.choices([t["id"] for t in TENANTS], TENANT_WEIGHTS)[0]
    kind = kind or rng.choices(["gang", "node", "fraction"], [15, 40, 45])[0]
    base = {"id": f"dep{i:06d}-{kind}", "tenant": tenant, "priority": rng.choice([0, 10, 50])}
    if kind.startswith("gang"):
        shards = int(kind[4:]) if kind != "gang" else rng.choice([8, 16, 32, 64])
        return {**base, "id": f"dep{i:06d}-gang{shards}", "replicas": 1,
                "shards_per_replica": shards, "locality": "rack" if shards <= 32 else "row",
                "shard": {"accelerators": 1, "hbm_gib": 48, "cpu_milli": 8000,
                          "memory_mib": 65536, "power_w": SHARD_W}}
    if kind == "node":
        acc = rng.choice([1, 2, 4])
        return {**base, "replicas": rng.randint(1, 4), "shards_per_replica": 1,
                "locality": "node", "shard": {"accelerators": acc, "hbm_gib": 32,
                                              "cpu_milli": 4000 * acc,
                                              "memory_mib": 32768 * acc, "power_w": SHARD_W}}
    return {**base, "replicas": rng.randint(1, 8), "shards_per_replica": 1, "locality": "node",
            "shard": {"accelerators": 1, "accelerator_milli": rng.choice([250, 500]),
                      "hbm_gib": 16, "cpu_milli": 2000, "memory_mib": 16384,
                      "power_w": SHARD_W}}


def requested(d: Doc) -> float:
    s = d["shard"]
    per = s["accelerator_milli"] / 1000 if s.get("accelerator_milli", 1000) < 1000 \
        else s["accelerators"]
    return per * d["shards_per_replica"] * d["replicas"]


def held(deployments: dict[str, Doc], placements: list[Doc]) -> float:
    total = 0.0
    for p in placements:
        s = deployments[p["deployment"]]["shard"]
        total += s["accelerator_milli"] / 1000 if s.get("accelerator_milli", 1000) < 1000 \
            else len(p["accelerator_indices"])
    return total


def measure(n_nodes: int, args: argparse.Namespace) -> SizeResult:
    """Steps 1-5 of the module docstring for one cluster size."""
    from scheduler import plan_to_dict, problem_from_dict, solve
    from scheduler import Options

    rng = random.Random(args.seed)
    doc = cluster(n_nodes, args.seed)
    capacity = ACCELERATORS * len(doc["nodes"])
    background: list[Doc] = []
    total = 0.0
    while total < args.fill * capacity:
        background.append(arrival(rng, len(background)))
        total += requested(background[-1])
    later = [arrival(rng, len(background) + i) for i in range(args.measure)]
    gangs = [arrival(rng, len(background) + args.measure + i, "gang64") for i in range(20)]
    batches = [arrival(rng, len(background) + args.measure + 20 + i)
               for i in range(args.batches * args.batch_size)]
    room_gangs = [arrival(rng, len(background) + args.measure + 20 + len(batches) + i, "gang64")
                  for i in range(20)]  # drawn last: the stream before them is unchanged
    stream = background + later + gangs + batches + room_gangs
    by_id = {d["id"]: d for d in stream}

    # 1. background, one online solve
    problem = problem_from_dict({**doc, "deployments": stream, "options": {"mode": "online"}})
    deps = {d.id: d for d in problem.deployments}
    first = dataclasses.replace(problem, deployments=tuple(deps[d["id"]] for d in background))
    t0 = time.perf_counter()
    plan = solve(first, time_limit_ms=None)
    background_s = time.perf_counter() - t0
    current = plan.placements
    holding = {p.deployment: deps[p.deployment] for p in current}

    # A thinned copy of the background state for the roomy gang probes (step 3): whole
    # deployments in arrival order while their accelerators stay within --gang-fill.
    acc_of: dict[str, float] = {}
    for p in current:
        acc_of[p.deployment] = acc_of.get(p.deployment, 0.0) + (
            p.accelerator_milli / 1000 if p.accelerator_milli is not None
            else len(p.accelerator_indices))
    keep: set[str] = set()
    kept_acc = 0.0
    for d in background:
        a = acc_of.get(d["id"], 0.0)
        if a and kept_acc + a > args.gang_fill * capacity:
            break
        kept_acc += a
        keep.add(d["id"])
    room_current = tuple(p for p in current if p.deployment in keep)
    room_holding = {p.deployment: deps[p.deployment] for p in room_current}

    def one_call(new: list[Doc], mode: str) -> float:
        nonlocal current
        prob = dataclasses.replace(problem, placements=current, options=Options(mode=mode),
                                   deployments=(*holding.values(),
                                                *(deps[d["id"]] for d in new)))
        t = time.perf_counter()
        result = solve(prob, time_limit_ms=args.time_limit_ms)
        ms = 1000 * (time.perf_counter() - t)
        current = result.placements
        for p in current:
            holding.setdefault(p.deployment, deps[p.deployment])
        return ms

    def placed(dep_id: str) -> bool:
        return any(p.deployment == dep_id for p in current)

    noop_ms = [one_call([], "online") for _ in range(5)]  # the price of re-reading the state
    online_ms = [one_call([d], "online") for d in later]  # 2.
    gang64_ms: list[float] = []  # 3.
    gang64_placed_ms: list[float] = []
    gang64_refused_ms: list[float] = []
    for d in gangs:
        gang64_ms.append(one_call([d], "online"))
        (gang64_placed_ms if placed(d["id"]) else gang64_refused_ms).append(gang64_ms[-1])
    batch_ms = [one_call(batches[k:k + args.batch_size], "batch")  # 4.
                for k in range(0, len(batches), args.batch_size)]
    loaded_current, loaded_holding = current, holding
    current, holding = room_current, room_holding  # 3. (room): its own state from here on
    room_gang64_ms: list[float] = []
    room_gang64_ok: list[bool] = []
    for d in room_gangs:
        room_gang64_ms.append(one_call([d], "online"))
        room_gang64_ok.append(placed(d["id"]))
    room_gang64_placed = sum(room_gang64_ok)
    current, holding = loaded_current, loaded_holding
    final = plan_to_dict(dataclasses.replace(plan, placements=current, unplaced=(),
                                             preempted=(), moved=()))["placements"]
    # Placed demand over the stream without the 64-shard probes (they are latency probes).
    probe_ids = {d["id"] for d in gangs + room_gangs}
    solver_acc = held(by_id, [p for p in final if p["deployment"] not in probe_ids])
    gang64_placed = len({p["deployment"] for p in final}
                        & {d["id"] for d in gangs})

    violations = None
    if args.check:
        from pathlib import Path
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scheduler"))
        from checker import check_plan  # type: ignore[import-not-found]
        pdoc = {**doc, "deployments": [by_id[i] for i in sorted({p["deployment"]
                                                                  for p in final})]}
        vs = check_plan(pdoc, {"status": "feasible", "placements": final, "unplaced": []},
                        rules=[r for r in ("INDICES", "EXCLUSIVE_ACCELERATOR",
                                           "SHARED_ACCELERATOR", "HBM", "CPU", "MEMORY",
                                           "NODE_STATE", "LOCALITY", "ISOLATION", "EXCLUSION",
                                           "ZONE", "QUOTA_ACCELERATORS", "QUOTA_POWER",
                                           "POWER_RACK", "POWER_ROW", "GANG")])
        violations = len(vs)
        for v in vs[:5]:
            print(f"    violation: {v}", file=sys.stderr)

    # 5. the greedy on the same stream, online
    g = BestFitGreedy({**doc, "deployments": stream})
    greedy_ms = []
    for d in stream:
        if d["id"] in probe_ids:
            continue
        t = time.perf_counter()
        g.place(d)
        greedy_ms.append(1000 * (time.perf_counter() - t))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return SizeResult(len(doc["nodes"]), capacity, len(background), background_s, online_ms,
                      gang64_ms, batch_ms,
                      sum(requested(d) for d in stream if d["id"] not in probe_ids),
                      solver_acc, held(by_id, g.placements), greedy_ms, gang64_placed, noop_ms, peak,
                      violations, gang64_placed_ms, gang64_refused_ms, room_gang64_ms,
                      room_gang64_placed, room_gang64_ok)


def format_rows(results: list[SizeResult], batch_size: int) -> str:
    head = (f"{'nodes':>6} {'bg arrivals':>11} {'bg /s':>7} {'online p50/p99 ms':>18} "
            f"{'no-op p50 ms':>12} {'gang64 p50/p99 ms (placed)':>27} {f'batch{batch_size} p50/p99 ms':>19} "
            f"{'placed maia':>11} {'placed greedy':>13} {'greedy p50/p99':>15} "
            f"{'peak RSS MiB':>12}")
    lines = [head]
    for r in results:
        def pp(v: list[float]) -> str:
            return f"{percentile(v, 50):.1f}/{percentile(v, 99):.1f}"
        lines.append(
            f"{r.nodes:>6} {r.background_arrivals:>11} "
            f"{r.background_arrivals / r.background_s:>7.0f} {pp(r.online_ms):>18} "
            f"{percentile(r.noop_ms, 50):>12.1f} "
            f"{pp(r.gang64_ms) + f' ({r.gang64_placed}/{len(r.gang64_ms)})':>27} {pp(r.batch_ms):>19} "
            f"{100 * r.solver_placed_acc / r.requested_acc:>10.1f}% "
            f"{100 * r.greedy_placed_acc / r.requested_acc:>12.1f}% {pp(r.greedy_ms):>15} "
            f"{r.peak_rss_mib:>12.0f}")
    # Gang probes split: on the loaded cluster by outcome, and on the thinned state.
    lines.append("")
    lines.append(f"{'nodes':>6} {'gang64 placed p50/p99 (n)':>26} "
                 f"{'gang64 refused p50/p99 (n)':>27} {'room: placed p50/p99 (n)':>26} "
                 f"{'room: refused p50/p99 (n)':>26}")
    for r in results:
        def pn(v: list[float]) -> str:
            return (f"{percentile(v, 50):.1f}/{percentile(v, 99):.1f} ({len(v)})" if v
                    else "- (0)")
        room_ok = [ms for ms, ok in zip(r.room_gang64_ms, r.room_gang64_ok) if ok]
        room_no = [ms for ms, ok in zip(r.room_gang64_ms, r.room_gang64_ok) if not ok]
        lines.append(f"{r.nodes:>6} {pn(r.gang64_placed_ms):>26} {pn(r.gang64_refused_ms):>27} "
                     f"{pn(room_ok):>26} {pn(room_no):>26}")
    return "\n".join(lines)


def child_json(cmd: list[str], n: int) -> dict[str, Any]:
    """Measure one cluster size in a child process (its peak RSS its own): the JSON of its
    last stdout line."""
    print(f"  {n} nodes ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    if args.child:  # one size, JSON on stdout
        r = measure(args.nodes[0], args)
        print(json.dumps(dataclasses.asdict(r)))
        return 0
    results = []
    for n in args.nodes:
        cmd = [sys.executable, "-m", "bench", "synthetic", "--child", "--nodes", str(n),
               "--seed", str(args.seed), "--fill", str(args.fill), "--measure",
               str(args.measure), "--batches", str(args.batches), "--batch-size",
               str(args.batch_size), "--time-limit-ms", str(args.time_limit_ms),
               "--gang-fill", str(args.gang_fill)]
        if args.check:
            cmd.append("--check")
        r = SizeResult(**child_json(cmd, n))
        if r.violations:
            print(f"  {n} nodes: {r.violations} checker violations", file=sys.stderr)
        results.append(r)
    print(format_rows(results, args.batch_size))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return 0
