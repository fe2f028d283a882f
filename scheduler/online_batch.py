"""Online batches (`batch_size: k`): k arrivals decided together, by trying orders.

Several orders of the k arrivals (as they arrived, biggest first, `BATCH_SHUFFLES` seeded
shuffles; priority always first) are played out on the state and undone; the order placing
most (priority-weighted), then leaving the least fragmentation (`node_fragmentation` summed
over ready nodes), is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scheduler.explain import explain
from scheduler.fragmentation import node_fragmentation
from scheduler.greedy import Placer
from scheduler.state import ClusterState, ShardAt

if TYPE_CHECKING:
    from scheduler.solve import Solver

BATCH_SHUFFLES = 4  # random orders tried per online batch, besides arrival and size order

Replicas = dict[int, dict[int, dict[int, ShardAt]]]  # deployment -> replica -> shard -> place


def batch_orders(solver: Solver, ds: list[int], seed: int) -> list[list[int]]:
    """Candidate orders for one online batch, all priority first."""
    deps = solver.state.deps
    prio = {d: -deps[d].priority for d in ds}
    orders = [sorted(ds, key=lambda d: (prio[d], d)),            # as they arrived
              solver.batch_order(ds)]                            # biggest first
    rng = np.random.default_rng(seed)
    for _ in range(BATCH_SHUFFLES):
        noise = dict(zip(ds, rng.permutation(len(ds)).tolist()))
        orders.append(sorted(ds, key=lambda d: (prio[d], noise[d])))
    unique: list[list[int]] = []
    for order in orders:
        if order not in unique:
            unique.append(order)
    return unique


def place_batch(solver: Solver, ds: list[int], seed: int) -> None:
    """Decide these arrivals together: the best of `batch_orders`, played out and undone."""
    state = solver.state
    for d in ds:
        solver.workload.observe(state.deps[d].shard, state.deps[d].replicas)
    if solver.workload.stale():
        solver.workload.refresh()  # one snapshot for every candidate, so scores compare
    before = replicas_of(state, ds)
    best: tuple[tuple[float, float], Replicas] | None = None
    for order in batch_orders(solver, ds, seed):
        placer = Placer(state, scorer=solver.placer.scorer, workload=solver.workload)
        for d in order:
            todo = solver.pending(d)
            if todo:
                placer.place_deployment(d, todo)
        result = replicas_of(state, ds)
        value = sum(len(rs) * solver.replica_value(d) for d, rs in result.items())
        score = (float(value), -fragmentation_total(solver, state))
        if best is None or score > best[0]:
            best = (score, result)
        set_replicas(state, ds, before)
    assert best is not None
    set_replicas(state, ds, best[1])
    solver.adopt(state)
    for d in ds:
        if solver.pending(d):
            solver.why[d] = explain(state, d)


def replicas_of(state: ClusterState, ds: list[int]) -> Replicas:
    """These deployments' replicas as they stand (copies: what `set_replicas` restores)."""
    return {d: {r: dict(state.replicas[(d, r)]) for r in state.by_dep.get(d, ())}
            for d in ds}


def set_replicas(state: ClusterState, ds: list[int], replicas: Replicas) -> None:
    """Make these deployments hold exactly the given replicas (undo/redo of a trial)."""
    for d in ds:
        for r in list(state.by_dep.get(d, ())):
            state.remove_replica(d, r)
        for r, shards in replicas[d].items():
            state.add_replica(d, r, shards)


def fragmentation_total(solver: Solver, state: ClusterState) -> float:
    free = np.where(state.acc_exists & state.topo.node_ready[:, None], state.acc_free, 0)
    return float(node_fragmentation(free, state.cpu_free, state.mem_free,
                                    solver.workload).sum())
