"""Nodes as the operator sees them: list/get with usage, cordon, uncordon, drain, summary.

Cordon and uncordon change what the solver may use, so they bump the cluster generation.
Drain is cordon plus `draining`: the node's replicas become outgoing and are replaced
make-before-break (`store/rollout.py`): the reconciler places a replacement elsewhere, and
stops a replica on the node only once its replacement runs, never below the replicas asked, or
below the replicas its deployment had placed when the drain began if it was short of them (the
drain's event records those counts: `rollout.drain_baseline`).
Uncordon ends a drain (what still runs there stays).

The views are the node as stored, with what only the leader's agent hub knows: `connected` (the
nodes whose agent holds a stream to it) and `heard` (when each was last heard from on one: its
stored last heartbeat is written only every few heartbeat timeouts while the stream lives,
`domain.liveness.CONTACT_WRITE_TIMEOUTS`); a node's last heartbeat is the later of the two.
A follower holds no agent streams (agents go to the leader): it is given `connected` None and a
node is connected as the leader stored it, its health UP (the leader marks a node suspect as
soon as its stream ends, and up on its Hello), so that `maiactl get nodes` and `wait nodes
--connected` through any controller say the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import replace
from datetime import datetime

from controller.errors import NotFound
from controller.identity import Principal
from controller.usecases import policy
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.store.nominations import StoredNomination, nominated_nodes
from controller.store.rollout import DRAIN_EVENT, drain_baseline, stored_key
from controller.store.snapshot import load_snapshot
from controller.domain.changes import ClusterChange
from controller.domain.liveness import later_contact
from controller.domain.values import ClusterSnapshot, ClusterSummary, NodeView
from controller.usecases import paging, tokens
from controller.usecases.tenants import tenant_views
from controller.usecases.paging import Page, PageRequest
from controller.usecases.ports import Signals
from controller.usecases.validation import check_id, check_optional_id


def _view(row: m.Node, usage: repo.ClusterUsage, connected: Set[str] | None,
          heard: Mapping[str, datetime], nominated: Mapping[str, StoredNomination]) -> NodeView:
    """The node as stored, connected or not (`connected` None: as stored, on a follower), its last
    heartbeat the later of the stored one and the hub's (module docstring), and the head-of-line
    nomination keeping it (`nominated`: node -> the stored one)."""
    up = row.health is m.NodeHealth.UP if connected is None else row.id in connected
    view = repo.node_view(row, usage, up)
    last = later_contact(view.last_heartbeat, heard.get(row.id))
    if last != view.last_heartbeat:
        view = replace(view, last_heartbeat=last)
    nom = nominated.get(row.id)
    return view if nom is None else replace(view, nominated_for=stored_key(nom.solver_id),
                                            nominated_at=nom.nominated_at)


async def list_nodes(uow: UnitOfWork, who: Principal, connected: Set[str] | None, heard: Mapping[str, datetime],
                     rack: str = "", page: PageRequest = PageRequest()) -> Page[NodeView]:
    policy.require_admin(who, "listing nodes")  # first: another role is told that, not how its page_token fared
    check_optional_id("rack", rack)
    bounds = paging.bounds(page, paging.scope_of("nodes", rack=rack))
    rows = await repo.list_node_rows(uow.session, rack, bounds)
    page = paging.page_of(rows, bounds, key=lambda n: (n.id,))
    usage = await repo.node_usage(uow.session, [n.id for n in page.items])
    nominated = await nominated_nodes(uow.session)
    return page.map(lambda n: _view(n, usage, connected, heard, nominated))


async def get_node(uow: UnitOfWork, who: Principal, node_id: str, connected: Set[str] | None,
                   heard: Mapping[str, datetime]) -> NodeView:
    check_id("node", node_id)
    policy.require_admin(who, "reading nodes")
    row = await repo.get_node(uow.session, node_id)
    if row is None:
        raise NotFound(f"node {node_id} not found")
    usage = await repo.node_usage(uow.session, [row.id])
    return _view(row, usage, connected, heard, await nominated_nodes(uow.session))


async def _set_cordon(uow: UnitOfWork, who: Principal, node_id: str, cordoned: bool, signals: Signals,
                      connected: Set[str] | None, heard: Mapping[str, datetime], *, drain: bool = False) -> NodeView:
    check_id("node", node_id)
    policy.require_admin(who, "cordoning, uncordoning and draining nodes")
    row = await repo.get_node(uow.session, node_id)
    if row is None:
        raise NotFound(f"node {node_id} not found")
    await repo.will_move_generation(uow.session)
    while True:
        draining = drain or (row.draining and cordoned)
        if (row.cordoned, row.draining) == (cordoned, draining):
            changed = False
            break
        # Both flags, only if they are still as read: a drain and an uncordon that read the node
        # at once each wrote its own flag, and left it uncordoned yet draining (new shards placed
        # on it, its drain never done), a state neither asked for. The later is decided again.
        if changed := await repo.move_node_flags(uow.session, row, cordoned, draining):
            break
        if not await repo.reread_node_flags(uow.session, row):  # deleted meanwhile
            raise NotFound(f"node {node_id} not found")
    if changed:
        await repo.bump_cluster_generation(uow.session, ClusterChange.node(node_id))
        kind = DRAIN_EVENT if drain else ("node.cordoned" if cordoned else "node.uncordoned")
        data = {"placed_replicas": await drain_baseline(uow.session, node_id)} if drain else None
        repo.record_event(uow.session, actor=who.name, kind=kind, object_kind="node", object_id=node_id, data=data)
        await uow.commit()
        signals.wake_reconciler()
    usage = await repo.node_usage(uow.session, [row.id])
    return _view(row, usage, connected, heard, await nominated_nodes(uow.session))


async def cordon_node(uow: UnitOfWork, who: Principal, node_id: str, signals: Signals,
                      connected: Set[str] | None, heard: Mapping[str, datetime]) -> NodeView:
    return await _set_cordon(uow, who, node_id, True, signals, connected, heard)


async def uncordon_node(uow: UnitOfWork, who: Principal, node_id: str, signals: Signals,
                        connected: Set[str] | None, heard: Mapping[str, datetime]) -> NodeView:
    return await _set_cordon(uow, who, node_id, False, signals, connected, heard)


async def drain_node(uow: UnitOfWork, who: Principal, node_id: str, signals: Signals,
                     connected: Set[str] | None, heard: Mapping[str, datetime]) -> NodeView:
    return await _set_cordon(uow, who, node_id, True, signals, connected, heard, drain=True)


async def delete_node(uow: UnitOfWork, who: Principal, node_id: str, signals: Signals) -> None:
    """Forget a node (a bad registration): its shards are released and placed again elsewhere,
    its agent's stream is ended and its node credentials revoked. Its agent, refused its
    credential (UNAUTHENTICATED), brings it back by registering with a node-bootstrap token (a
    credential left active answered PERMISSION_DENIED: a node credential registers its own node
    only while that node exists, so the agent could neither use it nor tell to drop it)."""
    check_id("node", node_id)
    policy.require_admin(who, "deleting nodes")
    # A node not stored is NOT_FOUND without waiting for the lock below (every plan commit holds
    # it): one registered after this read was not there when the call read, as if it came after it.
    if not await repo.existing_ids(uow.session, m.Node, (node_id,)):
        raise NotFound(f"node {node_id} not found")
    # Alone among the writers that move the generation, before any row (PostgreSQL's lock order:
    # store/changes.py): no plan commit lands a shard on the node between the read of its shards
    # and its row's deletion, and none holds its row or isolation_state while this waits. The node
    # is read again under it: it may have been deleted while this waited.
    await repo.moves_generation_alone(uow.session)
    row = await repo.get_node(uow.session, node_id)
    if row is None:
        raise NotFound(f"node {node_id} not found")
    released = await repo.remove_placements_on_node(uow.session, node_id)
    await repo.will_change_nodes_hardware(uow.session)  # isolation_state before the node's row (the same)
    await uow.session.delete(row)
    await repo.bump_cluster_generation(uow.session, ClusterChange.node(node_id))
    repo.record_event(uow.session, actor=who.name, kind="node.deleted", object_kind="node", object_id=node_id,
                      data={"released_shards": bool(released)})
    await tokens.revoke_node_credentials(uow, who, node_id, signals, node_deleted=True)  # commits
    signals.wake_reconciler()


async def registered_sessions(uow: UnitOfWork, node_ids: Iterable[str]) -> dict[str, str | None]:
    """The session of each stored node's current registration (None: it never registered), by
    node id, in one read; a node not stored is left out."""
    return {node_id: row.session_id for node_id, row in (await repo.node_rows_by_id(uow.session, node_ids)).items()}


async def cluster_snapshot(uow: UnitOfWork, who: Principal) -> ClusterSnapshot:
    """The committed state as the solver is handed it, every placement included (admin only:
    it names every tenant's work)."""
    policy.require_admin(who, "reading the cluster snapshot")
    snapshot = await load_snapshot(uow.session)
    return ClusterSnapshot(generation=snapshot.generation, problem=snapshot.problem)


async def cluster_summary(uow: UnitOfWork, who: Principal) -> ClusterSummary:
    """The whole picture for an admin; a tenant token sees the aggregate capacity (nodes,
    accelerators and power in total and in use) and only its own deployments and usage."""
    own = policy.visible_tenant(who, "", "reading the cluster summary")
    s = uow.session
    # Sums by the database (power per rack, milli-units, a tenant's use), not `cluster_usage`'s row
    # per (node, tenant) of the whole cluster (docs/benchmarks.md, `nodeusage`).
    rack_power_w, _ = await repo.rack_power(s)
    states, total = await repo.node_state_counts(s)
    racks = await repo.list_racks(s)
    tenants = [t for t in await repo.list_tenant_rows(s) if not own or t.id == own]
    return ClusterSummary(
        nodes_ready=states.get("ready", 0), nodes_cordoned=states.get("cordoned", 0),
        nodes_down=states.get("down", 0), nodes_suspect=states.get("suspect", 0),
        accelerators_total=float(total), accelerators_used=await repo.placed_milli(s) / 1000.0,
        power_budget_w=sum(k.power_budget_w or 0.0 for k in racks),
        power_used_w=sum(rack_power_w.get(k.id, 0.0) for k in racks),
        deployments_by_phase=await repo.count_deployments_by_phase(s, tenant=own),
        tenants=tuple(await tenant_views(uow, tenants)),
    )
