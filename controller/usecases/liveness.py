"""Node liveness over time: suspect → down → evicted, and back up (rules: domain/liveness.py).

The node-lifecycle loop (`controller/nodelifecycle.py`) reads every node's liveness here, asks
the rules what is due, and writes the changes in one transaction: health, `evicted_at`, one
event per node, and a cluster generation bump when what the solver sees changed (a node that
takes new shards again, or one whose work is evicted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from controller.domain.changes import ClusterChange
from controller.domain.liveness import NodeLiveness, Transition, later_contact
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import UnitOfWork


async def read_liveness(uow: UnitOfWork, connected: Iterable[str], *, silent_before: datetime | None = None,
                        heard: Mapping[str, datetime] | None = None, recent: Iterable[str] = ()) -> list[NodeLiveness]:
    """Every node's liveness; with `silent_before` (now less how stale a live stream's stored last
    contact may be), only of the nodes a rule could change: suspect; down and not evicted yet, or
    evicted and heard from since (connected again: up); up but silent since (a node up and heard
    from since is due nothing, connected or not; a node down and evicted is due nothing until its
    agent is back, and a connected agent's last contact is written within that time); and the
    `recent` ones whatever they are (the nodes whose stream ended lately: stored as heard from,
    yet silent past the heartbeat timeout sooner). A join's thousands of registered nodes not
    connected yet are down and evicted: not read every second.
    A node's last contact is the later of the stored one and what `heard` says (the leader's own
    observation of the nodes whose stream it held: stored at most every
    `LivenessPolicy.contact_write_every_for` the longest silence timeout told, `silent_before`
    counting that timeout in)."""
    live = set(connected)
    heard = heard or {}
    return [NodeLiveness(node_id, zone, health.value, later_contact(last, heard.get(node_id)), evicted, node_id in live)
            for node_id, zone, health, last, evicted
            in await repo.node_liveness_rows(uow.session, silent_before=silent_before, also=recent)]


async def zone_health(uow: UnitOfWork) -> tuple[dict[str, int], dict[str, int]]:
    """Each zone's node count and count of nodes not up (what the eviction rates read)."""
    return await repo.node_health_by_zone(uow.session)


async def apply_transitions(uow: UnitOfWork, changes: list[Transition], now: datetime) -> list[Transition]:
    """Write the changes; the ones written. Each changes what the solver sees, so any written
    moves the cluster generation (the reconciler should run): a node that takes new shards again,
    one that takes none (suspect), one whose work is evicted, and one down but not evicted yet,
    still cordoned to the solver, whose condition its reasons name ("down, its work not evicted
    yet", not "suspect" as it was).

    The changes were judged from a read in an earlier unit of work: a change whose node no longer
    has the health it was judged with (`Transition.was`; an eviction: its work evicted already)
    is left out, event and all. Between the read and this write the agent hub may have marked the
    node suspect itself (its stream ended: a second `node.suspect` event), or the node's agent may
    have said Hello (up again: marking it down would leave a connected node down)."""
    if not changes:
        return []
    held = await repo.count_placements_on_nodes(uow.session, [c.node_id for c in changes if c.evict])
    await repo.will_move_generation(uow.session)  # before the nodes' rows (lock order: store/changes.py)
    written: set[int] = set()  # indices into `changes`
    # The nodes' rows in ascending id, as a plan commit and a report flush lock them (the lock order:
    # store/changes.py); `changes` come in the read's order, then evictions longest silent first.
    for i in sorted(range(len(changes)), key=lambda i: changes[i].node_id):
        change = changes[i]
        health = m.NodeHealth(change.health)
        was = m.NodeHealth(change.was) if change.was is not None else None
        if not await repo.set_node_health(uow.session, change.node_id, health,
                                          evicted_at=now if change.evict else None, was=was):
            continue
        written.add(i)
        if change.evict:
            kind = "node.evicted"
            message = f"{change.why}: its {held.get(change.node_id, 0)} shard(s) are placed again elsewhere"
        else:
            kind = f"node.{change.health}"
            message = change.why
        repo.record_event(uow.session, actor="controller", kind=kind, object_kind="node", object_id=change.node_id,
                          message=message)
    applied = [changes[i] for i in sorted(written)]
    if applied:
        await repo.bump_cluster_generation(uow.session, ClusterChange.nodes(c.node_id for c in applied))
    await uow.commit()
    return applied

