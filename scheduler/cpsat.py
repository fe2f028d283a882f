"""CP-SAT over node classes: which pending replicas go into which locality domain.

The greedy places one gang at a time and can paint itself into a corner (a big gang arriving
after small ones took the one rack it fitted in, two tenants that exclude each other spread over
every rack). This model decides all pending replicas of a batch jointly, at the level of
locality domains and node classes (`classes.py`), then hands its choice back to the greedy
placer restricted to those domains, which picks concrete nodes and accelerator indices with
the exact per-node rules. The model's capacity rules are aggregated per class, i.e. a
relaxation: the decoded plan is checked rule by rule by the placer, and the solver keeps
whichever of greedy and decoded plan is better, so CP-SAT can only improve the answer.

The model is built in sections, one function each, in a fixed order (the order of variables
and constraints is part of what makes the search deterministic): data (`ClassModel.data`),
variables, one function per rule family, objective, hints; then solve, decode, keep the better.
Per-node rules reach the model through the filter plugins only: a (deployment, class) pair
exists where `node_fit` gives the class's representative slots.

Objective, lexicographic in two solves: placed demand x priority weight first (phase 1, whose
OPTIMAL is a proof of term 1), then, placing as much, fragmentation: fresh nodes opened and
fresh (empty) racks opened, so partly used capacity is filled first and whole nodes and racks
stay free for big gangs (phase 2, hinted with phase 1's answer, with half the deterministic
time phase 1 used, within the budget).

Set MAIA_DUMP_MODEL=/path/model.pb.txt to write the model for offline debugging.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from ortools.sat.python import cp_model

from scheduler.classes import NodeClass, node_classes
from scheduler.filters import node_fit
from scheduler.greedy import Placer
from scheduler.model import Deployment
from scheduler.state import ClusterState

if TYPE_CHECKING:
    from ortools.sat import sat_parameters_pb2

    from scheduler.solve import Solver

NUM_WORKERS = 2          # the target machines have 2 cores
MIN_SOLVE_S = 0.02       # below this much time left, do not even build the model
MAX_PAIRS = 200_000      # (deployment, class) pairs beyond which the model is not built
CPSAT_SEED = 1
CPSAT_SHARE_WITH_REPAIR = 0.5  # of the time left, when moves or preemption follow CP-SAT
DETERMINISTIC_PER_S = 0.3  # deterministic-time units allowed per wall second left (see configure)
MIN_SECOND_PHASE = 0.005  # deterministic units below which phase 2 is not run
MIN_SECOND_PHASE_S = 0.2  # phase 2's budget floor (seconds of budget, x DETERMINISTIC_PER_S)
SECOND_PHASE_SHARE = 0.5  # phase 2's budget: this share of the deterministic time phase 1 used
CLOCK_CUT = -1  # `_second_phase`: stopped by the wall clock (not a CP-SAT status)
WALL_SHARE = 0.85  # of the time left: CP-SAT's wall-clock ceiling (decoding needs the rest)
WALL_CUT = 0.95  # a search that ran this share of its wall-clock ceiling was cut by it
SPREAD_ORDER = {"node": 0, "rack": 1, "row": 2, "zone": 3, "none": 4}

STATUS_NAMES = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible",
                cp_model.INFEASIBLE: "infeasible", cp_model.MODEL_INVALID: "model_invalid",
                cp_model.UNKNOWN: "unknown"}

Var = cp_model.IntVar


def configure(params: "sat_parameters_pb2.SatParameters", budget_s: float,
              left_s: float) -> None:
    """Deterministic search: the same model gives the same answer on every run.

    `interleave_search` runs the workers' strategies interleaved in a fixed schedule (the
    result does not depend on thread timing), with a fixed seed, and the search stops at a
    *deterministic* time budget (work counted by the solver, not the clock) proportional to
    `budget_s`, the share of the time limit planned for it (`Solver.budget_s`): not the time
    actually left, which depends on how fast the stages before it ran. The wall-clock limit
    (`left_s`, what is left before the deadline) stays as a ceiling, usually above that
    budget's duration: only a much slower machine reaches it (then the answer can vary).

    `catch_sigint_signal` off: CP-SAT's own SIGINT handler (on by default) is installed in C for
    the search and then set back to the default action, not to the handler the process had
    (Python still reports its own): after one solve, Ctrl-C killed a controller outright instead
    of stopping it cleanly. The library's callers stop a search by its limits, never by SIGINT."""
    params.catch_sigint_signal = False
    params.num_workers = NUM_WORKERS
    params.interleave_search = True
    params.random_seed = CPSAT_SEED
    params.max_deterministic_time = max(budget_s * DETERMINISTIC_PER_S, 0.005)
    params.max_time_in_seconds = max(left_s * WALL_SHARE, 0.01)


