"""CP-SAT over node classes: which pending replicas go into which locality domain.

The greedy places one gang at a time and can paint itself into a corner (a big gang arriving
after small ones took the one rack it fitted in, two tenants that exclude each other spread over
every rack). This model decides all pending replicas of a batch jointly, at the level of
locality domains and node classes (`classes.py`), then hands its choice back to the greedy
placer restricted to those domains, which picks concrete nodes and accelerator indices with
the exact per-node rules. The model's capacity rules are aggregated per class, i.e. a
relaxation: the decoded plan is checked rule by rule by the placer, and the solver keeps
whichever of greedy and decoded plan is better, so CP-SAT can only improve the answer.

Objective, lexicographic through weights: placed demand x priority weight first, then
fragmentation: fresh nodes opened and fresh (empty) racks opened, so partly used capacity is
filled first and whole nodes and racks stay free for big gangs.

Set MAIA_DUMP_MODEL=/path/model.pb.txt to write the model for offline debugging.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
from ortools.sat.python import cp_model

from scheduler.classes import NodeClass, node_classes
from scheduler.filters import node_fit, quota_room
from scheduler.greedy import Placer
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

STATUS_NAMES = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible",
                cp_model.INFEASIBLE: "infeasible", cp_model.MODEL_INVALID: "model_invalid",
                cp_model.UNKNOWN: "unknown"}


def configure(params: "sat_parameters_pb2.SatParameters", left_s: float) -> None:
    """Deterministic search: the same model gives the same answer on every run.

    `interleave_search` runs the workers' strategies interleaved in a fixed schedule (the
    result does not depend on thread timing), with a fixed seed, and the search stops at a
    *deterministic* time budget (work counted by the solver, not the clock) proportional to
    the time left. The wall-clock limit stays as a ceiling, slightly above that budget's
    usual duration: only a much slower machine reaches it (then the answer can vary)."""
    params.num_workers = NUM_WORKERS
    params.interleave_search = True
    params.random_seed = CPSAT_SEED
    params.max_deterministic_time = max(left_s * DETERMINISTIC_PER_S, 0.005)
    params.max_time_in_seconds = max(left_s * 0.85, 0.01)


def _frag_metric(state: ClusterState) -> tuple[int, int]:
    """Whole free racks and whole free nodes (more is less fragmented)."""
    topo = state.topo
    whole_nodes = (state.free_whole() == topo.node_accelerators) & topo.node_ready & \
        (state.node_tenant.sum(axis=1) == 0)
    busy_racks = np.bincount(topo.node_rack, weights=~whole_nodes & topo.node_ready,
                             minlength=len(topo.rack_ids))
    return int((busy_racks == 0).sum()), int(whole_nodes.sum())


def improve(solver: "Solver", base: ClusterState, wanted: list[int]) -> None:
    """Try to beat the greedy answer in solver.state; adopt the better of the two."""
    left = solver.deadline - time.perf_counter()
    if left < MIN_SOLVE_S:
        solver.stats["cpsat"] = "skipped: no time left"
        solver.time_cut.update(wanted)
        return
    t_build = time.perf_counter()
    deps = base.deps
    topo = base.topo
    pending = {d: [r for r in range(deps[d].replicas) if (d, r) not in base.replicas]
               for d in wanted}
    pending = {d: rs for d, rs in pending.items() if rs}
    if not pending:
        return

    # ---- data -------------------------------------------------------------------------------
    classes = node_classes(base)
    reps = np.array([c.representative for c in classes], dtype=np.int64)
    counts = np.array([c.count for c in classes], dtype=np.int64)
    slots = {d: node_fit(base, d).slots[reps] if len(reps) else np.zeros(0, dtype=np.int64)
             for d in pending}
    pairs = [(d, ci) for d in pending for ci in np.flatnonzero(slots[d] > 0).tolist()]
    if len(pairs) > MAX_PAIRS:
        solver.stats["cpsat"] = f"skipped: {len(pairs)} pairs"
        return
    weight = {d: deps[d].shards_per_replica * max(deps[d].shard.milli, 1) *
              (deps[d].priority - solver.min_priority + 1) for d in pending}
    tenant_of = {d: int(base.dep_tenant[d]) for d in pending}
    class_rack = np.array([c.rack for c in classes], dtype=np.int64)
    free_whole = base.free_whole()
    acc_count = topo.node_accelerators

    model = cp_model.CpModel()

    # ---- variables ----------------------------------------------------------------------------
    # x[d, c]: shards of deployment d on nodes of class c.
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    for d, ci in pairs:
        spec_s = deps[d].shards_per_replica
        ub = min(int(counts[ci] * slots[d][ci]), len(pending[d]) * spec_s)
        x[d, ci] = model.new_int_var(0, ub, f"x_d{d}_c{ci}")
    # y[d, D]: replicas of d inside locality domain D (D: a class when locality is node).
    y: dict[tuple[int, int], cp_model.IntVar] = {}
    members: dict[tuple[int, int], list[int]] = defaultdict(list)
    for d, ci in pairs:
        level = deps[d].locality
        dom = ci if level == "node" else int(topo.domain_of(level)[reps[ci]])
        members[d, dom].append(ci)
    for (d, dom), cis in members.items():
        y[d, dom] = model.new_int_var(0, len(pending[d]), f"y_d{d}_D{dom}")
    # z[d]: new replicas of d; on[d]: d runs at all (min_replicas).
    z = {d: model.new_int_var(0, len(pending[d]), f"z_d{d}") for d in pending}

    # ---- constraints --------------------------------------------------------------------------
    # A replica's shards all sit in its locality domain (the gang rule at domain level).
    for (d, dom), cis in members.items():
        model.add(sum(x[d, ci] for ci in cis) == deps[d].shards_per_replica * y[d, dom])
        if deps[d].locality == "node":  # one node per replica
            per_node = int(slots[d][dom]) // deps[d].shards_per_replica
            model.add(y[d, dom] <= int(counts[dom]) * per_node)
    for d in pending:
        model.add(z[d] == sum(y[key] for key in y if key[0] == d))
        have = len(base.placed_replicas(d))
        need = deps[d].min_replicas - have
        if need > 1:
            on = model.new_bool_var(f"on_d{d}")
            model.add(z[d] >= need).only_enforce_if(on)
            model.add(z[d] == 0).only_enforce_if(~on)
    # Per class: accelerators (whole ones, and fresh ones opened for fractions), CPU, memory.
    by_class: dict[int, list[int]] = defaultdict(list)
    for d, ci in pairs:
        by_class[ci].append(d)
    opened: dict[int, cp_model.IntVar] = {}
    for ci, ds in by_class.items():
        n = int(reps[ci])
        cnt = int(counts[ci])
        whole_use = []
        frac_by_tenant: dict[int, list] = defaultdict(list)
        for d in ds:
            spec = deps[d].shard
            if spec.fractional:
                frac_by_tenant[tenant_of[d]].append(spec.accelerator_milli * x[d, ci])
            elif spec.accelerators:
                whole_use.append(spec.accelerators * x[d, ci])
        for t, terms in frac_by_tenant.items():
            partial = int(np.where((base.acc_owner[n] == t) & (base.acc_free[n] < 1000),
                                   base.acc_free[n], 0).sum())
            fresh = model.new_int_var(0, cnt * int(free_whole[n]), f"fresh_t{t}_c{ci}")
            model.add(sum(terms) <= 1000 * fresh + cnt * partial)
            whole_use.append(fresh)
        if whole_use:
            model.add(sum(whole_use) <= cnt * int(free_whole[n]))
        cpu = [deps[d].shard.cpu_milli * x[d, ci] for d in ds if deps[d].shard.cpu_milli]
        if cpu and base.cpu_free[n] < 1e14:
            model.add(sum(cpu) <= int(cnt * max(base.cpu_free[n], 0)))
        mem = [deps[d].shard.memory_mib * x[d, ci] for d in ds if deps[d].shard.memory_mib]
        if mem and base.mem_free[n] < 1e14:
            model.add(sum(mem) <= int(cnt * max(base.mem_free[n], 0)))
        # Fresh (entirely free) nodes opened: the fragmentation term.
        if free_whole[n] == acc_count[n] and acc_count[n] > 0 and whole_use:
            opened[ci] = model.new_int_var(0, cnt, f"open_c{ci}")
            model.add(int(acc_count[n]) * opened[ci] >= sum(whole_use))
    # Power: racks and rows, shard power only (idle power is already in the base state).
    rack_terms: dict[int, list] = defaultdict(list)
    for d, ci in pairs:
        p = deps[d].shard.shard_power_w
        if p > 0:
            rack_terms[int(class_rack[ci])].append((int(round(p * 1000)), x[d, ci]))
    row_terms: dict[int, list] = defaultdict(list)
    for rack, terms in rack_terms.items():
        head = base.rack_headroom()[rack]
        if head < 1e14:
            model.add(sum(w * v for w, v in terms) <= int(np.floor(max(head, 0) * 1000)))
        row_terms[int(topo.rack_row[rack])].extend(terms)
    for row, terms in row_terms.items():
        head = base.row_headroom()[row]
        if head < 1e14:
            model.add(sum(w * v for w, v in terms) <= int(np.floor(max(head, 0) * 1000)))
    # Tenant caps (accelerators and power).
    by_tenant: dict[int, list[int]] = defaultdict(list)
    for d in pending:
        by_tenant[tenant_of[d]].append(d)
    for t, ds in by_tenant.items():
        milli_room = topo.tenant_max_milli[t] - base.tenant_milli[t]
        if milli_room < 1e14:
            model.add(sum(deps[d].shard.milli * deps[d].shards_per_replica * z[d] for d in ds)
                      <= int(np.floor(milli_room + 1e-6)))
        power_room = topo.tenant_max_power[t] - base.tenant_power[t]
        if power_room < 1e14:
            model.add(sum(int(round(deps[d].shard.shard_power_w * 1000)) *
                          deps[d].shards_per_replica * z[d] for d in ds)
                      <= int(np.floor(max(power_room, 0) * 1000)))
    # Spread: replicas per spread domain (exact when the spread domain contains the locality
    # domain; otherwise a bound on shards, and the placer enforces the exact rule).
    order = {"node": 0, "rack": 1, "row": 2, "zone": 3, "none": 4}
    for d in pending:
        sp = deps[d].spread
        if sp is None or sp.domain == "none":
            continue
        counts_now = base.spread_count[d]
        sdom = topo.domain_of(sp.domain)
        groups: dict[int, list] = defaultdict(list)
        if order[sp.domain] >= order[deps[d].locality] and deps[d].locality != "node":
            for (dd, dom), cis in members.items():
                if dd == d:
                    groups[int(sdom[reps[cis[0]]])].append(y[d, dom])
            for sd, terms in groups.items():
                model.add(sum(terms) <= max(sp.max_per_domain - int(counts_now[sd]), 0))
        elif sp.domain == "node":  # per class: each node has its own room
            for (dd, ci) in pairs:
                if dd == d:
                    room = max(sp.max_per_domain - int(counts_now[reps[ci]]), 0)
                    model.add(x[d, ci] <= room * deps[d].shards_per_replica * int(counts[ci]))
        else:  # a replica touching the domain puts at most all its shards there
            for (dd, ci) in pairs:
                if dd == d:
                    groups[int(sdom[reps[ci]])].append(x[d, ci])
            for sd, terms in groups.items():
                room = max(sp.max_per_domain - int(counts_now[sd]), 0)
                model.add(sum(terms) <= room * deps[d].shards_per_replica)
    # Isolation and exclusion between new tenants in one rack: presence booleans.
    present: dict[tuple[int, int], cp_model.IntVar] = {}
    rack_tenants: dict[int, set[int]] = defaultdict(set)
    for d, ci in pairs:
        rack, t = int(class_rack[ci]), tenant_of[d]
        key = (t, rack)
        if key not in present:
            present[key] = model.new_bool_var(f"in_t{t}_r{rack}")
            rack_tenants[rack].add(t)
        model.add(x[d, ci] == 0).only_enforce_if(~present[key])
    for rack, ts in rack_tenants.items():
        for t in ts:
            for u in ts:
                if u <= t:
                    continue
                if base.dedicated_rack[t] or base.dedicated_rack[u] or \
                        topo.tenant_excludes[t, u]:
                    model.add_bool_or([~present[t, rack], ~present[u, rack]])
    # dedicated_node: nodes of a class are split between tenants.
    for ci, ds in by_class.items():
        ts = {tenant_of[d] for d in ds}
        if len(ts) > 1 and any(base.dedicated_node[t] for t in ts):
            cnt = int(counts[ci])
            share = {t: model.new_int_var(0, cnt, f"nodes_t{t}_c{ci}") for t in ts}
            model.add(sum(share.values()) <= cnt)
            for t in ts:
                terms = [x[d, ci] for d in ds if tenant_of[d] == t]
                cap = max(int(slots[d][ci]) for d in ds if tenant_of[d] == t)
                model.add(sum(terms) <= cap * share[t])
    # Fresh racks opened (fragmentation at rack level).
    empty_racks = [r for r in rack_tenants if base.rack_tenant[r].sum() == 0]
    rack_open = {}
    for r in empty_racks:
        rack_open[r] = model.new_bool_var(f"open_r{r}")
        for t in rack_tenants[r]:
            model.add_implication(present[t, r], rack_open[r])

    # ---- objective ----------------------------------------------------------------------------
    frag_terms = list(opened.values()) + [10 * v for v in rack_open.values()]
    frag_ub = sum(int(counts[ci]) for ci in opened) + 10 * len(rack_open)
    scale = frag_ub + 1
    model.maximize(sum(scale * weight[d] * z[d] for d in pending) - sum(frag_terms))

    # ---- hint from the greedy answer ---------------------------------------------------------
    greedy = solver.state
    _add_hints(model, greedy, classes, pending, x, y)

    dump = os.environ.get("MAIA_DUMP_MODEL")
    if dump:
        model.export_to_file(dump)

    # ---- solve --------------------------------------------------------------------------------
    left = solver.deadline - time.perf_counter()
    if left < MIN_SOLVE_S:
        solver.stats["cpsat"] = "skipped: model build used the time"
        solver.time_cut.update(pending)
        return
    cp = cp_model.CpSolver()
    opts = solver.problem.options
    if opts.mode == "rebalance" or opts.allow_preemption:
        left *= CPSAT_SHARE_WITH_REPAIR  # moves and preemption run after it, in what is left
    configure(cp.parameters, left)
    status = cp.solve(model)
    name = STATUS_NAMES.get(status, str(status))
    solver.stats.update({"cpsat": name, "classes": len(classes), "vars": len(x) + len(y),
                         "cpsat_ms": round((time.perf_counter() - t_build) * 1000, 1)})
    if status == cp_model.OPTIMAL or status == cp_model.FEASIBLE:
        # Term 1 of the bound (the fragmentation part is at most frag_ub), plus kept work.
        kept = solver.objective(base)
        solver.stats["best_bound"] = kept + int((cp.best_objective_bound + frag_ub) // scale)
    else:  # INFEASIBLE / MODEL_INVALID / UNKNOWN: keep the greedy answer
        if status == cp_model.UNKNOWN:  # stopped by its time limit before any solution
            solver.time_cut.update(pending)
        return

    # ---- decode: the placer realises the chosen domains with the exact rules ----------------
    trial, exact = _decode(solver, base, cp, pending, classes, members, x, y)

    greedy_value = (solver.objective(greedy), _frag_metric(greedy))
    trial_value = (solver.objective(trial), _frag_metric(trial))
    solver.stats["greedy_objective"] = greedy_value[0]
    solver.stats["cpsat_objective"] = trial_value[0]
    if trial_value > greedy_value:
        solver._adopt(trial)
        solver.stats["answer"] = "cpsat"
    else:
        solver.stats["answer"] = "greedy"
    # Stopped by the time limit (FEASIBLE) with a bound the plan does not reach: what is left
    # unplaced was not proved unplaceable. A reached bound proves term 1 whatever the status.
    if status == cp_model.FEASIBLE and solver.stats["best_bound"] > solver.objective(solver.state):
        solver.time_cut.update(pending)
    # A bound below what a plan reaches is no bound: the model does not cover everything the
    # placer can do (the greedy answer beat it), so claim neither the bound nor optimality.
    if solver.objective(solver.state) > solver.stats["best_bound"]:
        del solver.stats["best_bound"]
        return
    # Proved only for what the model covers: no preemption or moves could do better.
    opts = solver.problem.options
    if status == cp_model.OPTIMAL and exact and trial_value >= greedy_value and \
            not opts.allow_preemption and opts.mode == "batch":
        solver.proved_optimal = True


def _add_hints(model: cp_model.CpModel, greedy: ClusterState, classes: list[NodeClass],
               pending: dict[int, list[int]], x: dict[tuple[int, int], cp_model.IntVar],
               y: dict[tuple[int, int], cp_model.IntVar]) -> None:
    """Hint the model with the greedy answer: its shards per (deployment, class) and its
    replicas per (deployment, domain)."""
    deps, topo = greedy.deps, greedy.topo
    class_of = {n: c.index for c in classes for n in c.nodes}
    hint_x: dict[tuple[int, int], int] = defaultdict(int)
    hint_y: dict[tuple[int, int], int] = defaultdict(int)
    for (d, r), shards in greedy.replicas.items():
        if d not in pending or r not in pending[d]:
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
    for key, var in x.items():
        model.add_hint(var, hint_x.get(key, 0))
    for key, var in y.items():
        model.add_hint(var, hint_y.get(key, 0))


def _decode(solver: "Solver", base: ClusterState, cp: cp_model.CpSolver,
            pending: dict[int, list[int]], classes: list[NodeClass],
            members: dict[tuple[int, int], list[int]],
            x: dict[tuple[int, int], cp_model.IntVar],
            y: dict[tuple[int, int], cp_model.IntVar]) -> tuple[ClusterState, bool]:
    """The placer realises the domains the model chose, with the exact per-node rules, then
    fills what is left greedily. Returns the trial state and whether it is exactly the
    model's choice."""
    deps, topo = base.deps, base.topo
    trial = base.copy()
    placer = Placer(trial, scorer="bestfit", workload=solver.workload)
    exact = True
    leftovers: dict[int, list[int]] = {}
    for d in solver.batch_order(list(pending)):  # first what the model chose, for everyone
        todo = list(pending[d])
        level = deps[d].locality
        for dom in sorted(dom for (dd, dom) in y if dd == d and cp.value(y[d, dom]) > 0):
            if level == "node":
                allowed = np.zeros(topo.n_nodes, dtype=bool)
                allowed[list(classes[dom].nodes)] = True
            else:
                allowed = topo.domain_of(level) == dom
            # The classes the model used inside the domain, first; the whole domain if need be.
            chosen = np.zeros(topo.n_nodes, dtype=bool)
            for ci in members[d, dom]:
                if cp.value(x[d, ci]) > 0:
                    chosen[list(classes[ci].nodes)] = True
            shards = list(range(deps[d].shards_per_replica))
            for _ in range(int(cp.value(y[d, dom]))):
                if todo and (placer.place_gang(d, todo[0], shards, allowed & chosen) or
                             placer.place_gang(d, todo[0], shards, allowed)):
                    todo.pop(0)
                else:
                    exact = False
                    break
        leftovers[d] = todo
    for d in solver.batch_order(list(pending)):  # then the greedy fills what is left
        if leftovers[d] and placer.place_deployment(d, leftovers[d]):
            exact = False
        have = trial.placed_replicas(d)
        if have and len(have) < deps[d].min_replicas:
            for r in have:
                trial.remove_replica(d, r)
            exact = False

    return trial, exact
