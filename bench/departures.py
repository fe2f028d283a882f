"""Departures: the openb trace's pods arriving *and* leaving (the second protocol).

The FGD protocol only adds pods; a real cluster also loses them. Here each arrival is a pod of
the workload drawn with replacement (seeded), and once placed it runs for that pod's trace
lifetime (`deletion_time - creation_time`) and leaves. The trace's own creation times are far
too sparse to load the cluster (on `default`, at most ~66 of 6,212 GPUs are ever requested at
once), so arrival times are a Poisson process over a window (`WINDOW_S`, half an hour of
trace time by default) at the rate that makes the offered GPU demand (what the arrivals would
hold if nothing waited) average `load` x capacity over the window's second half, which is
what is measured (the first half fills the cluster). Lifetimes run from a few seconds to days,
so pods that live longer than the window never leave: it models a busy half hour of a cluster
whose short jobs churn over long-running services.

A new pod is tried at once; one that does not fit waits in a queue, and after every departure
the queue is retried in arrival order (stopping after `MAX_RETRY_MISSES` misses in a row, as a
real scheduler's backoff would). With `maia+moves`, at most every `rebalance_every` seconds a
departure that leaves the queue's head waiting may also move running pods (at most
`max_moves` shards, the solver's rebalance trial `scheduler.room.make_room`) to fit it.

Policies: `maia` (the solver's online placer: FGD score, model pressure), `maia+moves` (the
same with moves), `bestfit` (the solver's placer with plain best-fit scoring, as
`MAIA_SCORER=bestfit`). Reported: time-averaged GPU allocation, pods waiting (time-averaged),
pods that waited and how long, pods still waiting at the end, moves; and at `samples` evenly
spaced moments, the allocation next to what an offline re-pack of the pods present then
(running + waiting) could reach (`bench.bound`: CPU, memory and node boundaries relaxed, so an
upper limit).
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from bench import traces
from bench.fgd import capacity_milli, cluster_doc, pod_deployment

WINDOW_S = 1800.0  # seconds of arrivals; the second half is measured
MAX_RETRY_MISSES = 4  # waiting pods tried after a departure before giving up on the queue
POLICIES = ("maia", "maia+moves", "bestfit")

Doc = dict[str, Any]


@dataclass(frozen=True)
class Job:
    pod: traces.TracePod
    arrive: float  # compressed trace time (s)
    lifetime: float  # trace lifetime (s), kept


@dataclass
class ReplayResult:
    workload: str
    policy: str
    seed: int
    load: float
    jobs: int
    horizon_s: float  # the measured half of the arrival window
    alloc_pct: float  # time-averaged share of GPU capacity allocated
    waiting_avg: float  # time-averaged pods waiting
    waited: int  # pods arriving in the measured half that had to wait
    wait_mean_s: float  # over pods that waited and then ran
    wait_p95_s: float
    never_placed: int  # of those, still waiting when the arrivals end
    moves: int
    seconds: float
    moments: list[tuple[float, float, float]] = field(default_factory=list)  # (t, alloc %, re-pack %)
    placements: list[Doc] = field(default_factory=list, repr=False)  # state at the window's end
    deployments: list[Doc] = field(default_factory=list, repr=False)


def make_jobs(pods: list[traces.TracePod], lifetimes: list[tuple[int, int]], capacity: int,
              load: float, seed: int, window_s: float = WINDOW_S) -> list[Job]:
    """Poisson arrivals over [0, window_s] of pods drawn with replacement, at the rate that
    makes the offered demand average load x capacity over the window's second half."""
    life = [float(max(deleted - created, 1)) for created, deleted in lifetimes]
    demand = [p.gpu_request_milli for p in pods]
    # Expected demand one arrival still holds t seconds later is E[request x min(lifetime, t)];
    # pods arriving at rate r since time 0 offer r x that integral at time t.
    ts = [window_s * (0.5 + 0.5 * k / 19) for k in range(20)]
    held = statistics.mean(sum(d * min(l, t) for d, l in zip(demand, life)) / len(pods)
                           for t in ts)
    rate = load * capacity / max(held, 1e-9)  # arrivals per second
    rng = random.Random(seed)
    jobs: list[Job] = []
    t = rng.expovariate(rate)
    while t <= window_s:
        i = rng.randrange(len(pods))
        jobs.append(Job(pods[i], t, life[i]))
        t += rng.expovariate(rate)
    return jobs


