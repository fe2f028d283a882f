"""Gangs waiting behind a stream of single-shard arrivals: with and without head-of-line
nominations (`scheduler.model.Nomination`, controller/scheduling/nominations.py).

A full cluster (every accelerator held by a single-accelerator deployment), gangs waiting for
room (`--gangs`, in `--zones` zones), and churn: each step one running deployment (chosen at
random) leaves, one new arrives, and the gangs are tried again, all on one warm `Session` as the
controller's fast path drives it. Without nominations each freed accelerator goes to the next
arrival and a gang waits for a coincidence; with them the session nominates nodes for it
(`Session.nominees`) once it has waited `--nominate-after` steps, arrivals go elsewhere (or wait:
the cluster is full), and what frees on the nominated nodes stays free until the gang fits.
`--policies`: `off`, `one` (one gang holds nodes at a time, cluster-wide: the controller's first
policy) and `zone` (one a zone, in zones no other gang holds nodes in: the controller's now).

Reported per policy and seed: the step each gang was placed at and the last (or that not all
were within `--steps`), how many gangs held nodes at once, the accelerator-steps the nominated
nodes stood idle meanwhile (what the nominations cost the others), the arrivals left waiting, and
the cost of one single-shard decision (`place()`) with a nomination in force against without
one, those that placed apart from those refused (an arrival with nowhere to go has its reasons
worded). With `--check` each gang's placement and the final state are graded by the independent
checker.
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


POLICIES = ("off", "one", "zone")


@dataclass
class Run:
    policy: str  # off: no nominations; one: one at a time, cluster-wide; zone: one a zone (the controller's)
    seed: int
    placed_at: int | None = None  # step the last gang was placed at (None: not all within the steps)
    gangs_placed_at: list[int | None] = field(default_factory=list)  # each gang's
    most_nominated: int = 0  # gangs holding nominated nodes at once, at most
    idle_accelerator_steps: int = 0  # free accelerators on nominated nodes, summed over the steps
    arrivals_waiting: int = 0  # arrivals not placed when the run ended
    decide_ms: list[float] = field(default_factory=list)  # single-shard place() that placed, wall clock
    refused_ms: list[float] = field(default_factory=list)  # ... that placed nothing (its reasons worded)
    violations: int | None = None


def cluster(nodes: int, zones: int = 1) -> tuple[dict[str, Any], list[str]]:
    """`nodes` 4-accelerator nodes, 16 a rack, the racks split evenly among `zones` (a row each),
    every accelerator held by a one-accelerator deployment."""
    docs, deployments, placements = [], [], []
    racks = -(-nodes // PER_RACK)
    for i in range(nodes):
        nid = f"n{i:05d}"
        docs.append({"id": nid, "rack": f"r{i // PER_RACK:04d}", "accelerators": ACCELERATORS})
        for a in range(ACCELERATORS):
            name = f"bg{i:05d}-{a}"
            deployments.append(_single(name))
            placements.append({"deployment": name, "replica": 0, "shard": 0, "node": nid, "accelerator_indices": [a]})
    problem = {"version": 1, "zones": [{"id": f"z{z}"} for z in range(zones)],
               "rows": [{"id": f"w{z}", "zone": f"z{z}"} for z in range(zones)],
               "racks": [{"id": f"r{r:04d}", "row": f"w{r * zones // racks}"} for r in range(racks)],
               "nodes": docs, "deployments": deployments, "placements": placements, "options": {"mode": "online"}}
    return problem, [d["id"] for d in deployments]


def _single(name: str) -> dict[str, Any]:
    return {"id": name, "tenant": "bg", "replicas": 1, "shards_per_replica": 1, "shard": {"accelerators": 1},
            "locality": "node"}


def run(args: argparse.Namespace, policy: str, seed: int) -> Run:
    doc, running = cluster(args.nodes, args.zones)
    gangs = [f"gang{g}" for g in range(args.gangs)]
    for gang in gangs:
        doc["deployments"].append({"id": gang, "tenant": "lab", "replicas": 1, "shards_per_replica": args.gang,
                                   "shard": {"accelerators": 1}, "locality": "rack"})
    session = Session(problem_from_dict(doc))
    where = {p["deployment"]: p["node"] for p in doc["placements"]}  # running deployment -> its node
    out = Run(policy=policy, seed=seed)
    rng = random.Random(seed)
    waiting: list[str] = []
    held: dict[str, tuple[str, ...]] = {}  # gang -> its nominated nodes, in the order nominated
    before: dict[str, Problem] = {}  # the state when a gang's nodes were nominated (what --check judges against)
    placed: dict[str, int] = {}
    violations = 0

    def nominate() -> None:
        session.nominate([Nomination(gang, 0, nodes) for gang, nodes in held.items()])

    for step in range(args.steps):
        # As the controller's policy (controller/scheduling/nominations.py) after --nominate-after:
        # one at a time ("one", as it was), or one a zone ("zone": nodes in zones no other holds).
        for gang in gangs if policy != "off" and step >= args.nominate_after else ():
            if gang in placed or gang in held:
                continue
            if policy == "one" and held:
                break
            nodes = session.nominees(gang, policy == "zone")
            if nodes:
                held[gang] = tuple(sorted(nodes))
                nominate()
                before[gang] = session.snapshot()
        out.most_nominated = max(out.most_nominated, len(held))
        gone = running.pop(rng.randrange(len(running)))
        session.release(gone)
        del where[gone]
        # As the controller's fast path orders them: what waits (the gangs first, the oldest),
        # then the arrival.
        for gang in gangs:
            if gang not in placed and session.place(gang).placements:
                placed[gang] = step
                if args.check and gang in held:
                    violations += len(_violations(session.snapshot(), before[gang], gang))
                if held.pop(gang, None) is not None:
                    nominate()
        if len(placed) == len(gangs):
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
        if held:
            nominated = {node for nodes in held.values() for node in nodes}
            used = sum(1 for node in where.values() if node in nominated)
            out.idle_accelerator_steps += ACCELERATORS * len(nominated) - used
    out.gangs_placed_at = [placed.get(gang) for gang in gangs]
    out.arrivals_waiting = len(waiting)
    if args.check:
        final = session.snapshot()
        out.violations = violations + sum(len(_violations(final, before[gang], gang)) for gang in held) + \
            len(_violations(final, None, None))
    return out


def _violations(final: Problem, before: Problem | None, gang: str | None) -> list[Any]:
    """The independent checker on the final state, as a plan of everything running: what one
    node, rack or gang holds; and, against the state when a gang's nodes were nominated, that
    nothing placed since (but the gang) landed on them (NODE_STATE)."""
    from tests.scheduler.checker import check_plan  # the independent checker (tests/scheduler)
    live = {d.id for d in final.deployments}
    kept = tuple(p for p in before.placements if p.deployment in live) if before is not None else ()
    nominations = () if before is None else tuple(n for n in before.nominations if n.deployment == gang)
    problem = dataclasses.replace(final, placements=kept, nominations=nominations)
    plan = Plan(status="feasible", placements=final.placements, unplaced=())
    rules = ("INDICES", "EXCLUSIVE_ACCELERATOR", "LOCALITY", "GANG", "NODE_STATE")
    return check_plan(problem_to_dict(problem), plan_to_dict(plan), validate_schema=False, rules=rules)


def main(args: argparse.Namespace) -> int:
    runs = [run(args, policy, seed) for seed in args.seeds for policy in args.policies]
    for r in runs:
        placed = (f"all placed at step {r.placed_at}" if r.placed_at is not None
                  else f"not all placed in {args.steps} steps")
        each = ", ".join("-" if at is None else str(at) for at in r.gangs_placed_at)
        print(f"policy={r.policy:4} seed={r.seed}: gangs {placed} (each: {each}); at most {r.most_nominated} "
              f"nominated at once; idle accelerator-steps on nominated nodes {r.idle_accelerator_steps}; arrivals "
              f"waiting {r.arrivals_waiting}; single-shard place() placing {_ms(r.decide_ms)}, refused "
              f"{_ms(r.refused_ms)}; violations {r.violations}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"},
                       "runs": [asdict(r) for r in runs]}, f)
    return 0 if all(r.violations in (None, 0) for r in runs) else 1


def _ms(values: list[float]) -> str:
    return f"{len(values)}x p50 {percentile(values, 50):.2f} ms p99 {percentile(values, 99):.2f} ms" if values else "none"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("headofline", help="gangs behind a stream of single-shard arrivals on a full cluster: "
                                          "steps until placed, with and without nominations")
    p.add_argument("--nodes", type=int, default=256, help="4-accelerator nodes, 16 a rack")
    p.add_argument("--gang", type=int, default=32, help="shards of one accelerator, in one rack, a gang")
    p.add_argument("--gangs", type=int, default=1, help="gangs waiting")
    p.add_argument("--zones", type=int, default=1, help="zones the racks are split among")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=["off", "zone"],
                   help="off: no nominations; one: one gang at a time, cluster-wide; zone: one a zone (the "
                        "controller's)")
    p.add_argument("--steps", type=int, default=20000, help="departures (each with one arrival) at most")
    p.add_argument("--nominate-after", type=int, default=10, help="steps a gang waits before nodes are nominated")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--check", action="store_true", help="grade the final state with the independent checker")
    p.add_argument("--json", help="write the runs here")
    p.set_defaults(func=main)


if __name__ == "__main__":
    sys.exit(main(argparse.ArgumentParser().parse_args()))