def _frag_metric(state: ClusterState) -> tuple[int, int]:
    """Whole free racks and whole free nodes (more is less fragmented)."""
    topo = state.topo
    whole_nodes = (state.free_whole() == topo.node_healthy) & topo.node_ready & \
        (state.node_tenant.sum(axis=1) == 0)
    busy_racks = np.bincount(topo.node_rack, weights=~whole_nodes & topo.node_ready,
                             minlength=len(topo.rack_ids))
    return int((busy_racks == 0).sum()), int(whole_nodes.sum())


@dataclass
class ClassModel:
    """The model over node classes and what decoding it needs."""

    base: ClusterState
    pending: dict[int, list[int]]            # deployment -> replicas to place
    classes: list[NodeClass]
    reps: np.ndarray                         # (C,) representative node per class
    counts: np.ndarray                       # (C,) nodes per class
    slots: dict[int, np.ndarray]             # deployment -> (C,) slots on the representative
    pairs: list[tuple[int, int]]             # (deployment, class) with slots
    weight: dict[int, int]                   # deployment -> term 1 weight of one replica
    running: dict[int, int]                  # deployment short of min_replicas -> replicas it runs
    kept: set[int]                           # ... of those, the ones the greedy kept running
    model: cp_model.CpModel = field(default_factory=cp_model.CpModel)
    x: dict[tuple[int, int], Var] = field(default_factory=dict)   # shards of d on class c
    y: dict[tuple[int, int], Var] = field(default_factory=dict)   # replicas of d in domain D
    z: dict[int, Var] = field(default_factory=dict)               # new replicas of d
    on: dict[int, Var] = field(default_factory=dict)              # d reaches min_replicas
    members: dict[tuple[int, int], list[int]] = field(
        default_factory=lambda: defaultdict(list))                # (d, domain) -> classes
    by_class: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    opened: dict[int, Var] = field(default_factory=dict)          # fresh nodes of a class
    present: dict[tuple[int, int], Var] = field(default_factory=dict)  # tenant in rack
    rack_tenants: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    rack_open: dict[int, Var] = field(default_factory=dict)       # fresh racks opened

    @property
    def deps(self) -> tuple[Deployment, ...]:
        return self.base.deps

    def tenant(self, d: int) -> int:
        return int(self.base.dep_tenant[d])

    def at_stake(self) -> int:
        """Term 1 weight of the running replicas the model may drop (those of deployments
        short of min_replicas it may leave there): in the base state, and in the model's
        objective only while their deployment is on."""
        return sum(self.weight[d] * self.running.get(d, 0) for d in self.on)

    def running_kept(self, state: ClusterState) -> int:
        """Running replicas of the deployments short of min_replicas that `state` keeps (a
        deployment short of it runs nothing, so any placed means all kept)."""
        return sum(n for d, n in self.running.items() if state.by_dep.get(d))

    @classmethod
    def data(cls, base: ClusterState, pending: dict[int, list[int]],
             min_priority: int, greedy: ClusterState) -> ClassModel:
        deps = base.deps
        # The most shards the model may place: a node's room under its `max_shards` beyond it
        # binds nothing (`node_classes`, `_node_shards`).
        horizon = sum(len(rs) * deps[d].shards_per_replica for d, rs in pending.items())
        classes = node_classes(base, horizon=horizon)
        reps = np.array([c.representative for c in classes], dtype=np.int64)
        counts = np.array([c.count for c in classes], dtype=np.int64)
        slots = {d: node_fit(base, d).slots[reps] if len(reps) else np.zeros(0, dtype=np.int64)
                 for d in pending}
        pairs = [(d, ci) for d in pending for ci in np.flatnonzero(slots[d] > 0).tolist()]
        weight = {d: deps[d].shards_per_replica * max(deps[d].shard.milli, 1) *
                  (deps[d].priority - min_priority + 1) for d in pending}
        # Running deployments short of min_replicas: the greedy placed what they need before
        # anything else (`Solver.place_group`), and what it kept running stays running.
        running = {d: len(base.by_dep[d]) for d in pending if base.short_of_min(d)}
        kept = {d for d in running if greedy.by_dep.get(d)}
        return cls(base, pending, classes, reps, counts, slots, pairs, weight, running, kept)


