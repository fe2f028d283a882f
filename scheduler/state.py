"""Mutable occupancy of the cluster during one solve.

`ClusterState` holds what is used where (per accelerator, node, rack, row and tenant) as numpy
arrays so filters can be vectorised, and records every placed replica so it can be undone
(trial placements, preemption, moves). All mutation goes through `add_replica`/`remove_replica`
(one shard at a time, `_apply`) or `load`, which keep the aggregates consistent and give every
node they change a new stamp (`node_version`): a cache of per-node scores (scoring.py) is valid
for a node exactly while its stamp is the one it was computed at.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Hashable
from itertools import chain, count
from typing import NamedTuple, TypeVar

import numpy as np

from scheduler.model import Deployment
from scheduler.topology import SHARDS_UNLIMITED, UNLIMITED, Topology

# Node stamps, unique across every state of the process: a twin (`copy`) starts with its
# original's stamps (same occupancy) and each later change draws a fresh one, so equal stamps
# always mean an equal node, whichever state a cache was filled from.
_stamps = count(1)
# What is left of an accelerator's HBM is kept to this many decimals of a GiB (a billionth: far
# below any real need), so that shards' fractional needs add up as written (`ClusterState.apply`).
HBM_DIGITS = 9


Kept = TypeVar("Kept")


def kept(cache: "OrderedDict[Hashable, Kept]", key: Hashable, make: Callable[[], Kept],
         limit: int) -> Kept:
    """`cache[key]` (made if missing), marked most recently used; beyond `limit` entries the
    least recently used goes (the per-shape tables of filters and placer)."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        if len(cache) > limit:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def stamp_now() -> int:
    """A stamp newer than every node's now and older than any given later: nodes changed
    after this call are those whose stamp is at least it."""
    return next(_stamps)


class ShardAt(NamedTuple):
    """Where one shard runs: node index, accelerator indices and the milli it takes on each.

    A named tuple (not a dataclass): one is made per existing placement on every solve, and
    comparing replicas (plan: unchanged since loaded?) is then a C-level tuple comparison."""
    node: int
    indices: tuple[int, ...]
    milli: int  # per accelerator: 1000 for whole accelerators


class NodeTable:
    """Per-node arrays computed from nodes' occupancy, each row valid while its node's stamp
    is the one it was computed at (`ClusterState.node_version`; 0: never computed). Stamps
    are unique across states, so one table may serve a state and its twins."""

    def __init__(self, n_nodes: int, **arrays: np.ndarray | None) -> None:
        self.stamp = np.zeros(n_nodes, dtype=np.int64)
        self.arrays = arrays

    def stale(self, state: "ClusterState", nodes: np.ndarray | None = None) -> np.ndarray:
        """Those of `nodes` (None: all) changed since computed, or never computed."""
        if nodes is None:
            return np.flatnonzero(self.stamp != state.node_version)
        return nodes[self.stamp[nodes] != state.node_version[nodes]]

    def store(self, state: "ClusterState", nodes: np.ndarray,
              **values: np.ndarray | None) -> None:
        """Rows `nodes` of the named arrays, computed from the state as it is now."""
        for name, value in values.items():
            if value is not None:
                self.arrays[name][nodes] = value  # type: ignore[index]
        self.stamp[nodes] = state.node_version[nodes]

    def get(self, name: str, nodes: np.ndarray | None = None) -> np.ndarray | None:
        array = self.arrays[name]
        if array is None:
            return None
        return array if nodes is None else array[nodes]


