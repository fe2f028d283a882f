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
from collections.abc import Sequence

import numpy as np

from scheduler.filters import (BIG, MAX_NAMED, NODE_FILTERS, DomainPower, NodeFit, gang_capacity, names, node_fit,
                               power_line, quota_room)
from scheduler.model import IMPLIED_ROW, IMPLIED_ZONE, Reason
from scheduler.state import ClusterState
from scheduler.topology import UNLIMITED


def explain(state: ClusterState, d: int) -> tuple[Reason, ...]:
    """Reasons one more replica of deployment d does not fit in this state; first, when none of
    it is placed though one would fit, that min_replicas is why."""
    topo = state.topo
    dep = state.deps[d]
    t = int(state.dep_tenant[d])
    tenant = topo.tenant_ids[t]
    count = dep.shards_per_replica
    reasons: list[Reason] = []

    room, cap = quota_room(state, d)
    if room < count and cap is not None:
        reasons.append(Reason(cap.code, cap.detail(state, d, count), tenant))

    fit = node_fit(state, d, explain=True)
    codes = fit.codes
    assert codes is not None
    n_nodes = topo.n_nodes
    fitting = int((fit.slots > 0).sum())
    per_filter = np.bincount(codes[codes >= 0], minlength=len(NODE_FILTERS))
    failed = Counter({c: int(n) for c, n in enumerate(per_filter) if n})
    if failed:
        summary = ", ".join(f"{n} {NODE_FILTERS[c].code}" for c, n in failed.most_common())
        head = f"{fitting}/{n_nodes} nodes fit a shard: {summary}"
        # Most nodes first, a rule the deployment itself makes after the rest (`standing`).
        for c, n in sorted(failed.most_common(), key=lambda cn: NODE_FILTERS[cn[0]].standing):
            f = NODE_FILTERS[c]
            nodes = np.flatnonzero(codes == c)
            reasons.append(Reason(f.code, f"{head}; {f.detail(state, d, nodes)}",
                                  f.scope(state, nodes)))

    if fitting and room >= count:
        domain = _domain_reasons(state, d, fit)
        for reason in domain:  # one reason per code: a node filter's of the same code is joined to it
            reasons = list(leading(reasons, reason)) if any(r.code == reason.code for r in reasons) \
                else [*reasons, reason]
        if not domain and not state.by_dep.get(d) and dep.min_replicas > 1:
            # A replica fits, yet none is placed: min_replicas binds, first; the node filters'
            # reasons say why no more fit (one reason per code: a CAPACITY one is joined to it).
            reasons = list(leading(reasons, _min_replicas_reason(state, d, fit.slots, room)))
            if cap is not None and room < dep.min_replicas * count:  # the quota binds too: say by how much
                reasons.append(Reason(cap.code, cap.detail(state, d, dep.min_replicas * count), tenant))
    if not reasons:
        reasons.append(Reason("CAPACITY", f"{dep.id} fits no more replicas: {fitting}/{n_nodes}"
                              f" nodes have room, min_replicas {dep.min_replicas} not reachable"))
    return tuple(reasons)


def leading(reasons: Sequence[Reason], first: Reason) -> tuple[Reason, ...]:
    """`first` ahead of `reasons`, keeping one reason per code: a reason of its code among them
    is joined to it (its message after `first`'s, its scope kept)."""
    same = next((r for r in reasons if r.code == first.code), None)
    if same is None:
        return (first, *reasons)
    joined = Reason(first.code, f"{first.message}; {same.message}",
                    same.scope if same.scope is not None else first.scope)
    return (joined, *(r for r in reasons if r is not same))


