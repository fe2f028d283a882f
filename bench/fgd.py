"""The FGD paper's protocol (spec, last section) on the Alibaba openb trace.

Cluster: every node of openb_node_list_gpu_node.csv, 16 to a rack, one row, one zone, one shared
tenant, no power budgets. Per seed: sample pods with replacement until their GPU request reaches
130% of GPU capacity, shuffle, place them online one at a time with no departures (or k per
decision), and report the share of GPU capacity left unallocated when arrived demand reaches
100%.

How the solver is driven (the fastest correct use of the public API we found):
- `single` (default): ONE `solve()` over a problem listing the arrivals in order with
  `options.mode = online` (and `batch_size = k`). The spec defines online mode as exactly this
  protocol: each deployment decided in listed order without knowledge of later ones and never
  moved. Later arrivals cannot change earlier decisions, so solving the arrivals up to the 100%
  point gives the state at 100%; the property test `test_online_decisions_ignore_later_arrivals`
  checks that premise.
- `per-call`: one `solve()` per arrival (or per batch of k, mode `batch`), the way a controller
  would call it, with the placements so far. The problem is parsed once; each call reuses its
  frozen nodes via `dataclasses.replace`. It lists only the deployments that hold placements
  plus the new arrivals (a failed pod is dropped, as in the paper's simulator).
- `session`: one warm `scheduler.session.Session`, one `place()` per arrival (the same decisions
  as `single`, decided one call at a time on the kept state).
The independent greedy baselines of `bench.greedy` (best fit, random fit) run the same arrivals.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from bench import traces
from bench.bound import FULL, Bound
from bench.greedy import BestFitGreedy

Doc = dict[str, Any]
RACK_SIZE = 16
TENANT = "openb"
POLICIES_IN_PAPER = ("01-Random", "02-DotProd", "03-GpuClustering", "04-GpuPacking",
                     "05-BestFit", "06-FGD")


@dataclass(frozen=True)
class RunResult:
    """One seed of one policy: the allocation at the 100% point and what it cost."""

    workload: str
    policy: str
    seed: int
    capacity_milli: int
    arrivals: int  # arrivals decided (up to the report point)
    allocated_milli: int
    decisions: int  # solver calls for per-call, arrivals otherwise
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    deployments: list[Doc] = field(default_factory=list, repr=False)  # the arrivals decided
    placements: list[Doc] = field(default_factory=list, repr=False)  # the resulting state

    @property
    def unallocated_pct(self) -> float:
        return 100.0 * (1.0 - self.allocated_milli / self.capacity_milli)

    @property
    def arrivals_per_s(self) -> float:
        return self.arrivals / self.seconds if self.seconds > 0 else float("inf")


def cluster_doc(nodes: list[traces.TraceNode], rack_size: int = RACK_SIZE) -> Doc:
    """The openb GPU nodes as a problem document without deployments."""
    n_racks = (len(nodes) + rack_size - 1) // rack_size
    doc_nodes = []
    for i, n in enumerate(nodes):
        node: Doc = {"id": n.name, "rack": f"rack{i // rack_size:03d}", "state": "ready",
                     "accelerators": n.gpus, "cpu_milli": n.cpu_milli,
                     "memory_mib": n.memory_mib}
        if n.model:
            node["accelerator_model"] = n.model
        doc_nodes.append(node)
    return {"version": 1, "zones": [{"id": "z"}], "rows": [{"id": "row", "zone": "z"}],
            "racks": [{"id": f"rack{i:03d}", "row": "row"} for i in range(n_racks)],
            "nodes": doc_nodes, "tenants": [{"id": TENANT, "isolation": "shared"}],
            "deployments": [], "placements": [], "options": {"mode": "online"}}


def pod_deployment(index: int, pod: traces.TracePod) -> Doc:
    """One pod as one deployment of one replica of one shard (spec's mapping)."""
    shard: Doc = {"accelerators": pod.num_gpu, "cpu_milli": pod.cpu_milli,
                  "memory_mib": pod.memory_mib}
    if pod.num_gpu == 1 and pod.gpu_milli < 1000:
        shard["accelerator_milli"] = pod.gpu_milli
    if pod.gpu_spec:
        shard["accelerator_models"] = list(pod.gpu_spec)
    return {"id": f"a{index:05d}-{pod.name}", "tenant": TENANT, "replicas": 1,
            "shards_per_replica": 1, "shard": shard, "locality": "node"}


def capacity_milli(nodes: Iterable[traces.TraceNode]) -> int:
    return 1000 * sum(n.gpus for n in nodes)


def sample_arrivals(pods: list[traces.TracePod], capacity: int, seed: int,
                    share: float = 1.3) -> list[traces.TracePod]:
    """Sample with replacement until the GPU request reaches `share` of capacity; shuffle."""
    rng = random.Random(seed)
    out: list[traces.TracePod] = []
    total = 0
    while total < share * capacity:
        pod = pods[rng.randrange(len(pods))]
        out.append(pod)
        total += pod.gpu_request_milli
    rng.shuffle(out)
    return out


def prefix_to(arrivals: list[traces.TracePod], capacity: int, share: float) -> int:
    """Arrivals up to and including the one that brings demand to `share` of capacity."""
    total = 0
    for i, pod in enumerate(arrivals):
        total += pod.gpu_request_milli
        if total >= share * capacity:
            return i + 1
    return len(arrivals)


def allocated_milli(deployments: list[Doc], placements: Iterable[Doc]) -> int:
    """GPU milli held by the placements (fractions at their milli), recomputed from scratch."""
    by_id = {d["id"]: d["shard"] for d in deployments}
    total = 0
    for p in placements:
        shard = by_id[p["deployment"]]
        if shard["accelerators"] == 1 and shard.get("accelerator_milli", 1000) < 1000:
            total += shard["accelerator_milli"] * len(p["accelerator_indices"])
        else:
            total += 1000 * len(p["accelerator_indices"])
    return total


def gpu_configurations(deployments: list[Doc], placements: Iterable[Doc]) -> Counter[tuple[int, ...]]:
    """Per GPU holding work, the milli of each pod on it (largest first), counted: e.g.
    `(810,)` for an 810 alone, `(470, 470)` for a pair. What a run's unallocated milli is made
    of (each GPU leaves 1000 - the sum of its configuration; GPUs without work leave 1000),
    to set beside the pairing of the packing bound (`bench/bound.py`)."""
    by_id = {d["id"]: d["shard"] for d in deployments}
    gpus: dict[tuple[str, int], list[int]] = {}
    for p in placements:
        shard = by_id[p["deployment"]]
        milli = shard.get("accelerator_milli", 1000) if shard["accelerators"] == 1 else 1000
        for index in p["accelerator_indices"]:
            gpus.setdefault((p["node"], index), []).append(milli)
    return Counter(tuple(sorted(m, reverse=True)) for m in gpus.values())


def format_configurations(configs: Counter[tuple[int, ...]], top: int) -> str:
    """The `top` configurations leaving the most free milli in all, one line each."""
    worst = sorted(configs.items(), key=lambda kv: (-(FULL - sum(kv[0])) * kv[1], kv[0]))
    return "\n".join(f"    {'+'.join(map(str, c))}: {n} GPUs, {FULL - sum(c)} free each, "
                     f"{(FULL - sum(c)) * n} milli" for c, n in worst[:top] if sum(c) < FULL)


# ---- drivers ------------------------------------------------------------------------------

def run_greedy(cluster: Doc, deployments: list[Doc], policy: str, seed: int) -> tuple[
        list[Doc], list[float]]:
    """The independent greedy, arrival by arrival; returns placements and latencies (ms)."""
    g = BestFitGreedy({**cluster, "deployments": deployments}, policy, seed)  # type: ignore[arg-type]
    lat = []
    for d in deployments:
        t0 = time.perf_counter()
        g.place(d)
        lat.append(1000 * (time.perf_counter() - t0))
    return g.placements, lat


def decision_limit_ms(time_limit_ms: int | None) -> int:
    """The time limit of one decision: the given one, else the solver's default."""
    from scheduler.solve import DEFAULT_TIME_LIMIT_MS
    return time_limit_ms or DEFAULT_TIME_LIMIT_MS


def run_solver_single(cluster: Doc, deployments: list[Doc], batch_size: int,
                      time_limit_ms: int | None) -> tuple[list[Doc], list[float]]:
    """One online solve() over all arrivals (batch_size k groups k arrivals per decision).

    The solve's time limit is `decision_limit_ms` (per decision) times the decisions: the
    single solve stands for one call per decision, each with its own limit (`per-call`).
    With one limit for the whole run, every batch after the first seconds found the deadline
    passed and its joint CP-SAT assignment cut to 10 ms of wall clock, so the plan depended
    on the machine's load."""
    from scheduler import plan_to_dict, problem_from_dict, solve
    options: Doc = {"mode": "online"}
    if batch_size > 1:
        options["batch_size"] = batch_size
    problem = problem_from_dict({**cluster, "deployments": deployments, "options": options})
    decisions = -(-len(deployments) // max(batch_size, 1))
    t0 = time.perf_counter()
    plan = solve(problem, time_limit_ms=decision_limit_ms(time_limit_ms) * max(decisions, 1))
    elapsed = 1000 * (time.perf_counter() - t0)
    return plan_to_dict(plan)["placements"], [elapsed]


def run_solver_per_call(cluster: Doc, deployments: list[Doc], batch_size: int,
                        time_limit_ms: int | None) -> tuple[list[Doc], list[float]]:
    """One solve() per arrival (online) or per k arrivals (batch), placements carried over."""
    from scheduler import plan_to_dict, problem_from_dict, solve
    from scheduler import Options
    mode = "online" if batch_size == 1 else "batch"
    base = problem_from_dict({**cluster, "deployments": deployments, "options": {"mode": mode}})
    deps = base.deployments
    options = Options(mode=mode)
    holding: dict[str, Any] = {}  # deployment id -> Deployment, for those with placements
    current: tuple[Any, ...] = ()
    lat: list[float] = []
    for start in range(0, len(deps), batch_size):
        batch = deps[start:start + batch_size]
        problem = dataclasses.replace(base, deployments=(*holding.values(), *batch),
                                      placements=current, options=options)
        t0 = time.perf_counter()
        plan = solve(problem, time_limit_ms=time_limit_ms)
        lat.append(1000 * (time.perf_counter() - t0))
        current = plan.placements
        placed_now = {p.deployment for p in current}
        for d in batch:
            if d.id in placed_now:
                holding[d.id] = d
    return plan_to_dict(dataclasses.replace(plan, placements=current))["placements"], lat


def run_solver_session(cluster: Doc, deployments: list[Doc], batch_size: int,
                       time_limit_ms: int | None) -> tuple[list[Doc], list[float]]:
    """One warm `Session` (scheduler/session.py) over the empty cluster, one `place()` per
    arrival: what a controller keeping the session warm pays per decision."""
    from scheduler import Plan, plan_to_dict, problem_from_dict
    from scheduler.session import Session
    if batch_size != 1:
        raise ValueError("the session driver decides one arrival at a time (batch size 1)")
    base = problem_from_dict({**cluster, "deployments": deployments,
                              "options": {"mode": "online"}})
    session = Session(dataclasses.replace(base, deployments=()), time_limit_ms=time_limit_ms)
    lat: list[float] = []
    for d in base.deployments:
        t0 = time.perf_counter()
        session.place(d)
        lat.append(1000 * (time.perf_counter() - t0))
    return plan_to_dict(Plan("feasible", session.snapshot().placements))["placements"], lat


def probe_calls(cluster: Doc, deployments: list[Doc], placements: list[Doc],
                probes: list[Doc], time_limit_ms: int | None) -> list[float]:
    """Latency (ms) of one online solve() per probe arrival, on the state `placements`.

    This is what a controller pays per arrival through the public API: the whole state is
    handed over on every call.
    """
    from scheduler import problem_from_dict, solve
    holding = {p["deployment"] for p in placements}
    kept = [d for d in deployments if d["id"] in holding]
    base = problem_from_dict({**cluster, "deployments": kept + probes,
                              "placements": placements, "options": {"mode": "online"}})
    deps = {d.id: d for d in base.deployments}
    kept_deps = tuple(deps[d["id"]] for d in kept)
    lat = []
    for d in probes:  # each probe decided on the same state, not accumulated
        problem = dataclasses.replace(base, deployments=(*kept_deps, deps[d["id"]]))
        t0 = time.perf_counter()
        solve(problem, time_limit_ms=time_limit_ms)
        lat.append(1000 * (time.perf_counter() - t0))
    return lat


def run_seed(workload: str, seed: int, policy: str, *, nodes: list[traces.TraceNode],
             pods: list[traces.TracePod], batch_size: int = 1, driver: str = "single",
             report_at: float = 1.0, time_limit_ms: int | None = None,
             probes: int = 0) -> RunResult:
    """Sample, place up to `report_at` of capacity, and measure the allocation there.

    `probes` > 0 (solver only): afterwards, time that many further arrivals one solve() each.
    """
    cluster = cluster_doc(nodes)
    cap = capacity_milli(nodes)
    sampled = sample_arrivals(pods, cap, seed)
    cut = prefix_to(sampled, cap, report_at)
    arrivals = sampled[:cut]
    deployments = [pod_deployment(i, p) for i, p in enumerate(arrivals)]
    t0 = time.perf_counter()
    runner: Callable[..., tuple[list[Doc], list[float]]]
    if policy == "maia":
        runner = {"single": run_solver_single, "per-call": run_solver_per_call,
                  "session": run_solver_session}[driver]
        placements, lat = runner(cluster, deployments, batch_size, time_limit_ms)
    else:
        placements, lat = run_greedy(cluster, deployments, policy, seed)
    seconds = time.perf_counter() - t0
    if policy == "maia" and probes > 0:
        extra = [pod_deployment(cut + i, p) for i, p in enumerate(sampled[cut:cut + probes])]
        lat = probe_calls(cluster, deployments, placements, extra, time_limit_ms)
    return RunResult(workload, policy, seed, cap, len(deployments),
                     allocated_milli(deployments, placements), len(lat), seconds, lat,
                     deployments, placements)


def parse_seeds(text: str) -> list[int]:
    """'42-51' or '42,43' or '42'."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def expand_workloads(names: list[str], root: Path | None = None) -> list[str]:
    """Workload names, with a trailing '*' matching every trace file of that family."""
    out: list[str] = []
    base = (root or traces.data_dir()) / traces.TRACE_SUBDIR
    for name in names:
        if name.endswith("*"):
            found = sorted(p.name[len("openb_pod_list_"):-4]
                           for p in base.glob(f"openb_pod_list_{name[:-1]}*.csv"))
            if not found:
                raise traces.TraceMissing(f"no trace file matches openb_pod_list_{name}.csv "
                                          f"under {base}")
            out.extend(found)
        else:
            out.append(name)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def seed_arrivals(pods: list[traces.TracePod], capacity: int, seed: int,
                  report_at: float = 1.0) -> list[traces.TracePod]:
    """The arrivals of one seed up to the report point (what every policy decides)."""
    sampled = sample_arrivals(pods, capacity, seed)
    return sampled[:prefix_to(sampled, capacity, report_at)]


def format_table(workload: str, results: dict[str, list[RunResult]],
                 paper: dict[str, tuple[float, int]],
                 bounds: dict[int, Bound] | None = None) -> str:
    """Our policies and the paper's six, unallocated GPU % at 100% arrived demand.

    `bounds` (per seed): what no policy can beat on those arrivals (`bench.bound`), shown
    beside every row as the mean over that row's seeds; '*' marks a bound not proven optimal
    (then HiGHS's dual bound, still a valid limit).
    """
    bounds = bounds or {}
    lines = [f"workload {workload}: GPU capacity left unallocated when arrived demand reaches "
             f"100% (lower is better; bound: what no policy can beat)",
             f"  {'policy':<26}{'unalloc %':>10}{'stdev':>8}{'seeds':>7}{'arrivals/s':>12}"
             f"{'bound %':>9}"]

    def bound_text(seeds: list[int]) -> str:
        if not seeds or any(s not in bounds for s in seeds):
            return ""
        mean = statistics.mean(bounds[s].unallocated_pct for s in seeds)
        return f"{mean:.2f}" + ("" if all(bounds[s].proven for s in seeds) else "*")

    for policy, runs in results.items():
        vals = [r.unallocated_pct for r in runs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rate = sum(r.arrivals for r in runs) / max(sum(r.seconds for r in runs), 1e-9)
        lines.append(f"  {policy:<26}{statistics.mean(vals):>10.2f}{sd:>8.2f}{len(vals):>7}"
                     f"{rate:>12.0f}{bound_text([r.seed for r in runs]):>9}")
    for policy in POLICIES_IN_PAPER:
        if policy in paper:
            mean, n = paper[policy]
            lines.append(f"  {'paper ' + policy:<26}{mean:>10.2f}{'':>8}{n:>7}{'':>12}")
    return "\n".join(lines)
