"""What a commit leaves the cached snapshot: the cache follows its own commits instead of
reading the cluster again, so that the snapshot again equals what `load_snapshot` would read.

`ClusterCache` (`cluster.py`) keeps the state a commit moves (the generation, the repairs, the
deployments being deleted); these functions write the snapshot (a snapshot of the cache's own,
whose lists and mappings they update in place) and tell the session what was written:
- `write_decisions`: a fast plan written whole, at the cost of its decisions (`committed`);
- `write_shards`: what a commit wrote (`CommitResult.shards`), replicas renumbered as
  `load_snapshot` numbers them (`follow`, and `settled` for a fresh read's);
- `scope_of`: what a full solve of the snapshot changes, all its commit has to speak for;
- `releasing` and `released_written`: the shards the snapshot leaves out, which the next commit
  releases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from controller.store.rollout import stored_key
from controller.store.snapshot import ShardKey, Snapshot, Where
from scheduler import Plan
from scheduler.interchange import deployment_from_dict, placement_from_dict, placement_to_dict
from scheduler.decisions import Decision

from controller.scheduling.decider import RemoteSession, readopt

if TYPE_CHECKING:
    from scheduler.session import Session


def write_decisions(snap: Snapshot, decisions: Sequence[Decision]) -> bool:
    """Append the placements of `decisions` (a fast plan the applier wrote whole) to `snap`, in
    place; False when their stored replica indices would not follow the solver's numbering."""
    placements = snap.problem["placements"]
    for decision in decisions:
        key = decision.deployment
        replicas = sorted({p.replica for p in decision.placements})
        if replicas != list(range(len(replicas))) or snap.replica_indices.get(key):
            return False  # stored indices would not follow the solver's numbering
        ref = snap.solver_refs.get(key)
        if replicas and ref is not None:
            snap.solver_refs[key] = dataclasses.replace(  # type: ignore[index]
                ref, replicas={r: r for r in replicas})
        snap.replica_indices[key] = frozenset(replicas)  # type: ignore[index]
        # Listed by deployment (arrival order: decided ones are the newest), replica, shard, as read.
        placements.extend(placement_to_dict(p) for p in sorted(
            decision.placements, key=lambda p: (p.replica, p.shard)))
    return True


def scope_of(snap: Snapshot, plan: Plan) -> frozenset[str]:
    """The stored deployments a full solve of this snapshot changes or leaves short (its
    placements differ from the snapshot's, it is unplaced, or preempted): all a commit of
    `plan` has to speak for (blocking: O(placements), a worker thread)."""
    before: dict[str, set[tuple[int, int, Where]]] = {}
    for p in snap.problem["placements"]:
        before.setdefault(p["deployment"], set()).add(
            (p["replica"], p["shard"], (p["node"], tuple(p["accelerator_indices"]), p.get("accelerator_milli"))))
    after: dict[str, set[tuple[int, int, Where]]] = {}
    for q in plan.placements:
        after.setdefault(q.deployment, set()).add(
            (q.replica, q.shard, (q.node, tuple(q.accelerator_indices), q.accelerator_milli)))
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    changed.update(u.deployment for u in plan.unplaced)
    changed.update(v.deployment for v in plan.preempted)
    return frozenset(stored_key(name) for name in changed) | snap.deleting | releasing(snap)


def releasing(snap: Snapshot) -> frozenset[str]:
    """The stored deployments with shards the snapshot leaves out (`Snapshot.released`: a
    scale down's replicas beyond the count, an outgoing replica on an evicted node), followed
    from their changes but not released yet: the next commit speaks for them and releases
    them (`commit_plan` releases a scope's `released` shards)."""
    return frozenset(key for key, _, _ in snap.released)


def released_written(snap: Snapshot) -> dict[ShardKey, Where]:
    """After a commit that spoke for `releasing`: their shards are released, so each of those
    deployments uses the replica indices of what the snapshot holds of it, as a fresh read
    lists them; none is left to release (blocking: a worker thread)."""
    keys = releasing(snap)
    if not keys:
        return {}
    used: dict[str, set[int]] = {key: set() for key in keys}
    for ref in snap.solver_refs.values():
        if ref.key in used:
            used[ref.key].update(ref.replicas.values())
    for key, indices in used.items():
        snap.replica_indices[key] = frozenset(indices)  # type: ignore[index]
    return {}


def readopt_as_listed(snap: Snapshot, session: Session | RemoteSession, touched: Collection[str]) -> None:
    """The session holds the deployments `touched` as the snapshot lists them now."""
    docs = {d["id"]: d for d in snap.problem["deployments"]}
    placed: dict[str, list[dict[str, Any]]] = {}
    for p in snap.problem["placements"]:
        if p["deployment"] in touched:
            placed.setdefault(p["deployment"], []).append(p)
    readopt(session, [(deployment_from_dict(docs[key]), [placement_from_dict(p) for p in placed.get(key, ())])
                      for key in touched])


def write_shards(snap: Snapshot, shards: Mapping[ShardKey, Where | None],
                 gone: frozenset[str] = frozenset()) -> set[str] | None:
    """Apply a commit's shards (placed, moved, removed; by stored key) to a snapshot of our own,
    in place, replicas renumbered as `load_snapshot` numbers them: the deployments touched; None
    when it cannot (a deployment it does not hold, unless `gone`: being deleted)."""
    touched: dict[str, dict[tuple[int, int], Where | None]] = {}
    for (key, replica, shard), where in shards.items():
        if key not in gone:
            touched.setdefault(key, {})[(replica, shard)] = where
    if not touched:
        return set()
    docs = {d["id"] for d in snap.problem["deployments"]}
    by_deployment: dict[str, list[dict[str, Any]]] = {}
    for p in snap.problem["placements"]:
        by_deployment.setdefault(p["deployment"], []).append(p)
    outgoing: dict[str, set[int]] = {}  # stored replicas of a rollout's or a drain's outgoing ones
    for ref in snap.solver_refs.values():
        if ref.outgoing and ref.key in touched:
            outgoing.setdefault(ref.key, set()).update(ref.replicas.values())
    for key, changes in touched.items():
        ref = snap.solver_refs.get(key)
        if key not in docs or ref is None or ref.outgoing or any(r in outgoing.get(key, ()) for r, _ in changes):
            return None  # not its current revision's replicas: read afresh
        stored = {(ref.replicas[p["replica"]], p["shard"]): (p["node"], tuple(p["accelerator_indices"]),
                                                              p.get("accelerator_milli"))
                  for p in by_deployment.get(key, ())}
        for at, where in changes.items():
            if where is None:
                stored.pop(at, None)
            else:
                stored[at] = where
        numbering = {index: solver for solver, index in enumerate(sorted({r for r, _ in stored}))}
        by_deployment[key] = [_placement_doc(key, numbering[r], shard, where) for (r, shard), where in sorted(stored.items())]
        snap.solver_refs[key] = dataclasses.replace(  # type: ignore[index]
            ref, replicas={solver: index for index, solver in numbering.items()})
        snap.replica_indices[key] = frozenset(numbering) | outgoing.get(key, set())  # type: ignore[index]
    snap.problem["placements"] = [p for d in snap.problem["deployments"] for p in by_deployment.get(d["id"], ())]
    return set(touched)


def _placement_doc(key: str, replica: int, shard: int, where: Where) -> dict[str, Any]:
    """A placement as `load_snapshot` lists it."""
    node, indices, milli = where
    doc: dict[str, Any] = {"deployment": key, "replica": replica, "shard": shard, "node": node,
                           "accelerator_indices": list(indices)}
    if milli is not None:
        doc["accelerator_milli"] = milli
    return doc