# ---- variables ------------------------------------------------------------------------------

def _variables(m: ClassModel) -> None:
    deps, topo, model = m.deps, m.base.topo, m.model
    # x[d, c]: shards of deployment d on nodes of class c.
    for d, ci in m.pairs:
        ub = min(int(m.counts[ci] * m.slots[d][ci]), len(m.pending[d]) * deps[d].shards_per_replica)
        m.x[d, ci] = model.new_int_var(0, ub, f"x_d{d}_c{ci}")
    # y[d, D]: replicas of d inside locality domain D (D: a class when locality is node).
    for d, ci in m.pairs:
        level = deps[d].locality
        dom = ci if level == "node" else int(topo.domain_of(level)[m.reps[ci]])
        m.members[d, dom].append(ci)
    for (d, dom) in m.members:
        m.y[d, dom] = model.new_int_var(0, len(m.pending[d]), f"y_d{d}_D{dom}")
    # z[d]: new replicas of d.
    m.z.update({d: model.new_int_var(0, len(m.pending[d]), f"z_d{d}") for d in m.pending})


# ---- constraints, one rule family each ------------------------------------------------------

def _gangs(m: ClassModel) -> None:
    """A replica's shards all sit in its locality domain; min_replicas all or nothing, the
    running replicas counted: a deployment short of it that the greedy kept running gets
    what it needs (running work is not dropped for new work); one the greedy could not keep
    is on (reaches min_replicas, its running replicas count in term 1) or off (runs nothing).
    The model must weigh exactly what the plan will hold, or it proves an optimum the plan
    does not reach."""
    deps, model = m.deps, m.model
    for (d, dom), cis in m.members.items():
        model.add(sum(m.x[d, ci] for ci in cis) == deps[d].shards_per_replica * m.y[d, dom])
        if deps[d].locality == "node":  # one node per replica
            per_node = int(m.slots[d][dom]) // deps[d].shards_per_replica
            model.add(m.y[d, dom] <= int(m.counts[dom]) * per_node)
    for d in m.pending:
        model.add(m.z[d] == sum(m.y[key] for key in m.y if key[0] == d))
        need = deps[d].min_replicas - len(m.base.by_dep.get(d, ()))
        if d in m.kept:
            model.add(m.z[d] >= need)
        elif need > 1 or d in m.running:
            on = m.on[d] = model.new_bool_var(f"on_d{d}")
            model.add(m.z[d] >= need).only_enforce_if(on)
            model.add(m.z[d] == 0).only_enforce_if(~on)


def _class_capacity(m: ClassModel) -> None:
    """Per class: accelerators (whole ones, and fresh ones opened for fractions), CPU,
    memory; and the fresh (entirely free) nodes opened, for the fragmentation term."""
    deps, base, model = m.deps, m.base, m.model
    free_whole = base.free_whole()
    acc_count = base.topo.node_healthy
    for d, ci in m.pairs:
        m.by_class[ci].append(d)
    for ci, ds in m.by_class.items():
        n = int(m.reps[ci])
        cnt = int(m.counts[ci])
        whole_use = []
        frac_by_tenant: dict[int, list] = defaultdict(list)
        for d in ds:
            spec = deps[d].shard
            if spec.fractional:
                frac_by_tenant[m.tenant(d)].append(spec.accelerator_milli * m.x[d, ci])
            elif spec.accelerators:
                whole_use.append(spec.accelerators * m.x[d, ci])
        for t, terms in frac_by_tenant.items():
            partial = int(np.where((base.acc_owner[n] == t) & (base.acc_free[n] < 1000),
                                   base.acc_free[n], 0).sum())
            fresh = model.new_int_var(0, cnt * int(free_whole[n]), f"fresh_t{t}_c{ci}")
            model.add(sum(terms) <= 1000 * fresh + cnt * partial)
            whole_use.append(fresh)
        if whole_use:
            model.add(sum(whole_use) <= cnt * int(free_whole[n]))
        cpu = [deps[d].shard.cpu_milli * m.x[d, ci] for d in ds if deps[d].shard.cpu_milli]
        if cpu and base.cpu_free[n] < 1e14:
            model.add(sum(cpu) <= int(cnt * max(base.cpu_free[n], 0)))
        mem = [deps[d].shard.memory_mib * m.x[d, ci] for d in ds if deps[d].shard.memory_mib]
        if mem and base.mem_free[n] < 1e14:
            model.add(sum(mem) <= int(cnt * max(base.mem_free[n], 0)))
        if free_whole[n] == acc_count[n] and acc_count[n] > 0 and whole_use:
            m.opened[ci] = model.new_int_var(0, cnt, f"open_c{ci}")
            model.add(int(acc_count[n]) * m.opened[ci] >= sum(whole_use))


