"""Scores of the nodes one shard could go to, for the greedy placer, kept between decisions.

`greedy.Placer` ranks the nodes for a single shard by what the shard does to each: the
fragmentation it adds there (FGD, `fragmentation.py`), the pairing value it loses on the
accelerator it takes (`pairing.py`), the model-restricted demand it displaces, and the free
room it leaves. `NodeScores` computes those per node, vectorised over the nodes asked, and
keeps them; the placer combines them into its ranking keys.

A decision costs the decision, not the cluster: the FGD scores of a node (its fragmentation
now, per tenant; where a shard of a given shape would go on it and its fragmentation then, per
tenant and shape) are kept between decisions and computed again only for nodes whose stamp
(`ClusterState.node_version`, new on every change of the node) moved since, or when the
workload snapshot or the pairing prices they depend on change.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from scheduler.filters import BIG
from scheduler.fragmentation import SCARCITY_WEIGHT, Workload, model_pressure, node_fragmentation
from scheduler.model import ShardSpec
from scheduler.pairing import PairingValues
from scheduler.state import ClusterState, NodeTable, kept

Scorer = Literal["fgd", "bestfit"]
FGD_ACCELERATOR_CHOICE = False  # fractions: FGD picks the accelerator too (as in the paper)
FGD_QUANTUM = 1.0  # fragmentation deltas closer than this (milli) count as ties
PAIRING_WEIGHT = 30.0  # per milli of pairing value lost (pairing.py), next to FGD's milli
STATE_PRICES = True  # price pairings on the cluster as it stands, not an empty one
SHAPES_KEPT = 64  # score tables (per tenant, shard shape) a placer keeps, least used out


@dataclass
class ShardScores:
    """Where one shard of a shape goes on each node (rows: nodes, or the nodes asked)."""

    pick: np.ndarray | None  # the accelerator a fractional shard takes there
    pairing_loss: np.ndarray | None  # pairing value lost on `pick` (None: no prices)
    left_after: np.ndarray  # free milli the tenant could use there, with the shard
    frag_after: np.ndarray | None  # fragmentation with the shard (None: not FGD)


class NodeScores:
    """The scores of one ClusterState's nodes for single shards (FGD, pairing prices,
    scarcity), kept per tenant and shard shape between decisions."""

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

    def uses_fgd(self) -> bool:
        """Whether single shards are ranked by FGD: the FGD scorer, and some workload seen."""
        return self.scorer == "fgd" and len(self.workload.counts) > 0

    def fgd_scores(self, t: int, spec: ShardSpec, nodes: np.ndarray) -> ShardScores:
        """`score_rows` for these nodes under FGD, from tables kept per (tenant, shape): the
        accelerator a fraction takes (per pricing too) and what the shard leaves (per node and
        accelerator taken). Only nodes changed since (or never scored), and nodes where new
        prices move the fraction to another accelerator, are scored now."""
        return self.kept_scores(t, spec, nodes, self.prices_now(spec))

    def prices_now(self, spec: ShardSpec) -> PairingValues | None:
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

    def version(self, values: PairingValues | None) -> tuple[int, int]:
        """What scores taken under `values` (`prices_now`) depend on besides the nodes'
        stamps: the workload snapshot and the pricing."""
        prices = -1 if values is None else self._prices_generation
        return (self.workload.version, prices)

    def kept_scores(self, t: int, spec: ShardSpec, nodes: np.ndarray,
                    values: PairingValues | None) -> ShardScores:
        """`fgd_scores` under these prices (`prices_now`)."""
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

    def score_rows(self, t: int, spec: ShardSpec, nodes: np.ndarray,
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

    def forget(self) -> None:
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
        return int(topo.node_healthy[topo.node_ready].sum())

    def _room_by_use(self) -> dict[int, int]:
        """Accelerators of ready nodes with room, per milli used on them (0: empty)."""
        s = self.state
        free = s.acc_free[s.acc_exists & s.topo.node_ready[:, None]]
        used, count = np.unique(1000 - free[free > 0], return_counts=True)
        return dict(zip(used.tolist(), count.tolist()))

    def scarcity_cost(self, t: int, spec: ShardSpec, candidates: np.ndarray) -> np.ndarray:
        """Milli of model-restricted demand a shard is expected to displace on each candidate
        (its milli x the pressure on the node's model, `model_pressure`); zeros when no shape
        is restricted. Keeps scarce models for the shapes that can only use them."""
        w = self.workload
        if not self.scarce():
            return np.zeros(len(candidates))
        s = self.state
        free = np.where(s.topo.node_ready, self.free_milli(t).sum(axis=1), 0)
        by_model = np.bincount(w.node_model, weights=free, minlength=len(w.model_names))
        pressure = model_pressure(w, by_model)
        if pressure is None:
            return np.zeros(len(candidates))
        return SCARCITY_WEIGHT * spec.milli * pressure[w.node_model[candidates]]

    def scarce(self) -> bool:
        """Whether `scarcity_cost` may be other than zero (a model-restricted shape seen)."""
        w = self.workload
        return w.restricted_share.size > 0 and w.node_model is not None and SCARCITY_WEIGHT > 0

    def _current_snapshot(self) -> None:
        """Refresh a stale workload snapshot; score tables of an older one are dropped."""
        if self.workload.stale():
            self.workload.refresh()
        if self._scores_version != self.workload.version:
            self.forget()
            self._scores_version = self.workload.version

    def fragmentation(self, t: int, nodes: np.ndarray) -> np.ndarray:
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
        """`free_milli(t)` of these nodes only."""
        s = self.state
        usable = s.acc_exists[nodes] & ((s.acc_owner[nodes] == -1) | (s.acc_owner[nodes] == t))
        return np.where(usable, s.acc_free[nodes], 0)

    def free_milli(self, t: int) -> np.ndarray:
        """(N, A) free milli per accelerator that tenant t could use."""
        s = self.state
        usable = s.acc_exists & ((s.acc_owner == -1) | (s.acc_owner == t))
        return np.where(usable, s.acc_free, 0)


def rounded_delta(cost: np.ndarray, pairing_loss: np.ndarray | None) -> np.ndarray:
    """The primary ranking key: FGD cost plus the pairing loss's weight, in quanta."""
    delta = cost if pairing_loss is None else cost + PAIRING_WEIGHT * pairing_loss
    return np.round(delta / FGD_QUANTUM)


def same_prices(a: PairingValues, b: PairingValues) -> bool:
    """Whether two pricings value every placement alike (`PairingValues.loss`)."""
    return a.net_value == b.net_value and np.array_equal(a.room_value, b.room_value)
