"""What no placement policy can beat on the FGD protocol: an exact packing bound.

Relax everything but the GPUs themselves: CPU, memory and node boundaries go, GPU models stay.
What is left is a bin packing per GPU model with profits. A GPU holds either whole-GPU pods'
share (a pod of k whole GPUs takes k GPUs of one model it accepts) or fractional pods whose
milli sum to at most 1000. Any placement that passes the checker is a solution of this relaxed
problem, so its optimum (most GPU milli allocated) bounds every policy, online or offline.

The fractional part is an arc-flow integer program (Valerio de Carvalho, 1999), exact and of
pseudo-polynomial size: per model, a graph over the fill levels 0..1000 of one GPU (in units of
the gcd of the sizes), an arc per (level, pod size) and a "leave the rest empty" arc from every
level to 1000; each unit of flow from 0 to 1000 is one GPU's configuration. Arcs of size s only
leave levels reachable with sizes >= s (pods on a GPU in non-increasing size order), which
removes symmetric configurations without losing any. HiGHS (the build inside ortools, through
`pywraplp`) solves it to proven optimality (relative gap 0); `Bound.proven` says whether it did
within the time limit, and `Bound.milli` is then the optimum, otherwise HiGHS's dual bound
(still a valid limit).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from bench.traces import TraceNode, TracePod

FULL = 1000  # milli per GPU


@dataclass(frozen=True)
class Bound:
    """The most GPU milli any policy can allocate to these arrivals on these GPUs."""

    capacity_milli: int
    milli: int  # proven optimum, or the solver's dual bound when not proven
    proven: bool
    seconds: float

    @property
    def unallocated_pct(self) -> float:
        return 100.0 * (1.0 - self.milli / self.capacity_milli)


@dataclass(frozen=True)
class _PodClass:
    gpus: int  # whole GPUs (0 for a fractional pod)
    milli: int  # per pod: 1000 x gpus, or its fraction
    models: tuple[int, ...]  # model indices it accepts
    count: int


def _classes(pods: Iterable[TracePod], model_names: list[str | None]) -> list[_PodClass]:
    counts: Counter[tuple[int, int, tuple[int, ...]]] = Counter()
    everywhere = tuple(range(len(model_names)))
    for p in pods:
        if p.num_gpu == 0 or p.gpu_milli == 0:
            continue  # host-only pods hold no GPU
        models = everywhere if not p.gpu_spec else tuple(
            i for i, m in enumerate(model_names) if m in p.gpu_spec)
        if not models:
            continue
        if p.num_gpu == 1 and p.gpu_milli < FULL:
            counts[(0, p.gpu_milli, models)] += 1
        else:
            counts[(p.num_gpu, FULL * p.num_gpu, models)] += 1
    return [_PodClass(g, m, models, n) for (g, m, models), n in sorted(counts.items())]


class _Columns:
    """Column-wise model under construction: bounds, costs, integrality, sparse rows."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.upper: list[float] = []
        self.entries: list[list[tuple[int, float]]] = []
        self.row_lo: list[float] = []
        self.row_hi: list[float] = []

    def var(self, cost: float, upper: float) -> int:
        self.cost.append(cost)
        self.upper.append(upper)
        self.entries.append([])
        return len(self.cost) - 1

    def row(self, lo: float, hi: float) -> int:
        self.row_lo.append(lo)
        self.row_hi.append(hi)
        return len(self.row_lo) - 1

    def add(self, row: int, var: int, coef: float) -> None:
        self.entries[var].append((row, coef))


def _levels(sizes: list[int], cap: int) -> dict[int, list[int]]:
    """For each size, the fill levels an arc of that size may leave (sizes >= it so far)."""
    reach = {0}
    out: dict[int, list[int]] = {}
    for s in sorted(sizes, reverse=True):
        frontier = sorted(reach)
        for a in frontier:  # close under adding s
            b = a + s
            while b <= cap and b not in reach:
                reach.add(b)
                b += s
        out[s] = sorted(a for a in reach if a + s <= cap)
    return out


