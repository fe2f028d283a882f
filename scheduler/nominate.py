"""Which nodes to nominate for a deployment waiting at the head of the line.

A deployment that finds no room because others hold it can wait forever: a gang of 64 shards
behind a stream of single-shard arrivals sees each departure free an accelerator and the next
arrival take it. Nominating nodes for it (`model.Nomination`, the problem's `nominations`: no new
shard of another deployment of its priority or lower lands there) keeps what frees on them for
it, until it fits. `choose_nodes` picks them, for each replica it misses (its `min_replicas` that
are not placed, one at least): the domain at its locality level whose nodes, once emptied, would
hold the replica whole, with the most room now (the least to wait for), and in it the nodes with
the most room now until, emptied, they would hold the replica. Between domains with as much room
now (and in a domain, nodes as good), the one replicas of several accelerators (`_held_whole`)
hold least goes first: such a replica leaves only whole and is, as a rule, the long-lived kind
this line exists to place (a model being served), where single-accelerator work turns over;
nodes a gang was just placed on would otherwise be kept for the next gang, which would wait for
the first to leave. `zones_apart` keeps to zones where no other deployment holds nominated
nodes, so that several nominations (one a zone: the controller's policy) each gather room in a
zone of their own.

"Emptied" counts what no departure changes: the node is ready (and not nominated for another
deployment), in the tenant's zones, of an accepted model, and its healthy accelerators (with
their HBM), CPU and memory take that many shards. Power budgets, isolation and spread are not
counted: they are judged when the deployment is tried again, as every rule is.
"""

from __future__ import annotations

import numpy as np

from scheduler.filters import node_fit
from scheduler.state import ClusterState


def empty_slots(state: ClusterState, d: int, *, zones_apart: bool = False) -> np.ndarray:
    """(N,) shards of d each node would take with nothing on it (0 where a rule no departure
    changes refuses it, or a node nominated for another deployment; with `zones_apart`, a node
    in a zone where another deployment holds nominated nodes)."""
    topo = state.topo
    spec = state.deps[d].shard
    t = int(state.dep_tenant[d])
    ok = topo.node_ready & topo.model_mask(state.deps[d])
    if len(topo.zone_ids):
        ok &= topo.tenant_zone_ok[t][topo.node_zone]
    # Not nominated for another deployment (its own nominated nodes count).
    own = np.array([n.deployment == state.deps[d].id for n in topo.nominations] + [True], dtype=bool)
    others = ~own[topo.node_nominated]  # -1 (not nominated) reads the last entry
    ok &= ~others
    if zones_apart and others.any():
        ok &= ~np.isin(topo.node_zone, topo.node_zone[others])
    usable = topo.acc_usable & (topo.node_hbm[:, None] >= spec.hbm_gib)
    if spec.fractional:
        slots = usable.sum(axis=1) * (1000 // spec.accelerator_milli)
    else:
        slots = usable.sum(axis=1) // spec.accelerators
    if spec.cpu_milli:
        slots = np.minimum(slots, topo.node_cpu // spec.cpu_milli)
    if spec.memory_mib:
        slots = np.minimum(slots, topo.node_mem // spec.memory_mib)
    if topo.shards_capped:  # an emptied node holds at most its `max_shards`
        slots = np.minimum(slots, topo.node_max_shards)
    return np.where(ok, slots, 0).astype(np.int64)


def choose_nodes(state: ClusterState, d: int, *, zones_apart: bool = False) -> list[int]:
    """The nodes to nominate for deployment d (see the module docstring), in the order chosen;
    empty when d needs no accelerator, or when no domain could hold a replica however empty
    (with `zones_apart`: in the zones no other deployment holds nominated nodes in)."""
    dep = state.deps[d]
    if dep.shard.accelerators == 0:
        return []
    empty = empty_slots(state, d, zones_apart=zones_apart)
    room = np.minimum(node_fit(state, d).slots, empty)
    domain = state.topo.domain_of(dep.locality)
    need = dep.shards_per_replica
    held = _held_whole(state, d)
    chosen: list[int] = []
    for _ in range(max(dep.min_replicas - len(state.by_dep.get(d, ())), 1)):
        nodes = _best_domain(domain, empty, room, held, need)
        if not nodes:
            break
        chosen += nodes
        empty[nodes] = 0  # a replica's nodes are its own
    return chosen


def _held_whole(state: ClusterState, d: int) -> np.ndarray:
    """(N,) accelerators on each node held by replicas of several accelerators (a gang, a shard
    of several) of deployments other than d."""
    held = np.zeros(state.topo.n_nodes, dtype=np.int64)
    deps, replicas = state.deps, state.replicas
    for other, placed in state.by_dep.items():
        dep = deps[other]
        if other == d or dep.shards_per_replica * dep.shard.accelerators <= 1:
            continue  # single-accelerator work, by far the most replicas, costs one test a deployment
        for r in placed:
            for at in replicas[(other, r)].values():
                held[at.node] += len(at.indices)
    return held


def _best_domain(domain: np.ndarray, empty: np.ndarray, room: np.ndarray, held: np.ndarray, need: int) -> list[int]:
    """In the domain whose nodes, emptied, take `need` shards and that has the most room now
    (then the least held by replicas of several accelerators, then the lowest index), the fewest
    nodes that would: most room first, then most when emptied, then least held, then index."""
    nodes = np.arange(len(domain))
    if len(np.unique(domain)) == len(domain):  # one node a domain (locality node): no walk
        fits = np.flatnonzero(empty >= need)
        return [] if len(fits) == 0 else [int(fits[np.lexsort((fits, held[fits], -room[fits]))[0]])]
    order = np.lexsort((nodes, held, -empty, -room, domain))  # by domain, each in the order nodes are taken
    can = np.bincount(domain, weights=empty)
    starts = np.searchsorted(domain[order], np.arange(len(can) + 1))
    best: tuple[int, int, int, list[int]] | None = None  # (room, -held, -domain, nodes)
    for dom in np.flatnonzero(can >= need).tolist():
        members = order[starts[dom]:starts[dom + 1]]
        members = members[empty[members] > 0]
        taken = members[:int(np.searchsorted(np.cumsum(empty[members]), need)) + 1]
        value = (int(room[taken].sum()), -int(held[taken].sum()), -dom)
        if best is None or value > best[:3]:
            best = (*value, taken.tolist())
    return [] if best is None else best[3]
