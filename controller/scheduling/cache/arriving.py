"""Deployments arriving: the rows stored since the cache last read them, added to the cached
snapshot as `load_snapshot` would list them, and counted against
`count_schedulable_deployments` (a key committed out of order makes the counts differ).

`ClusterCache` (`cluster.py`) keeps the keys read so far (`last_id`, the newest key, the newest
one another controller placed); these functions read and write the snapshot (a snapshot of the
cache's own, whose lists and mappings they update in place).
"""

from __future__ import annotations

from typing import Any

from controller.store.rollout import stored_key
from controller.store.snapshot import Arrivals, Snapshot


def unaccounted(snap: Snapshot, new: Arrivals, schedulable: int) -> int:
    """The `count_schedulable_deployments` read with the rows stored since (`new`) less what
    `snap` and those rows hold (`ClusterCache.unaccounted`)."""
    known = snap.deployment_ids
    return schedulable - len(known) - sum(1 for key in new.deployment_ids if key not in known)


def add(snap: Snapshot, arrivals: Arrivals, read_up_to: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Add deployments stored since the last read (as `load_snapshot` would) to `snap`: their
    documents, and their keys by name. Ones committed out of order (keys up to `read_up_to`:
    the last one read, or one another controller placed) take their place by key; ones `snap`
    holds already are not added again."""
    fresh = {key: i for key, i in arrivals.deployment_ids.items() if key not in snap.deployment_ids}
    docs = [d for d in arrivals.deployments if stored_key(d["id"]) in fresh]
    late = any(key <= read_up_to for key in fresh.values())
    snap.deployment_ids.update(fresh)  # type: ignore[attr-defined]
    snap.solver_refs.update((name, ref) for name, ref in arrivals.solver_refs.items()  # type: ignore[attr-defined]
                            if ref.key in fresh)
    snap.replica_indices.update((key, frozenset()) for key in fresh)  # type: ignore[attr-defined]
    if late:  # a new list, never one sorted in place (`SnapshotIndex`)
        ids = snap.deployment_ids
        snap.problem["deployments"] = sorted((*snap.problem["deployments"], *docs),
                                             key=lambda d: ids[stored_key(d["id"])])
    else:
        snap.problem["deployments"].extend(docs)
    return docs, fresh


def pending_since(snap: Snapshot, known_id: int) -> list[dict[str, Any]] | None:
    """The snapshot's deployments stored after `known_id`, to decide (None: one of them
    has placements already, so it is not an arrival; the full path decides)."""
    docs = [d for d in snap.problem["deployments"]
            if snap.deployment_ids.get(d["id"], 0) > known_id]
    if any(snap.replica_indices.get(d["id"]) for d in docs):
        return None
    return docs