class Replay:
    """One policy over one job list: the solver's cycle state driven event by event."""

    def __init__(self, nodes: list[traces.TraceNode], jobs: list[Job], policy: str,
                 max_moves: int, rebalance_every: float, batch_size: int = 1,
                 defer: bool = True) -> None:
        from scheduler import problem_from_dict
        from scheduler.greedy import Placer
        from scheduler.solve import Solver
        self.jobs = jobs
        self.policy = policy
        self.max_moves = max_moves if policy == "maia+moves" else 0
        self.deployments = [pod_deployment(i, j.pod) for i, j in enumerate(jobs)]
        doc = {**cluster_doc(nodes), "deployments": self.deployments}
        self.solver = Solver(problem_from_dict(doc, validate=False), None)
        if policy == "bestfit":
            self.solver.placer = Placer(self.solver.state, scorer="bestfit",
                                        workload=self.solver.workload)
        self.solver.deadline = float("inf")  # moves are bounded by max_moves, not a clock
        self.capacity = capacity_milli(nodes)
        self.started: dict[int, float] = {}
        self.waiting: list[int] = []  # FIFO
        self.allocated = 0  # GPU milli held now
        self.moves = 0
        self.rebalance_every = rebalance_every
        self.last_rebalance = float("-inf")
        # Batches (maia policies, batch_size > 1): arrivals held until `batch_size` of them
        # are decided together (`online_batch.place_batch`, deferral included with `defer`).
        self.batch_size = batch_size if policy != "bestfit" else 1
        self.defer = defer
        self.held: list[int] = []
        self.batches = 0

    def arrive(self, i: int, now: float) -> list[int]:
        """A new pod: tried at once (it may pass pods waiting for room it does not need), or
        held for its batch; returns the pods that started."""
        if self.batch_size > 1:
            self.held.append(i)
            return self.decide_batch(now) if len(self.held) >= self.batch_size else []
        self.solver.workload.observe(self.solver.state.deps[i].shard, 1)
        if self.try_place(i, now):
            return [i]
        self.waiting.append(i)
        return []

    def decide_batch(self, now: float) -> list[int]:
        """The held arrivals decided together; what the batch left (no room, or deferred)
        waits; returns the pods that started."""
        from scheduler.online_batch import place_batch
        group, self.held = self.held, []
        place_batch(self.solver, group, self.batches, defer=self.defer)
        self.batches += 1
        placed = [i for i in group if (i, 0) in self.solver.state.replicas]
        for i in group:
            if i in placed:
                self._started(i, now)
            else:
                self.waiting.append(i)
        return placed

    def try_place(self, i: int, now: float) -> bool:
        """Place pod i now if it fits (with batches and `defer`, not as a big fraction
        opening one of the last empty accelerators: `defer.defer_openers`, as a batch would
        decide it)."""
        from scheduler.defer import defer_openers, tight
        squeezed = tight(self.solver) if self.batch_size > 1 and self.defer else None
        if not self.solver.placer.place_deployment(i, [0]):
            return False
        if squeezed is not None and defer_openers(self.solver, [i], squeezed):
            return False  # taken out again (a changed node is re-scored: no adopt needed)
        self._started(i, now)
        return True

    def _started(self, i: int, now: float) -> None:
        self.started[i] = now
        self.allocated += self.jobs[i].pod.gpu_request_milli

    def leave(self, i: int) -> None:
        self.solver.state.remove_replica(i, 0)
        self.allocated -= self.jobs[i].pod.gpu_request_milli

    def retry(self, now: float) -> list[int]:
        """Waiting pods, in arrival order, that fit now (bounded misses); returns them."""
        placed, misses, still = [], 0, []
        for k, i in enumerate(self.waiting):
            if misses >= MAX_RETRY_MISSES:
                still.extend(self.waiting[k:])
                break
            if self.try_place(i, now):
                placed.append(i)
                misses = 0
            else:
                still.append(i)
                misses += 1
        self.waiting = still
        if self.waiting and self.max_moves and now - self.last_rebalance >= self.rebalance_every:
            self.last_rebalance = now
            head = self.waiting[0]
            if self.make_room(head, now):
                placed.append(head)
                self.waiting.pop(0)
        return placed

    def make_room(self, i: int, now: float) -> bool:
        """Move running pods (at most max_moves shards) so that pod i fits."""
        from scheduler.room import TrialBudget, make_room
        from scheduler.solve import ROOM_TRIALS
        solver = self.solver
        eligible = [v for v in solver.state.replicas if v[0] != i]
        found = make_room(solver, i, eligible, relocate=True, budget=self.max_moves,
                          trials=TrialBudget(ROOM_TRIALS))
        if found is None:
            return False
        trial, _, moved = found
        solver.adopt(trial)
        self.moves += moved
        self._started(i, now)
        return True

    def placements(self) -> list[Doc]:
        topo = self.solver.topo
        out = []
        for (d, r), shards in sorted(self.solver.state.replicas.items()):
            frac = self.solver.state.deps[d].shard.fractional
            for s, at in sorted(shards.items()):
                p: Doc = {"deployment": self.deployments[d]["id"], "replica": r, "shard": s,
                          "node": topo.node_ids[at.node],
                          "accelerator_indices": list(at.indices)}
                if frac:
                    p["accelerator_milli"] = at.milli
                out.append(p)
        return out