def _node_shards(m: ClassModel) -> None:
    """Per class, the shards its nodes may still take under their `max_shards`; only where that
    could bind: where the most its (deployment, class) pairs may place (their variables' upper
    bounds, each within one deployment's slots) is more. Nodes without a cap, or far from it
    (4,096 against a few accelerators' shards), add nothing to the model."""
    if not m.base.topo.shards_capped:
        return
    deps = m.deps
    room = m.base.shard_room(m.reps)
    for ci, ds in m.by_class.items():
        cap = int(m.counts[ci]) * int(room[ci])
        most = sum(min(int(m.counts[ci] * m.slots[d][ci]), len(m.pending[d]) * deps[d].shards_per_replica)
                   for d in ds)  # `_variables`' upper bounds
        if most > cap:
            m.model.add(sum(m.x[d, ci] for d in ds) <= cap)


def _power(m: ClassModel) -> None:
    """Racks and rows within budget: shard power only (idle power is in the base state)."""
    deps, base, model = m.deps, m.base, m.model
    class_rack = [c.rack for c in m.classes]
    rack_terms: dict[int, list] = defaultdict(list)
    for d, ci in m.pairs:
        p = deps[d].shard.shard_power_w
        if p > 0:
            rack_terms[int(class_rack[ci])].append((int(round(p * 1000)), m.x[d, ci]))
    row_terms: dict[int, list] = defaultdict(list)
    for rack, terms in rack_terms.items():
        head = base.rack_headroom()[rack]
        if head < 1e14:
            model.add(sum(w * v for w, v in terms) <= int(np.floor(max(head, 0) * 1000)))
        row_terms[int(base.topo.rack_row[rack])].extend(terms)
    for row, terms in row_terms.items():
        head = base.row_headroom()[row]
        if head < 1e14:
            model.add(sum(w * v for w, v in terms) <= int(np.floor(max(head, 0) * 1000)))


def _tenant_caps(m: ClassModel) -> None:
    """Tenant caps: accelerators and power."""
    deps, base, topo, model = m.deps, m.base, m.base.topo, m.model
    by_tenant: dict[int, list[int]] = defaultdict(list)
    for d in m.pending:
        by_tenant[m.tenant(d)].append(d)
    for t, ds in by_tenant.items():
        milli_room = topo.tenant_max_milli[t] - base.tenant_milli[t]
        if milli_room < 1e14:
            model.add(sum(deps[d].shard.milli * deps[d].shards_per_replica * m.z[d] for d in ds)
                      <= int(np.floor(max(milli_room, 0) + 1e-6)))  # over its cap (lowered): no more, not infeasible
        power_room = topo.tenant_max_power[t] - base.tenant_power[t]
        if power_room < 1e14:
            model.add(sum(int(round(deps[d].shard.shard_power_w * 1000)) *
                          deps[d].shards_per_replica * m.z[d] for d in ds)
                      <= int(np.floor(max(power_room, 0) * 1000)))


