"""Node liveness over time: suspect → down → evicted, and back up (rules: domain/liveness.py).

The node-lifecycle loop (`controller/nodelifecycle.py`) reads every node's liveness here, asks
the rules what is due, and writes the changes in one transaction: health, `evicted_at`, one
event per node, and a cluster generation bump when what the solver sees changed (a node that
takes new shards again, or one whose work is evicted).

A node that goes down leaves its shards UNKNOWN in the same transaction (those loading or running:
nothing says they run any more), their last word kept in the message, and their
deployments' phases follow (DEGRADED: `domain/phases.py`): `get`, `describe` and `wait` no longer
show a rack that went dark as running until the eviction grace ends. The agent's next report
(its first full heartbeat on a new stream) says what they are again; an eviction moves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from controller.domain.changes import ClusterChange
from controller.domain.liveness import DOWN, NodeLiveness, Transition, later_contact
from controller.domain.values import DeploymentView, deployment_key, split_deployment_key
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import UnitOfWork

# What a node going down leaves UNKNOWN: the shards its agent said it loads or runs. ASSIGNED ones
# (not taken up yet) stay so: not running either, and a STOPPED of one is ignored (`agents._judged`);
# FAILED and STOPPED ones run nothing (a failed one is placed again after its back-off anyway).
_MAY_RUN = (m.ShardPhase.LOADING, m.ShardPhase.RUNNING)


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
    # Copied here, in the event loop's step that the caller read `heard` in: a stream ending during
    # the read puts its node in the hub's `released` as it leaves the connected, so taken at once
    # the node is in one or the other. Looked up after the read instead, a node whose stream ended
    # meanwhile was in neither, judged by its stored contact alone (tens of seconds old while the
    # stream lived) and marked down the moment its agent went.
    live = set(connected)
    heard = heard or {}
    return [NodeLiveness(node_id, zone, health.value, later_contact(last, heard.get(node_id)), evicted, node_id in live)
            for node_id, zone, health, last, evicted
            in await repo.node_liveness_rows(uow.session, silent_before=silent_before, also=recent)]


async def zone_health(uow: UnitOfWork) -> tuple[dict[str, int], dict[str, int]]:
    """Each zone's node count and count of nodes not up (what the eviction rates read)."""
    return await repo.node_health_by_zone(uow.session)


async def apply_transitions(uow: UnitOfWork, changes: list[Transition], now: datetime, *,
                            views: dict[str, DeploymentView] | None = None) -> list[Transition]:
    """Write the changes; the ones written. Each changes what the solver sees, so any written
    moves the cluster generation (the reconciler should run): a node that takes new shards again,
    one that takes none (suspect), one whose work is evicted, and one down but not evicted yet,
    still cordoned to the solver, whose condition its reasons name ("down, its work not evicted
    yet", not "suspect" as it was). A node going down leaves its shards UNKNOWN (module
    docstring); `views`, when given, receives the views of their deployments as committed (what
    watchers are told).

    The changes were judged from a read in an earlier unit of work: a change whose node no longer
    has the health it was judged with (`Transition.was`; an eviction: its work evicted already)
    is left out, event and all. Between the read and this write the agent hub may have marked the
    node suspect itself (its stream ended: a second `node.suspect` event), or the node's agent may
    have said Hello (up again: marking it down would leave a connected node down)."""
    if not changes:
        return []
    held = await repo.count_placements_on_nodes(uow.session, [c.node_id for c in changes if c.evict])
    await repo.will_move_generation(uow.session)  # before the nodes' rows (lock order: store/changes.py)
    # The shards of the nodes going down, and their deployments, before the nodes' rows (the lock order).
    unknown = await _shards_unknown(uow, {c.node_id: c.why for c in changes if c.health == DOWN and not c.evict}, now)
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
            if unknown is not None and change.health == DOWN and (shards := unknown.on(change.node_id)):
                message += f": its {shards} shard(s) unknown until its agent reports, evicted after the eviction grace"
        repo.record_event(uow.session, actor="controller", kind=kind, object_kind="node", object_id=change.node_id,
                          message=message)
    applied = [changes[i] for i in sorted(written)]
    down = {c.node_id for c in applied if c.health == DOWN and not c.evict}
    marked = await unknown.settle(uow, down, now) if unknown is not None else {}
    if applied:
        await repo.bump_cluster_generation(uow.session, ClusterChange.nodes(c.node_id for c in applied))
    await uow.commit()
    if views is not None:
        views.update(marked)
    return applied


class _UnknownShards:
    """The shards of nodes going down, written UNKNOWN and their deployments locked, before the
    nodes' rows (`_shards_unknown`); `settle` puts back those of a node whose change was not
    written (its agent came back since the read) and writes the deployments' phases."""

    def __init__(self, was: list[repo.ShardState], named: list[repo.NamedDeployment]) -> None:
        self._was = was
        self._named = named

    def on(self, node_id: str) -> int:
        """How many of the shards are on `node_id`."""
        return sum(state.node_id == node_id for state in self._was)

    async def settle(self, uow: UnitOfWork, down: set[str], at: datetime) -> dict[str, DeploymentView]:
        """Keep the shards of the nodes `down` (their change written) UNKNOWN, put the others back
        as they were; the views of the deployments whose shards stay UNKNOWN, as written."""
        back = [state for state in self._was if state.node_id not in down]
        kept = {state.key for state in self._was if state.node_id in down}
        named = self._named
        if back:  # rows this transaction wrote and locked already: no lock taken out of order
            await repo.write_reported_shards(uow.session, back, at)
            named = await repo.deployments_named(uow.session, {split_deployment_key(k)[1] for k in kept})
        phases: list[tuple[int, m.DeploymentPhase, m.DeploymentPhase, list[dict[str, Any]]]] = []
        views: dict[str, DeploymentView] = {}
        for dep in named:
            key = deployment_key(dep.row.tenant_id, dep.row.name)
            if key not in kept:
                continue
            phase = repo.implied_phase(dep.row, dep.placements)
            if phase is dep.row.phase:
                views[key] = repo.view_as_written(dep.row, dep.placements)
                continue
            phases.append((dep.row.id, dep.row.phase, phase, list(dep.row.reasons or [])))
            views[key] = repo.view_as_written(dep.row, dep.placements, phase=phase, updated_at=at)
        await repo.write_deployment_phases(uow.session, phases, at)
        return views


async def _shards_unknown(uow: UnitOfWork, why: Mapping[str, str], at: datetime) -> _UnknownShards | None:
    """The shards that may run on the nodes of `why` (node id -> why it goes down) written UNKNOWN,
    each with the agent's last word, and their deployments read and locked (None: no such shard)."""
    was = await repo.shard_states_on_nodes(uow.session, why, _MAY_RUN)
    if not was:
        return None
    await repo.write_reported_shards(uow.session, [
        replace(state, phase=m.ShardPhase.UNKNOWN, message=_last_word(state, why[state.node_id])) for state in was], at)
    named = await repo.deployments_named(uow.session, {split_deployment_key(state.key)[1] for state in was}, lock=True)
    return _UnknownShards(was, named)


def _last_word(state: repo.ShardState, why: str) -> str:
    said = f"{state.phase.value}: {state.message}" if state.message else state.phase.value
    return f"node {state.node_id} is down: {why}; last known {said}"

