"""Decisions per second: the warm session (`scheduler/session.py`) against one `solve()` per
arrival, on the Maia-shaped synthetic clusters of `bench/synthetic.py`.

Per size, in a child process:
1. the background arrivals of `bench synthetic` (until `--fill` of the accelerators are
   requested) are placed by the independent best-fit greedy (`bench/greedy.py`, fast), and
   the session is loaded from that state once (timed: what a controller pays at start);
2. from that state, `--arrivals` further arrivals go through the session, one `place()` each;
3. from the same state, the first `--solve-arrivals` of them go through `solve()`, one call per
   arrival on the whole cluster document (what a scheduler without a session does);
4. `--departures` background deployments leave (`release()`), timed;
5. the session's final state is graded by the independent checker (per-node, domain, tenant
   rules) when `--check` is given.
With `--shapes`, steps 2-4 give way to the cost of one decision per shard shape (issue 8: "a
decision costs the decision"): from the loaded state, a stream of single-shard fractional and
whole-accelerator deployments and gangs of 8 and 64 shards, interleaved, one `place()` each,
timed per decision and per shard placed (`--shape-arrivals` of each).
Both sides start from the same state and see the same arrivals; what they place may differ a
little (single-shard scoring learns the workload from what each has seen).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.fgd import percentile
from bench.greedy import BestFitGreedy
from bench.synthetic import ACCELERATORS, arrival, child_json, cluster, requested

CHECKED_RULES = ("INDICES", "EXCLUSIVE_ACCELERATOR", "SHARED_ACCELERATOR", "HBM", "CPU",
                 "MEMORY", "NODE_STATE", "LOCALITY", "ISOLATION", "EXCLUSION", "ZONE",
                 "QUOTA_ACCELERATORS", "QUOTA_POWER", "POWER_RACK", "POWER_ROW", "GANG")


@dataclass
class SessionResult:
    nodes: int
    load_ms: float
    background: int  # shards loaded
    background_s: float  # the greedy's time to place them
    session_ms: list[float]
    session_placed: int
    solve_ms: list[float]
    solve_placed: int
    session_placed_prefix: int  # of the arrivals solve() also saw
    release_ms: list[float]
    violations: int | None = None
    # --shapes: per shape, ms of each place() (wall clock and the thread's CPU) and the
    # shards it placed
    shape_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    shape_cpu_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    shape_shards: dict[str, list[int]] = dataclasses.field(default_factory=dict)


# --shapes: the decisions timed, as (shape, `synthetic.arrival` kind, weight in the stream)
SHAPES = (("fraction", "fraction", 8), ("whole", "node", 8), ("gang8", "gang8", 2),
          ("gang64", "gang64", 1))


def shape_arrival(rng: random.Random, i: int, shape: str, kind: str) -> dict[str, Any]:
    """A deployment of one replica of this shape (single shards: one accelerator or less)."""
    d = arrival(rng, i, kind)
    if kind in ("fraction", "node"):
        d = {**d, "id": f"dep{i:06d}-{shape}", "replicas": 1,
             "shard": {**d["shard"], "accelerators": 1,
                       "cpu_milli": min(d["shard"]["cpu_milli"], 4000),
                       "memory_mib": min(d["shard"]["memory_mib"], 32768)}}
    return d


def shape_stream(rng: random.Random, first: int, per_shape: int) -> list[tuple[str, dict]]:
    """`per_shape` x weight arrivals of every shape, interleaved (a gang every few singles)."""
    stream: list[tuple[str, dict]] = []
    counts = {shape: 0 for shape, _, _ in SHAPES}
    while any(counts[shape] < per_shape * w for shape, _, w in SHAPES):
        for shape, kind, w in SHAPES:
            for _ in range(w):
                if counts[shape] < per_shape * w:
                    stream.append((shape, shape_arrival(rng, first + len(stream), shape, kind)))
                    counts[shape] += 1
    return stream


def measure(n_nodes: int, args: argparse.Namespace) -> SessionResult:
    from scheduler import Options, problem_from_dict, solve
    from scheduler.session import Session

    rng = random.Random(args.seed)
    doc = cluster(n_nodes, args.seed)
    if args.no_budgets:  # no rack or row binds: most nodes with room are candidates
        doc = {**doc, "racks": [{**r, "power_budget_w": 1e12} for r in doc["racks"]],
               "rows": [{**r, "power_budget_w": 1e12} for r in doc["rows"]]}
    capacity = ACCELERATORS * len(doc["nodes"])
    background: list[dict[str, Any]] = []
    total = 0.0
    shards = 0
    while total < args.fill * capacity and (args.placements is None or shards < args.placements):
        background.append(arrival(rng, len(background)))
        total += requested(background[-1])
        shards += background[-1]["replicas"] * background[-1]["shards_per_replica"]
    later = [arrival(rng, len(background) + i) for i in range(args.arrivals)]
    shaped = shape_stream(rng, len(background) + len(later), args.shape_arrivals) if args.shapes else []
    t0 = time.perf_counter()
    greedy = BestFitGreedy({**doc, "deployments": background})  # 1.
    for d in background:
        greedy.place(d)
    background_s = time.perf_counter() - t0
    running = {p["deployment"] for p in greedy.placements}
    loaded = problem_from_dict({**doc, "deployments": [d for d in background
                                                       if d["id"] in running],
                                "placements": greedy.placements,
                                "options": {"mode": "online"}})
    deps = {d.id: d for d in problem_from_dict(
        {**doc, "deployments": background + later + [d for _, d in shaped]}).deployments}
    t0 = time.perf_counter()
    session = Session(loaded, time_limit_ms=args.time_limit_ms)
    load_ms = 1000 * (time.perf_counter() - t0)
    if args.shapes:
        return measure_shapes(session, shaped, deps, len(doc["nodes"]), load_ms,
                              len(greedy.placements), background_s, args)
    start = session.snapshot()

    session_ms: list[float] = []  # 2.
    placed: list[bool] = []
    for d in later:
        t = time.perf_counter()
        decision = session.place(deps[d["id"]])
        session_ms.append(1000 * (time.perf_counter() - t))
        placed.append(bool(decision.placements))

    # 3. one solve() per arrival, carrying its placements forward like a controller would
    current = start.placements
    running = {p.deployment for p in current}
    holding = {d.id: d for d in start.deployments if d.id in running}
    solve_ms: list[float] = []
    solve_placed = 0
    for d in later[:args.solve_arrivals]:
        new = deps[d["id"]]
        problem = dataclasses.replace(start, placements=current,
                                      deployments=(*holding.values(), new),
                                      options=Options(mode="online"))
        t = time.perf_counter()
        plan = solve(problem, time_limit_ms=args.time_limit_ms)
        solve_ms.append(1000 * (time.perf_counter() - t))
        current = plan.placements
        if any(p.deployment == new.id for p in current):
            holding[new.id] = new
            solve_placed += 1

    release_ms: list[float] = []  # 4.
    leaving = rng.sample(sorted(running), min(args.departures, len(running)))
    for dep_id in leaving:
        t = time.perf_counter()
        session.release(dep_id)
        release_ms.append(1000 * (time.perf_counter() - t))

    violations = check_session(session) if args.check else None  # 5.

    return SessionResult(len(doc["nodes"]), load_ms, len(greedy.placements), background_s,
                         session_ms, sum(placed), solve_ms, solve_placed,
                         sum(placed[:args.solve_arrivals]), release_ms, violations)


def check_session(session: Any) -> int:
    """Violations the independent checker finds in the session's state (a few printed)."""
    from pathlib import Path

    from scheduler import plan_to_dict, problem_to_dict
    from scheduler.model import Plan
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scheduler"))
    from checker import check_plan  # type: ignore[import-not-found]
    final = session.snapshot()
    vs = check_plan(problem_to_dict(final),
                    plan_to_dict(Plan(status="feasible", placements=final.placements)),
                    rules=CHECKED_RULES)
    for v in vs[:5]:
        print(f"    violation: {v}", file=sys.stderr)
    return len(vs)


