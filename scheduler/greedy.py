"""Greedy placement of replica gangs: the online fast path, the CP-SAT hint and its fallback.

One replica at a time: filter nodes (`filters.node_fit`), compute what every locality domain can
take as a whole (`filters.gang_capacity`), pick a domain that fits the whole gang (best fit, see
`fragmentation`), fill its nodes, then choose concrete accelerator indices shard by shard. A
replica is placed completely or not at all; a deployment that ends below `min_replicas` gives
its new replicas back.

A decision costs the decision, not the cluster: the scores of the nodes (`scoring.NodeScores`)
are kept between decisions, each node's computed again only when it changed. The best node
is the lexicographic minimum of the ranking keys, found without sorting every candidate.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from scheduler.candidates import RackBest, RackOrder
from scheduler.filters import fits_within, gang_capacity, group_spread_mask, node_fit, quota_room
from scheduler.fragmentation import Workload
from scheduler.model import ShardSpec
from scheduler.pairing import PairingValues
from scheduler.scoring import SHAPES_KEPT, NodeScores, Scorer, rounded_delta
from scheduler.state import ClusterState, ShardAt, kept

KEEP_CANDIDATES = True  # single shards: the best node per rack kept (`candidates.RackBest`)


@dataclass(frozen=True)
class NodeRanking:
    """Where one shard could go, best first (`Placer.rank_nodes`)."""

    nodes: np.ndarray  # node indices, best first
    pick: np.ndarray | None  # per node, the accelerator a fractional shard takes there
    cost: np.ndarray | None  # per node, FGD delta + scarcity term (no pairing); None: no FGD
    frag_after: np.ndarray | None  # per node, its fragmentation with the shard
    pairing_loss: np.ndarray | None  # per node, pairing value lost on `pick` (pairing.py)


class Placer:
    """Places gangs into a ClusterState it owns the mutation of; ranks a single shard's nodes
    by the scores `self.scores` (`scoring.NodeScores`) keeps for that state."""

    def __init__(self, state: ClusterState, scorer: Scorer = "fgd",
                 workload: Workload | None = None) -> None:
        self.state = state
        self.scores = NodeScores(state, scorer, workload)
        self._known_index: tuple[int, int] | None = None  # (node, accelerator) FGD chose
        # Single node-local shards: admitted nodes and each rack's best, per (tenant, shape).
        self._rack_order: RackOrder | None = None
        self._rack_best: OrderedDict[tuple, RackBest] = OrderedDict()

    # ---- public ---------------------------------------------------------------------------

    def place_deployment(self, d: int, replicas: list[int],
                         allowed: np.ndarray | None = None, *, reach_min: bool = True) -> list[int]:
        """Place as many of the given replicas as fit; honour min_replicas (unless `reach_min` is
        False: a preemption gathering them domain by domain judges the minimum at its end).
        Returns placed."""
        dep = self.state.deps[d]
        placed = []
        for r in replicas:
            if self._place_replica(d, r, list(range(dep.shards_per_replica)), allowed):
                placed.append(r)
            else:
                break  # identical replicas: if one does not fit, the next will not either
        have = self.state.placed_replicas(d)
        if reach_min and have and len(have) < dep.min_replicas:
            # Fewer than min_replicas means none, kept replicas included.
            for r in have:
                self.state.remove_replica(d, r)
            return []
        return placed

    def _place_replica(self, d: int, r: int, shard_ids: list[int],
                       allowed: np.ndarray | None) -> bool:
        """A whole replica: where its spread holds with its spread group's replicas counted
        too (a rollout's or drain's replicas being replaced, which run until it does) if it
        fits there, else where it holds with its own (beside them: a replacement never waits)."""
        apart = group_spread_mask(self.state, d)
        if apart is not None and self.place_gang(d, r, shard_ids,
                                                 apart if allowed is None else allowed & apart):
            return True
        return self.place_gang(d, r, shard_ids, allowed)

    def place_gang(self, d: int, r: int, shard_ids: list[int],
                   allowed: np.ndarray | None = None) -> bool:
        """Place these shards of replica r together (locality, power, caps); all or nothing."""
        state = self.state
        dep = state.deps[d]
        count = len(shard_ids)
        if count == 0:
            return True
        room, _ = quota_room(state, d)
        if room < count:
            return False
        if count == 1 and allowed is None and dep.locality not in ("rack", "row", "zone") \
                and self._keeps_candidates(d):
            node = self._best_kept(d)
            return node is not None and self._commit(d, r, [(shard_ids[0], node)])
        # More shards of a replica placed in part (`repair`): its spread not counted against
        # itself, or a gang with a spread rule could never be made whole beside its survivors.
        slots = node_fit(state, d, replica=r).slots
        if allowed is not None:
            slots = np.where(allowed, slots, 0)
        if count == 1:
            if dep.locality in ("rack", "row", "zone"):
                # Keep whole racks free for gangs: the fullest domain with room, then its
                # best node (locality node/none shards choose among all nodes).
                level = dep.locality
                cap = gang_capacity(state, d, slots, level)
                candidates = np.flatnonzero(cap >= 1)
                if len(candidates) == 0:
                    return False
                domain = self._best_domain(d, level, candidates, 1)
                slots = np.where(state.topo.domain_of(level) == domain, slots, 0)
            node = self._best_node(d, slots)
            if node is None:
                return False
            return self._commit(d, r, [(shard_ids[0], node)])
        level = dep.locality
        cap = gang_capacity(state, d, slots, level)
        candidates = np.flatnonzero(cap >= count)
        if len(candidates) == 0:
            return False
        domain = self._best_domain(d, level, candidates, count)
        dom_of = state.topo.domain_of(level)
        in_domain = (dom_of == domain) & (slots > 0)
        chosen = self._fill(d, slots, np.flatnonzero(in_domain), count)
        if chosen is None:
            return False
        return self._commit(d, r, list(zip(shard_ids, chosen)))

    # ---- choices --------------------------------------------------------------------------

    def _best_domain(self, d: int, level: str, candidates: np.ndarray, count: int) -> int:
        """Best fit: the candidate domain left with the least free capacity after the gang."""
        if len(candidates) == 1:
            return int(candidates[0])
        s = self.state
        t = int(s.dep_tenant[d])
        node_free = np.where(s.topo.node_ready, self.scores.free_milli(t).sum(axis=1), 0)
        dom_free = np.bincount(s.topo.domain_of(level), weights=node_free,
                               minlength=s.topo.n_domains(level))
        left = dom_free[candidates] - count * s.deps[d].shard.milli
        # Ties go to domains the tenant already uses: others stay clean for isolation.
        own = np.bincount(s.topo.domain_of(level), weights=s.node_tenant[:, t],
                          minlength=s.topo.n_domains(level))[candidates] > 0
        return int(candidates[np.lexsort((candidates, ~own, left))[0]])

    def _fill(self, d: int, slots: np.ndarray, nodes: np.ndarray, count: int
              ) -> list[int] | None:
        """Nodes for `count` shards among `nodes`: fullest nodes first, within rack/row power."""
        s = self.state
        topo = s.topo
        power = s.deps[d].shard.shard_power_w
        free_acc = s.free_whole()[nodes]
        order = nodes[np.lexsort((nodes, free_acc, slots[nodes]))]
        rack_left: dict[int, int] = {}
        row_left: dict[int, int] = {}
        rack_head, row_head = s.rack_headroom(), s.row_headroom()
        chosen: list[int] = []
        for n in order.tolist():
            rack, row = int(topo.node_rack[n]), int(topo.node_row[n])
            if power > 0:
                if rack not in rack_left:
                    rack_left[rack] = fits_within(rack_head[rack], power)
                if row not in row_left:
                    row_left[row] = fits_within(row_head[row], power)
                take = min(int(slots[n]), count - len(chosen), rack_left[rack], row_left[row])
                rack_left[rack] -= take
                row_left[row] -= take
            else:
                take = min(int(slots[n]), count - len(chosen))
            chosen.extend([n] * take)
            if len(chosen) == count:
                return chosen
        return None

    def _best_node(self, d: int, slots: np.ndarray) -> int | None:
        """One shard: the node where it adds least fragmentation (FGD) or fits best."""
        ranking = self.rank_nodes(d, slots, best_only=True)
        if ranking is None:
            return None
        best = int(ranking.nodes[0])
        if ranking.frag_after is not None and ranking.pick is not None:
            self._known_index = (best, int(ranking.pick[0]))
        return best

    def rank_nodes(self, d: int, slots: np.ndarray, full: bool = False,
                   best_only: bool = False) -> NodeRanking | None:
        """Nodes with a slot for one shard of d, best first (see `NodeRanking`); None when
        none has. Without `full`, a single candidate is returned unscored; with `best_only`,
        only the first node (the same as the whole ranking's first)."""
        candidates = np.flatnonzero(slots > 0)
        if len(candidates) == 0:
            return None
        if len(candidates) == 1 and not full:
            return NodeRanking(candidates, None, None, None, None)
        s = self.state
        spec = s.deps[d].shard
        t = int(s.dep_tenant[d])
        use_fgd = self.scores.uses_fgd()
        scored = self.scores.fgd_scores(t, spec, candidates) if use_fgd else \
            self.scores.score_rows(t, spec, candidates, None, fgd=False)
        pick, pairing_loss = scored.pick, scored.pairing_loss
        cpu_after = s.cpu_free[candidates] - spec.cpu_milli
        # Prefer racks the tenant already uses, so other racks stay clean for isolation.
        stranger = s.rack_tenant[s.topo.node_rack[candidates], t] == 0
        cost = frag_after = None
        if not use_fgd:
            keys = [candidates, cpu_after, stranger, scored.left_after]
        else:
            assert scored.frag_after is not None
            before = self.scores.fragmentation(t, candidates)
            frag_after = scored.frag_after
            cost = frag_after - before + self.scores.scarcity_cost(t, spec, candidates)
            # Ties (common when nothing changes) go to the node left with less free capacity.
            keys = [candidates, cpu_after, stranger, scored.left_after,
                    rounded_delta(cost, pairing_loss)]
        order = np.array([lexmin(keys)]) if best_only else np.lexsort(keys)
        return NodeRanking(candidates[order], None if pick is None else pick[order],
                           None if cost is None else cost[order],
                           None if frag_after is None else frag_after[order],
                           None if pairing_loss is None else pairing_loss[order])

    # ---- single shards from the kept candidates (`candidates.RackBest`) --------------------

    def _keeps_candidates(self, d: int) -> bool:
        """Whether a single shard of d is chosen from the kept candidates: FGD scoring (the
        ranking `RackBest` keeps) and no spread rule (a rule of the deployment's own)."""
        return KEEP_CANDIDATES and self.scores.uses_fgd() and self.state.deps[d].spread is None

    def _best_kept(self, d: int) -> int | None:
        """`_best_node(d, node_fit(state, d).slots)`, from the kept candidates: the same node
        (and the same accelerator noted for a fraction), the same snapshot and prices taken
        (only when two nodes or more have a slot, as `rank_nodes` does)."""
        s = self.state
        spec = s.deps[d].shard
        t = int(s.dep_tenant[d])
        best_of = self._kept_candidates(t, spec, s.topo.refusing(s.deps[d]))
        best_of.judge(s, d)
        racks, count = best_of.candidates(s, d)
        if count <= 1:
            return None if count == 0 else best_of.only(racks)
        values = self.scores.prices_now(spec)
        if self.scores.scarce():  # a model-restricted shape seen: a cost over the whole cluster
            return self._best_node(d, node_fit(s, d).slots)
        best_of.rank(s, self.scores.version(values), racks,
                     lambda nodes: self._node_keys(t, spec, nodes, values))
        best, keys = best_of.ranking_keys(s, t, racks)
        node = int(best[lexmin(keys)])
        if spec.fractional and spec.accelerators > 0:  # as `_best_node` notes it
            pick = self.scores.kept_scores(t, spec, np.array([node]), values).pick
            assert pick is not None
            self._known_index = (node, int(pick[0]))
        return node

    def _kept_candidates(self, t: int, spec: ShardSpec, refusing: tuple[tuple[str, int], ...]) -> RackBest:
        """Per tenant, shard shape and the nominations that refuse it (`Topology.refusing`: the
        nodes kept for others differ by priority; a change of them moves those nodes' stamps)."""
        key = (t, spec.accelerators, spec.accelerator_milli, spec.hbm_gib, spec.cpu_milli,
               spec.memory_mib, spec.accelerator_models, refusing)
        if self._rack_order is None:
            self._rack_order = RackOrder.of(self.state.topo)
        order = self._rack_order
        return kept(self._rack_best, key, lambda: RackBest(order, self.state.topo.n_nodes),
                    SHAPES_KEPT)

    def _node_keys(self, t: int, spec: ShardSpec, nodes: np.ndarray,
                   values: PairingValues | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per node, the ranking keys of `rank_nodes` that are the node's own: FGD delta
        (rounded), free milli left, CPU left."""
        scored = self.scores.kept_scores(t, spec, nodes, values)
        assert scored.frag_after is not None
        cost = scored.frag_after - self.scores.fragmentation(t, nodes) + \
            self.scores.scarcity_cost(t, spec, nodes)
        return (rounded_delta(cost, scored.pairing_loss), scored.left_after,
                self.state.cpu_free[nodes] - spec.cpu_milli)

    # ---- mutation -------------------------------------------------------------------------

    def _commit(self, d: int, r: int, shard_nodes: list[tuple[int, int]]) -> bool:
        """Choose indices shard by shard and record the replica; undo on any surprise."""
        s = self.state
        shards: dict[int, ShardAt] = {}
        added: list[ShardAt] = []
        ok = True
        chosen, self._known_index = self._known_index, None
        for shard, node in shard_nodes:
            if chosen is not None and chosen[0] == node and len(shard_nodes) == 1:
                pick = ((chosen[1],), s.deps[d].shard.accelerator_milli)
            else:
                pick = s.choose_indices(d, node)
            if pick is None:
                ok = False
                break
            at = ShardAt(node, pick[0], pick[1])
            s._apply(d, at, +1)  # claim it now so the next shard sees it
            added.append(at)
            shards[shard] = at
        for at in added:
            s._apply(d, at, -1)
        if not ok:
            return False
        s.add_replica(d, r, shards)
        return True

    def refresh_nodes(self, nodes: np.ndarray) -> None:
        """The occupancy of these nodes changed outside a placement (a warm session's
        departure). Nothing to do: their stamps moved with the change (`ClusterState`), so
        their cached scores are taken again when next needed."""



def lexmin(keys: list[np.ndarray]) -> int:
    """The index `np.lexsort(keys)` puts first (the last key is the primary one), without
    sorting: narrow to the minimum of each key in turn; what ties on every key goes to the
    lowest index, as in lexsort's stable order. The keys must hold no NaN."""
    at = np.arange(len(keys[0]))
    for key in reversed(keys):
        column = key[at]
        at = at[column == column.min()]
        if len(at) == 1:
            break
    return int(at[0])

