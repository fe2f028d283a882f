"""Changes by others, read from the change log, applied to the cached snapshot and its session.

`warm.py` reads what the change log names (`store/changes.py`) and hands it to `ClusterCache`
(`cluster.py`), which keeps the state a change moves (the generation, the repairs, the newest
key, whether the session may hold work short of replicas); these functions write the change
into the snapshot (a snapshot of the cache's own, whose lists and mappings they update in place)
and into the session, or say that the cache cannot follow it (None: the cache is dropped):
- `apply_nodes`: node changes as one `ClusterDelta`;
- `apply_tenants`, `apply_topology`: contract and topology changes as deltas too;
- `depart`: deployments being deleted taken out;
- `apply_deployments`: deployments read again whole in place of what the cache held of them, and
  ones another controller placed before this cache read them added;
- `reread`, `nodes_holding`: which node changes need their deployments read again first.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from controller.store.rollout import stored_key
from controller.store.snapshot import DeploymentRead, NodeRead, ShardKey, Snapshot, Where
from scheduler.model import Rack, Row, Zone
from scheduler.interchange import (deployment_from_dict, node_from_dict, node_shape, placement_from_dict,
                                   tenant_from_dict)
from scheduler.decisions import ClusterDelta, Decision

from controller.scheduling.decider import RemoteSession, release_held

if TYPE_CHECKING:
    from scheduler.session import Session


def apply_nodes(snap: Snapshot, session: Session | RemoteSession, reads: Sequence[NodeRead],
                reread: Collection[str]) -> tuple[bool, Sequence[Decision]] | None:
    """Node changes (the nodes as read now) written into `snap` and sent to `session` as one
    `ClusterDelta` (`ClusterCache.apply_nodes`): whether they could help work short of replicas,
    and what the session re-placed of shards on nodes whose work was evicted; None when the
    cache cannot follow them."""
    known = snap.index.nodes_by_id(snap.problem)
    differ = [read for read in reads if read.doc != known.get(read.id)]
    if not differ:
        return False, ()
    racks = {r["id"] for r in snap.problem["racks"]}
    changed: list[dict[str, Any]] = []
    removed: list[str] = []
    helped = False
    for read in differ:
        old, new = known.get(read.id), read.doc
        held_by = snap.index.placed_on(snap.problem, read.id)
        if held_by and read.id not in reread and (
                new is None or old is None or read.draining or node_shape(old) != node_shape(new)
                or new["state"] == "down" and _replacing_on(snap, held_by)):
            return None  # its shards must be placed again, or replaced: the full path does
        if new is None:
            removed.append(read.id)
            continue
        if new["rack"] not in racks:
            return None
        changed.append(new)
        helped |= new["state"] == "ready"
    if not changed and not removed:
        return False, ()
    nodes = dict(known)  # the index's own mapping is not changed in place
    ordered = all(a < b for a, b in zip(nodes, list(nodes)[1:]))
    added = any(doc["id"] not in nodes for doc in changed)
    nodes.update((doc["id"], doc) for doc in changed)
    for node_id in removed:
        nodes.pop(node_id, None)
    # Listed as `load_snapshot` reads them: by id.
    if ordered and added:
        snap.problem["nodes"] = sorted(nodes.values(), key=lambda n: n["id"])
        nodes = {n["id"]: n for n in snap.problem["nodes"]}  # in the list's order
    else:
        snap.problem["nodes"] = list(nodes.values())
    snap.index.took_nodes(snap.problem["nodes"], nodes)
    snap.index.read(snap.problem)  # here rather than on the event loop
    repaired = session.apply(ClusterDelta(nodes=tuple(map(node_from_dict, changed)),
                                          removed_nodes=tuple(removed)))
    return helped, repaired


def _replacing_on(snap: Snapshot, held_by: Collection[str]) -> bool:
    """Whether one of the solver deployments holding shards on a node is a replica being
    replaced (`solver_view` drops those on an evicted node, or places an older revision's
    again: the full path reads them)."""
    refs = snap.solver_refs
    return any(refs[name].outgoing for name in held_by if name in refs)


def apply_tenants(snap: Snapshot, session: Session | RemoteSession, docs: list[dict[str, Any]]) -> bool | None:
    """Tenants as read now (`snapshot.load_tenants`: all of them, after a contract change) to
    the snapshot and the session (blocking: a worker thread). Placed work stays where it is,
    as a full solve leaves it; what is decided next follows the new contracts. Whether one
    changed (a contract change may help work short of replicas); None when the cache cannot
    follow (a tenant with deployments gone): drop it."""
    if docs == snap.problem["tenants"]:
        return False
    if {d["tenant"] for d in snap.problem["deployments"]} - {t["id"] for t in docs}:
        return None
    before = {t["id"]: t for t in snap.problem["tenants"]}
    changed = tuple(tenant_from_dict(t) for t in docs if before.get(t["id"]) != t)
    snap.problem["tenants"] = list(docs)  # a tenant gone has no work: the session's copy is never used
    if session.apply(ClusterDelta(tenants=changed)):
        return None  # never: no node changed
    return True


def apply_topology(snap: Snapshot, session: Session | RemoteSession, zones: list[dict[str, Any]],
                   rows: list[dict[str, Any]], racks: list[dict[str, Any]]) -> bool | None:
    """Zones, rows and racks as read now (`snapshot.load_topology`, after a topology change)
    to the snapshot and the session (blocking: a worker thread): racks and rows added, moved
    or given other power budgets; placed work stays where it is, as a full solve leaves it.
    Whether something changed (a budget raised may help); None when the cache cannot follow
    (something it holds gone, which applying a topology never does; a snapshot without one)."""
    problem = snap.problem
    before = {key: {item["id"]: item for item in problem[key]} for key in ("zones", "rows", "racks")}
    after = {"zones": zones, "rows": rows, "racks": racks}
    if all(list(before[key].values()) == after[key] for key in after):
        return False
    if any(not before[key] or before[key].keys() - {item["id"] for item in after[key]} for key in after):
        return None
    changed = {key: [item for item in after[key] if before[key].get(item["id"]) != item] for key in after}
    problem.update(after)
    delta = ClusterDelta(
        zones=tuple(Zone(z["id"]) for z in changed["zones"]),
        rows=tuple(Row(r["id"], r["zone"], r.get("power_budget_w")) for r in changed["rows"]),
        racks=tuple(Rack(r["id"], r["row"], r.get("power_budget_w")) for r in changed["racks"]))
    if session.apply(delta):
        return None  # never: no node changed
    return True


def depart(snap: Snapshot, session: Session | RemoteSession, gone: Collection[str]) -> bool:
    """The deployments `gone` (being deleted, by key) taken out of `snap` and released in
    `session`, every solver deployment of theirs (a rollout's or a drain's outgoing replicas are
    one of their own, `TENANT/NAME~REVISION`: left behind, they held their nodes in the session
    after the commit removed them) (`ClusterCache.depart`): whether one held shards."""
    held = any(snap.replica_indices.get(key) for key in gone)
    solver_ids = {solver_id for solver_id, ref in snap.solver_refs.items() if ref.key in gone} | set(gone)
    snap.index.depart(snap.problem, solver_ids)  # their documents and placements, cut from the lists
    for key in gone:
        snap.deployment_ids.pop(key, None)  # type: ignore[attr-defined]
        snap.replica_indices.pop(key, None)  # type: ignore[attr-defined]
    for solver_id in solver_ids:
        snap.solver_refs.pop(solver_id, None)  # type: ignore[attr-defined]
    release_held(session, sorted(solver_ids))  # to the decide process one message, not waited for
    return held


def apply_deployments(
    snap: Snapshot, session: Session | RemoteSession, reads: Sequence[DeploymentRead], repairs: Collection[str],
) -> tuple[frozenset[str], dict[str, DeploymentRead], dict[ShardKey, Where]] | None:
    """Deployments read again whole (`reads`) put in `snap` and `session` in place of what they
    held of them, and those another controller placed before this cache read them added
    (`ClusterCache.apply_deployments`): the keys of those the cache held that changed, the ones
    added (by key), and the snapshot's `released` after; None when the cache cannot follow (one
    of `repairs`, the solver deployments the session re-placed, not committed yet)."""
    wanted: dict[str, DeploymentRead] = {}
    adopted: dict[str, DeploymentRead] = {}
    for read in reads:
        if read.id is not None and read.deployments and read.key not in snap.deployment_ids:
            if read.placements or read.released:  # placed by another controller before this cache read it
                adopted[read.key] = read
            continue  # not read yet (an arrival): the pass reads it
        if read.key not in snap.deployment_ids:
            if read.placements:
                return None
            continue  # gone (its deletion is read as a departure)
        if read.id is None or not read.deployments:
            return None
        wanted[read.key] = read
    held: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {key: ([], []) for key in wanted}
    for d in snap.problem["deployments"]:
        if stored_key(d["id"]) in held:
            held[stored_key(d["id"])][0].append(d)
    for p in snap.problem["placements"]:
        if stored_key(p["deployment"]) in held:
            held[stored_key(p["deployment"])][1].append(p)
    releasing: dict[str, dict[ShardKey, Where]] = {}
    for at, where in snap.released.items():
        releasing.setdefault(at[0], {})[at] = where
    changed = {key: read for key, read in wanted.items()
               if held[key] != (read.deployments, read.placements) or snap.replica_indices.get(key) != read.replica_indices
               or {d["id"]: snap.solver_refs.get(d["id"]) for d in held[key][0]} != read.refs
               or releasing.get(key, {}) != read.released}
    if any(not held[key][0] or any(d["id"] in repairs for d in held[key][0]) for key in changed):
        return None
    released = dict(snap.released)
    if changed:
        _replace(snap, session, changed, {key: [d["id"] for d in held[key][0]] for key in changed})
        released = {at: where for at, where in released.items() if at[0] not in changed}
    if adopted:
        _adopt(snap, session, adopted)
    for read in (*changed.values(), *adopted.values()):
        released.update(read.released)
    return frozenset(changed), adopted, released


def _replace(snap: Snapshot, session: Session | RemoteSession, reads: Mapping[str, DeploymentRead],
             old: Mapping[str, list[str]]) -> None:
    """Put the deployments `reads` (stored keys) in place of their solver deployments `old`:
    in the snapshot, listed where they were (placements follow the deployments' order, as
    read), and in the session."""
    docs: list[dict[str, Any]] = []
    for d in snap.problem["deployments"]:
        key = stored_key(d["id"])
        if key not in reads:
            docs.append(d)
        elif d["id"] == old[key][0]:
            docs += reads[key].deployments
    by_solver: dict[str, list[dict[str, Any]]] = {}
    for p in snap.problem["placements"]:
        if stored_key(p["deployment"]) not in reads:
            by_solver.setdefault(p["deployment"], []).append(p)
    for read in reads.values():
        for p in read.placements:
            by_solver.setdefault(p["deployment"], []).append(p)
    snap.problem["deployments"] = docs
    snap.problem["placements"] = [p for d in docs for p in by_solver.get(d["id"], ())]
    for key, read in reads.items():
        for solver_id in old[key]:
            snap.solver_refs.pop(solver_id, None)  # type: ignore[attr-defined]
            if solver_id not in read.refs and solver_id in session:
                session.release(solver_id)
        snap.solver_refs.update(read.refs)  # type: ignore[attr-defined]
        snap.replica_indices[key] = read.replica_indices  # type: ignore[index]
        for doc in read.deployments:
            session.replace(deployment_from_dict(doc),
                            [placement_from_dict(p) for p in by_solver.get(doc["id"], ())])


def _adopt(snap: Snapshot, session: Session | RemoteSession, reads: Mapping[str, DeploymentRead]) -> None:
    """Deployments another controller placed before this cache read them (`reads`, by key):
    added to the snapshot where `load_snapshot` lists them (by key), and to the session
    where they are placed."""
    for key, read in reads.items():
        snap.deployment_ids[key] = read.id  # type: ignore[index]
        snap.solver_refs.update(read.refs)  # type: ignore[attr-defined]
        snap.replica_indices[key] = read.replica_indices  # type: ignore[index]
    ids = snap.deployment_ids
    docs = snap.problem["deployments"] + [d for read in reads.values() for d in read.deployments]
    docs.sort(key=lambda d: ids[stored_key(d["id"])])  # stable: a rollout's solver deployments keep their order
    by_solver: dict[str, list[dict[str, Any]]] = {}
    for p in (*snap.problem["placements"], *(p for read in reads.values() for p in read.placements)):
        by_solver.setdefault(p["deployment"], []).append(p)
    snap.problem["deployments"] = docs
    snap.problem["placements"] = [p for d in docs for p in by_solver.get(d["id"], ())]
    for read in reads.values():
        for doc in read.deployments:
            session.replace(deployment_from_dict(doc),
                            [placement_from_dict(p) for p in by_solver.get(doc["id"], ())])


def reread(snap: Snapshot, reads: Sequence[NodeRead]) -> dict[str, frozenset[str]]:
    """The nodes among `reads` holding shards whose deployments must be read again whole
    before the nodes are applied (`apply_nodes(reread=)`), with those deployments (no call
    on the session: short Python, on the event loop unless `reads` are many:
    `warm.REREAD_ON_LOOP_MAX_NODES`): drained or no longer drained, holding
    a replica being replaced (the view drops one on an evicted node), removed, or changed other
    than in state (resized: the shards on accelerators it no longer has, or on a node
    removed, were released as it changed; the session repairs what is left of their
    replicas, as `solve()` does)."""
    holding = nodes_holding(snap, {read.id for read in reads})
    nodes = snap.index.nodes_by_id(snap.problem) if holding else {}
    again = {}
    for read in reads:
        if read.id not in holding:
            continue
        old = nodes.get(read.id)
        keys, outgoing = holding[read.id]
        if (read.draining or outgoing or read.doc is None or old is None
                or node_shape(old) != node_shape(read.doc)):
            again[read.id] = keys
    return again


def nodes_holding(snap: Snapshot, nodes: Collection[str]) -> dict[str, tuple[frozenset[str], bool]]:
    """For each of `nodes` holding shards: the stored deployments holding them, and whether
    one of those shards is an outgoing replica's (a drain or a rollout replaces it)."""
    if not nodes:  # (a catch-up with no node change)
        return {}
    refs = snap.solver_refs
    held: dict[str, tuple[frozenset[str], bool]] = {}
    for node in nodes:
        names = snap.index.placed_on(snap.problem, node)
        if names:
            held[node] = (frozenset(map(stored_key, names)),
                          any(name in refs and refs[name].outgoing for name in names))
    return held