def measure_shapes(session: Any, shaped: list[tuple[str, dict]], deps: dict[str, Any],
                   nodes: int, load_ms: float, background: int, background_s: float,
                   args: argparse.Namespace) -> SessionResult:
    """--shapes: one timed `place()` per arrival of the interleaved shape stream."""
    shape_ms: dict[str, list[float]] = {shape: [] for shape, _, _ in SHAPES}
    shape_cpu_ms: dict[str, list[float]] = {shape: [] for shape, _, _ in SHAPES}
    shape_shards: dict[str, list[int]] = {shape: [] for shape, _, _ in SHAPES}
    profile = None
    if args.profile:
        import cProfile
        profile = cProfile.Profile()
    for shape, d in shaped:
        dep = deps[d["id"]]
        if profile is not None:
            profile.enable()
        t, c = time.perf_counter(), time.thread_time()
        decision = session.place(dep)
        ms, cpu = 1000 * (time.perf_counter() - t), 1000 * (time.thread_time() - c)
        if profile is not None:
            profile.disable()
        shape_ms[shape].append(ms)
        shape_cpu_ms[shape].append(cpu)
        shape_shards[shape].append(len(decision.placements))
    if profile is not None:
        profile.dump_stats(args.profile)
    violations = None
    if args.check:
        violations = check_session(session)
    return SessionResult(nodes, load_ms, background, background_s, [], 0, [], 0, 0, [],
                         violations, shape_ms, shape_cpu_ms, shape_shards)


