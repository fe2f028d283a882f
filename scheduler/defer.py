"""Online batches leave a big fraction out rather than open one of the last empty accelerators.

With no departures the cluster fills up, and at the end the empty accelerators are what is
short: most of a trace's demand (openb `default`: 71 % of the milli) asks for whole
accelerators, which nothing else can serve. A fraction of 810 milli that opens an empty
accelerator then holds it at 810 for good (the 190 left fits almost nothing), where a whole
task arriving later would use all 1000; on seed 1 of `default` 990 accelerators end holding an
810 alone (188,100 of the 239,130 milli left unallocated), and the packing bound with those
810s forced in is already 3.50 %, the best packing 3.1 % (docs/benchmarks.md, issue 9 part 9).
A decision one arrival at a time must place what fits (online mode); a batch is the solver's
own decision about several arrivals, so here it may say "not now":

    tight     the batch starts with fewer empty accelerators (ready, nothing on them) than
              `EMPTY_SHARE` of the ready ones
    deferred  then every fractional single-shard replica of the batch of at least `MIN_MILLI`
              that the batch put alone on an accelerator (it opened an empty one) is taken
              out again; the batch's other replicas still pending are placed after, on the
              room this frees; the deferred ones stay pending with a CAPACITY reason that
              says so (a controller tries them again on its next pass).

Both constants were chosen on seeds 1-10 of openb `default` (never 42-51), deferring in the
online protocol as a proxy and then in batches (docs/benchmarks.md, issue 9, 2026-12-01,
evening). They are the protocol's: no departures, 130 % of the capacity offered, measured at
100 % arrived. **With departures the deferral hurts**: `bench departures --batch-size 16`
(seed 42, 95 % offered) allocates 90.64 % of GPU capacity on time average with it against
91.42 % without, 510 pods waiting against 336 (docs/benchmarks.md, issue 9, 2026-12-01, late):
accelerators free up all the time there, and a held-back fraction leaves room nothing else
takes. `online_batch.place_batch(defer=False)` turns it off; `solve()`'s online batches
(`batch_size` > 1) still defer (no option switches it; the controller decides one arrival at
a time, where nothing is deferred).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scheduler.model import Reason
from scheduler.pairing import FULL
from scheduler.state import ClusterState, ShardAt

if TYPE_CHECKING:
    from scheduler.solve import Solver

EMPTY_SHARE = 0.13  # tight below this share of the ready accelerators left empty
MIN_MILLI = 600  # fractions from this size up are deferred rather than open an accelerator


def empty_accelerators(state: ClusterState) -> tuple[int, int]:
    """(empty accelerators, ready accelerators): on nodes that are ready, nothing placed."""
    ready = state.acc_exists & state.topo.node_ready[:, None]
    return int(np.count_nonzero(ready & (state.acc_free >= FULL))), int(ready.sum())


def tight(state: ClusterState) -> tuple[int, int] | None:
    """(empty, ready) accelerators when fewer than `EMPTY_SHARE` of the ready ones are empty
    (module doc), else None."""
    empty, ready = empty_accelerators(state)
    return (empty, ready) if empty < EMPTY_SHARE * ready else None


def defer_openers(solver: Solver, ds: list[int], empty: int, ready: int) -> list[int]:
    """Take out the replicas of these deployments that the module doc defers (each a big
    fraction this solve put alone on an accelerator; running ones stay) and give each deferred deployment its reason, which
    counts the `empty` of `ready` accelerators the batch started with; returns the
    deployments that lost a replica."""
    state = solver.state
    deferred = []
    taken = 0
    for d in ds:
        dep = state.deps[d]
        milli = dep.shard.accelerator_milli
        if not (dep.shard.fractional and dep.shards_per_replica == 1 and milli >= MIN_MILLI):
            continue
        opened = [r for r in sorted(state.by_dep.get(d, ()))  # this batch's, not the given
                  if (d, r) not in solver.given
                  and _alone(state, state.replicas[(d, r)][0], milli)]
        for r in opened:
            state.remove_replica(d, r)
        if opened:
            deferred.append(d)
            taken += len(opened)
            solver.why[d] = (Reason(
                "CAPACITY",
                f"{dep.id}: deferred, {milli} milli would open one of the last {empty} empty "
                f"accelerators of {ready} (fewer than {EMPTY_SHARE:.0%}) and leave "
                f"{FULL - milli} milli beside it; kept for work that fills an accelerator"),)
    if taken:
        count = solver.stats.get("deferred_replicas", 0)
        solver.stats["deferred_replicas"] = (count if isinstance(count, int) else 0) + taken
    return deferred


def _alone(state: ClusterState, shard: ShardAt, milli: int) -> bool:
    """The shard is all its accelerator holds."""
    return len(shard.indices) == 1 and \
        int(state.acc_free[shard.node, shard.indices[0]]) == FULL - milli
