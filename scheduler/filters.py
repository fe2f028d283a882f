"""Feasibility filters: which nodes can take a shard of a deployment, and how many.

Like a Kubernetes filter plugin chain (or Nomad's feasibility iterators), every hard rule that
can be judged per node is a vectorised mask over all nodes, applied in a fixed order; the first
mask a node fails is the reason it is counted under when a deployment cannot be placed
("0/96 nodes fit: 64 POWER_RACK, 32 ISOLATION"). What survives is turned into *slots*: how many
identical shards of this deployment each node could take at once. Domain-level rules (rack and
row power shared by several nodes, locality, tenant caps) are in `gang_capacity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.state import ClusterState

BIG = 1 << 40
NODE_CODES = ("NODE_STATE", "ZONE", "ACCELERATOR_MODEL", "EXCLUSION", "ISOLATION", "SPREAD",
              "CAPACITY", "HBM", "CPU", "MEMORY", "POWER_RACK", "POWER_ROW")


@dataclass(frozen=True)
class NodeFit:
    slots: np.ndarray                 # (N,) shards each node can take now; 0 where filtered
    codes: np.ndarray | None = None   # (N,) index into NODE_CODES of the first failed filter


def _static_mask(state: ClusterState, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ready, zone ok, model ok) per node; these never change during a solve."""
    cache = state.static_cache
    if d not in cache:
        topo = state.topo
        t = state.dep_tenant[d]
        zone_ok = topo.tenant_zone_ok[t][topo.node_zone] if len(topo.zone_ids) else \
            np.ones(topo.n_nodes, dtype=bool)
        cache[d] = (topo.node_ready, zone_ok, topo.model_mask(state.deps[d]))
    return cache[d]


