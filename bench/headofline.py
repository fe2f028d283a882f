"""A gang waiting behind a stream of single-shard arrivals: with and without head-of-line
nominations (`scheduler.model.Nomination`, controller/scheduling/nominations.py).

A full cluster (every accelerator held by a single-accelerator deployment), one gang waiting for
room, and churn: each step one running deployment (chosen at random) leaves, one new arrives,
and the gang is tried again, all on one warm `Session` as the controller's fast path drives it.
Without nominations each freed accelerator goes to the next arrival and the gang waits for a
coincidence; with them the session nominates nodes for it (`Session.nominees`) once it has waited
`--nominate-after` steps, arrivals go elsewhere (or wait: the cluster is full), and what frees
on the nominated nodes stays free until the gang fits.

Reported per mode and seed: the step the gang was placed at (or that it never was within
`--steps`), the accelerator-steps the nominated nodes stood idle meanwhile (what the nomination
costs the others), the arrivals left waiting, and the cost of one single-shard decision
(`place()`) with a nomination in force against without one, those that placed apart from those
refused (an arrival with nowhere to go has its reasons worded). With `--check` the final state
is graded by the independent checker.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.fgd import percentile
from scheduler import problem_from_dict
from scheduler.interchange import deployment_from_dict, plan_to_dict, problem_to_dict
from scheduler.model import Nomination, Plan, Problem
from scheduler.session import Session

PER_RACK = 16
ACCELERATORS = 4


@dataclass
class Run:
    nominate: bool
    seed: int
    placed_at: int | None = None  # step the gang was placed at (None: not within the steps)
    idle_accelerator_steps: int = 0  # free accelerators on nominated nodes, summed over the steps
    arrivals_waiting: int = 0  # arrivals not placed when the run ended
    decide_ms: list[float] = field(default_factory=list)  # single-shard place() that placed, wall clock
    refused_ms: list[float] = field(default_factory=list)  # ... that placed nothing (its reasons worded)
    violations: int | None = None


def cluster(nodes: int) -> tuple[dict[str, Any], list[str]]:
    """`nodes` 4-accelerator nodes, 16 a rack, every accelerator held by a one-accelerator deployment."""
    docs, deployments, placements = [], [], []
    for i in range(nodes):
        nid = f"n{i:05d}"
        docs.append({"id": nid, "rack": f"r{i // PER_RACK:04d}", "accelerators": ACCELERATORS})
        for a in range(ACCELERATORS):
            name = f"bg{i:05d}-{a}"
            deployments.append(_single(name))
            placements.append({"deployment": name, "replica": 0, "shard": 0, "node": nid, "accelerator_indices": [a]})
    problem = {"version": 1, "nodes": docs, "deployments": deployments, "placements": placements,
               "options": {"mode": "online"}}
    return problem, [d["id"] for d in deployments]


def _single(name: str) -> dict[str, Any]:
    return {"id": name, "tenant": "bg", "replicas": 1, "shards_per_replica": 1, "shard": {"accelerators": 1},
            "locality": "node"}


def run(args: argparse.Namespace, nominate: bool, seed: int) -> Run:
    doc, running = cluster(args.nodes)
    doc["deployments"].append({"id": "gang", "tenant": "lab", "replicas": 1, "shards_per_replica": args.gang,
                               "shard": {"accelerators": 1}, "locality": "rack"})
    session = Session(problem_from_dict(doc))
    where = {p["deployment"]: p["node"] for p in doc["placements"]}  # running deployment -> its node
    out = Run(nominate=nominate, seed=seed)
    rng = random.Random(seed)
    waiting: list[str] = []
    nominated: set[str] = set()
    before: Problem | None = None  # the state when nodes were nominated (what --check judges against)
    for step in range(args.steps):
        if nominate and not nominated and step >= args.nominate_after:
            nominated = set(session.nominees("gang"))
            session.nominate([Nomination("gang", 0, tuple(sorted(nominated)))])
            before = session.snapshot()
        gone = running.pop(rng.randrange(len(running)))
        session.release(gone)
        del where[gone]
        # As the controller's fast path orders them: what waits (the gang first, the oldest),
        # then the arrival.
        if session.place("gang").placements:
            out.placed_at = step
            break
        for name in list(waiting):
            decision = session.place(name)
            if decision.placements:
                waiting.remove(name)
                running.append(name)
                where[name] = decision.placements[0].node
        name = f"new{step:06d}"
        started = time.perf_counter()
        decision = session.place(deployment_from_dict(_single(name)))
        (out.decide_ms if decision.placements else out.refused_ms).append((time.perf_counter() - started) * 1000)
        if decision.placements:
            running.append(name)
            where[name] = decision.placements[0].node
        else:
            waiting.append(name)
        if nominated:
            used = sum(1 for node in where.values() if node in nominated)
            out.idle_accelerator_steps += ACCELERATORS * len(nominated) - used
    out.arrivals_waiting = len(waiting)
    if args.check:
        out.violations = len(_violations(session.snapshot(), before))
    return out


def _violations(final: Problem, before: Problem | None) -> list[Any]:
    """The independent checker on the final state, as a plan of everything running: what one
    node, rack or gang holds; and, against the state when nodes were nominated, that nothing
    placed since (but the gang) landed on a nominated node (NODE_STATE)."""
    from tests.scheduler.checker import check_plan  # the independent checker (tests/scheduler)
    live = {d.id for d in final.deployments}
    kept = tuple(p for p in before.placements if p.deployment in live) if before is not None else ()
    problem = dataclasses.replace(final, placements=kept, nominations=() if before is None else before.nominations)
    plan = Plan(status="feasible", placements=final.placements, unplaced=())
    rules = ("INDICES", "EXCLUSIVE_ACCELERATOR", "LOCALITY", "GANG", "NODE_STATE")
    return check_plan(problem_to_dict(problem), plan_to_dict(plan), validate_schema=False, rules=rules)


def main(args: argparse.Namespace) -> int:
    runs = [run(args, nominate, seed) for seed in args.seeds for nominate in (False, True)]
    for r in runs:
        placed = f"placed at step {r.placed_at}" if r.placed_at is not None else f"not placed in {args.steps} steps"
        print(f"nominate={str(r.nominate):5} seed={r.seed}: gang {placed}; idle accelerator-steps on nominated "
              f"nodes {r.idle_accelerator_steps}; arrivals waiting {r.arrivals_waiting}; single-shard place() "
              f"placing {_ms(r.decide_ms)}, refused {_ms(r.refused_ms)}; violations {r.violations}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"},
                       "runs": [asdict(r) for r in runs]}, f)
    return 0 if all(r.violations in (None, 0) for r in runs) else 1


def _ms(values: list[float]) -> str:
    return f"{len(values)}x p50 {percentile(values, 50):.2f} ms p99 {percentile(values, 99):.2f} ms" if values else "none"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("headofline", help="a gang behind a stream of single-shard arrivals on a full cluster: "
                                          "steps until placed, with and without nominations")
    p.add_argument("--nodes", type=int, default=256, help="4-accelerator nodes, 16 a rack")
    p.add_argument("--gang", type=int, default=32, help="shards of one accelerator, in one rack")
    p.add_argument("--steps", type=int, default=20000, help="departures (each with one arrival) at most")
    p.add_argument("--nominate-after", type=int, default=10, help="steps the gang waits before nodes are nominated")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--check", action="store_true", help="grade the final state with the independent checker")
    p.add_argument("--json", help="write the runs here")
    p.set_defaults(func=main)


if __name__ == "__main__":
    sys.exit(main(argparse.ArgumentParser().parse_args()))