def _min_replicas_reason(state: ClusterState, d: int, slots: np.ndarray, room: int) -> Reason:
    """Deployment d runs nothing though a replica of it fits: fewer than min_replicas placed
    means none are. The replicas that fit at once are bounded by the quota and by each locality
    domain's room taken alone (domains sharing a power budget or a spread rule may fit fewer):
    an upper bound, named only when it is below min_replicas (else the search did not reach it)."""
    dep = state.deps[d]
    count = dep.shards_per_replica
    need = dep.min_replicas
    fit_at_once = min(room // count, int((gang_capacity(state, d, slots, dep.locality) // count).sum()))
    if fit_at_once < need:
        return Reason("CAPACITY", f"min_replicas {need} not reachable: room for at most {fit_at_once} "
                                  f"replica(s) of {dep.id} now; fewer than min_replicas placed means none are")
    return Reason("CAPACITY", f"min_replicas {need} not reached: a replica of {dep.id} fits now, {need} at once "
                              "were not placed; fewer than min_replicas placed means none are")


def _cut_by(state: ClusterState, d: int, fit: NodeFit, level: str, count: int, cap: np.ndarray) -> list[Reason]:
    """No `level` domain fits the gang of `count` shards (`cap`: the room each has), though
    nodes fit single shards: the per-node rules other than free accelerators without which a
    domain would fit it (CPU, memory or HBM a node has too little of for all its accelerators, a
    rack's or row's power budget feeding fewer shards), one reason each, with the numbers of the
    domain that would fit best without it. Said of no rule, the room is the accelerators'. Each
    rule's room alone is `fit`'s, as the node filters judged them (`node_fit(explain=True)`)."""
    topo = state.topo
    rooms, passes = fit.rooms, fit.passes
    of = topo.domain_of(level)
    power = state.deps[d].shard.shard_power_w
    reasons: list[Reason] = []
    for i, (f, room) in enumerate(rooms):
        if f.code == "CAPACITY":
            continue
        others = np.minimum.reduce([r for j, (_, r) in enumerate(rooms) if j != i]) if len(rooms) > 1 \
            else np.full_like(room, BIG)
        if passes is not None:
            others = np.where(passes, others, 0)
        lifted = (f.level,) if isinstance(f, DomainPower) else ()
        without = gang_capacity(state, d, others, level, unpowered=lifted)
        if not (without >= count).any():
            continue
        target = int(np.argmax(without))
        nodes = np.flatnonzero((of == target) & (room < others))
        if isinstance(f, DomainPower):  # the gang's need against the budget of the domain it would use
            at = f.domains(state)
            cut = np.unique(at.of_node[np.flatnonzero(of == target)])
            lines = [power_line(f.level, at.ids[k], at.used[k], count * power, at.budget[k])
                     for k in cut if at.used[k] + count * power > at.budget[k]]
            if not lines:
                continue
            detail, scope = names(lines[:MAX_NAMED]), at.ids[cut[0]] if len(cut) == 1 else None
        elif len(nodes):
            detail, scope = f.detail(state, d, nodes), f.scope(state, nodes)
        else:
            continue
        where = topo.domain_name(level, target)
        if level == "none":
            needs, shown = f"a replica needs {count} shards", "the cluster"
        else:
            needs = f"a replica needs {count} shards in one {level}"
            shown = f"the only {level}" if _implied(level, where) else f"{level} {where}"
        room_left = int(cap[target])  # the room the rule leaves the domain named (below `count`)
        reasons.append(Reason(f.code, f"{needs}; {f.code} leaves {shown} room for {room_left}: {detail}", scope))
    return reasons


def _implied(level: str, where: str) -> bool:
    """A row or zone the document left out, implied under an internal id: not a name to show.
    Any other id is the document's, "_" first or not (`_n1` was told as "the only node")."""
    return (level, where) in (("row", IMPLIED_ROW), ("zone", IMPLIED_ZONE))


def _domain_reasons(state: ClusterState, d: int, fit: NodeFit) -> list[Reason]:
    """Nodes fit single shards (`fit`, judged with explain), but no locality domain fits the whole
    gang: say why."""
    slots = fit.slots
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
                rack_lines.append((topo.rack_ids[r], power_line(
                    "rack", topo.rack_ids[r], used, need, budget)))
            row = topo.rack_row[r]
            if state.row_power[row] + need > topo.row_budget[row]:
                row_lines.append((topo.row_ids[row], power_line(
                    "row", topo.row_ids[row], state.row_power[row], need,
                    topo.row_budget[row])))
        if level == "row":
            rows = np.bincount(topo.rack_row, weights=racks, minlength=len(topo.row_ids))
            for w in np.flatnonzero(rows >= count):
                if state.row_power[w] + need > topo.row_budget[w]:
                    row_lines.append((topo.row_ids[w], power_line(
                        "row", topo.row_ids[w], state.row_power[w], need, topo.row_budget[w])))
                else:
                    racks_in = np.flatnonzero((topo.rack_row == w) & (racks > 0))
                    tight = [topo.rack_ids[r] for r in racks_in
                             if topo.rack_budget[r] < UNLIMITED / 2]
                    if tight:
                        rack_lines.append((tight[0], f"row {topo.row_ids[w]}: rack power "
                                           f"budgets of {names(tight)} leave room for fewer "
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
        reasons = _cut_by(state, d, fit, level, count, cap)
    if not reasons:
        best = int(cap.max()) if len(cap) else 0
        total = int(gang_capacity(state, d, slots, "none")[0])
        if level == "none" or total < count:  # the cluster's room binds (no locality change would help)
            reasons.append(Reason("CAPACITY", f"a replica needs {count} shards; the cluster has room for "
                                              f"{total} now"))
        if level != "none" and (total >= count or best < total):  # and one domain's, smaller than the cluster
            where = topo.domain_name(level, int(np.argmax(cap))) if len(cap) else "-"
            implied = _implied(level, where)
            shown = f"the only {level} (none declared)" if implied else where
            reasons.append(Reason("LOCALITY", f"locality {level}: a replica needs {count} shards "
                                  f"in one {level}; the best, {shown}, has room for {best}",
                                  None if implied else where))
    return reasons