class ClusterState:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        deps = topo.problem.deployments
        # A list, not the problem's tuple: a warm session (session.py) appends arrivals to it
        # (`add_deployment`); trial copies share it.
        self.deps: list[Deployment] = list(deps)
        self.dep_tenant = np.array([topo.tenant_index[d.tenant] for d in deps], dtype=np.int64)
        n, a = topo.n_nodes, max(topo.max_accelerators, 1)
        n_t = len(topo.tenant_ids)
        exists = topo.acc_usable.copy()  # an unhealthy accelerator is as one the node does not have
        self.acc_exists = exists
        self.acc_free = np.where(exists, 1000, 0).astype(np.int64)         # milli free
        self.acc_hbm = np.where(exists, topo.node_hbm[:, None], 0.0)        # GiB free
        self.acc_owner = np.full((n, a), -1, dtype=np.int64)               # tenant or -1
        self.cpu_free = topo.node_cpu.copy()
        self.mem_free = topo.node_mem.copy()
        self.node_tenant = np.zeros((n, n_t), dtype=np.int64)   # shards per tenant and node
        self.rack_tenant = np.zeros((len(topo.rack_ids), n_t), dtype=np.int64)
        alive_idle = np.where(topo.node_alive, topo.node_idle_w, 0.0)
        self.rack_power = np.bincount(topo.node_rack, weights=alive_idle,
                                      minlength=len(topo.rack_ids)).astype(float)
        self.row_power = np.bincount(topo.rack_row, weights=self.rack_power,
                                     minlength=len(topo.row_ids)).astype(float)
        self.tenant_milli = np.zeros(n_t, dtype=float)
        self.tenant_power = np.zeros(n_t, dtype=float)
        # Tenant isolation classes as masks over tenants.
        self.dedicated_node = np.array([i == "dedicated_node" for i in topo.tenant_isolation],
                                       dtype=bool)
        self.dedicated_rack = np.array([i == "dedicated_rack" for i in topo.tenant_isolation],
                                       dtype=bool)
        # Per node, the stamp of its last change (see `_stamps`): what it holds (free milli,
        # owners, HBM, CPU, memory, tenants' shard counts) is the same while this is.
        self.node_version = np.full(n, next(_stamps), dtype=np.int64)
        self.static_cache: dict[int, tuple] = {}  # filters that never change, shared by copies
        # Per-node filter results by (tenant, shard shape) (`filters.node_fit`), stamped:
        # shared by copies like the static ones.
        self.fit_cache: OrderedDict[tuple, NodeTable] = OrderedDict()
        # Placed replicas: (deployment, replica) -> {shard: ShardAt}.
        self.replicas: dict[tuple[int, int], dict[int, ShardAt]] = {}
        self.by_dep: dict[int, set[int]] = {}  # deployment -> its placed replicas
        # Spread: per deployment with a spread rule, replicas touching each domain.
        self.spread_count: dict[int, np.ndarray] = {
            d: np.zeros(topo.n_domains(dep.spread.domain), dtype=np.int64)
            for d, dep in enumerate(deps) if dep.spread is not None}
        # Spread groups (`Deployment.spread_group`): group -> its deployments. Shared by
        # copies, like `deps`.
        self.spread_groups: dict[str, list[int]] = {}
        for d, dep in enumerate(deps):
            if dep.spread_group is not None:
                self.spread_groups.setdefault(dep.spread_group, []).append(d)

    def copy(self) -> "ClusterState":
        twin = copy.copy(self)
        for name in ("acc_free", "acc_hbm", "acc_owner", "cpu_free", "mem_free", "node_tenant",
                     "node_version", "rack_tenant", "rack_power", "row_power", "tenant_milli", "tenant_power"):
            setattr(twin, name, getattr(self, name).copy())
        # A replica's shard dict is never changed in place (add_replica makes a new one), so
        # the twin shares them: copying ~2,000 of them was most of a trial's copy.
        twin.replicas = dict(self.replicas)
        twin.by_dep = {k: set(v) for k, v in self.by_dep.items()}
        twin.spread_count = {k: v.copy() for k, v in self.spread_count.items()}
        return twin

    # ---- mutation -------------------------------------------------------------------------

    def add_deployment(self, dep: Deployment) -> int:
        """Register a deployment the problem did not list (a warm session's arrival); its
        index. The topology's deployment index learns it too."""
        d = len(self.deps)
        self.deps.append(dep)
        self.dep_tenant = np.append(self.dep_tenant, self.topo.tenant_index[dep.tenant])
        self.topo.deployment_index[dep.id] = d
        if dep.spread is not None:
            self.spread_count[d] = np.zeros(self.topo.n_domains(dep.spread.domain),
                                            dtype=np.int64)
        if dep.spread_group is not None:
            self.spread_groups.setdefault(dep.spread_group, []).append(d)
        return d

    def _apply(self, d: int, at: ShardAt, sign: int) -> None:
        dep = self.deps[d]
        t = int(self.dep_tenant[d])
        n = at.node
        spec = dep.shard
        self.node_version[n] = next(_stamps)
        for idx in at.indices:
            self.acc_free[n, idx] -= sign * at.milli
            # Rounded to HBM_DIGITS: 0.3 - 0.1 - 0.1 is 0.0999..., which refused a third 0.1
            # (every comparison with a shard's need is against what is left, so it is kept exact).
            self.acc_hbm[n, idx] = round(self.acc_hbm[n, idx] - sign * spec.hbm_gib, HBM_DIGITS)
            if sign > 0:
                self.acc_owner[n, idx] = t
            elif self.acc_free[n, idx] >= 1000:
                self.acc_owner[n, idx] = -1
        self.cpu_free[n] -= sign * spec.cpu_milli
        self.mem_free[n] -= sign * spec.memory_mib
        self.node_tenant[n, t] += sign
        rack = self.topo.node_rack[n]
        self.rack_tenant[rack, t] += sign
        power = spec.power_w * at.milli * len(at.indices) / 1000.0
        self.rack_power[rack] += sign * power
        self.row_power[self.topo.node_row[n]] += sign * power
        self.tenant_milli[t] += sign * at.milli * len(at.indices)
        self.tenant_power[t] += sign * power

    def touch(self, nodes: np.ndarray) -> None:
        """New stamps for these nodes: something per-node caches read changed outside the
        occupancy (a node cordoned or made ready again)."""
        self.node_version[nodes] = next(_stamps)

    def _spread_domains(self, d: int, shards: dict[int, ShardAt]) -> set[int]:
        level = self.deps[d].spread.domain  # type: ignore[union-attr]
        dom = self.topo.domain_of(level)
        return {int(dom[s.node]) for s in shards.values()}

    def add_replica(self, d: int, r: int, shards: dict[int, ShardAt]) -> None:
        """Record a replica (or more shards of a partly placed one)."""
        current = self.replicas.get((d, r))
        if current is not None and d in self.spread_count:
            for dom in self._spread_domains(d, current):
                self.spread_count[d][dom] -= 1
        merged = dict(current or {})
        for s, at in shards.items():
            self._apply(d, at, +1)
            merged[s] = at
        self.replicas[(d, r)] = merged
        self.by_dep.setdefault(d, set()).add(r)
        if d in self.spread_count:
            for dom in self._spread_domains(d, merged):
                self.spread_count[d][dom] += 1

    def load(self, replicas: dict[tuple[int, int], dict[int, ShardAt]], *,
             copy: bool = True) -> None:
        """Record many existing replicas at once (vectorised; same result as add_replica).

        With copy=False the state keeps the given shard dicts (the caller hands them over and
        must not mutate them; the state itself never mutates a replica's dict in place)."""
        if not replicas:
            return
        deps = self.deps
        items = list(replicas.values())
        ats = [at for sh in items for at in sh.values()]
        if not ats:
            return
        # Per shard: deployment, node, milli and number of accelerators.
        lens = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        rd = np.fromiter((k[0] for k in replicas), dtype=np.int64, count=len(replicas))
        sd = np.repeat(rd, lens)
        cols = np.array([(at[0], at[2], len(at[1])) for at in ats], dtype=np.int64)
        sn, sm, na = cols[:, 0], cols[:, 1], cols[:, 2]
        st = self.dep_tenant[sd]
        # Per accelerator entry (a host-only shard has none).
        n_arr = np.repeat(sn, na)
        m_arr = np.repeat(sm, na)
        d_arr = np.repeat(sd, na)
        i_arr = np.fromiter(chain.from_iterable(at[1] for at in ats), dtype=np.int64,
                            count=int(na.sum()))
        t_arr = self.dep_tenant[d_arr]
        hbm = np.array([d.shard.hbm_gib for d in deps], dtype=float)[d_arr]
        power_w = np.array([d.shard.power_w for d in deps], dtype=float)[d_arr]
        self.node_version[sn] = next(_stamps)
        np.subtract.at(self.acc_free, (n_arr, i_arr), m_arr)
        np.subtract.at(self.acc_hbm, (n_arr, i_arr), hbm)
        self.acc_hbm[n_arr, i_arr] = np.round(self.acc_hbm[n_arr, i_arr], HBM_DIGITS)  # as `apply` rounds
        self.acc_owner[n_arr, i_arr] = t_arr
        # Per shard (not per accelerator): host resources and tenant presence.
        np.subtract.at(self.cpu_free, sn, np.array([d.shard.cpu_milli for d in deps])[sd])
        np.subtract.at(self.mem_free, sn, np.array([d.shard.memory_mib for d in deps])[sd])
        np.add.at(self.node_tenant, (sn, st), 1)
        np.add.at(self.rack_tenant, (self.topo.node_rack[sn], st), 1)
        # Power and tenant totals: per accelerator entry.
        power = power_w * m_arr / 1000.0
        np.add.at(self.rack_power, self.topo.node_rack[n_arr], power)
        np.add.at(self.row_power, self.topo.node_row[n_arr], power)
        np.add.at(self.tenant_milli, t_arr, m_arr)
        np.add.at(self.tenant_power, t_arr, power)
        if copy:
            self.replicas.update((k, dict(sh)) for k, sh in replicas.items())
        else:
            self.replicas.update(replicas)
        by_dep = self.by_dep
        for d, r in replicas:
            got = by_dep.get(d)
            if got is None:
                by_dep[d] = {r}
            else:
                got.add(r)
        if self.spread_count:
            for (d, _), sh in replicas.items():
                if d in self.spread_count:
                    for dom in self._spread_domains(d, sh):
                        self.spread_count[d][dom] += 1

    def remove_replica(self, d: int, r: int) -> dict[int, ShardAt]:
        shards = self.replicas.pop((d, r), {})
        self.by_dep.get(d, set()).discard(r)
        for at in shards.values():
            self._apply(d, at, -1)
        if d in self.spread_count and shards:
            for dom in self._spread_domains(d, shards):
                self.spread_count[d][dom] -= 1
        return shards

    # ---- queries --------------------------------------------------------------------------

    def placed_replicas(self, d: int) -> list[int]:
        return sorted(self.by_dep.get(d, ()))

    def group_spread_count(self, d: int) -> np.ndarray | None:
        """Replicas per domain of d's spread rule, d's own and those of the other deployments
        of its spread group (each counted in every domain one of its shards touches); None: d
        has no spread rule, or no other deployment of its group holds a replica. Counted when
        asked: the others are a deployment's replicas being replaced, few and short-lived."""
        dep = self.deps[d]
        if dep.spread is None or dep.spread_group is None:
            return None
        others = [e for e in self.spread_groups[dep.spread_group] if e != d and self.by_dep.get(e)]
        if not others:
            return None
        dom = self.topo.domain_of(dep.spread.domain)
        counts = self.spread_count[d].copy()
        for e in others:
            for r in self.by_dep[e]:
                for x in {int(dom[at.node]) for at in self.replicas[(e, r)].values()}:
                    counts[x] += 1
        return counts

    def short_of_min(self, d: int) -> int:
        """Replicas deployment d still needs to reach min_replicas while some of it is placed
        (0 when none is, or enough are): short of them, min_replicas takes the placed ones
        away too."""
        have = len(self.by_dep.get(d, ()))
        return max(self.deps[d].min_replicas - have, 0) if have else 0

    def node_shards(self, nodes: np.ndarray | None = None) -> np.ndarray:
        """Shards each node (of `nodes`, None: all) holds, whatever they need (`Node.max_shards`
        bounds it): the tenants' counts summed, which every mutation keeps."""
        held = self.node_tenant if nodes is None else self.node_tenant[nodes]
        return held.sum(axis=1)

    def shard_room(self, nodes: np.ndarray | None = None) -> np.ndarray:
        """More shards each node (of `nodes`, None: all) may take under its `max_shards`, at
        least 0 (a node over it, lowered since, keeps what it has and takes nothing);
        `topology.SHARDS_UNLIMITED` where the node has none."""
        cap = self.topo.node_max_shards if nodes is None else self.topo.node_max_shards[nodes]
        return np.where(cap < SHARDS_UNLIMITED, np.maximum(cap - self.node_shards(nodes), 0), SHARDS_UNLIMITED)

    def rack_headroom(self) -> np.ndarray:
        return self.topo.rack_budget - self.rack_power

    def row_headroom(self) -> np.ndarray:
        return self.topo.row_budget - self.row_power

    def free_whole(self) -> np.ndarray:
        """Per node, accelerators nobody uses at all."""
        return ((self.acc_free >= 1000) & self.acc_exists).sum(axis=1)

    def choose_indices(self, d: int, node: int) -> tuple[tuple[int, ...], int] | None:
        """Concrete accelerators for one more shard of deployment d on node (None: no room).

        Whole shards take the lowest fully free indices; a fraction goes onto the fullest
        accelerator its tenant already uses that still has room, else the lowest free one.
        """
        spec = self.deps[d].shard
        if spec.accelerators == 0:
            return (), 1000
        free = self.acc_free[node]
        hbm = self.acc_hbm[node]
        exists = self.acc_exists[node]
        if not spec.fractional:
            ok = np.flatnonzero(exists & (free >= 1000) & (hbm >= spec.hbm_gib))
            if len(ok) < spec.accelerators:
                return None
            return tuple(int(i) for i in ok[:spec.accelerators]), 1000
        t = self.dep_tenant[d]
        owner = self.acc_owner[node]
        m = spec.accelerator_milli
        fits = exists & (free >= m) & (hbm >= spec.hbm_gib)
        shared = np.flatnonzero(fits & (owner == t) & (free < 1000))
        if len(shared):
            best = shared[np.argmin(free[shared])]
            return (int(best),), m
        empty = np.flatnonzero(fits & (owner == -1))
        if len(empty):
            return (int(empty[0]),), m
        return None


def is_unlimited(value: float) -> bool:
    return value >= UNLIMITED / 2


def dep_index(state: ClusterState, dep: Deployment) -> int:
    return state.topo.deployment_index[dep.id]
