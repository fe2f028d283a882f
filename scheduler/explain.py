"""Why a deployment could not be placed, in reasons a person can act on.

Reasons are computed against the cluster state at the moment the deployment was last tried, as
Nomad's AllocMetric and Kubernetes' filter statuses do: node filters are counted per first
failing rule ("0/4 nodes fit a shard: 1 NODE_STATE, 1 EXCLUSION"), then domain rules name the
binding numbers ("rack rack-a1 power: 1200 W used + 5600 W needed > 6500 W budget; fits if
the budget were 6800 W"). One Reason per code, each with its scope, so the plan, the gRPC error
details and the CLI can all show the same thing.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from scheduler.filters import NODE_CODES, gang_capacity, node_fit, quota_room
from scheduler.model import Reason
from scheduler.state import ClusterState
from scheduler.topology import UNLIMITED

MAX_NAMED = 3  # domains named in one message before "+N more"
_ISOLATION_SCAN = 256  # nodes an ISOLATION message looks at to name who holds them


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" +{len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def _first(items: np.ndarray, render: Callable[[int], str]) -> list[str]:
    """Render only the items a message shows; the rest count for "+N more"."""
    shown = [render(int(i)) for i in items[:MAX_NAMED]]
    return shown + [""] * max(len(items) - MAX_NAMED, 0)


def _w(value: float) -> str:
    return f"{value / 1000:.1f} kW" if value >= 10000 else f"{value:.0f} W"


def explain(state: ClusterState, d: int) -> tuple[Reason, ...]:
    """Reasons one more replica of deployment d does not fit in this state."""
    topo = state.topo
    dep = state.deps[d]
    spec = dep.shard
    t = int(state.dep_tenant[d])
    tenant = topo.tenant_ids[t]
    count = dep.shards_per_replica
    reasons: list[Reason] = []

    room, quota_code = quota_room(state, d)
    if room < count and quota_code is not None:
        if quota_code == "QUOTA_ACCELERATORS":
            used, cap, need = (state.tenant_milli[t] / 1000, topo.tenant_max_milli[t] / 1000,
                               count * spec.milli / 1000)
            reasons.append(Reason(quota_code, f"tenant {tenant} holds {used:g} accelerators + "
                                  f"{need:g} needed > {cap:g} max_accelerators", tenant))
        else:
            used, cap = state.tenant_power[t], topo.tenant_max_power[t]
            reasons.append(Reason(quota_code, f"tenant {tenant} draws {_w(used)} + "
                                  f"{_w(count * spec.shard_power_w)} needed > {_w(cap)} "
                                  f"max_power_w", tenant))

    fit = node_fit(state, d, explain=True)
    codes = fit.codes
    assert codes is not None
    n_nodes = topo.n_nodes
    fitting = int((fit.slots > 0).sum())
    per_code = np.bincount(codes[codes >= 0], minlength=len(NODE_CODES))
    failed = Counter({c: int(n) for c, n in enumerate(per_code) if n})
    if failed:
        summary = ", ".join(f"{n} {NODE_CODES[c]}" for c, n in failed.most_common())
        head = f"{fitting}/{n_nodes} nodes fit a shard: {summary}"
        for c, n in failed.most_common():
            nodes = np.flatnonzero(codes == c)
            reasons.append(Reason(NODE_CODES[c], f"{head}; {_node_detail(state, d, c, nodes)}",
                                  _scope(state, NODE_CODES[c], nodes)))

    if fitting and room >= count:
        reasons.extend(_domain_reasons(state, d, fit.slots))
    if not reasons:
        reasons.append(Reason("CAPACITY", f"{dep.id} fits no more replicas: {fitting}/{n_nodes}"
                              f" nodes have room, min_replicas {dep.min_replicas} not reachable"))
    return tuple(reasons)


def _scope(state: ClusterState, code: str, nodes: np.ndarray) -> str | None:
    topo = state.topo
    if code in ("POWER_RACK", "EXCLUSION"):
        racks = np.unique(topo.node_rack[nodes])
        return topo.rack_ids[racks[0]] if len(racks) == 1 else None
    if code == "POWER_ROW":
        rows = np.unique(topo.node_row[nodes])
        return topo.row_ids[rows[0]] if len(rows) == 1 else None
    return topo.node_ids[nodes[0]] if len(nodes) == 1 else None


def _node_detail(state: ClusterState, d: int, code: int, nodes: np.ndarray) -> str:
    topo = state.topo
    dep = state.deps[d]
    spec = dep.shard
    t = int(state.dep_tenant[d])
    name = NODE_CODES[code]
    node_names = _first(nodes, lambda n: topo.node_ids[n])
    if name == "NODE_STATE":
        states = _first(nodes, lambda n: f"{topo.node_ids[n]} ({topo.problem.nodes[n].state})")
        return f"not ready: {_names(states)}"
    if name == "ZONE":
        zones = topo.problem.tenants[t].zones or ()
        return f"tenant {topo.tenant_ids[t]} may only run in zones {', '.join(zones)}"
    if name == "ACCELERATOR_MODEL":
        return (f"needs {'|'.join(spec.accelerator_models or ())}, nodes have "
                f"{_names(sorted({str(topo.node_model[n]) for n in nodes[:64]}))}")
    if name == "EXCLUSION":
        excluded = topo.tenant_excludes[t]
        def held_by(rack: int) -> str:
            holders = [topo.tenant_ids[o] for o in np.flatnonzero(
                excluded & (state.rack_tenant[rack] > 0))]
            return f"rack {topo.rack_ids[rack]} holds {', '.join(holders)}"
        parts = _first(np.unique(topo.node_rack[nodes]), held_by)
        return f"excluded tenants share the rack: {_names(parts)}"
    if name == "ISOLATION":
        # Name the rack only when a dedicated_rack tenant is why; dedicated_node is about the node.
        def holders(counts: np.ndarray) -> str:
            return ", ".join(f"{topo.tenant_ids[o]} ({topo.tenant_isolation[o]})"
                             for o in np.flatnonzero(counts > 0) if o != t) or "nothing"

        def held_by(n: int) -> str:
            rack = topo.node_rack[n]
            others_rack = state.rack_tenant[rack] > 0
            others_rack[t] = False
            if state.dedicated_rack[t] or (state.dedicated_rack & others_rack).any():
                return f"rack {topo.rack_ids[rack]} holds {holders(state.rack_tenant[rack])}"
            return f"node {topo.node_ids[n]} holds {holders(state.node_tenant[n])}"
        looked = nodes[:_ISOLATION_SCAN]  # one line per rack or node, duplicates dropped
        text = _names(list(dict.fromkeys(held_by(int(n)) for n in looked)))
        if len(nodes) > len(looked):
            text += f" (+{len(nodes) - len(looked)} more nodes)"
        return f"tenant {topo.tenant_ids[t]} is {topo.tenant_isolation[t]}: {text}"
    if name == "SPREAD":
        sp = dep.spread
        return f"spread: at most {sp.max_per_domain} replica(s) per {sp.domain} reached"
    if name == "CAPACITY":
        need = (f"{spec.accelerator_milli} milli of an accelerator" if spec.fractional
                else f"{spec.accelerators} free accelerator(s)")
        return f"need {need}: {_names(node_names)} full"
    if name == "HBM":
        return f"need {spec.hbm_gib:g} GiB HBM per accelerator: {_names(node_names)}"
    if name == "CPU":
        n = nodes[0]
        return (f"need {spec.cpu_milli} cpu_milli, {topo.node_ids[n]} has "
                f"{max(state.cpu_free[n], 0):.0f} free")
    if name == "MEMORY":
        n = nodes[0]
        return (f"need {spec.memory_mib} memory_mib, {topo.node_ids[n]} has "
                f"{max(state.mem_free[n], 0):.0f} free")
    if name == "POWER_RACK":
        parts = _first(np.unique(topo.node_rack[nodes]), lambda r: _power_line(
            "rack", topo.rack_ids[r], state.rack_power[r], spec.shard_power_w,
            topo.rack_budget[r]))
        return _names(parts)
    if name == "POWER_ROW":
        parts = _first(np.unique(topo.node_row[nodes]), lambda r: _power_line(
            "row", topo.row_ids[r], state.row_power[r], spec.shard_power_w,
            topo.row_budget[r]))
        return _names(parts)
    return _names(node_names)


def _power_line(kind: str, name: str, used: float, need: float, budget: float) -> str:
    return (f"{kind} {name} power: {_w(used)} used + {_w(need)} needed > {_w(budget)} budget; "
            f"fits if the budget were {_w(used + need)}")


def _domain_reasons(state: ClusterState, d: int, slots: np.ndarray) -> list[Reason]:
    """Nodes fit single shards, but no locality domain fits the whole gang: say why."""
    topo = state.topo
    dep = state.deps[d]
    count = dep.shards_per_replica
    level = dep.locality
    if count == 1:
        return []
    cap = gang_capacity(state, d, slots, level)
    if (cap >= count).any():
        return []
    power = dep.shard.shard_power_w
    need = count * power
    reasons: list[Reason] = []
    if level in ("rack", "row"):
        racks = np.bincount(topo.node_rack, weights=slots, minlength=len(topo.rack_ids))
        rack_lines, row_lines = [], []
        for r in np.flatnonzero(racks >= count) if level == "rack" else []:
            used, budget = state.rack_power[r], topo.rack_budget[r]
            if used + need > budget:
                rack_lines.append((topo.rack_ids[r], _power_line(
                    "rack", topo.rack_ids[r], used, need, budget)))
            row = topo.rack_row[r]
            if state.row_power[row] + need > topo.row_budget[row]:
                row_lines.append((topo.row_ids[row], _power_line(
                    "row", topo.row_ids[row], state.row_power[row], need,
                    topo.row_budget[row])))
        if level == "row":
            rows = np.bincount(topo.rack_row, weights=racks, minlength=len(topo.row_ids))
            for w in np.flatnonzero(rows >= count):
                if state.row_power[w] + need > topo.row_budget[w]:
                    row_lines.append((topo.row_ids[w], _power_line(
                        "row", topo.row_ids[w], state.row_power[w], need, topo.row_budget[w])))
                else:
                    racks_in = np.flatnonzero((topo.rack_row == w) & (racks > 0))
                    tight = [topo.rack_ids[r] for r in racks_in
                             if topo.rack_budget[r] < UNLIMITED / 2]
                    if tight:
                        rack_lines.append((tight[0], f"row {topo.row_ids[w]}: rack power "
                                           f"budgets of {_names(tight)} leave room for fewer "
                                           f"than {count} shards"))
        if rack_lines:
            reasons.append(Reason("POWER_RACK", "; ".join(m for _, m in rack_lines[:MAX_NAMED])
                                  + (f" +{len(rack_lines) - MAX_NAMED} more racks"
                                     if len(rack_lines) > MAX_NAMED else ""),
                                  rack_lines[0][0] if len(rack_lines) == 1 else None))
        if row_lines:
            unique = list(dict.fromkeys(row_lines))
            reasons.append(Reason("POWER_ROW", "; ".join(m for _, m in unique[:MAX_NAMED]),
                                  unique[0][0] if len(unique) == 1 else None))
    if not reasons:
        best = int(cap.max()) if len(cap) else 0
        where = topo.domain_name(level, int(np.argmax(cap))) if len(cap) else "-"
        reasons.append(Reason("LOCALITY", f"locality {level}: a replica needs {count} shards "
                              f"in one {level}; the best, {where}, has room for {best}",
                              where if level != "none" else None))
    return reasons