def _spread(m: ClassModel) -> None:
    """Replicas per spread domain: exact when the spread domain contains the locality
    domain; otherwise a bound on shards, and the placer enforces the exact rule."""
    deps, base, model = m.deps, m.base, m.model
    for d in m.pending:
        sp = deps[d].spread
        if sp is None or sp.domain == "none":
            continue
        # With its spread group's replicas (a rollout's outgoing ones): the greedy places
        # apart from them where it can, else beside them; where it could not, it keeps its answer.
        group = base.group_spread_count(d)
        counts_now = base.spread_count[d] if group is None else group
        sdom = base.topo.domain_of(sp.domain)
        groups: dict[int, list] = defaultdict(list)
        if SPREAD_ORDER[sp.domain] >= SPREAD_ORDER[deps[d].locality] and \
                deps[d].locality != "node":
            for (dd, dom), cis in m.members.items():
                if dd == d:
                    groups[int(sdom[m.reps[cis[0]]])].append(m.y[d, dom])
            for sd, terms in groups.items():
                model.add(sum(terms) <= max(sp.max_per_domain - int(counts_now[sd]), 0))
        elif sp.domain == "node":  # per class: each node has its own room
            for (dd, ci) in m.pairs:
                if dd == d:
                    room = max(sp.max_per_domain - int(counts_now[m.reps[ci]]), 0)
                    model.add(m.x[d, ci] <= room * deps[d].shards_per_replica *
                              int(m.counts[ci]))
        else:  # a replica touching the domain puts at most all its shards there
            for (dd, ci) in m.pairs:
                if dd == d:
                    groups[int(sdom[m.reps[ci]])].append(m.x[d, ci])
            for sd, terms in groups.items():
                room = max(sp.max_per_domain - int(counts_now[sd]), 0)
                model.add(sum(terms) <= room * deps[d].shards_per_replica)


def _isolation(m: ClassModel) -> None:
    """Isolation and exclusion between new tenants in one rack (presence booleans), and
    dedicated_node tenants splitting a class's nodes."""
    base, topo, model = m.base, m.base.topo, m.model
    class_rack = [c.rack for c in m.classes]
    for d, ci in m.pairs:
        rack, t = int(class_rack[ci]), m.tenant(d)
        key = (t, rack)
        if key not in m.present:
            m.present[key] = model.new_bool_var(f"in_t{t}_r{rack}")
            m.rack_tenants[rack].add(t)
        model.add(m.x[d, ci] == 0).only_enforce_if(~m.present[key])
    for rack, ts in m.rack_tenants.items():
        for t in ts:
            for u in ts:
                if u <= t:
                    continue
                if base.dedicated_rack[t] or base.dedicated_rack[u] or \
                        topo.tenant_excludes[t, u]:
                    model.add_bool_or([~m.present[t, rack], ~m.present[u, rack]])
    for ci, ds in m.by_class.items():
        ts = {m.tenant(d) for d in ds}
        if len(ts) > 1 and any(base.dedicated_node[t] for t in ts):
            cnt = int(m.counts[ci])
            share = {t: model.new_int_var(0, cnt, f"nodes_t{t}_c{ci}") for t in ts}
            model.add(sum(share.values()) <= cnt)
            for t in ts:
                terms = [m.x[d, ci] for d in ds if m.tenant(d) == t]
                cap = max(int(m.slots[d][ci]) for d in ds if m.tenant(d) == t)
                model.add(sum(terms) <= cap * share[t])


def _fresh_racks(m: ClassModel) -> None:
    """Fresh racks opened (fragmentation at rack level)."""
    for r in [r for r in m.rack_tenants if m.base.rack_tenant[r].sum() == 0]:
        m.rack_open[r] = m.model.new_bool_var(f"open_r{r}")
        for t in m.rack_tenants[r]:
            m.model.add_implication(m.present[t, r], m.rack_open[r])


# Rule families in the order they are added (the order is part of the deterministic search).
CONSTRAINTS = (_gangs, _class_capacity, _node_shards, _power, _tenant_caps, _spread, _isolation,
               _fresh_racks)


def _placed(m: ClassModel) -> cp_model.LinearExprT:
    """Term 1: the priority-weighted new replicas, and the running ones at stake
    (`ClassModel.at_stake`) while their deployment is on."""
    return sum(m.weight[d] * m.z[d] for d in m.pending) + \
        sum(m.weight[d] * m.running[d] * on for d, on in m.on.items() if d in m.running)


def _fragmentation(m: ClassModel) -> cp_model.LinearExprT:
    """Fresh nodes opened + 10 x fresh racks opened (lower is better)."""
    return sum(m.opened.values()) + sum(10 * v for v in m.rack_open.values())


def _objective(m: ClassModel) -> None:
    """Phase 1: placed weight only. Fragmentation breaks its ties in phase 2 (`_second_phase`):
    a weighted sum of both leaves a gap in the small term the search rarely closes, so the
    placed weight, though settled, was never proved (the 1,024-node rebalance problem)."""
    m.model.maximize(_placed(m))


