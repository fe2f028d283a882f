"""Online batches (`batch_size: k`): k arrivals decided together.

Candidates, each played out on the state and undone: several orders of the k arrivals (as
they arrived, biggest first, `BATCH_SHUFFLES` seeded shuffles; priority always first), each
arrival then decided alone by the placer (in arrival order learning the workload one arrival
at a time, exactly as online decisions would: so a batch never places less than they do), and the joint assignment of `joint_batch.py` (the
batch's fractional shards paired onto accelerators by one CP-SAT model). The candidate placing
most (priority-weighted) is kept, then (with `LOOKAHEAD`) the one whose free room, over the
whole cluster, the pairing LP predicts takes most of the workload's expected demand
(`lookahead`: a score of the final allocation, not of this batch), then the one leaving the
cluster best by `node_quality` (least fragmentation, most pairing value kept, `pairing.py`) on
the nodes it touched. A batch that starts short of empty accelerators then defers the big
fractions it put alone on one (`defer.py`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from scheduler.defer import Squeeze, defer_openers, tight
from scheduler.explain import explain
from scheduler.fragmentation import node_fragmentation
from scheduler.greedy import Placer
from scheduler.joint_batch import jointly_placeable, place_jointly, place_rest
from scheduler.scoring import PAIRING_WEIGHT
from scheduler.state import ClusterState, ShardAt

if TYPE_CHECKING:
    from scheduler.solve import Solver

JOINT: list[int] = []  # stands for the joint assignment among the orders tried
BATCH_SHUFFLES = 4  # random orders tried per online batch, besides arrival and size order
LOOKAHEAD = False  # among candidates placing as much, prefer the one `lookahead` rates higher

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


def place_batch(solver: Solver, ds: list[int], seed: int, defer: bool = True) -> None:
    """Decide these arrivals together: the best of `batch_orders` and the joint assignment,
    each played out and undone; then, with `defer` and a batch that starts short of empty
    accelerators, `defer_big_fractions`."""
    state = solver.state
    alone = copy.deepcopy(solver.workload)  # what one arrival at a time would have seen
    for d in ds:
        solver.workload.observe(state.deps[d].shard, state.deps[d].replicas)
    if solver.workload.stale():
        solver.workload.refresh()  # one snapshot for every candidate, so scores compare
    before = replicas_of(state, ds)
    squeezed = tight(solver) if defer else None
    base = node_quality(solver, solver.placer, state)
    best: tuple[tuple[float, float, float], Replicas] | None = None
    joint = any(jointly_placeable(solver, d) for d in ds)
    joint_won = False
    orders = batch_orders(solver, ds, seed)
    for order in [*orders, *([JOINT] if joint else [])]:
        # The first order (as they arrived) learns the workload one arrival at a time, as
        # online decisions do: the batch then never places less than them.
        first = order is orders[0]
        placer = Placer(state, scorer=solver.placer.scores.scorer,
                        workload=alone if first else solver.workload)
        if order is JOINT:
            place_jointly(solver, placer, ds)
        else:
            for d in order:
                if first:
                    alone.observe(state.deps[d].shard, state.deps[d].replicas)
                todo = solver.pending(d)
                if todo:
                    placer.place_deployment(d, todo)
        result = replicas_of(state, ds)
        value = sum(len(rs) * solver.replica_value(d) for d, rs in result.items())
        score = (float(value), lookahead(solver),
                 batch_quality(solver, solver.placer, state, result, base))
        if best is None or score > best[0]:
            best = (score, result)
            joint_won = order is JOINT
        set_replicas(state, ds, before)
    assert best is not None
    if joint:
        counts = solver.stats.setdefault("joint_batches", [0, 0])  # [kept, tried]
        counts[0] += int(joint_won)  # type: ignore[index]
        counts[1] += 1  # type: ignore[index]
    set_replicas(state, ds, best[1])
    solver.adopt(state)
    deferred = [] if squeezed is None else defer_big_fractions(solver, ds, squeezed)
    for d in ds:
        if solver.pending(d) and d not in deferred:
            solver.why[d] = explain(solver.state, d)


def defer_big_fractions(solver: Solver, ds: list[int], squeeze: Squeeze) -> list[int]:
    """The batch started short of empty accelerators (`defer.tight`, `squeeze`):
    take out the big fractions it put alone on one (`defer.defer_openers`), place the
    batch's other pending replicas on the room that frees, and defer again what that
    opened; returns the deployments deferred."""
    deferred = defer_openers(solver, ds, squeeze)
    if deferred:
        solver.adopt(solver.state)  # the placer's scores saw the replicas taken out
        rest = [d for d in ds if d not in deferred]
        place_rest(solver, solver.placer, rest)
        deferred += defer_openers(solver, rest, squeeze)
    return deferred


def lookahead(solver: Solver) -> float:
    """What the cluster as it stands predicts for the final allocation: milli of the
    workload's expected demand its free room can still take (`NodeScores.expected_packing`, the
    pairing LP over every accelerator with room), to whole milli so that LP noise cannot
    order two equal states; 0 when `LOOKAHEAD` is off or nothing is priced."""
    packed = solver.placer.scores.expected_packing() if LOOKAHEAD else None
    return 0.0 if packed is None else float(round(packed))


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


def node_quality(solver: Solver, placer: Placer, state: ClusterState,
                 nodes: np.ndarray | None = None) -> np.ndarray:
    """Per node (all, or these), higher is better: minus its fragmentation, plus
    `PAIRING_WEIGHT` x the pairing value its free room keeps (`pairing.py`): the terms the
    placer and the joint assignment weigh per shard."""
    free = np.where(state.acc_exists & state.topo.node_ready[:, None], state.acc_free, 0)
    cpu, mem = state.cpu_free, state.mem_free
    if nodes is not None:
        free, cpu, mem = free[nodes], cpu[nodes], mem[nodes]
    quality = -node_fragmentation(free, cpu, mem, solver.workload, nodes)
    values = placer.scores.pairing_values()
    if values is not None:
        quality += PAIRING_WEIGHT * values.room_value[np.clip(free, 0, 1000)].sum(axis=1)
    return quality


def batch_quality(solver: Solver, placer: Placer, state: ClusterState, result: Replicas,
                  base: np.ndarray) -> float:
    """How much better the batch left the cluster than `base` (`node_quality` before it),
    counting only the nodes it touched, plus the pairing value its fractional shards add."""
    nodes = np.array(sorted({at.node for rs in result.values() for shards in rs.values()
                             for at in shards.values()}), dtype=np.int64)
    if len(nodes) == 0:
        return 0.0
    gain = float((node_quality(solver, placer, state, nodes) - base[nodes]).sum())
    values = placer.scores.pairing_values()
    if values is not None:
        gain += PAIRING_WEIGHT * sum(len(rs) * values.net(state.deps[d].shard.accelerator_milli)
                                     for d, rs in result.items()
                                     if state.deps[d].shard.fractional)
    return gain
