"""What an online batch is judged by, in one place: how well the nodes it touched are left.

`online_batch.place_batch` keeps, among its candidates placing as much, the one scoring best
here; the joint assignment of `joint_batch.py` maximises the same measure (its tables are
`row_quality` of the node with one accelerator at each level it can reach), so the model and
the selection agree.

A node's quality (higher is better): minus its fragmentation (FGD, `node_fragmentation`),
plus `PAIRING_WEIGHT` x the pairing value its accelerators' free room keeps (`pairing.py`): the
terms the placer weighs per shard. A batch's: the change of its touched nodes' quality, plus
`PAIRING_WEIGHT` x the net value of the fractional shards it placed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scheduler.fragmentation import Workload, node_fragmentation
from scheduler.greedy import PAIRING_WEIGHT, Placer
from scheduler.pairing import FULL, PairingValues
from scheduler.state import ClusterState, ShardAt

if TYPE_CHECKING:
    from scheduler.solve import Solver

Replicas = dict[int, dict[int, dict[int, ShardAt]]]  # deployment -> replica -> shard -> place


def usable_free(state: ClusterState) -> np.ndarray:
    """Free milli per accelerator, 0 where there is none or its node is not ready: (N, A)."""
    return np.where(state.acc_exists & state.topo.node_ready[:, None], state.acc_free, 0)


def row_quality(workload: Workload, values: PairingValues | None, free: np.ndarray,
                cpu: np.ndarray, mem: np.ndarray, nodes: np.ndarray | None) -> np.ndarray:
    """Quality of nodes given as rows (free milli per accelerator, free CPU and memory; nodes:
    each row's node index, None for all nodes in order)."""
    quality = -node_fragmentation(free, cpu, mem, workload, nodes)
    if values is not None:
        quality += PAIRING_WEIGHT * values.room_value[np.clip(free, 0, FULL)].sum(axis=1)
    return quality


def node_quality(solver: Solver, placer: Placer, state: ClusterState,
                 nodes: np.ndarray | None = None) -> np.ndarray:
    """Per node (all, or these), higher is better (module doc)."""
    free, cpu, mem = usable_free(state), state.cpu_free, state.mem_free
    if nodes is not None:
        free, cpu, mem = free[nodes], cpu[nodes], mem[nodes]
    return row_quality(solver.workload, placer.pairing_values(), free, cpu, mem, nodes)


def batch_quality(solver: Solver, placer: Placer, state: ClusterState, result: Replicas,
                  base: np.ndarray) -> float:
    """How much better the batch left the cluster than `base` (`node_quality` before it),
    counting only the nodes it touched, plus the pairing value its fractional shards add."""
    nodes = np.array(sorted({at.node for rs in result.values() for shards in rs.values()
                             for at in shards.values()}), dtype=np.int64)
    if len(nodes) == 0:
        return 0.0
    gain = float((node_quality(solver, placer, state, nodes) - base[nodes]).sum())
    values = placer.pairing_values()
    if values is not None:
        gain += PAIRING_WEIGHT * sum(len(rs) * values.net(state.deps[d].shard.accelerator_milli)
                                     for d, rs in result.items()
                                     if state.deps[d].shard.fractional)
    return gain