def build(base: ClusterState, pending: dict[int, list[int]], min_priority: int,
          greedy: ClusterState) -> ClassModel | str:
    """The whole model, hinted by the greedy answer; or why it was not built."""
    m = ClassModel.data(base, pending, min_priority, greedy)
    if len(m.pairs) > MAX_PAIRS:
        return f"skipped: {len(m.pairs)} pairs"
    _variables(m)
    for add in CONSTRAINTS:
        add(m)
    _objective(m)
    _add_hints(m, greedy)
    return m


def _add_hints(m: ClassModel, greedy: ClusterState) -> None:
    """Hint the model with the greedy answer: its shards per (deployment, class) and its
    replicas per (deployment, domain)."""
    deps, topo = greedy.deps, greedy.topo
    class_of = {n: c.index for c in m.classes for n in c.nodes}
    hint_x: dict[tuple[int, int], int] = defaultdict(int)
    hint_y: dict[tuple[int, int], int] = defaultdict(int)
    for (d, r), shards in greedy.replicas.items():
        if d not in m.pending or r not in m.pending[d]:
            continue
        first = next(iter(shards.values())).node
        level = deps[d].locality
        if first not in class_of:
            continue
        dom = class_of[first] if level == "node" else int(topo.domain_of(level)[first])
        hint_y[d, dom] += 1
        for at in shards.values():
            if at.node in class_of:
                hint_x[d, class_of[at.node]] += 1
    for key, var in m.x.items():
        m.model.add_hint(var, hint_x.get(key, 0))
    for key, var in m.y.items():
        m.model.add_hint(var, hint_y.get(key, 0))


# ---- the stage: build, solve, decode, keep the better ---------------------------------------

def improve(solver: Solver, base: ClusterState, wanted: list[int]) -> None:
    """Try to beat the greedy answer in solver.state; adopt the better of the two."""
    left = solver.deadline - time.perf_counter()
    if left < MIN_SOLVE_S:
        solver.stats["cpsat"] = "skipped: no time left"
        solver.stats["clock_cut"] = True  # the clock, not a budget, decided: the plan may differ
        solver.time_cut.update(wanted)
        return
    t_build = time.perf_counter()
    deps = base.deps
    pending = {d: [r for r in range(deps[d].replicas) if (d, r) not in base.replicas]
               for d in wanted}
    pending = {d: rs for d, rs in pending.items() if rs}
    if not pending:
        return
    greedy = solver.state
    m = build(base, pending, solver.min_priority, greedy)
    if isinstance(m, str):
        solver.stats["cpsat"] = m
        return
    dump = os.environ.get("MAIA_DUMP_MODEL")
    if dump:
        m.model.export_to_file(dump)

    left = solver.deadline - time.perf_counter()
    if left < MIN_SOLVE_S:
        solver.stats["cpsat"] = "skipped: model build used the time"
        solver.stats["clock_cut"] = True
        solver.time_cut.update(pending)
        return
    cp = cp_model.CpSolver()
    opts = solver.problem.options
    budget = solver.budget_s
    if opts.mode == "rebalance" or opts.allow_preemption:
        left *= CPSAT_SHARE_WITH_REPAIR  # moves and preemption run after it, in what is left
        budget *= CPSAT_SHARE_WITH_REPAIR
    t_solve = time.perf_counter()
    configure(cp.parameters, budget, left)
    status = cp.solve(m.model)
    solver.stats.update({"cpsat": STATUS_NAMES.get(status, str(status)),
                         "classes": len(m.classes), "vars": len(m.x) + len(m.y)})
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # INFEASIBLE / MODEL_INVALID / UNKNOWN: keep the greedy answer.
        if status == cp_model.UNKNOWN:  # stopped by its time limit before any solution
            solver.time_cut.update(pending)
            if stopped_by_clock(cp):  # not by its budget: on a faster machine it finds one
                solver.stats["clock_cut"] = True
        solver.stats["cpsat_ms"] = round((time.perf_counter() - t_build) * 1000, 1)
        return
    # Term 1: the model's bound and its own answer (before decoding), plus kept work (less
    # the running replicas the model weighs itself).
    settled = solver.objective(base) - m.at_stake()
    solver.stats["best_bound"] = settled + int(round(cp.best_objective_bound))
    solver.stats["model_objective"] = settled + int(round(cp.objective_value))
    # Phase 2 ends by the ceiling phase 1 had: the rest of the time stays for decoding.
    left -= (time.perf_counter() - t_solve) / WALL_SHARE
    # Phase 2's budget (deterministic time, a count): half what phase 1 used (at least a small
    # floor), within what it left of the budget: the two search no longer than one solve did.
    used_s = cp.deterministic_time / DETERMINISTIC_PER_S
    second_s = min(budget - used_s, max(SECOND_PHASE_SHARE * used_s, MIN_SECOND_PHASE_S))
    answer, frag_status = _second_phase(m, cp, second_s, left)
    if stopped_by_clock(cp) or frag_status == CLOCK_CUT:
        solver.stats["clock_cut"] = True  # the plan may differ on a faster machine
        frag_status = cp_model.UNKNOWN
    solver.stats.update({"cpsat_fragmentation": STATUS_NAMES.get(frag_status, str(frag_status)),
                         "cpsat_ms": round((time.perf_counter() - t_build) * 1000, 1)})
    trial, exact = _decode(solver, m, answer, solver.batch_order(list(m.pending)))
    short = not exact and solver.objective(trial) < solver.stats["model_objective"]
    if short and time.perf_counter() >= solver.deadline:
        solver.stats["clock_cut"] = True  # not realised again: the plan may differ on a faster machine
    elif short:
        # The placer realises a domain's shards on its fullest nodes first: a deployment the model
        # gave the whole domain could take the one class another could use (a row-local gang took
        # the only node a 16 GiB shard fitted, placing 21000 of the model's 22000). Realised the
        # other way round, the deployments the model kept to the fewest classes first (only where
        # the first fell short of the model's answer: a decode is 50-200 ms at 256 nodes).
        again, again_exact = _decode(solver, m, answer, _fewest_classes_first(solver, m, answer))
        if (_value(solver, m, again), again_exact) > (_value(solver, m, trial), exact):
            trial, exact = again, again_exact
    proved = status == cp_model.OPTIMAL and frag_status == cp_model.OPTIMAL
    _keep_better(solver, m, greedy, trial, exact, status, proved)


