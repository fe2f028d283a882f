"""Greedy placement of replica gangs: the online fast path, the CP-SAT hint and its fallback.

One replica at a time: filter nodes (`filters.node_fit`), compute what every locality domain can
take as a whole (`filters.gang_capacity`), pick a domain that fits the whole gang (best fit, see
`fragmentation`), fill its nodes, then choose concrete accelerator indices shard by shard. A
replica is placed completely or not at all; a deployment that ends below `min_replicas` gives
its new replicas back.

A decision costs the decision, not the cluster: the FGD scores of a node (its fragmentation
now, per tenant; where a shard of a given shape would go on it and its fragmentation then, per
tenant and shape) are kept between decisions and computed again only for nodes whose stamp
(`ClusterState.node_version`, new on every change of the node) moved since, or when the
workload snapshot or the pairing prices they depend on change. The best node is the
lexicographic minimum of the ranking keys, found without sorting every candidate.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from scheduler.candidates import RackBest, RackOrder
from scheduler.filters import BIG, gang_capacity, node_fit, quota_room
from scheduler.fragmentation import SCARCITY_WEIGHT, Workload, model_pressure, node_fragmentation
from scheduler.model import ShardSpec
from scheduler.pairing import PairingValues
from scheduler.state import ClusterState, NodeTable, ShardAt, kept

Scorer = Literal["fgd", "bestfit"]
FGD_ACCELERATOR_CHOICE = False  # fractions: FGD picks the accelerator too (as in the paper)
FGD_QUANTUM = 1.0  # fragmentation deltas closer than this (milli) count as ties
PAIRING_WEIGHT = 30.0  # per milli of pairing value lost (pairing.py), next to FGD's milli
STATE_PRICES = True  # price pairings on the cluster as it stands, not an empty one
SHAPES_KEPT = 64  # score tables (per tenant, shard shape) a placer keeps, least used out
KEEP_CANDIDATES = True  # single shards: the best node per rack kept (`candidates.RackBest`)


@dataclass(frozen=True)
class NodeRanking:
    """Where one shard could go, best first (`Placer.rank_nodes`)."""

    nodes: np.ndarray  # node indices, best first
    pick: np.ndarray | None  # per node, the accelerator a fractional shard takes there
    cost: np.ndarray | None  # per node, FGD delta + scarcity term (no pairing); None: no FGD
    frag_after: np.ndarray | None  # per node, its fragmentation with the shard
    pairing_loss: np.ndarray | None  # per node, pairing value lost on `pick` (pairing.py)


@dataclass
class ShardScores:
    """Where one shard of a shape goes on each node (rows: nodes, or the nodes asked)."""

    pick: np.ndarray | None  # the accelerator a fractional shard takes there
    pairing_loss: np.ndarray | None  # pairing value lost on `pick` (None: no prices)
    left_after: np.ndarray  # free milli the tenant could use there, with the shard
    frag_after: np.ndarray | None  # fragmentation with the shard (None: not FGD)


class Placer:
    """Places gangs into a ClusterState it owns the mutation of."""

    def __init__(self, state: ClusterState, scorer: Scorer = "fgd",
                 workload: Workload | None = None) -> None:
        self.state = state
        self.scorer = scorer
        self.workload = workload or Workload()
        # FGD score tables, valid for one workload snapshot: fragmentation per tenant; per
        # (tenant, shard shape) the accelerator a fraction takes (per pricing too), and the
        # free milli and fragmentation the shard leaves (for the accelerator it takes).
        self._scores_version = -1
        self._before: dict[int, NodeTable] = {}
        self._tables: OrderedDict[tuple, NodeTable] = OrderedDict()
        self._prices: PairingValues | None = None  # the prices the tables were scored with
        self._prices_generation = 0  # bumped when the prices change
        self._known_index: tuple[int, int] | None = None  # (node, accelerator) FGD chose
        # Single node-local shards: admitted nodes and each rack's best, per (tenant, shape).
        self._rack_order: RackOrder | None = None
        self._rack_best: OrderedDict[tuple, RackBest] = OrderedDict()

    # ---- public ---------------------------------------------------------------------------

    def place_deployment(self, d: int, replicas: list[int],
                         allowed: np.ndarray | None = None) -> list[int]:
        """Place as many of the given replicas as fit; honour min_replicas. Returns placed."""
        dep = self.state.deps[d]
        placed = []
        for r in replicas:
            if self.place_gang(d, r, list(range(dep.shards_per_replica)), allowed):
                placed.append(r)
            else:
                break  # identical replicas: if one does not fit, the next will not either
        have = self.state.placed_replicas(d)
        if have and len(have) < dep.min_replicas:
            # Fewer than min_replicas means none, kept replicas included.
            for r in have:
                self.state.remove_replica(d, r)
            return []
        return placed

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
        slots = node_fit(state, d).slots
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

    def _free_milli(self, t: int) -> np.ndarray:
        """(N, A) free milli per accelerator that tenant t could use."""
        s = self.state
        usable = s.acc_exists & ((s.acc_owner == -1) | (s.acc_owner == t))
        return np.where(usable, s.acc_free, 0)

    def _best_domain(self, d: int, level: str, candidates: np.ndarray, count: int) -> int:
        """Best fit: the candidate domain left with the least free capacity after the gang."""
        if len(candidates) == 1:
            return int(candidates[0])
        s = self.state
        t = int(s.dep_tenant[d])
        node_free = np.where(s.topo.node_ready, self._free_milli(t).sum(axis=1), 0)
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
                    rack_left[rack] = int(np.floor(max(rack_head[rack], 0) / power + 1e-9))
                if row not in row_left:
                    row_left[row] = int(np.floor(max(row_head[row], 0) / power + 1e-9))
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
        use_fgd = self._uses_fgd()
        scored = self._fgd_scores(t, spec, candidates) if use_fgd else \
            self._score_rows(t, spec, candidates, None, fgd=False)
        pick, pairing_loss = scored.pick, scored.pairing_loss
        cpu_after = s.cpu_free[candidates] - spec.cpu_milli
        # Prefer racks the tenant already uses, so other racks stay clean for isolation.
        stranger = s.rack_tenant[s.topo.node_rack[candidates], t] == 0
        cost = frag_after = None
        if not use_fgd:
            keys = [candidates, cpu_after, stranger, scored.left_after]
        else:
            assert scored.frag_after is not None
            before = self._fragmentation(t, candidates)
            frag_after = scored.frag_after
            cost = frag_after - before + self._scarcity_cost(t, spec, candidates)
            # Ties (common when nothing changes) go to the node left with less free capacity.
            keys = [candidates, cpu_after, stranger, scored.left_after,
                    rounded_delta(cost, pairing_loss)]
        order = np.array([lexmin(keys)]) if best_only else np.lexsort(keys)
        return NodeRanking(candidates[order], None if pick is None else pick[order],
                           None if cost is None else cost[order],
                           None if frag_after is None else frag_after[order],
                           None if pairing_loss is None else pairing_loss[order])

    def _fgd_scores(self, t: int, spec: ShardSpec, nodes: np.ndarray) -> ShardScores:
        """`_score_rows` for these nodes under FGD, from tables kept per (tenant, shape): the
        accelerator a fraction takes (per pricing too) and what the shard leaves (per node and
        accelerator taken). Only nodes changed since (or never scored), and nodes where new
        prices move the fraction to another accelerator, are scored now."""
        return self._kept_scores(t, spec, nodes, self._prices_now(spec))

    def _prices_now(self, spec: ShardSpec) -> PairingValues | None:
        """Bring the workload snapshot up to date, and the pairing prices a shard of `spec`
        is scored with (None: not a fraction, or no prices); a new pricing moves
        `_prices_generation`."""
        self._current_snapshot()
        values = self.pairing_values() if spec.fractional and spec.accelerators > 0 else None
        if values is not None and values is not self._prices:
            if self._prices is None or not same_prices(values, self._prices):
                self._prices_generation += 1
            self._prices = values
        return values

    def _kept_scores(self, t: int, spec: ShardSpec, nodes: np.ndarray,
                     values: PairingValues | None) -> ShardScores:
        """`_fgd_scores` under these prices (`_prices_now`)."""
        state = self.state
        fractional = spec.fractional and spec.accelerators > 0
        shape = (t, spec.accelerators, spec.accelerator_milli, spec.hbm_gib, spec.cpu_milli,
                 spec.memory_mib)
        n = state.topo.n_nodes
        pick = pairing_loss = None
        if fractional:
            picks = self._table(
                ("pick", self._prices_generation if values is not None else -1, *shape),
                pick=np.zeros(n, dtype=np.int64),
                pairing_loss=None if values is None else np.zeros(n))
            stale = picks.stale(state, nodes)
            if len(stale):
                fresh_pick, fresh_loss = self._pick_rows(t, spec, stale, values, fgd=True)
                picks.store(state, stale, pick=fresh_pick, pairing_loss=fresh_loss)
            pick, pairing_loss = picks.get("pick", nodes), picks.get("pairing_loss", nodes)
        after = self._table(("after", *shape), pick=np.zeros(n, dtype=np.int64) if fractional
                            else None, left_after=np.zeros(n, dtype=np.int64),
                            frag_after=np.zeros(n))
        redo = after.stamp[nodes] != state.node_version[nodes]
        if pick is not None:
            redo |= after.arrays["pick"][nodes] != pick  # type: ignore[index]
        if redo.any():
            at = np.flatnonzero(redo)
            on = None if pick is None else pick[at]
            left, frag = self._after_rows(t, spec, nodes[at], on, fgd=True)
            after.store(state, nodes[at], pick=on, left_after=left, frag_after=frag)
        return ShardScores(pick, pairing_loss, after.arrays["left_after"][nodes],  # type: ignore[index]
                           after.arrays["frag_after"][nodes])  # type: ignore[index]

    def _table(self, key: tuple, **arrays: np.ndarray | None) -> NodeTable:
        """The score table under `key` (made with these arrays if new), most recently used."""
        return kept(self._tables, key, lambda: NodeTable(self.state.topo.n_nodes, **arrays),
                    SHAPES_KEPT)

    def _score_rows(self, t: int, spec: ShardSpec, nodes: np.ndarray,
                    values: PairingValues | None, fgd: bool) -> ShardScores:
        """Where one shard of `spec` (tenant t) would go on each of `nodes` and what it leaves
        there; a function of each node's own state (and the workload and prices) alone."""
        pick, pairing_loss = self._pick_rows(t, spec, nodes, values, fgd)
        left_after, frag_after = self._after_rows(t, spec, nodes, pick, fgd)
        return ShardScores(pick, pairing_loss, left_after, frag_after)

    def _pick_rows(self, t: int, spec: ShardSpec, nodes: np.ndarray,
                   values: PairingValues | None, fgd: bool
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The accelerator a fractional shard takes on each node, and the pairing value that
        loses (None, None for other shards)."""
        if not (spec.accelerators > 0 and spec.fractional):
            return None, None
        s = self.state
        free = self._free_milli_of(t, nodes)
        rows = np.arange(len(nodes))
        fits = (free >= spec.accelerator_milli) & (s.acc_hbm[nodes] >= spec.hbm_gib)
        shared = fits & (s.acc_owner[nodes] == t) & (free < 1000)
        a = free.shape[1]
        key = np.where(shared, free, np.where(fits, 2000 + np.arange(a), BIG))
        pairing_loss = None
        if values is not None:
            # The accelerator whose pairing loses least, then the packing order.
            lost = np.round(values.loss(free, spec.accelerator_milli))
            key = np.where(fits, lost * 4000 + key, BIG)
        pick = np.argmin(key, axis=1)
        if values is not None:
            pairing_loss = lost[rows, pick]
        if fgd and FGD_ACCELERATOR_CHOICE:
            # FGD also picks the accelerator: try each that fits, keep the least fragmenting.
            tries = np.repeat(free[:, None, :], a, axis=1)          # (Nc, A try, A)
            tries[:, np.arange(a), np.arange(a)] -= spec.accelerator_milli
            scored = node_fragmentation(
                tries.reshape(len(nodes) * a, a), np.repeat(s.cpu_free[nodes] - spec.cpu_milli, a),
                np.repeat(s.mem_free[nodes] - spec.memory_mib, a), self.workload,
                np.repeat(nodes, a)).reshape(len(nodes), a)
            scored = np.where(fits, scored, np.inf)
            pick = np.argmin(scored + 1e-9 * key, axis=1)           # ties: the packing order
        return pick, pairing_loss

    def _after_rows(self, t: int, spec: ShardSpec, nodes: np.ndarray, pick: np.ndarray | None,
                    fgd: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """With one shard on each node (a fraction on accelerator `pick`): the free milli the
        tenant could use left there, and (FGD) the node's fragmentation."""
        s = self.state
        after = self._free_milli_of(t, nodes)
        if spec.accelerators > 0:
            if spec.fractional:
                after[np.arange(len(nodes)), pick] -= spec.accelerator_milli
            else:
                whole = (after >= 1000) & (s.acc_hbm[nodes] >= spec.hbm_gib)
                take = whole & (np.cumsum(whole, axis=1) <= spec.accelerators)
                after = np.where(take, 0, after)
        if not fgd:
            return after.sum(axis=1), None
        return after.sum(axis=1), node_fragmentation(
            after, s.cpu_free[nodes] - spec.cpu_milli, s.mem_free[nodes] - spec.memory_mib,
            self.workload, nodes)

    def forget_scores(self) -> None:
        """Drop the cached node scores (memory only: a changed node is re-scored anyway, its
        stamp having moved)."""
        self._before.clear()
        self._tables.clear()

    def pairing_values(self) -> PairingValues | None:
        """Prices of free room per accelerator for the workload seen (`pairing.py`); None
        with plain best fit or before any arrival."""
        if self.scorer != "fgd" or PAIRING_WEIGHT <= 0 or not self.workload.counts:
            return None
        if self.workload.stale():
            self.workload.refresh()
        return self.workload.pairing(self._ready_accelerators(),
                                     self._room_by_use if STATE_PRICES else None)

    def expected_packing(self) -> float | None:
        """Milli of the workload's expected demand the cluster as it stands can still take
        (`pairing.expected_packing`); None with plain best fit, before any arrival or with
        nothing fractional."""
        if self.scorer != "fgd" or not self.workload.counts:
            return None
        return self.workload.expected_packing(self._ready_accelerators(), self._room_by_use())

    def _ready_accelerators(self) -> int:
        topo = self.state.topo
        return int(topo.node_accelerators[topo.node_ready].sum())

    def _room_by_use(self) -> dict[int, int]:
        """Accelerators of ready nodes with room, per milli used on them (0: empty)."""
        s = self.state
        free = s.acc_free[s.acc_exists & s.topo.node_ready[:, None]]
        used, count = np.unique(1000 - free[free > 0], return_counts=True)
        return dict(zip(used.tolist(), count.tolist()))

    def _scarcity_cost(self, t: int, spec: ShardSpec, candidates: np.ndarray) -> np.ndarray:
        """Milli of model-restricted demand a shard is expected to displace on each candidate
        (its milli x the pressure on the node's model, `model_pressure`); zeros when no shape
        is restricted. Keeps scarce models for the shapes that can only use them."""
        w = self.workload
        if not self._scarce():
            return np.zeros(len(candidates))
        s = self.state
        free = np.where(s.topo.node_ready, self._free_milli(t).sum(axis=1), 0)
        by_model = np.bincount(w.node_model, weights=free, minlength=len(w.model_names))
        pressure = model_pressure(w, by_model)
        if pressure is None:
            return np.zeros(len(candidates))
        return SCARCITY_WEIGHT * spec.milli * pressure[w.node_model[candidates]]

    def _scarce(self) -> bool:
        """Whether `_scarcity_cost` may be other than zero (a model-restricted shape seen)."""
        w = self.workload
        return w.restricted_share.size > 0 and w.node_model is not None and SCARCITY_WEIGHT > 0

    def _uses_fgd(self) -> bool:
        return self.scorer == "fgd" and len(self.workload.counts) > 0

    # ---- single shards from the kept candidates (`candidates.RackBest`) --------------------

    def _keeps_candidates(self, d: int) -> bool:
        """Whether a single shard of d is chosen from the kept candidates: FGD scoring (the
        ranking `RackBest` keeps) and no spread rule (a rule of the deployment's own)."""
        return KEEP_CANDIDATES and self._uses_fgd() and self.state.deps[d].spread is None

    def _best_kept(self, d: int) -> int | None:
        """`_best_node(d, node_fit(state, d).slots)`, from the kept candidates: the same node
        (and the same accelerator noted for a fraction), the same snapshot and prices taken
        (only when two nodes or more have a slot, as `rank_nodes` does)."""
        s = self.state
        spec = s.deps[d].shard
        t = int(s.dep_tenant[d])
        best_of = self._kept_candidates(t, spec)
        best_of.judge(s, d)
        racks, count = best_of.candidates(s, d)
        if count <= 1:
            return None if count == 0 else best_of.only(racks)
        values = self._prices_now(spec)
        if self._scarce():  # a model-restricted shape seen: a cost over the whole cluster
            return self._best_node(d, node_fit(s, d).slots)
        prices = -1 if values is None else self._prices_generation
        best_of.rank(s, (self.workload.version, prices), racks,
                     lambda nodes: self._node_keys(t, spec, nodes, values))
        best, keys = best_of.ranking_keys(s, t, racks)
        node = int(best[lexmin(keys)])
        if spec.fractional and spec.accelerators > 0:  # as `_best_node` notes it
            pick = self._kept_scores(t, spec, np.array([node]), values).pick
            assert pick is not None
            self._known_index = (node, int(pick[0]))
        return node

    def _kept_candidates(self, t: int, spec: ShardSpec) -> RackBest:
        key = (t, spec.accelerators, spec.accelerator_milli, spec.hbm_gib, spec.cpu_milli,
               spec.memory_mib, spec.accelerator_models)
        if self._rack_order is None:
            self._rack_order = RackOrder.of(self.state.topo)
        order = self._rack_order
        return kept(self._rack_best, key, lambda: RackBest(order, self.state.topo.n_nodes),
                    SHAPES_KEPT)

    def _node_keys(self, t: int, spec: ShardSpec, nodes: np.ndarray,
                   values: PairingValues | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per node, the ranking keys of `rank_nodes` that are the node's own: FGD delta
        (rounded), free milli left, CPU left."""
        scored = self._kept_scores(t, spec, nodes, values)
        assert scored.frag_after is not None
        cost = scored.frag_after - self._fragmentation(t, nodes) + \
            self._scarcity_cost(t, spec, nodes)
        return (rounded_delta(cost, scored.pairing_loss), scored.left_after,
                self.state.cpu_free[nodes] - spec.cpu_milli)

    def _current_snapshot(self) -> None:
        """Refresh a stale workload snapshot; score tables of an older one are dropped."""
        if self.workload.stale():
            self.workload.refresh()
        if self._scores_version != self.workload.version:
            self.forget_scores()
            self._scores_version = self.workload.version

    def _fragmentation(self, t: int, nodes: np.ndarray) -> np.ndarray:
        """Fragmentation of these nodes as tenant t sees them, consistent with the workload
        snapshot; from the tenant's table, nodes changed since scored are scored again."""
        self._current_snapshot()
        table = self._before.get(t)
        if table is None:
            table = self._before[t] = NodeTable(self.state.topo.n_nodes,
                                                 frag=np.zeros(self.state.topo.n_nodes))
        stale = table.stale(self.state, nodes)
        if len(stale):
            s = self.state
            table.store(s, stale, frag=node_fragmentation(
                self._free_milli_of(t, stale), s.cpu_free[stale], s.mem_free[stale],
                self.workload, stale))
        return table.arrays["frag"][nodes]  # type: ignore[index]

    def _free_milli_of(self, t: int, nodes: np.ndarray) -> np.ndarray:
        """`_free_milli(t)` of these nodes only."""
        s = self.state
        usable = s.acc_exists[nodes] & ((s.acc_owner[nodes] == -1) | (s.acc_owner[nodes] == t))
        return np.where(usable, s.acc_free[nodes], 0)

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


def rounded_delta(cost: np.ndarray, pairing_loss: np.ndarray | None) -> np.ndarray:
    """The primary ranking key: FGD cost plus the pairing loss's weight, in quanta."""
    delta = cost if pairing_loss is None else cost + PAIRING_WEIGHT * pairing_loss
    return np.round(delta / FGD_QUANTUM)


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


def same_prices(a: PairingValues, b: PairingValues) -> bool:
    """Whether two pricings value every placement alike (`PairingValues.loss`)."""
    return a.net_value == b.net_value and np.array_equal(a.room_value, b.room_value)