def replay(workload: str, nodes: list[traces.TraceNode], jobs: list[Job], policy: str, *,
           seed: int, load: float, max_moves: int = 4, rebalance_every: float = 60.0,
           samples: int = 4, repack: bool = True, batch_size: int = 1,
           defer: bool = True) -> ReplayResult:
    """Run the event loop over the arrival window and measure its second half."""
    t0 = time.perf_counter()
    sim = Replay(nodes, jobs, policy, max_moves, rebalance_every, batch_size, defer)
    end = jobs[-1].arrive if jobs else 0.0
    start = end / 2
    moments = [start + (end - start) * (k + 1) / (samples + 1) for k in range(samples)]
    seen: list[tuple[float, float, list[int]]] = []  # (t, alloc milli, pods present)
    events: list[tuple[float, int, int]] = [(j.arrive, 1, i) for i, j in enumerate(jobs)]
    heapq.heapify(events)  # (time, 0 = departure / 1 = arrival, job): departures first
    last, alloc_area, wait_area = start, 0.0, 0.0
    while events and events[0][0] <= end:
        now, kind, i = heapq.heappop(events)
        if now > start:
            alloc_area += sim.allocated * (now - last)
            wait_area += (len(sim.waiting) + len(sim.held)) * (now - last)
            last = now
        while moments and moments[0] <= now:
            moments.pop(0)
            present = [d for d, _ in sim.solver.state.replicas] + sim.waiting
            seen.append((now, sim.allocated, present))
        if kind == 1:
            started = sim.arrive(i, now)
        else:
            sim.leave(i)
            started = sim.retry(now)
        for s in started:
            heapq.heappush(events, (now + jobs[s].lifetime, 0, s))
    alloc_area += sim.allocated * (end - last)
    wait_area += (len(sim.waiting) + len(sim.held)) * (end - last)
    sim.waiting += sim.held  # a batch not yet full at the end: still waiting
    late = [i for i in sim.started if jobs[i].arrive >= start]
    waits = [sim.started[i] - jobs[i].arrive for i in late if sim.started[i] > jobs[i].arrive]
    still = [i for i in sim.waiting if jobs[i].arrive >= start]
    span = max(end - start, 1e-9)
    moments_out = []
    for t, alloc, present in seen:
        limit = float("nan")
        if repack:
            from bench.bound import packing_bound
            b = packing_bound(nodes, [jobs[i].pod for i in present], time_limit_s=60.0)
            limit = 100.0 * b.milli / sim.capacity
        moments_out.append((t, 100.0 * alloc / sim.capacity, limit))
    return ReplayResult(
        workload, policy, seed, load, len(jobs), span,
        100.0 * alloc_area / (sim.capacity * span), wait_area / span,
        len(waits) + len(still), statistics.mean(waits) if waits else 0.0,
        _p95(waits), len(still), sim.moves, time.perf_counter() - t0, moments_out,
        sim.placements(), sim.deployments)


