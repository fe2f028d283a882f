"""The values a warm session (`scheduler.session`) takes and gives: a cluster change and what one
decision changed. Kept apart from the session so that code which only builds or reads them (the
controller, whose sessions live in its decide process) does not import the solver with them
(OR-Tools and pandas: most of a process's start; tests/test_import_weight.py)."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.model import Move, Node, Placement, Preemption, Rack, Row, Tenant, Unplaced, Zone


@dataclass(frozen=True, slots=True)
class Decision:
    """What one decision changed for one deployment.

    `placements`: the shards placed or re-placed by it (new replicas whole; shards repaired
    beside their gang). `moved`: re-placed shards that ran elsewhere before. `released`:
    replica numbers of this deployment that stopped and were not placed again.
    `unplaced`: replicas still missing, with the same reasons `solve()` gives.
    `preempted`: other deployments' replicas evicted to make room."""
    deployment: str
    placements: tuple[Placement, ...] = ()
    unplaced: Unplaced | None = None
    preempted: tuple[Preemption, ...] = ()
    moved: tuple[Move, ...] = ()
    released: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterDelta:
    """Cluster changes applied together: nodes, tenants and domains added or replaced by id,
    nodes removed (their shards are placed again, as for a down node)."""
    nodes: tuple[Node, ...] = ()
    removed_nodes: tuple[str, ...] = ()
    tenants: tuple[Tenant, ...] = ()
    zones: tuple[Zone, ...] = ()
    rows: tuple[Row, ...] = ()
    racks: tuple[Rack, ...] = ()