def _second_phase(m: ClassModel, first: cp_model.CpSolver, budget_s: float,
                  left_s: float) -> tuple[cp_model.CpSolver, int]:
    """Phase 2: the fewest fresh nodes and racks among answers placing what phase 1's did,
    hinted with phase 1's answer. Returns the answer to decode (phase 1's if phase 2 did not
    run, found none, or the wall clock stopped it) and phase 2's status (UNKNOWN when the budget
    left it none, CLOCK_CUT when the wall clock stopped it or left it no time)."""
    if not (m.opened or m.rack_open):
        return first, cp_model.OPTIMAL  # nothing to break ties on
    if budget_s * DETERMINISTIC_PER_S < MIN_SECOND_PHASE:
        return first, cp_model.UNKNOWN  # not run: phase 1 used the budget
    if left_s < MIN_SOLVE_S:
        return first, CLOCK_CUT  # not run: phase 1 used the time (its answer, as when cut)
    model = m.model
    model.clear_hints()
    for var in [*m.x.values(), *m.y.values(), *m.z.values(), *m.opened.values(),
                *m.present.values(), *m.rack_open.values()]:
        model.add_hint(var, first.value(var))
    model.add(_placed(m) >= int(round(first.objective_value)))
    model.minimize(_fragmentation(m))
    second = cp_model.CpSolver()
    configure(second.parameters, budget_s, left_s)
    status = second.solve(model)
    # Stopped by the wall clock rather than its deterministic budget (what is left after
    # phase 1 is small on a slow machine), its answer depends on the machine's speed: decode
    # phase 1's instead, so the plan stays the same from run to run.
    if status == cp_model.OPTIMAL or (status == cp_model.FEASIBLE and not stopped_by_clock(second)):
        return second, status
    return first, CLOCK_CUT if stopped_by_clock(second) else status


def stopped_by_clock(cp: cp_model.CpSolver) -> bool:
    """Did the wall-clock ceiling, not the deterministic budget, end this search?"""
    return cp.wall_time >= WALL_CUT * cp.parameters.max_time_in_seconds


