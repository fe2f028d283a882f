"""What the free room left on one accelerator is worth: prices from the packing LP.

FGD scores a node by the free milli a *single* next task could not use, so it cannot tell a
470 put beside another 470 (60 left, fine: the best packing of the workload does that) from a
320 put into the 530 a 470 left (210 left, which only the few small tasks can fill). What
decides the waste at the end is how fractional tasks pair up on accelerators, and the bound of
`bench/bound.py` shows the best pairing of a workload is a small LP. This module prices it.

The LP (arc flow over one accelerator's fill levels, Valerio de Carvalho): the workload's
demand, scaled to the cluster's capacity (the cluster is expected to fill up), packed onto its
accelerators, most milli allocated. Its duals give each fractional size s a *net value*
pi(s) = s - w(s) (w: the price of that size's supply) and an accelerator one value u.
`room_value[x]` = the most net value any multiset of the workload's sizes fitting into x milli
is worth (a knapsack over pi), so room_value[1000] = u: a configuration is in the LP's optimum
exactly when its pods' net values add up to u. Putting a task of size s where x milli are free
then *loses* room_value[x] - room_value[x - s] - pi(s) >= 0: zero when the pairing can be part
of a best packing, more the worse it is. `Placer` adds that loss to a fractional task's FGD
score (the accelerator inside a node is chosen by it too).

Priced on the cluster as it stands (`used`, what the placer passes): the accelerators start
from the milli already used on them (a 470 alone starts at 470) and the demand expected is the
room left, not the capacity. An empty cluster gets the fresh prices; a filling one learns which
room is plentiful and which is short: when few empty accelerators are left and many halves
wait for a 470, opening an empty one for a 470 loses value (whole tasks need it), which the
fresh prices cannot see (every pairing of the fresh optimum costs nothing there). On openb
`default` this took online 3.86 % to 3.82 % (docs/benchmarks.md).

One pool of accelerators (models are left to `model_pressure`), fractional tasks only; whole
tasks take a full accelerator at value u. Tiny (a few thousand variables), solved by GLOP in
milliseconds; the placer re-prices every `fragmentation.STATE_PRICE_EVERY` arrivals.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import linear_solver_pb2, pywraplp  # at import (costly in a timed solve)

FULL = 1000  # milli per accelerator
MAX_LEVELS = 200  # fill levels of the arc flow (gcd resolution); coarser sizes round up
MAX_MODELS = 16  # LPs kept built (one per set of sizes priced)
_MODELS: dict[tuple[tuple[int, ...], int, bool], _ArcFlow] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class PairingValues:
    """`room_value[x]` for x = 0..1000 free milli, and the net value of each known size."""

    room_value: np.ndarray  # (1001,) float
    net_value: dict[int, float]  # fractional milli -> pi(s)

    def net(self, milli: int) -> float:
        """Net value of one task of `milli`; a size the snapshot did not hold is worth the
        room it takes."""
        pi = self.net_value.get(milli)
        return float(self.room_value[min(milli, FULL)]) if pi is None else pi

    def loss(self, free: np.ndarray, milli: int) -> np.ndarray:
        """Value lost by putting a task of `milli` where `free` milli are free (same shape as
        `free`; meaningless where it does not fit: the caller masks those)."""
        x = np.clip(free, 0, FULL).astype(np.int64)
        pi = self.net(milli)
        return np.maximum(self.room_value[x] - self.room_value[np.maximum(x - milli, 0)] - pi,
                          0.0)


def pairing_values(demand: Iterable[tuple[int, float]], accelerators: int,
                   used: Mapping[int, int] | None = None) -> PairingValues | None:
    """Prices for a workload. `demand`: (milli per accelerator, share of the milli asked) per
    shape, whole-accelerator shapes as milli 1000; `accelerators`: the cluster's count.
    `used` (optional): the cluster as it stands, accelerators with room per milli already
    used on them (0: empty); the demand then fills the room left, packed onto those
    accelerators from where they are, instead of an empty cluster of `accelerators`.
    None when there is nothing fractional to price or the LP fails."""
    solved = _solved(demand, accelerators, used)
    if solved is None:
        return None
    expected, solver = solved
    lp, unit, cap = expected.lp, expected.unit, expected.cap
    constraints = solver.constraints()
    w = {size: max(constraints[i].dual_value(), 0.0) for size, i in lp.supply.items()}
    net = {s: (s - w[s]) * unit for s in expected.counts}  # milli
    value = np.zeros(cap + 1)
    for level in range(1, cap + 1):
        best = value[level - 1]
        for s, pi in net.items():
            if s <= level and value[level - s] + pi > best:
                best = value[level - s] + pi
        value[level] = best
    room = value[np.arange(FULL + 1) // unit]
    return PairingValues(room, {m: net[-(-m // unit)] for m in expected.frac})


def expected_packing(demand: Iterable[tuple[int, float]], accelerators: int,
                     used: Mapping[int, int]) -> float | None:
    """Milli of the expected demand the cluster as it stands can still take: the optimum of
    the same LP whose duals `pairing_values` prices with (demand filling the room left,
    packed onto the accelerators from where they are). Two states that placed the same work
    compare by it: the higher leaves room the workload pairs up better, i.e. predicts more
    allocated once the cluster is full. None when there is nothing fractional or the LP
    fails."""
    solved = _solved(demand, accelerators, used)
    if solved is None:
        return None
    expected, solver = solved
    return float(solver.Objective().Value()) * expected.unit


def _solved(demand: Iterable[tuple[int, float]], accelerators: int,
            used: Mapping[int, int] | None) -> tuple[_Expected, pywraplp.Solver] | None:
    """The LP of this workload on this cluster, solved; None: nothing fractional, or GLOP
    failed."""
    expected = _Expected.of(demand, accelerators, used)
    solver = None if expected is None else expected.solve()
    return None if expected is None or solver is None else (expected, solver)


@dataclass(frozen=True)
class _Expected:
    """The arc-flow LP's data for one workload on one cluster: the tasks expected per size
    (in units of `unit` milli; size `cap` is a whole accelerator) and where the
    accelerators start."""

    frac: list[int]  # fractional milli of the workload
    unit: int
    cap: int
    counts: dict[int, float]
    accelerators: int
    starts: dict[int, int] | None

    @staticmethod
    def of(demand: Iterable[tuple[int, float]], accelerators: int,
           used: Mapping[int, int] | None) -> _Expected | None:
        shares: dict[int, float] = {}
        for milli, share in demand:
            if share > 0 and 0 < milli <= FULL:
                shares[milli] = shares.get(milli, 0.0) + share
        frac = sorted(m for m in shares if m < FULL)
        total = sum(shares.values())
        if not frac or accelerators <= 0 or total <= 0:
            return None
        unit = math.gcd(FULL, *frac)
        while FULL // unit > MAX_LEVELS:
            unit *= 2
        cap = FULL // unit
        starts: dict[int, int] | None = None
        room = accelerators * FULL
        if used is not None:
            # Levels in whole units, rounded up (a used amount off the grid wastes the rest).
            starts = {}
            for milli, n in used.items():
                level = -(-int(milli) // unit)
                if n > 0 and level < cap:
                    starts[level] = starts.get(level, 0) + int(n)
            room = sum((cap - level) * unit * n for level, n in starts.items())
            if room <= 0:
                return None
        # Tasks expected if demand fills the room, in units of `unit` milli.
        counts = {-(-m // unit): 0.0 for m in frac}
        for m in frac:
            counts[-(-m // unit)] += shares[m] / total * room / m
        counts[cap] = counts.get(cap, 0.0) + shares.get(FULL, 0.0) / total * room / FULL
        return _Expected(frac, unit, cap, counts, accelerators, starts)

    @property
    def lp(self) -> _ArcFlow:
        """The LP of this set of sizes, built once (`MAX_MODELS` kept)."""
        key = (tuple(sorted(self.counts)), self.cap, self.starts is None)
        with _LOCK:
            lp = _MODELS.get(key)
            if lp is None:
                if len(_MODELS) >= MAX_MODELS:
                    _MODELS.clear()
                lp = _MODELS[key] = _ArcFlow(*key)
        return lp

    def solve(self) -> pywraplp.Solver | None:
        """The arc-flow LP (most units packed) solved to optimality; None if GLOP fails.

        Building the model costs ~10x solving it, so each set of sizes is built once
        (`_ArcFlow`) and each solve loads a fresh GLOP solver from a copy of it with its own
        row bounds: the same model as one built anew, solved from scratch (a kept solver
        would start from its last basis and may answer with other, equally optimal, duals)."""
        lp = self.lp
        model = linear_solver_pb2.MPModelProto()
        model.CopyFrom(lp.model)
        rows = model.constraint
        starts = self.starts or {}
        rows[lp.gpus].upper_bound = self.accelerators if self.starts is None else starts.get(0, 0)
        for a, i in lp.levels.items():
            rows[i].lower_bound = -starts.get(a, 0)
        for size, i in lp.supply.items():
            rows[i].upper_bound = self.counts[size]
        solver = pywraplp.Solver.CreateSolver("GLOP")
        if solver is None or solver.LoadModelFromProto(model) != "":
            return None
        if solver.Solve() != pywraplp.Solver.OPTIMAL:
            return None
        return solver


class _ArcFlow:
    """The arc-flow LP of one set of sizes, with every row bound 0 (`_Expected.solve` sets them):
    `model` and the row indices of the accelerators, each level and each size's supply."""

    def __init__(self, sizes: tuple[int, ...], cap: int, empty_start: bool) -> None:
        solver = pywraplp.Solver.CreateSolver("GLOP")
        if empty_start:
            reach = {0}
            for s in sorted(sizes, reverse=True):  # levels reachable with sizes >= s
                for a in sorted(reach):            # (no symmetric configurations)
                    b = a + s
                    while b <= cap and b not in reach:
                        reach.add(b)
                        b += s
        else:  # from arbitrary levels every size may come next
            reach = set(range(cap + 1))
        out: dict[int, list] = {a: [] for a in reach}
        into: dict[int, list] = {a: [] for a in reach}
        into[cap] = []
        by_size: dict[int, list] = {s: [] for s in sizes}
        objective = solver.Objective()
        for a in sorted(reach):
            for s in sizes:
                if a + s <= cap:
                    f = solver.NumVar(0, solver.infinity(), "")
                    out[a].append(f)
                    into.setdefault(a + s, []).append(f)
                    by_size[s].append(f)
                    objective.SetCoefficient(f, s)
            if 0 < a < cap:
                rest = solver.NumVar(0, solver.infinity(), "")  # the rest stays empty
                out[a].append(rest)
                into[cap].append(rest)
        objective.SetMaximization()
        gpus = solver.Constraint(0, 0)
        for f in out[0]:
            gpus.SetCoefficient(f, 1)
        levels = {}
        for a in reach:
            if 0 < a < cap:
                # What leaves a level came into it, or started there.
                row = levels[a] = solver.Constraint(0, 0)
                for f in into.get(a, []):
                    row.SetCoefficient(f, 1)
                for f in out[a]:
                    row.SetCoefficient(f, -1)
        supply = {}
        for s in sizes:
            row = supply[s] = solver.Constraint(0, 0)
            for f in by_size[s]:
                row.SetCoefficient(f, 1)
        self.model = linear_solver_pb2.MPModelProto()
        solver.ExportModelToProto(self.model)
        self.gpus = gpus.index()
        self.levels = {a: row.index() for a, row in levels.items()}
        self.supply = {s: row.index() for s, row in supply.items()}