def _p95(values: list[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def format_table(workload: str, load: float, results: dict[str, list[ReplayResult]]) -> str:
    lines = [f"workload {workload}, offered load {load:.2f} x GPU capacity, arrivals and "
             f"departures (means over seeds; alloc: time-averaged GPU allocation, higher is "
             f"better)",
             f"  {'policy':<14}{'alloc %':>9}{'waiting':>9}{'waited':>8}{'wait s':>9}"
             f"{'p95 s':>9}{'left':>6}{'moves':>7}{'at moments':>12}{'re-pack':>9}"]
    for policy, runs in results.items():
        def mean(get: Any) -> float:
            return statistics.mean(get(r) for r in runs)
        at = [m[1] for r in runs for m in r.moments]
        limit = [m[2] for r in runs for m in r.moments]
        lines.append(
            f"  {policy:<14}{mean(lambda r: r.alloc_pct):>9.2f}"
            f"{mean(lambda r: r.waiting_avg):>9.1f}{mean(lambda r: r.waited):>8.0f}"
            f"{mean(lambda r: r.wait_mean_s):>9.0f}{mean(lambda r: r.wait_p95_s):>9.0f}"
            f"{mean(lambda r: r.never_placed):>6.0f}{mean(lambda r: r.moves):>7.0f}"
            f"{statistics.mean(at) if at else float('nan'):>12.2f}"
            f"{statistics.mean(limit) if limit else float('nan'):>9.2f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", nargs="+", default=["default"])
    p.add_argument("--seeds", default="42-44")
    p.add_argument("--load", type=float, default=1.0,
                   help="offered GPU demand over the measured half of the window, x capacity")
    p.add_argument("--window-s", type=float, default=WINDOW_S, help="seconds of arrivals")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--max-moves", type=int, default=4, help="per departure, for maia+moves")
    p.add_argument("--rebalance-every", type=float, default=60.0,
                   help="seconds of trace time between two move attempts (maia+moves)")
    p.add_argument("--samples", type=int, default=4, help="moments re-packed offline")
    p.add_argument("--no-repack", dest="repack", action="store_false")
    p.add_argument("--check", action="store_true",
                   help="grade the state at the window's end with the independent checker")
    p.add_argument("--batch-size", type=int, default=1,
                   help="maia policies: arrivals decided together (online_batch.place_batch)")
    p.add_argument("--no-defer", dest="defer", action="store_false",
                   help="batches never defer big fractions (scheduler/defer.py)")


def main(args: argparse.Namespace) -> int:
    import sys

    from bench.fgd import parse_seeds
    nodes = traces.load_nodes(traces.trace_path(traces.GPU_NODE_LIST))
    cap = capacity_milli(nodes)
    for workload in args.workload:
        path = traces.trace_path(traces.workload_file(workload))
        pods, lifetimes = traces.load_pods(path), traces.load_lifetimes(path)
        results: dict[str, list[ReplayResult]] = {}
        for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
            for seed in parse_seeds(args.seeds):
                jobs = make_jobs(pods, lifetimes, cap, args.load, seed, args.window_s)
                r = replay(workload, nodes, jobs, policy, seed=seed, load=args.load,
                           max_moves=args.max_moves, rebalance_every=args.rebalance_every,
                           samples=args.samples, repack=args.repack,
                           batch_size=args.batch_size, defer=args.defer)
                results.setdefault(policy, []).append(r)
                print(f"  {workload} {policy} seed {seed}: alloc {r.alloc_pct:.2f}%, waiting "
                      f"{r.waiting_avg:.1f}, waited {r.waited}, wait mean {r.wait_mean_s:.0f} s,"
                      f" left {r.never_placed}, moves {r.moves}, moments "
                      + ", ".join(f"{a:.1f}/{b:.1f}" for _, a, b in r.moments)
                      + f" ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
                if args.check:
                    from bench.checking import check_state
                    doc = {**cluster_doc(nodes), "deployments": r.deployments}
                    bad = check_state(doc, r.placements)
                    print(f"    checker: {len(bad)} violations", file=sys.stderr)
        print(format_table(workload, args.load, results))
        print()
    return 0