def packing_bound(nodes: list[TraceNode], pods: Iterable[TracePod],
                  time_limit_s: float = 120.0,
                  min_placed: Mapping[int, int] | None = None) -> Bound:
    """Solve the relaxed packing of `pods` onto the GPUs of `nodes` (see module doc).

    `min_placed` (fractional milli -> pods): place at least that many pods of the size (up to
    those there are). The limit of a policy that places what a given run placed of those
    sizes: e.g. every 810-milli pod a run placed, which a policy placing every pod that fits
    when it arrives cannot leave out (the optimum leaves some out; docs/benchmarks.md)."""
    model_names = list(dict.fromkeys(n.model for n in nodes))
    gpus = [sum(n.gpus for n in nodes if n.model == m) for m in model_names]
    capacity = FULL * sum(gpus)
    classes = _classes(pods, model_names)
    frac = [c for c in classes if c.gpus == 0]
    unit = math.gcd(FULL, *[c.milli for c in frac]) if frac else FULL
    cap = FULL // unit
    cols = _Columns()
    # Per class: how many of its pods are placed, over all models.
    floor = dict(min_placed or {})
    class_rows = []
    for c in classes:  # pods of a size forced in: the first classes of it take the floor
        need = min(floor.get(c.milli, 0), c.count) if c.gpus == 0 else 0
        if need:
            floor[c.milli] -= need
        class_rows.append(cols.row(need, c.count))
    for mi, g in enumerate(gpus):
        if g == 0:
            continue
        gpu_row = cols.row(-math.inf, g)  # GPUs used by whole pods + fractional configurations
        for ci, c in enumerate(classes):
            if c.gpus and mi in c.models:
                x = cols.var(c.milli, c.count)
                cols.add(class_rows[ci], x, 1)
                cols.add(gpu_row, x, c.gpus)
        here = [(ci, c) for ci, c in enumerate(classes) if c.gpus == 0 and mi in c.models]
        if not here:
            continue
        sizes = sorted({c.milli // unit for _, c in here})
        # Pods of one size placed on this model = arcs of that size (split over its classes).
        size_rows = {s: cols.row(0, 0) for s in sizes}
        for ci, c in here:
            y = cols.var(0, c.count)
            cols.add(class_rows[ci], y, 1)
            cols.add(size_rows[c.milli // unit], y, -1)
        # Flow conservation per level: in - out = 0 for 0 < level < cap; out of 0 = GPUs used.
        level_rows = {a: cols.row(0, 0) for a in range(1, cap)}
        start = cols.var(0, g)  # flow into level 0 = GPUs with fractional pods
        cols.add(gpu_row, start, 1)
        source = cols.row(0, 0)
        cols.add(source, start, 1)

        def edge(a: int, b: int, var: int) -> None:
            cols.add(source if a == 0 else level_rows[a], var, -1)
            if b < cap:
                cols.add(level_rows[b], var, 1)

        levels = _levels(sizes, cap)
        used_levels = {0}
        for s in sizes:
            for a in levels[s]:
                f = cols.var(s * unit, g)
                edge(a, a + s, f)
                cols.add(size_rows[s], f, 1)
                used_levels.add(a + s)
        for a in sorted(used_levels):
            if 0 < a < cap:
                edge(a, cap, cols.var(0, g))  # the rest of this GPU stays empty
    return _solve(cols, capacity, time_limit_s)


def _solve(cols: _Columns, capacity: int, time_limit_s: float) -> Bound:
    """HiGHS (the build shipped inside ortools) to a zero gap, one thread; if it stops
    without any bound (a time limit on a loaded machine), the LP relaxation's optimum, which
    is still a valid limit (marked not proven)."""
    import time

    from ortools.linear_solver import pywraplp

    t0 = time.perf_counter()
    solver, objective = _program(cols, "HIGHS_MIXED_INTEGER_PROGRAMMING", time_limit_s)
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, 0.0)
    status = solver.Solve(params)
    proven = status == pywraplp.Solver.OPTIMAL
    if proven:
        milli = objective.Value()
    elif status == pywraplp.Solver.FEASIBLE:
        milli = objective.BestBound()
    else:
        relaxed, objective = _program(cols, "GLOP", time_limit_s, integer=False)
        if relaxed.Solve() != pywraplp.Solver.OPTIMAL:
            raise RuntimeError(f"HiGHS found no bound (status {status}), nor did the LP")
        milli = objective.Value()
    return Bound(capacity, int(math.floor(milli + 1e-6)), proven, time.perf_counter() - t0)


def _program(cols: _Columns, backend: str, time_limit_s: float, integer: bool = True
             ) -> tuple[Any, Any]:
    """The packing program in pywraplp: (solver, objective)."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise RuntimeError(f"this ortools build has no {backend} solver")
    solver.SuppressOutput()
    if backend.startswith("HIGHS"):
        solver.SetSolverSpecificParametersAsString("output_flag = false\nlog_to_console = false\n")
    solver.SetNumThreads(1)
    solver.SetTimeLimit(int(1000 * time_limit_s))
    make = solver.IntVar if integer else solver.NumVar
    xs = [make(0, u, "") for u in cols.upper]
    rows = [solver.Constraint(lo, hi) for lo, hi in zip(cols.row_lo, cols.row_hi)]
    for x, entries in zip(xs, cols.entries):
        for r, coef in entries:
            rows[r].SetCoefficient(x, coef)
    objective = solver.Objective()
    for x, c in zip(xs, cols.cost):
        if c:
            objective.SetCoefficient(x, c)
    objective.SetMaximization()
    return solver, objective