def tenant_masks(state: ClusterState, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(exclusion ok, isolation ok) per node for tenant t, from who is placed where now."""
    topo = state.topo
    rack_of = topo.node_rack
    excluded = topo.tenant_excludes[t]
    if excluded.any():
        excl_ok = ~((state.rack_tenant[:, excluded].sum(axis=1) > 0)[rack_of])
    else:
        excl_ok = np.ones(topo.n_nodes, dtype=bool)
    others = np.ones(len(topo.tenant_ids), dtype=bool)
    others[t] = False
    iso_ok = np.ones(topo.n_nodes, dtype=bool)
    if state.dedicated_node[t]:
        iso_ok &= state.node_tenant[:, others].sum(axis=1) == 0
    if state.dedicated_rack[t]:
        iso_ok &= (state.rack_tenant[:, others].sum(axis=1) == 0)[rack_of]
    ded_node = state.dedicated_node & others
    if ded_node.any():
        iso_ok &= state.node_tenant[:, ded_node].sum(axis=1) == 0
    ded_rack = state.dedicated_rack & others
    if ded_rack.any():
        iso_ok &= (state.rack_tenant[:, ded_rack].sum(axis=1) == 0)[rack_of]
    return excl_ok, iso_ok


def spread_mask(state: ClusterState, d: int) -> np.ndarray | None:
    """Nodes whose spread domain still has room for one more replica (None: no rule)."""
    dep = state.deps[d]
    if dep.spread is None:
        return None
    counts = state.spread_count[d]
    return (counts < dep.spread.max_per_domain)[state.topo.domain_of(dep.spread.domain)]


def node_fit(state: ClusterState, d: int, explain: bool = False) -> NodeFit:
    """Slots per node for shards of deployment d (and, with explain, why a node has none)."""
    topo = state.topo
    dep = state.deps[d]
    spec = dep.shard
    t = int(state.dep_tenant[d])
    ready, zone_ok, model_ok = _static_mask(state, d)
    excl_ok, iso_ok = tenant_masks(state, t)
    spread_ok = spread_mask(state, d)

    # Accelerator slots, without and with the HBM rule (to tell CAPACITY from HBM).
    if spec.accelerators == 0:
        acc_slots = hbm_slots = np.full(topo.n_nodes, BIG, dtype=np.int64)
    elif not spec.fractional:
        whole = state.acc_exists & (state.acc_free >= 1000)
        acc_slots = whole.sum(axis=1) // spec.accelerators
        hbm_slots = (whole & (state.acc_hbm >= spec.hbm_gib)).sum(axis=1) // spec.accelerators
    else:
        usable = state.acc_exists & ((state.acc_owner == -1) | (state.acc_owner == t))
        per_acc = np.where(usable, state.acc_free // spec.accelerator_milli, 0)
        acc_slots = per_acc.sum(axis=1)
        if spec.hbm_gib > 0:
            by_hbm = np.floor(np.maximum(state.acc_hbm, 0) / spec.hbm_gib).astype(np.int64)
            hbm_slots = np.minimum(per_acc, by_hbm).sum(axis=1)
        else:
            hbm_slots = acc_slots
    cpu_slots = (np.floor(np.maximum(state.cpu_free, 0) / spec.cpu_milli).astype(np.int64)
                 if spec.cpu_milli > 0 else np.full(topo.n_nodes, BIG, dtype=np.int64))
    mem_slots = (np.floor(np.maximum(state.mem_free, 0) / spec.memory_mib).astype(np.int64)
                 if spec.memory_mib > 0 else np.full(topo.n_nodes, BIG, dtype=np.int64))
    power = spec.shard_power_w
    if power > 0:
        rack_slots = np.floor(np.maximum(state.rack_headroom(), 0) / power + 1e-9).astype(np.int64)
        row_slots = np.floor(np.maximum(state.row_headroom(), 0) / power + 1e-9).astype(np.int64)
        pr = rack_slots[topo.node_rack]
        pw = row_slots[topo.node_row]
    else:
        pr = pw = np.full(topo.n_nodes, BIG, dtype=np.int64)

    passes = ready & zone_ok & model_ok & excl_ok & iso_ok
    if spread_ok is not None:
        passes &= spread_ok
    slots = np.minimum.reduce([acc_slots, hbm_slots, cpu_slots, mem_slots, pr, pw])
    slots = np.where(passes, slots, 0)

    codes = None
    if explain:
        checks = [ready, zone_ok, model_ok, excl_ok, iso_ok,
                  spread_ok if spread_ok is not None else np.ones(topo.n_nodes, dtype=bool),
                  acc_slots > 0, hbm_slots > 0, cpu_slots > 0, mem_slots > 0, pr > 0, pw > 0]
        codes = np.full(topo.n_nodes, -1, dtype=np.int64)
        for i in range(len(checks) - 1, -1, -1):  # the first failed check wins
            codes[~checks[i]] = i
    return NodeFit(slots=slots, codes=codes)


def gang_capacity(state: ClusterState, d: int, slots: np.ndarray, level: str) -> np.ndarray:
    """Shards of deployment d each `level` domain can take at once, within rack/row power."""
    topo = state.topo
    power = state.deps[d].shard.shard_power_w
    n_racks, n_rows = len(topo.rack_ids), len(topo.row_ids)
    if level == "node":
        return slots
    rack_sum = np.bincount(topo.node_rack, weights=slots, minlength=n_racks).astype(np.int64)
    if power > 0:
        rack_pow = np.floor(np.maximum(state.rack_headroom(), 0) / power + 1e-9).astype(np.int64)
        row_pow = np.floor(np.maximum(state.row_headroom(), 0) / power + 1e-9).astype(np.int64)
    else:
        rack_pow = np.full(n_racks, BIG, dtype=np.int64)
        row_pow = np.full(n_rows, BIG, dtype=np.int64)
    if level == "rack":
        return np.minimum.reduce([rack_sum, rack_pow, row_pow[topo.rack_row]])
    rack_c = np.minimum(rack_sum, rack_pow)
    row_sum = np.bincount(topo.rack_row, weights=rack_c, minlength=n_rows).astype(np.int64)
    row_c = np.minimum(row_sum, row_pow)
    if level == "row":
        return row_c
    zone_c = np.bincount(topo.row_zone, weights=row_c,
                         minlength=len(topo.zone_ids)).astype(np.int64)
    if level == "zone":
        return zone_c
    return np.array([zone_c.sum()], dtype=np.int64)


def quota_room(state: ClusterState, d: int) -> tuple[int, str | None]:
    """Shards of d the tenant's caps still allow, and the binding cap's code if any."""
    topo = state.topo
    t = int(state.dep_tenant[d])
    spec = state.deps[d].shard
    room, code = BIG, None
    if spec.milli > 0:
        left = topo.tenant_max_milli[t] - state.tenant_milli[t]
        room = max(0, int(np.floor(left / spec.milli + 1e-9)))
        code = "QUOTA_ACCELERATORS"
    if spec.shard_power_w > 0:
        left = topo.tenant_max_power[t] - state.tenant_power[t]
        by_power = max(0, int(np.floor(left / spec.shard_power_w + 1e-9)))
        if by_power < room:
            room, code = by_power, "QUOTA_POWER"
    return room, code
