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
              `WHOLE_COVER` x the accelerators whole tasks are expected to ask for from
              here on (`expected_whole`): the workload's whole share of the milli (as seen
              so far) times the demand still to come, taken as the free milli (the cluster
              is expected to fill up, as `pairing.py` expects) less the milli this solve
              has already left out (without that, every deferral would keep the estimate
              up and the batches would defer until the end; `WHOLE_COVER` > 1: the
              fractions that open accelerators need some too)
    deferred  then every fractional single-shard replica of the batch of at least `MIN_MILLI`
              that the batch put alone on an accelerator (it opened an empty one) is taken
              out again; the batch's other replicas still pending are placed after, on the
              room this frees; the deferred ones stay pending with a CAPACITY reason that
              says so (a controller tries them again on its next pass).

`MIN_MILLI` was chosen on seeds 1-10 of openb `default` (never 42-51) with a fixed share of
empty accelerators as the threshold (docs/benchmarks.md, issue 9, 2026-12-01, evening);
the threshold from the demand still to come replaced it (seeds 1-10, deferring in the online
protocol as a proxy: 3.62 -> 3.43 %, every seed better; docs/benchmarks.md, issue 9,
2026-12-01, night). The constants are the protocol's: no departures, 130 % of the capacity
offered, measured at 100 % arrived. **With departures the deferral hurts** (measured with
the fixed share): `bench departures --batch-size 16` (seed 42, 95 % offered) allocates 90.64 % of GPU capacity on time average with it against
91.42 % without, 510 pods waiting against 336 (docs/benchmarks.md, issue 9, 2026-12-01, late):
accelerators free up all the time there, and a held-back fraction leaves room nothing else
takes. `online_batch.place_batch(defer=False)` turns it off; `solve()`'s online batches
(`batch_size` > 1) still defer (no option switches it; the controller decides one arrival at
a time, where nothing is deferred).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from scheduler.fragmentation import Workload
from scheduler.model import Reason
from scheduler.pairing import FULL
from scheduler.state import ClusterState, ShardAt

if TYPE_CHECKING:
    from scheduler.solve import Solver

MIN_MILLI = 600  # fractions from this size up are deferred rather than open an accelerator
WHOLE_COVER = 1.3  # tight while the empty accelerators are fewer than this x `expected_whole`


@dataclass(frozen=True)
class Squeeze:
    """Why a batch is tight: `empty` of `ready` accelerators empty, fewer than
    `WHOLE_COVER` x `whole` (the accelerators whole tasks are expected to ask for)."""

    empty: int
    ready: int
    whole: float


def empty_accelerators(state: ClusterState) -> tuple[int, int]:
    """(empty accelerators, ready accelerators): on nodes that are ready, nothing placed."""
    ready = state.acc_exists & state.topo.node_ready[:, None]
    return int(np.count_nonzero(ready & (state.acc_free >= FULL))), int(ready.sum())


def whole_share(workload: Workload) -> float:
    """The share of the milli the workload (its snapshot) asks for that asks for whole
    accelerators."""
    demand = workload.demand()
    total = sum(x for _, x in demand)
    return sum(x for m, x in demand if m >= FULL) / total if total > 0 else 0.0


def free_milli(state: ClusterState) -> int:
    """Milli free on the accelerators of ready nodes."""
    ready = state.acc_exists & state.topo.node_ready[:, None]
    return int(np.clip(np.where(ready, state.acc_free, 0), 0, FULL).sum())


def left_out_milli(solver: Solver) -> int:
    """Milli of the replicas this solve decided and left unplaced (no room, or deferred)."""
    deps = solver.state.deps
    return sum(len(solver.pending(d)) * deps[d].shards_per_replica * deps[d].shard.milli
               for d in solver.why)


def still_to_come(solver: Solver) -> int:
    """Milli of demand expected from here on: the free milli less what this solve has left
    out (module doc)."""
    return max(free_milli(solver.state) - left_out_milli(solver), 0)


def expected_whole(solver: Solver) -> float:
    """Accelerators whole tasks are expected to ask for from here on (module doc): the
    workload's whole share of the demand still to come."""
    return whole_share(solver.workload) * still_to_come(solver) / FULL


def tight(solver: Solver) -> Squeeze | None:
    """Why the cluster is short of empty accelerators (module doc), or None. Never while
    the empty accelerators could take all the demand still to come (an empty cluster, say,
    however much of the workload asks for whole accelerators)."""
    empty, ready = empty_accelerators(solver.state)
    if still_to_come(solver) <= empty * FULL:
        return None
    whole = expected_whole(solver)
    return Squeeze(empty, ready, whole) if empty < WHOLE_COVER * whole else None


def defer_openers(solver: Solver, ds: list[int], squeeze: Squeeze) -> list[int]:
    """Take out the replicas of these deployments that the module doc defers (each a big
    fraction this solve put alone on an accelerator; running ones stay) and give each
    deferred deployment its reason, which says how short the batch started (`squeeze`);
    returns the deployments that lost a replica."""
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
                f"{dep.id}: deferred, {milli} milli would open one of the last "
                f"{squeeze.empty} empty accelerators of {squeeze.ready} (whole tasks are "
                f"expected to ask for {squeeze.whole:.0f}) and leave {FULL - milli} milli "
                f"beside it; kept for work that fills an accelerator"),)
    if taken:
        count = solver.stats.get("deferred_replicas", 0)
        solver.stats["deferred_replicas"] = (count if isinstance(count, int) else 0) + taken
    return deferred


def _alone(state: ClusterState, shard: ShardAt, milli: int) -> bool:
    """The shard is all its accelerator holds."""
    return len(shard.indices) == 1 and \
        int(state.acc_free[shard.node, shard.indices[0]]) == FULL - milli
