"""Which nodes to nominate for a deployment waiting at the head of the line.

A deployment that finds no room because others hold it can wait forever: a gang of 64 shards
behind a stream of single-shard arrivals sees each departure free an accelerator and the next
arrival take it. Nominating nodes for it (`model.Nomination`, the problem's `nominations`: no new
shard of another deployment of its priority or lower lands there) keeps what frees on them for
it, until it fits. `choose_nodes` picks them, for each replica it misses (its `min_replicas` that
are not placed, one at least): the domain at its locality level whose nodes, once emptied, would
hold the replica whole, with the most room now (the least to wait for), and in it the nodes with
the most room now until, emptied, they would hold the replica.

"Emptied" counts what no departure changes: the node is ready (and not nominated for another
deployment), in the tenant's zones, of an accepted model, and its healthy accelerators (with
their HBM), CPU and memory take that many shards. Power budgets, isolation and spread are not
counted: they are judged when the deployment is tried again, as every rule is.
"""

from __future__ import annotations

import numpy as np

from scheduler.filters import node_fit
from scheduler.state import ClusterState


def empty_slots(state: ClusterState, d: int) -> np.ndarray:
    """(N,) shards of d each node would take with nothing on it (0 where a rule no departure
    changes refuses it, or a node nominated for another deployment)."""
    topo = state.topo
    spec = state.deps[d].shard
    t = int(state.dep_tenant[d])
    ok = topo.node_ready & topo.model_mask(state.deps[d])
    if len(topo.zone_ids):
        ok &= topo.tenant_zone_ok[t][topo.node_zone]
    # Not nominated for another deployment (its own nominated nodes count).
    own = np.array([n.deployment == state.deps[d].id for n in topo.nominations] + [True], dtype=bool)
    ok &= own[topo.node_nominated]  # -1 (not nominated) reads the last entry
    usable = topo.acc_usable & (topo.node_hbm[:, None] >= spec.hbm_gib)
    if spec.fractional:
        slots = usable.sum(axis=1) * (1000 // spec.accelerator_milli)
    else:
        slots = usable.sum(axis=1) // spec.accelerators
    if spec.cpu_milli:
        slots = np.minimum(slots, topo.node_cpu // spec.cpu_milli)
    if spec.memory_mib:
        slots = np.minimum(slots, topo.node_mem // spec.memory_mib)
    return np.where(ok, slots, 0).astype(np.int64)


def choose_nodes(state: ClusterState, d: int) -> list[int]:
    """The nodes to nominate for deployment d (see the module docstring), in the order chosen;
    empty when d needs no accelerator, or when no domain could hold a replica however empty."""
    dep = state.deps[d]
    if dep.shard.accelerators == 0:
        return []
    empty = empty_slots(state, d)
    room = np.minimum(node_fit(state, d).slots, empty)
    domain = state.topo.domain_of(dep.locality)
    need = dep.shards_per_replica
    chosen: list[int] = []
    for _ in range(max(dep.min_replicas - len(state.by_dep.get(d, ())), 1)):
        nodes = _best_domain(domain, empty, room, need)
        if not nodes:
            break
        chosen += nodes
        empty[nodes] = 0  # a replica's nodes are its own
    return chosen


def _best_domain(domain: np.ndarray, empty: np.ndarray, room: np.ndarray, need: int) -> list[int]:
    """In the domain whose nodes, emptied, take `need` shards and that has the most room now
    (then the lowest index), the fewest nodes that would: most room first, then most when
    emptied, then index."""
    nodes = np.arange(len(domain))
    if len(np.unique(domain)) == len(domain):  # one node a domain (locality node): no walk
        fits = np.flatnonzero(empty >= need)
        return [] if len(fits) == 0 else [int(fits[np.argmax(room[fits])])]
    can = np.bincount(domain, weights=empty)
    order = np.lexsort((nodes, -empty, -room, domain))  # by domain, each in the order nodes are taken
    starts = np.searchsorted(domain[order], np.arange(len(can) + 1))
    best: tuple[int, int, list[int]] | None = None  # (room, -domain, nodes)
    for dom in np.flatnonzero(can >= need).tolist():
        members = order[starts[dom]:starts[dom + 1]]
        members = members[empty[members] > 0]
        taken = members[:int(np.searchsorted(np.cumsum(empty[members]), need)) + 1]
        value = (int(room[taken].sum()), -dom)
        if best is None or value > best[:2]:
            best = (*value, taken.tolist())
    return [] if best is None else best[2]
