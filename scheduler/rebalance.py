"""Rebalance: move running replicas (at most `max_moves` shards in all) to fit what did not.

Pending deployments are taken priority first, biggest first; for each, `room.make_room` with
relocation finds the fewest replicas to move so one more replica fits, as long as the move
budget, the solve's trial budget (`Solver.room_trials`) and the deadline allow. Runs before preemption, so moves are preferred to evictions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.room import make_room

if TYPE_CHECKING:
    from scheduler.solve import Solver


def rebalance(solver: Solver) -> None:
    """Move existing replicas (within max_moves shards) to fit what did not fit."""
    limit = solver.problem.options.max_moves
    budget = limit if limit is not None else 1 << 30
    solver.moves_used = 0
    pending = [d for d in range(len(solver.state.deps)) if solver.pending(d)]
    for d in solver.batch_order(pending):
        while solver.pending(d) and budget - solver.moves_used > 0:
            if solver.late(d):
                break
            eligible = [v for v in solver.state.replicas if v[0] != d]
            found = make_room(solver, d, eligible, relocate=True,
                              budget=budget - solver.moves_used, trials=solver.room_trials,
                              deadline=solver.deadline)
            if found is None:
                solver.late(d)
                break
            trial, _, moved = found
            solver.adopt(trial)
            solver.moves_used += moved
        if not solver.pending(d):
            solver.why.pop(d, None)
