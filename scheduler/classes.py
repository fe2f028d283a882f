"""Node classes: identical nodes in the same rack, counted once.

CP-SAT should see "12 free nodes of this kind in rack r07", not 12 copies of the same
variables. Two nodes are one class when they share the rack (so every domain and power budget),
readiness, model, per-accelerator free state and owners, free CPU and memory, which tenants and
deployments they hold (isolation and spread), the deployment they are nominated for, and, where
some node has a `max_shards`, the shards they may still take under it, counted up to `horizon`
(the most shards the caller may place: rooms beyond it bind nothing, so they split no class).
Swapping two nodes of a class changes nothing a rule can see, so the model may count them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from scheduler.state import ClusterState


@dataclass(frozen=True)
class NodeClass:
    index: int
    rack: int
    nodes: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.nodes)

    @property
    def representative(self) -> int:
        return self.nodes[0]


def node_classes(state: ClusterState, only_ready: bool = True,
                 horizon: int | None = None) -> list[NodeClass]:
    topo = state.topo
    held: dict[int, set[int]] = defaultdict(set)
    for (d, _), shards in state.replicas.items():
        for at in shards.values():
            held[at.node].add(d)
    groups: dict[tuple, list[int]] = defaultdict(list)
    free, owner, hbm = state.acc_free.tolist(), state.acc_owner.tolist(), state.acc_hbm.tolist()
    tenants = state.node_tenant
    nominated = topo.node_nominated.tolist()
    noms = [(nom.deployment, nom.priority) for nom in topo.nominations]
    room: list[int] | None = None
    if topo.shards_capped:
        left = state.shard_room()
        room = (left if horizon is None else np.minimum(left, horizon)).tolist()
    for n in range(topo.n_nodes):
        if only_ready and not topo.node_ready[n]:
            continue
        key = (int(topo.node_rack[n]), topo.node_model[n], tuple(free[n]), tuple(owner[n]),
               tuple(hbm[n]), float(state.cpu_free[n]), float(state.mem_free[n]),
               tuple(np.flatnonzero(tenants[n]).tolist()), tuple(sorted(held.get(n, ()))),
               noms[nominated[n]] if nominated[n] >= 0 else None,
               room[n] if room is not None else None)
        groups[key].append(n)
    return [NodeClass(i, key[0], tuple(nodes)) for i, (key, nodes) in enumerate(groups.items())]