def format_shapes(results: list[SessionResult]) -> str:
    """Per size and shape: place() p50/p99 ms (wall and CPU), CPU per shard placed, the
    decisions/s its CPU time allows, and how many placed of those tried."""
    lines = [f"{'nodes':>6} {'shards loaded':>13} {'shape':>8} {'wall p50/p99 ms':>17} "
             f"{'cpu p50/p99 ms':>17} {'cpu/shard p50 ms':>16} {'cpu decisions/s':>15} "
             f"{'placed':>9}"]
    for r in results:
        for shape, ms in r.shape_ms.items():
            cpu, shards = r.shape_cpu_ms[shape], r.shape_shards[shape]
            per = [m / s for m, s in zip(cpu, shards) if s]
            placed = sum(1 for s in shards if s)
            rate = 1000 * len(cpu) / sum(cpu) if sum(cpu) > 0 else 0.0
            lines.append(f"{r.nodes:>6} {r.background:>13} {shape:>8} "
                         f"{percentile(ms, 50):>8.2f}/{percentile(ms, 99):<8.2f} "
                         f"{percentile(cpu, 50):>8.2f}/{percentile(cpu, 99):<8.2f} "
                         f"{percentile(per, 50) if per else 0:>16.3f} {rate:>15.0f} "
                         f"{f'{placed}/{len(ms)}':>9}")
    return "\n".join(lines)


def format_rows(results: list[SessionResult]) -> str:
    def pp(v: list[float]) -> str:
        return f"{percentile(v, 50):.1f}/{percentile(v, 99):.1f}" if v else "-"

    def rate(v: list[float]) -> float:
        return 1000 * len(v) / sum(v) if v and sum(v) > 0 else 0.0

    head = (f"{'nodes':>6} {'load ms':>8} {'bg shards':>9} "
            f"{'session p50/p99 ms':>18} {'session /s':>10} {'solve p50/p99 ms':>17} "
            f"{'solve /s':>8} {'x':>6} {'placed s/solve':>14} {'release p50 ms':>14}")
    lines = [head]
    for r in results:
        lines.append(
            f"{r.nodes:>6} {r.load_ms:>8.0f} {r.background:>9} "
            f"{pp(r.session_ms):>18} {rate(r.session_ms):>10.0f} {pp(r.solve_ms):>17} "
            f"{rate(r.solve_ms):>8.1f} {rate(r.session_ms) / max(rate(r.solve_ms), 1e-9):>6.0f} "
            f"{f'{r.session_placed_prefix}/{r.solve_placed} of {len(r.solve_ms)}':>14} "
            f"{percentile(r.release_ms, 50) if r.release_ms else 0:>14.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(dataclasses.asdict(measure(args.nodes[0], args))))
        return 0
    results = []
    for n in args.nodes:
        cmd = [sys.executable, "-m", "bench", "session", "--child", "--nodes", str(n),
               "--seed", str(args.seed), "--fill", str(args.fill), "--arrivals",
               str(args.arrivals), "--solve-arrivals", str(args.solve_arrivals),
               "--departures", str(args.departures), "--time-limit-ms",
               str(args.time_limit_ms), "--shape-arrivals", str(args.shape_arrivals)] \
            + (["--check"] if args.check else []) + (["--shapes"] if args.shapes else []) \
            + ([] if args.placements is None else ["--placements", str(args.placements)]) \
            + (["--no-budgets"] if args.no_budgets else []) \
            + ([] if not args.profile else ["--profile", f"{args.profile}.{n}"])
        r = SessionResult(**child_json(cmd, n))
        if r.violations:
            print(f"  {n} nodes: {r.violations} checker violations", file=sys.stderr)
        results.append(r)
    print(format_shapes(results) if args.shapes else format_rows(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return 1 if any(r.violations for r in results) else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("session", help="decisions/s: the warm session vs one solve() per "
                       "arrival on synthetic clusters")
    p.add_argument("--nodes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--fill", type=float, default=0.7, help="accelerators requested first")
    p.add_argument("--arrivals", type=int, default=500, help="timed session decisions")
    p.add_argument("--solve-arrivals", type=int, default=40,
                   help="of those, how many also go through one solve() each")
    p.add_argument("--departures", type=int, default=200)
    p.add_argument("--time-limit-ms", type=int, default=2000)
    p.add_argument("--placements", type=int, default=None,
                   help="stop the background stream at about this many shards (and --fill)")
    p.add_argument("--no-budgets", action="store_true",
                   help="rack and row power budgets that never bind")
    p.add_argument("--shapes", action="store_true",
                   help="time one decision per shape (fraction, whole, gang8, gang64) instead")
    p.add_argument("--shape-arrivals", type=int, default=10,
                   help="with --shapes: arrivals per shape and stream weight (8/8/2/1)")
    p.add_argument("--profile", help="with --shapes: cProfile of the place() calls to FILE.N")
    p.add_argument("--check", action="store_true")
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=main)
