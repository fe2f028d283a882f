"""The plan: what the solve's final state means as placements, moves, preemptions, reasons
and a status.

An existing replica that did not change is re-emitted with the input's own placement values
(no per-shard comparison); a changed shard is a new placement, and a move if it was placed
before on another node or other accelerators. Deployments left pending get their reasons
(`explain`), the preemption hint when preemption is off, and TIME_LIMIT when the deadline
cut their search short.

`note_kept_violations` (asked for by `solve(check_kept=True)`, not by the warm session) lists in
`stats` the hard rules that existing placements the plan keeps break (isolation, capacity and
power as the watchdog and the plan applier judge them; gangs, locality, spread, models and
quotas as the solver does): the solver keeps or moves such a placement but never reports it
otherwise, and never makes a new breach.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from scheduler.explain import explain, leading
from scheduler.model import Move, Placement, Plan, Preemption, Problem, Reason, Unplaced
from scheduler.preemption import preemption_hints, with_hint
from scheduler.violations import Violation, find_power_violations, find_violations, find_workload_violations

if TYPE_CHECKING:
    from scheduler.solve import Solver


def enforce_min_replicas(solver: Solver) -> None:
    """Safety net: a deployment below min_replicas runs nothing."""
    state = solver.state
    for d, dep in enumerate(state.deps):
        have = state.placed_replicas(d)
        if have and len(have) < dep.min_replicas:
            for r in have:
                state.remove_replica(d, r)


def placements_and_moves(solver: Solver) -> tuple[list[Placement], list[Move]]:
    state, topo = solver.state, solver.topo
    deps = state.deps
    placements: list[Placement] = []
    moved: list[Move] = []
    node_index = topo.node_index
    for d, r in sorted(state.replicas):
        shards = state.replicas[(d, r)]
        dep = deps[d]
        given_r = solver.given.get((d, r), {})
        loaded = solver.loaded.get((d, r))
        if (shards is loaded or shards == loaded) and len(given_r) == len(shards) and \
                (d, r) not in solver.odd_milli:
            # Unchanged since loaded (same nodes, indices, milli): the input's own values.
            placements.extend(given_r[s] for s in sorted(given_r))
            continue
        for s, at in sorted(shards.items()):
            given = given_r.get(s)
            was = node_index[given.node] if given is not None else None
            if given is not None and was == at.node and \
                    tuple(given.accelerator_indices) == tuple(at.indices) and \
                    (given.accelerator_milli is not None) == dep.shard.fractional:
                placements.append(given)  # unchanged: the input's own value
                continue
            placements.append(Placement(
                dep.id, r, s, topo.node_ids[at.node], tuple(at.indices),
                at.milli if dep.shard.fractional else None))
            if given is not None and was is not None and (was != at.node or (
                    sorted(given.accelerator_indices) != sorted(at.indices))):
                moved.append(Move(dep.id, r, s, topo.node_ids[was], topo.node_ids[at.node]))
    return placements, moved


def unplaced_with_reasons(solver: Solver, preempted: list[tuple[int, int]],
                          only: list[int] | None = None) -> tuple[list[Unplaced], bool]:
    """Every deployment short of replicas (or of `only` these), with its reasons; and
    whether any of them got TIME_LIMIT (its search cut by the clock or the trial budget)."""
    deps = solver.state.deps
    hints = preemption_hints(solver, only)
    unplaced = []
    time_limited = False
    for d in range(len(deps)) if only is None else only:
        dep = deps[d]
        missing = len(solver.pending(d))
        if missing == 0:
            continue
        reasons = tuple(solver.why.get(d) or explain(solver.state, d))
        if d in hints:
            reasons = with_hint(reasons, hints[d])
        gone = [r for (dd, r) in preempted if dd == d]
        if gone:
            reasons = leading(reasons, Reason("CAPACITY", f"{len(gone)} replica(s) preempted for "
                                              "higher-priority or reserved work"))
        if d in solver.time_cut:
            reasons = reasons + (Reason(
                "TIME_LIMIT", f"solve stopped at its {solver.limit_ms} ms time limit before "
                f"proving {dep.id} could not be placed; best plan found so far returned"),)
            time_limited = True
        elif d in solver.trials_cut:
            reasons = reasons + (Reason(
                "TIME_LIMIT", f"the preemption search stopped at its {solver.room_trials.total} trials a solve before "
                f"{dep.id} was placed whole; another solve goes on from this plan"),)
            time_limited = True
        unplaced.append(Unplaced(dep.id, missing, reasons))
    return unplaced, time_limited


def emit_plan(solver: Solver) -> Plan:
    enforce_min_replicas(solver)
    state = solver.state
    deps = state.deps
    placements, moved = placements_and_moves(solver)
    preempted = sorted(set(v for v in solver.preempted if v not in state.replicas))
    unplaced, cut = unplaced_with_reasons(solver, preempted)
    new_placed = sum(1 for key in state.replicas if key not in solver.existing_replicas)
    pending = int(solver.stats.get("pending_replicas", 0))
    stats = solver.stats
    stats.setdefault("objective", solver.objective(state))
    # CP-SAT's bound covers what its model covers: a plan a later stage (moves, the exact
    # pairing) took above it leaves it no bound, and a plan below it no proof (the model
    # weighed something the plan does not hold).
    bound = stats.get("best_bound")
    if bound is not None and stats["objective"] > bound:
        del stats["best_bound"]
    proved = solver.proved_optimal and stats["objective"] == bound
    if pending == 0 and not solver.lost:
        status = "optimal"
    elif new_placed == 0 and unplaced and not moved and not cut:
        status = "infeasible"  # not when the deadline or the trial budget cut the search: nothing is proved
    else:
        status = "optimal" if proved else "feasible"
    stats["solve_ms"] = (time.perf_counter() - solver.t0) * 1000.0
    stats["nodes"] = solver.topo.n_nodes
    stats["time_limit_hit"] = any(solver.pending(d) for d in solver.time_cut)  # the clock's
    if any(solver.pending(d) for d in solver.trials_cut):
        stats["trials_cut"] = True  # the preemption search's budget: another solve places more
    return Plan(status=status, placements=tuple(placements), unplaced=tuple(unplaced),
                preempted=tuple(Preemption(deps[d].id, r) for d, r in preempted),
                moved=tuple(moved), stats=dict(stats))


KEPT_VIOLATIONS_LISTED = 20  # of the kept breaches, the first few in stats (all are counted)


def kept_violations(problem: Problem, plan: Plan) -> list[Violation]:
    """The hard rules broken by the plan's placements that the problem gave (kept as they were),
    judged alone: `find_violations`, then the rack and row power budgets the kept shards draw
    past (`find_power_violations`; a budget that idle power alone exceeds is no kept shard's).
    New and moved placements are left out: the solver never makes a breach.

    Then the rules over replicas, deployments and tenants (`find_workload_violations`: gangs,
    locality, spread, models, quotas), judged over the replicas the plan keeps a shard of, each
    whole as the plan runs it: a replica `repair` made whole beside its kept shards is no gang
    left partial, and the shards it added were placed within the rules (what breaks one there
    is the kept shards'). Replicas only new in the plan are left out."""
    if not problem.placements:
        return []
    given = set(problem.placements)
    kept = dataclasses.replace(problem, placements=tuple(p for p in plan.placements if p in given))
    idle = {v.scope for v in find_power_violations(dataclasses.replace(problem, placements=()))}
    held = {(p.deployment, p.replica) for p in kept.placements}
    replicas = dataclasses.replace(problem, placements=tuple(
        p for p in plan.placements if (p.deployment, p.replica) in held))
    return (find_violations(kept) + [v for v in find_power_violations(kept) if v.scope not in idle]
            + find_workload_violations(replicas))


def note_kept_violations(problem: Problem, plan: Plan) -> None:
    """stats.kept_violations: the first `KEPT_VIOLATIONS_LISTED` of `kept_violations`, each
    `{rule, scope, tenants, message}` (empty: none); stats.kept_violations_total: how many."""
    found = kept_violations(problem, plan)
    plan.stats["kept_violations"] = [
        {"rule": v.rule, "scope": v.scope, "tenants": list(v.tenants), "message": v.message}
        for v in found[:KEPT_VIOLATIONS_LISTED]]
    plan.stats["kept_violations_total"] = len(found)