def _keep_better(solver: Solver, m: ClassModel, greedy: ClusterState, trial: ClusterState,
                 exact: bool, status: int, proved: bool) -> None:
    """Adopt the decoded plan if it beats the greedy one; then say what was proved. Running
    replicas kept come first: a decoded plan that missed what a running deployment needs
    (the model's relaxation) must not win by placing new work in their stead."""
    greedy_value, trial_value = _value(solver, m, greedy), _value(solver, m, trial)
    solver.stats["greedy_objective"] = greedy_value[1]
    solver.stats["cpsat_objective"] = trial_value[1]
    if trial_value > greedy_value:
        solver.adopt(trial)
        solver.stats["answer"] = "cpsat"
    else:
        solver.stats["answer"] = "greedy"
    placed = solver.objective(solver.state)
    bound = solver.stats["best_bound"]
    assert isinstance(bound, int)
    # Stopped by the time limit (FEASIBLE) with a bound the plan does not reach: what is left
    # unplaced was not proved unplaceable. A reached bound proves term 1 whatever the status.
    if status == cp_model.FEASIBLE and bound > placed:
        solver.time_cut.update(m.pending)
    # A bound below what a plan reaches is no bound: the model does not cover everything the
    # placer can do (the greedy answer beat it), so claim neither the bound nor optimality. Nor
    # where shards were repaired before it: the model took their place as given (a better plan
    # re-places them elsewhere: an `optimal` plan was beaten, found by exploratory testing).
    if placed > bound or solver.repaired:
        del solver.stats["best_bound"]
        return
    # Proved only for what the model covers (no preemption or moves could do better), and
    # only for a plan that reaches the bound.
    opts = solver.problem.options
    if proved and exact and placed == bound and trial_value >= greedy_value and \
            not opts.allow_preemption and opts.mode == "batch":
        solver.proved_optimal = True


def _value(solver: Solver, m: ClassModel, state: ClusterState) -> tuple[int, int, tuple[int, int]]:
    """What `_keep_better` compares: running replicas kept, the objective, the fragmentation."""
    return m.running_kept(state), solver.objective(state), _frag_metric(state)


def _fewest_classes_first(solver: Solver, m: ClassModel, cp: cp_model.CpSolver) -> list[int]:
    """The pending deployments, those the model put on the fewest node classes first (then in
    batch order)."""
    used: dict[int, int] = defaultdict(int)
    for (d, _), var in m.x.items():
        if cp.value(var) > 0:
            used[d] += 1
    batch = {d: i for i, d in enumerate(solver.batch_order(list(m.pending)))}
    return sorted(m.pending, key=lambda d: (used[d], batch[d]))


def _decode(solver: Solver, m: ClassModel, cp: cp_model.CpSolver, order: list[int]) -> tuple[ClusterState, bool]:
    """The placer realises the domains the model chose, with the exact per-node rules, then
    fills what is left greedily. Returns the trial state and whether it is exactly the
    model's choice."""
    base, classes = m.base, m.classes
    deps, topo = base.deps, base.topo
    trial = base.copy()
    placer = Placer(trial, scorer="bestfit", workload=solver.workload)
    exact = True
    leftovers: dict[int, list[int]] = {}
    for d in order:  # first what the model chose, for everyone
        todo = list(m.pending[d])
        level = deps[d].locality
        for dom in sorted(dom for (dd, dom) in m.y if dd == d and cp.value(m.y[d, dom]) > 0):
            if level == "node":
                allowed = np.zeros(topo.n_nodes, dtype=bool)
                allowed[list(classes[dom].nodes)] = True
            else:
                allowed = topo.domain_of(level) == dom
            # The classes the model used inside the domain, first; the whole domain if need be.
            chosen = np.zeros(topo.n_nodes, dtype=bool)
            for ci in m.members[d, dom]:
                if cp.value(m.x[d, ci]) > 0:
                    chosen[list(classes[ci].nodes)] = True
            shards = list(range(deps[d].shards_per_replica))
            for _ in range(int(cp.value(m.y[d, dom]))):
                if todo and (placer.place_gang(d, todo[0], shards, allowed & chosen) or
                             placer.place_gang(d, todo[0], shards, allowed)):
                    todo.pop(0)
                else:
                    exact = False
                    break
        leftovers[d] = todo
    for d in solver.batch_order(list(m.pending)):  # then the greedy fills what is left
        if leftovers[d] and placer.place_deployment(d, leftovers[d]):
            exact = False
        have = trial.placed_replicas(d)
        if have and len(have) < deps[d].min_replicas:
            for r in have:
                trial.remove_replica(d, r)
            exact = False
    return trial, exact
