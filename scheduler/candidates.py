"""The best node for one shard without looking at every node: the best node of each rack, kept.

The greedy placer's choice for a single node-local shard (`Placer.rank_nodes`, `best_only`) is
the lexicographic minimum, over the nodes with a slot, of (FGD delta, free milli left, a rack
the tenant does not use yet, CPU left, node index). Done from scratch that is some forty vector
operations over every node per decision, however few nodes changed since the last one: it
made a decision at 16,384 nodes cost 2-3x one at 4,096.

`RackBest` keeps, per (tenant, shard shape, the nominations refusing it), what of that is a function of one node alone:
whether the node's own rules admit the shard (node-local slots, ready, zone, model, node
isolation) and its ranking keys; and per rack, how many of its nodes are admitted and the best
of them under the node keys. A decision judges and ranks again only the nodes whose stamp
(`ClusterState.node_version`) moved since, re-ranks their racks, and then works per rack: the
rules of a rack (its power and its row's, exclusion, rack isolation) and the "stranger" key
are one value per rack, so the best of the racks' best nodes is the node the full ranking puts
first. Per decision that is one comparison of stamps over the nodes and a few operations over
the racks (16 times fewer), instead of forty over the nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scheduler.filters import isolation_node_mask, local_slots, power_slots, tenant_rack_masks
from scheduler.state import ClusterState, stamp_now
from scheduler.topology import Topology

_NEVER = np.iinfo(np.int64).max  # above every integer key
# Per node: (FGD delta rounded, free milli left, CPU left) for these nodes, all admitted.
NodeKeys = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RackOrder:
    """Nodes grouped by rack: rack r's nodes are `nodes[start[r]:start[r + 1]]`, ascending."""

    nodes: np.ndarray
    start: np.ndarray

    @staticmethod
    def of(topo: Topology) -> "RackOrder":
        nodes = np.argsort(topo.node_rack, kind="stable")
        start = np.searchsorted(topo.node_rack[nodes], np.arange(len(topo.rack_ids) + 1))
        return RackOrder(nodes, start)

    def nodes_of(self, racks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The nodes of these racks, rack after rack, and how many each rack has."""
        lengths = self.start[racks + 1] - self.start[racks]
        offsets = np.repeat(self.start[racks] - (np.cumsum(lengths) - lengths), lengths)
        return self.nodes[offsets + np.arange(int(lengths.sum()))], lengths


class RackBest:
    """For one tenant and shard shape: admitted nodes and the best node of every rack."""

    def __init__(self, order: RackOrder, n_nodes: int) -> None:
        n_racks = len(order.start) - 1
        self.order = order
        self.admitted = np.zeros(n_nodes, dtype=bool)
        self.count = np.zeros(n_racks, dtype=np.int64)  # admitted nodes per rack
        self.judged = 0  # stamps below this are judged (0: none)
        self.keys_for: object = None  # what the keys were computed under (see `rank`)
        self.ranked = 0  # stamps below this were seen by `rank` (0: never)
        self.scored_at = np.zeros(n_nodes, dtype=np.int64)  # per node, the stamp keyed at
        self.ranked_ok = np.zeros(n_racks, dtype=bool)  # per rack, `best` is up to date
        self.delta = np.zeros(n_nodes)
        self.left = np.zeros(n_nodes, dtype=np.int64)
        self.cpu = np.zeros(n_nodes)
        self.best = np.full(n_racks, -1, dtype=np.int64)  # per rack (-1: none admitted)

    def judge(self, state: ClusterState, d: int) -> None:
        """Bring the admitted nodes up to date: only nodes changed since are judged."""
        changed = np.flatnonzero(state.node_version >= self.judged) if self.judged else \
            np.arange(len(self.admitted))
        self.judged = stamp_now()
        if len(changed) == 0:
            return
        now = node_admits(state, d, changed)
        diff = now.astype(np.int64) - self.admitted[changed]
        np.add.at(self.count, state.topo.node_rack[changed], diff)
        self.admitted[changed] = now

    def candidates(self, state: ClusterState, d: int) -> tuple[np.ndarray, int]:
        """Racks whose rules admit the shard and that have an admitted node; and how many
        nodes have a slot in all (what `node_fit` would count)."""
        racks = rack_admits(state, d) & (self.count > 0)
        return racks, int(self.count[racks].sum())

    def only(self, racks: np.ndarray) -> int:
        """The one admitted node of these racks (there is exactly one)."""
        nodes, _ = self.order.nodes_of(np.flatnonzero(racks & (self.count > 0)))
        return int(nodes[self.admitted[nodes]][0])

    def rank(self, state: ClusterState, keys_for: object, racks: np.ndarray,
             node_keys: NodeKeys) -> None:
        """Bring the best node of these racks (a mask) up to date, and the keys of their
        admitted nodes that changed since scored (the admitted nodes are judged already).
        When `keys_for` (the workload snapshot and prices the keys depend on) changed, every
        key is stale; racks not asked for are ranked when first asked (as the full ranking
        scores only the nodes with a slot)."""
        if keys_for != self.keys_for:
            self.keys_for = keys_for
            self.scored_at[:] = 0
            self.ranked_ok[:] = False
        elif self.ranked:
            moved = np.flatnonzero(state.node_version >= self.ranked)
            self.ranked_ok[state.topo.node_rack[moved]] = False
        self.ranked = stamp_now()
        todo = np.flatnonzero(racks & ~self.ranked_ok)
        if len(todo) == 0:
            return
        nodes, _ = self.order.nodes_of(todo)
        nodes = nodes[self.admitted[nodes]]
        stale = nodes[self.scored_at[nodes] != state.node_version[nodes]]
        if len(stale):
            self.delta[stale], self.left[stale], self.cpu[stale] = node_keys(stale)
            self.scored_at[stale] = state.node_version[stale]
        self._rank_racks(todo)
        self.ranked_ok[todo] = True

    def _rank_racks(self, racks: np.ndarray) -> None:
        """The best admitted node of each of these racks under the node keys (-1: none):
        per rack, the nodes with the least delta, of those the least free milli left, then
        the least CPU left, then the lowest index (`np.lexsort`'s order, without sorting)."""
        self.best[racks] = -1
        nodes, lengths = self.order.nodes_of(racks)
        some = lengths > 0
        racks, lengths = racks[some], lengths[some]
        if len(racks) == 0:
            return
        starts = np.cumsum(lengths) - lengths
        tie = self.admitted[nodes]
        admitted = np.logical_or.reduceat(tie, starts)
        for key, never in ((self.delta, np.inf), (self.left, _NEVER), (self.cpu, np.inf)):
            value = key[nodes]
            least = np.minimum.reduceat(np.where(tie, value, never), starts)
            tie = tie & (value == np.repeat(least, lengths))
        first = np.minimum.reduceat(np.where(tie, nodes, _NEVER), starts)
        self.best[racks[admitted]] = first[admitted]

    def ranking_keys(self, state: ClusterState, t: int, racks: np.ndarray
                     ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The best node of each of these racks, and the placer's ranking keys over them
        (`np.lexsort` order: the last is the primary one)."""
        rs = np.flatnonzero(racks)
        best = self.best[rs]
        stranger = state.rack_tenant[rs, t] == 0
        return best, [best, self.cpu[best], stranger, self.left[best], self.delta[best]]


def node_admits(state: ClusterState, d: int, nodes: np.ndarray) -> np.ndarray:
    """Whether each of these nodes' own rules admit a shard of d: a slot under the
    node-local filters, ready and not nominated for another (`Topology.nominated_against`), in
    the tenant's zones, of an accepted model, no node isolation against the tenant
    (`filters.node_fit` for one node, its rack aside)."""
    topo = state.topo
    t = int(state.dep_tenant[d])
    ok = local_slots(state, d, nodes) > 0
    ok &= topo.node_ready[nodes]
    against = topo.nominated_against(state.deps[d], nodes)
    if against is not None:
        ok &= ~against
    if len(topo.zone_ids):
        ok &= topo.tenant_zone_ok[t][topo.node_zone[nodes]]
    models = state.deps[d].shard.accelerator_models
    if models is not None:
        ok &= np.array([topo.node_model[n] in models for n in nodes.tolist()], dtype=bool)
    return ok & isolation_node_mask(state, t, nodes)


def rack_admits(state: ClusterState, d: int) -> np.ndarray:
    """Per rack, whether the rules of a rack admit a shard of d: power (the rack's and its
    row's), exclusion, rack isolation."""
    topo = state.topo
    excl_ok, iso_ok = tenant_rack_masks(state, int(state.dep_tenant[d]))
    ok = excl_ok & iso_ok
    power = state.deps[d].shard.shard_power_w
    if power > 0:
        ok &= power_slots(state.rack_headroom(), power) > 0
        ok &= (power_slots(state.row_headroom(), power) > 0)[topo.rack_row]
    return ok
