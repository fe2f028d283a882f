"""Repair: replicas that lost shards on down nodes (or came in incomplete) are made whole.

The lost shards are re-placed beside their surviving siblings, inside the replica's locality
domain; if they do not fit there, the whole gang is placed again from scratch by the mode that
follows (it becomes pending).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.solve import Solver


def repair(solver: Solver) -> None:
    """Shards on down nodes: re-place them beside their replica, else the whole replica."""
    state, topo = solver.state, solver.topo
    for (d, r), shards in sorted(solver.lost.items()):
        dep = state.deps[d]
        survivors = state.replicas.get((d, r), {})
        allowed = None
        if survivors and dep.locality != "none":
            dom = topo.domain_of(dep.locality)
            allowed = dom == dom[next(iter(survivors.values())).node]
        if survivors and solver.placer.place_gang(d, r, sorted(shards), allowed):
            solver.repaired = True
            continue
        state.remove_replica(d, r)  # the gang is broken: place it again as a whole
        solver.existing_replicas.discard((d, r))
