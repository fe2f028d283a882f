"""Preemption: evict the fewest lower-priority (or over-reservation) replicas so that a
deployment that did not fit does, and the hint given when preemption is off.

Who may be a victim (`victim_ok`): preemptible work of lower priority; or, for a
non-preemptible deployment of a tenant below its reservation, preemptible work of another
tenant. Online decisions are final inside one solve: there only work running before the
solve may be evicted. The search itself is `room.make_room` without relocation.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

from scheduler.model import Reason
from scheduler.room import Replica, TrialBudget, could_fit_anywhere, make_room

if TYPE_CHECKING:
    from scheduler.solve import Solver
    from scheduler.state import ClusterState

PREEMPTION_HINTS = 3  # unplaced deployments per solve tried for "fits after preempting"
HINT_TRIALS = 48  # trials those may run in all (a count: the same hints on any machine)
# Reasons preempting work cannot change; a hint goes on the first reason of another code.
NOT_FREED = ("NODE_STATE", "ZONE", "ACCELERATOR_MODEL", "TIME_LIMIT")


def victim_ok(solver: Solver, d: int, victim: int) -> bool:
    state = solver.state
    dep, vdep = state.deps[d], state.deps[victim]
    if victim == d or not vdep.preemptible:
        return False
    if vdep.priority < dep.priority:
        return True
    t = int(state.dep_tenant[d])
    below = state.tenant_milli[t] < solver.topo.tenant_reserved_milli[t]
    return not dep.preemptible and below and int(state.dep_tenant[victim]) != t


def eligible_victims(solver: Solver, d: int) -> list[Replica]:
    """Replicas d may take out: running ones, and (batch, rebalance) ones this solve placed, but not
    of a deployment that preempted to be placed: the work it evicted would have gone for nothing
    (a reserved claim took a fraction placed by preempting a whole running gang)."""
    online = solver.problem.options.mode == "online"
    return [v for v in solver.state.replicas if victim_ok(solver, d, v[0])
            and (v in solver.existing_replicas or not (online or v[0] in solver.claimants))]


def preempt_for(solver: Solver, d: int) -> None:
    """Evict the fewest victims, one replica of d at a time, until d is placed or stuck.

    A deployment short of min_replicas gathers them a replica at a time, each where its own
    victims make room (two node-local replicas on two full nodes: each node's; a trial that
    had to place all of them beside the first never could, and such a deployment never
    preempted). Stuck short of the minimum, everything it did is undone: fewer than
    min_replicas placed means none, and no victim goes for nothing."""
    minimum = solver.state.deps[d].min_replicas
    before: tuple[ClusterState, int, set[int]] | None = None  # the solve before d gathered short of min
    while solver.placeable(d):
        if solver.late(d):
            break
        eligible = eligible_victims(solver, d)
        if not eligible:
            break
        short = len(solver.state.placed_replicas(d)) < minimum
        if short and before is None:
            before = (solver.state, len(solver.preempted), set(solver.claimants))
        found = make_room(solver, d, eligible, relocate=False, budget=0,
                          trials=solver.room_trials, deadline=solver.deadline, below_min=short)
        if found is None:
            if solver.room_trials.left <= 0 and could_fit_anywhere(solver.state, d, eligible):
                solver.trials_cut.add(d)  # the search's budget ran out, not the room
            solver.late(d)
            break
        trial, removed, _ = found
        solver.adopt(trial)
        solver.preempted += [v for v in removed if v in solver.existing_replicas]
        if removed:
            solver.claimants.add(d)
        # The rest of the deployment may fit now; min_replicas still applies (judged below while gathering).
        rest = solver.placeable(d)
        if rest:
            solver.placer.place_deployment(d, rest, reach_min=not short)
        if not solver.pending(d):
            solver.why.pop(d, None)
    if before is not None and len(solver.state.placed_replicas(d)) < minimum:
        state, preempted, claimants = before  # `adopt` replaced the state: this one is as it was
        solver.adopt(state)
        del solver.preempted[preempted:]
        solver.claimants = claimants


def preemption_hints(solver: Solver, only: list[int] | None = None) -> dict[int, str]:
    """With allow_preemption off: for a few unplaced deployments (of `only` these), the
    fewest running replicas whose preemption would let one more replica fit (a trial on a
    copy)."""
    if solver.problem.options.allow_preemption:
        return {}
    state = solver.state
    unplaced = [d for d in (range(len(state.deps)) if only is None else only)
                if solver.pending(d)]
    if not unplaced:
        return {}  # the common no-op re-read: no scan of every running replica
    running = [v for v in state.replicas
               if state.deps[v[0]].preemptible and v in solver.existing_replicas]
    if not running:
        return {}
    trials = TrialBudget(HINT_TRIALS)
    hints: dict[int, str] = {}
    tried = 0
    for d in solver.batch_order(unplaced):
        if tried >= PREEMPTION_HINTS or trials.left <= 0 or \
                time.perf_counter() >= solver.deadline:
            break
        eligible = [v for v in running if victim_ok(solver, d, v[0])]
        if not eligible:
            continue
        tried += 1
        found = make_room(solver, d, eligible, relocate=False, budget=0, trials=trials,
                          deadline=solver.deadline)
        if found is None:
            continue
        trial, removed, _ = found
        more = len(trial.placed_replicas(d)) - len(state.placed_replicas(d))
        per_dep: dict[str, int] = defaultdict(int)
        for vd, _ in removed:
            per_dep[state.deps[vd].id] += 1
        victims = ", ".join(f"{n} replica{'s' if n > 1 else ''} of {name}" for name, n in
                            sorted(per_dep.items(), key=lambda kv: (-kv[1], kv[0])))
        hints[d] = (f"{more} more replica{'s fit' if more > 1 else ' fits'} after "
                    f"preempting {victims} (allow_preemption is off)")
    return hints


def with_hint(reasons: tuple[Reason, ...], hint: str) -> tuple[Reason, ...]:
    """Add the hint to the first reason preempting can change (else a CAPACITY one)."""
    for i, r in enumerate(reasons):
        if r.code not in NOT_FREED:
            return reasons[:i] + (Reason(r.code, f"{r.message}; {hint}", r.scope),) + \
                reasons[i + 1:]
    return reasons + (Reason("CAPACITY", hint),)
