"""A 1,024-node rebalance problem: does the solver that spends its time limit ever lose to the
greedy with moves, and does it give the same plan twice?

The problem (seeded, built from the synthetic cluster of `bench.synthetic`): a background
stream decided by one online `solve()` until about `placements` shards run, then `new`
deployments of the synthetic mix, at a higher priority than most of the background, asked for
in `rebalance` mode with preemption allowed and `max_moves`. Per run it reports the
priority-weighted placed demand (`scheduler.solve.plan_value`, what users care about),
preemptions, moves, replicas left unplaced and the CP-SAT figures, for

* `greedy`: the solver's greedy pipeline (greedy, moves, preemption; CP-SAT off), and
* `solver`: `solve()` as a caller gets it (greedy pipeline and CP-SAT pipeline, the better
  kept), `--repeats` times, with a digest of each plan to show repeated runs agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from typing import Any

from bench import synthetic

Doc = dict[str, Any]


def build(seed: int = 11, nodes: int = 1024, placements: int = 1700, new: int = 64,
          max_moves: int = 32, time_limit_ms: int = 10_000, *, mode: str = "rebalance",
          preemptible_share: float = 0.0, row_budget_factor: float = 1.0) -> Doc:
    """The rebalance problem document (see module doc). `preemptible_share` > 0: that share of
    the running deployments (drawn per deployment) is preemptible at priority 0, the new ones
    priority 100 (a preemption workload); `row_budget_factor` scales the rows' power budgets
    (below 1: power binds, where the victims of a replica's own domain are not the cheapest)."""
    from scheduler import plan_to_dict, problem_from_dict, solve
    doc = synthetic.cluster(nodes, seed)
    rng = random.Random(seed)
    background: list[Doc] = []
    shards = 0
    while shards < placements * 1.15:  # some of the stream will not fit
        d = synthetic.arrival(rng, len(background))
        background.append(d)
        shards += d["replicas"] * d["shards_per_replica"]
    plan = solve(problem_from_dict({**doc, "deployments": background,
                                    "options": {"mode": "online"}}))
    held = plan_to_dict(plan)["placements"]
    replicas: dict[str, set[int]] = {}
    for p in held:
        replicas.setdefault(p["deployment"], set()).add(p["replica"])
    # The background asks for what it holds (renumbered 0..k-1 is not needed: the online
    # solve places replicas 0..k-1), so only the new deployments are pending.
    kept = [{**d, "replicas": len(replicas[d["id"]]),
             "min_replicas": min(d.get("min_replicas", 1), len(replicas[d["id"]]))}
            for d in background if d["id"] in replicas]
    arrivals = []
    for i in range(new):
        d = synthetic.arrival(rng, len(background) + i)
        d["priority"] = rng.choice([10, 50, 100])
        arrivals.append(d)
    if preemptible_share > 0:
        for d in kept:
            d.update(priority=0, preemptible=rng.random() < preemptible_share)
        for d in arrivals:
            d["priority"] = 100
    for row in doc["rows"]:
        if row.get("power_budget_w") is not None:
            row["power_budget_w"] *= row_budget_factor
    options = {"mode": mode, "allow_preemption": True, "time_limit_ms": time_limit_ms}
    if mode == "rebalance":
        options["max_moves"] = max_moves
    return {**doc, "deployments": kept + arrivals, "placements": held, "options": options}


def digest(plan_doc: Doc) -> str:
    """A short hash of what the plan decides (placements, preemptions, moves)."""
    body = json.dumps([plan_doc["placements"], plan_doc.get("preempted", []),
                       plan_doc.get("moved", [])], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def measure(doc: Doc, *, use_cpsat: bool | None) -> Doc:
    """One run: `use_cpsat` None is the public `solve()`, False the greedy pipeline alone."""
    from scheduler import plan_to_dict, problem_from_dict, solve
    from scheduler.solve import Solver, plan_value
    problem = problem_from_dict(doc)
    t0 = time.perf_counter()
    plan = solve(problem) if use_cpsat is None else Solver(problem, None,
                                                           use_cpsat=use_cpsat).run()
    seconds = time.perf_counter() - t0
    placed, _ = plan_value(plan, problem)
    out = plan_to_dict(plan)
    st = plan.stats
    return {"weighted_placed": placed, "preempted": len(plan.preempted),
            "moves": len(plan.moved), "unplaced_replicas": sum(u.replicas for u in
                                                               plan.unplaced),
            "status": plan.status, "seconds": round(seconds, 2), "digest": digest(out),
            "pipeline": st.get("pipeline", "greedy" if use_cpsat is False else "-"),
            "cpsat": st.get("cpsat", "-"), "cpsat_ms": st.get("cpsat_ms"),
            "classes": st.get("classes"), "time_limit_hit": st.get("time_limit_hit"),
            "greedy_pipeline_value": st.get("greedy_pipeline_value"),
            "cpsat_pipeline_value": st.get("cpsat_pipeline_value")}


def main(args: argparse.Namespace) -> int:
    rows = []
    for seed in args.seeds:
        doc = build(seed, args.nodes, args.placements, args.new, args.max_moves, args.time_limit_ms,
                    mode=args.mode, preemptible_share=args.preemptible_share,
                    row_budget_factor=args.row_budget_factor)
        print(f"seed {seed}: {len(doc['nodes'])} nodes, {len(doc['deployments'])} deployments "
              f"({args.new} new), {len(doc['placements'])} existing placements",
              file=sys.stderr, flush=True)
        runs = [("greedy", measure(doc, use_cpsat=False))]
        runs += [(f"solver #{i + 1}", measure(doc, use_cpsat=None)) for i in range(args.repeats)]
        base = runs[0][1]["weighted_placed"]
        for name, r in runs:
            r.update({"seed": seed, "run": name,
                      "vs_greedy_pct": round(100.0 * (r["weighted_placed"] - base) / base, 3)})
            rows.append(r)
            print(f"  {name:<10} weighted placed {r['weighted_placed']:>10} "
                  f"({r['vs_greedy_pct']:+.3f}% vs greedy), preempted {r['preempted']}, "
                  f"moves {r['moves']}, unplaced replicas {r['unplaced_replicas']}, "
                  f"{r['seconds']} s, pipeline {r['pipeline']}, cpsat {r['cpsat']} "
                  f"({r['cpsat_ms']} ms, {r['classes']} classes), plan {r['digest']}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[11])
    p.add_argument("--nodes", type=int, default=1024)
    p.add_argument("--placements", type=int, default=1700,
                   help="about this many existing shard placements")
    p.add_argument("--new", type=int, default=64, help="new deployments to place")
    p.add_argument("--max-moves", type=int, default=32)
    p.add_argument("--time-limit-ms", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=2, help="solve() runs per seed")
    p.add_argument("--mode", choices=("rebalance", "online"), default="rebalance")
    p.add_argument("--preemptible-share", type=float, default=0.0,
                   help="that share of the running deployments preemptible at priority 0, the new at 100")
    p.add_argument("--row-budget-factor", type=float, default=1.0, help="the rows' power budgets scaled so")
    p.add_argument("--json", help="also write per-run results to this file")
