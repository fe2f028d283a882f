"""Database → placement problem: the immutable input of one reconcile pass.

The solver never sees the ORM: each pass reads the cluster once into an interchange-format
problem document (version 1, see shared/placement/README.md) and remembers the cluster
generation it read. `plans.commit_plan` later applies the solver's answer as its changes to
this snapshot, re-checking each replica it places against the committed state (the plan applier).

It runs every pass on clusters of thousands of nodes, so it reads one query per table, plain
columns rather than ORM objects, and builds the document in one sweep.

The read runs on the event loop that awaits it, the build in a worker thread (`load_snapshot`:
`read_snapshot_rows`, then `build_snapshot` from the rows alone). Its callers' loops serve
other work meanwhile: the API server's (a dry run, `maiactl snapshot`: every RPC and agent
heartbeat), the reconciler's (a full pass). At 4,096 nodes and 10,000 deployments the whole
was ~0.55-0.7 s of the loop's CPU in one sweep; now the loop spends ~0.1-0.2 s on the read (its
three large reads Core statements of the tables' columns: ~85 ms against ~135 with the ORM's
result processing) while the thread builds, handing the interpreter back every switch interval.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.engine import Row as SqlRow
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler import Deployment as SolverDeployment
from scheduler import ShardSpec, Spread, deployment_to_dict

from controller import limits
from controller.domain.values import deployment_key, split_deployment_key
from controller.store.changes import schedulable_count
from controller.store.inlist import any_of
from controller.store.nominations import StoredNomination, in_force, problem_nominations, read_nominations
from controller.store.repositories.nodes import stored_faults
from controller.store.rollout import DEFAULT_SURGE, PlanKeys, SolverRef, StoredReplica, outgoing_id, solver_view
from controller.store.snapshot_index import SnapshotIndex
from controller.store.models import (
    ClusterState,
    Deployment,
    DeploymentPhase,
    Node,
    NodeHealth,
    Placement,
    Rack,
    ShardPhase,
    Row,
    Tenant,
    Zone,
)

PROBLEM_VERSION = 1
# Keeps `IN (...)` lists well under every backend's bound-parameter limit.
_CHUNK = 500

# (deployment key TENANT/NAME, replica, shard): how a placed shard is named in the interchange format.
ShardKey = tuple[str, int, int]
# Where one shard runs: node, accelerator indices, milli per accelerator (None: whole).
Where = tuple[str, tuple[int, ...], int | None]


@dataclass(frozen=True)
class Snapshot:
    """The problem as read at cluster `generation`, plus what is needed to map a plan back.

    `problem` is a fresh dict owned by the caller: set `problem["options"]` before solving.
    """

    generation: int
    problem: dict[str, Any]
    # Deployment key (`TENANT/NAME`, the interchange id) → its primary key, for every deployment in `problem`.
    deployment_ids: Mapping[str, int] = field(default_factory=dict)
    # Solver deployment id → stored deployment, revision and replica numbering (store/rollout.py);
    # a deployment without a ref is its own, numbered as stored.
    solver_refs: Mapping[str, SolverRef] = field(default_factory=dict)
    # Stored deployment key → every replica index its shards use (new replicas take others).
    replica_indices: Mapping[str, frozenset[int]] = field(default_factory=dict)
    # Stored shards of live deployments left out of `problem` (on a node beyond today's limits,
    # or an outgoing replica dropped by the rollout view): the commit releases them.
    released: Mapping[ShardKey, Where] = field(default_factory=dict)
    # Deployments (keys) being deleted when it was read: the commit removes their rows (one deleted
    # later is removed by the next pass, which publishes its deletion).
    deleting: frozenset[str] = frozenset()
    # Lookups into `problem` (by node, rack, row, stored deployment) kept across the copies a
    # cache makes of it (`dataclasses.replace`); one whose lists are replaced is read again.
    index: SnapshotIndex = field(default_factory=SnapshotIndex, compare=False, repr=False)

    def plan_keys(self) -> PlanKeys:
        """Maps a plan solved from this snapshot back to stored shard keys."""
        return PlanKeys(self.solver_refs, self.replica_indices)

    @property
    def placements_by_shard(self) -> dict[ShardKey, dict[str, Any]]:
        """The snapshot's placements keyed by (deployment, replica, shard)."""
        return {(p["deployment"], p["replica"], p["shard"]): p for p in self.problem.get("placements", ())}


def _evicted(health: NodeHealth, evicted_at: datetime | None) -> bool:
    """Whether a node is down with its work evicted (`node_state` "down")."""
    return health is NodeHealth.DOWN and evicted_at is not None


def node_state(health: NodeHealth, cordoned: bool, evicted: bool) -> str:
    """The interchange node state the solver sees: `down` (its shards are placed again) only once
    a down node's work is evicted; a suspect or down node not evicted yet keeps its shards and
    takes no new ones, like a cordoned one (controller/domain/liveness.py)."""
    if health is NodeHealth.DOWN and evicted:
        return "down"
    return "cordoned" if cordoned or health is not NodeHealth.UP else "ready"


def node_condition(health: NodeHealth, evicted: bool) -> str | None:
    """Why a node the solver sees `cordoned` (or `down`) is so, when its state does not say it:
    the reasons name it ("not ready: n2 (suspect)"), an interchange extension
    (scheduler/interchange.py). None for an up node (ready, or cordoned by an operator)."""
    if health is NodeHealth.SUSPECT:
        return "suspect"
    if health is NodeHealth.DOWN and not evicted:  # an evicted one is `down`, as it says
        return "down, its work not evicted yet"
    return None


def _put(doc: dict[str, Any], key: str, value: Any) -> None:
    # Optional fields are left out rather than null: absent means "not limited" / "anywhere".
    if value is not None:
        doc[key] = value


_NODE_COLUMNS = (
    Node.id, Node.rack_id, Node.health, Node.cordoned, Node.accelerators, Node.accelerator_model, Node.hbm_gib,
    Node.cpu_milli, Node.memory_mib, Node.idle_power_w, Node.labels, Node.draining, Node.evicted_at,
    Node.failed_accelerators,
)
_TENANT_COLUMNS = (
    Tenant.id, Tenant.isolation, Tenant.excludes, Tenant.zones, Tenant.reserved_accelerators,
    Tenant.max_accelerators, Tenant.max_power_w,
)
_DEPLOYMENT_COLUMNS = (
    Deployment.id, Deployment.name, Deployment.tenant_id, Deployment.replicas, Deployment.min_replicas,
    Deployment.shards_per_replica, Deployment.shard_accelerators, Deployment.shard_accelerator_milli,
    Deployment.shard_hbm_gib, Deployment.shard_cpu_milli, Deployment.shard_memory_mib,
    Deployment.shard_power_w, Deployment.shard_accelerator_models, Deployment.locality,
    Deployment.spread_domain, Deployment.spread_max_per_domain, Deployment.priority,
    Deployment.preemptible, Deployment.template_revision, Deployment.revision_specs, Deployment.phase,
)
# An arrival's, and whether it is as inserted (`Arrivals.as_inserted`).
_ARRIVAL_COLUMNS = (*_DEPLOYMENT_COLUMNS, Deployment.resource_version, Deployment.created_at)


def _node_doc(n: Any) -> dict[str, Any] | None:
    """A node row (`_NODE_COLUMNS`) as the interchange format's node; None for a node beyond
    today's limits (registered before them: the solver would build arrays its size), which is
    left out, its shards placed again elsewhere, until it registers within them or is deleted."""
    if not 0 <= n.accelerators <= limits.NODE_ACCELERATORS_MAX:
        return None
    node: dict[str, Any] = {
        "id": n.id,
        "rack": n.rack_id,
        "state": node_state(n.health, n.cordoned, n.evicted_at is not None),
        "accelerators": n.accelerators,
    }
    _put(node, "accelerator_model", n.accelerator_model or None)
    _put(node, "hbm_gib", n.hbm_gib)
    _put(node, "cpu_milli", n.cpu_milli)
    _put(node, "memory_mib", n.memory_mib)
    node["idle_power_w"] = n.idle_power_w
    if n.labels:
        node["labels"] = dict(n.labels)
    _put(node, "condition", node_condition(n.health, n.evicted_at is not None))
    failed = sorted(f.index for f in stored_faults(n.failed_accelerators, n.accelerators))  # usecases/faults.py
    if failed:
        node["unhealthy_accelerators"] = failed
    # The shards an agent lists in one assignment set or heartbeat: the solver places no more.
    node["max_shards"] = limits.SHARDS_PER_NODE_MAX
    return node


def _tenant_doc(t: Any) -> dict[str, Any]:
    """A tenant row (`_TENANT_COLUMNS`) as the interchange format's tenant."""
    tenant: dict[str, Any] = {"id": t.id, "isolation": t.isolation.value}
    if t.excludes:
        tenant["excludes"] = list(t.excludes)
    if t.zones:  # stored [] means "no restriction"; an empty list would mean "nowhere"
        tenant["zones"] = list(t.zones)
    _put(tenant, "reserved_accelerators", t.reserved_accelerators)
    _put(tenant, "max_accelerators", t.max_accelerators)
    _put(tenant, "max_power_w", t.max_power_w)
    return tenant


def _deployment_doc(d: Any) -> dict[str, Any]:
    """A deployment row (`_DEPLOYMENT_COLUMNS`) as the interchange format's deployment, its
    current template, id `TENANT/NAME`."""
    spread = (Spread(d.spread_domain.value, d.spread_max_per_domain)
              if d.spread_domain is not None and d.spread_max_per_domain is not None else None)
    return deployment_to_dict(SolverDeployment(
        deployment_key(d.tenant_id, d.name), d.tenant_id, d.replicas, d.shards_per_replica,
        ShardSpec(d.shard_accelerators, d.shard_accelerator_milli, d.shard_hbm_gib,
                  d.shard_cpu_milli, d.shard_memory_mib, d.shard_power_w,
                  tuple(d.shard_accelerator_models) or None),  # [] means any model
        min_replicas=d.min_replicas, locality=d.locality.value, spread=spread,
        priority=d.priority, preemptible=d.preemptible))


async def _topology(session: AsyncSession, within_rows: Collection[str] | None = None,
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[Any]]:
    """Zones, rows and racks as interchange documents, and the node rows (`_NODE_COLUMNS`), in id
    order; only the rows `within_rows` (their racks and nodes) when given."""
    zones, rows, racks = await load_topology(session, within_rows)
    node_query = select(*_NODE_COLUMNS).order_by(Node.id)
    if within_rows is not None:
        node_query = (node_query.join(Rack, Node.rack_id == Rack.id)
                      .where(any_of(session, Rack.row_id, sorted(within_rows))))
    return zones, rows, racks, list(await session.execute(node_query))


async def load_topology(session: AsyncSession, within_rows: Collection[str] | None = None,
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Zones, rows and racks as `load_snapshot` lists them (only the rows `within_rows` and
    their racks when given)."""
    return _topology_docs(*await _topology_rows(session, within_rows))


async def _topology_rows(session: AsyncSession, within_rows: Collection[str] | None = None,
                         ) -> tuple[list[str], Sequence[SqlRow[Any]], Sequence[SqlRow[Any]]]:
    """Zone ids, (row, zone, power budget) and (rack, row, power budget) rows, in id order (only
    the rows `within_rows` and their racks when given): `_topology_docs` makes the documents."""
    zones = list((await session.execute(select(Zone.id).order_by(Zone.id))).scalars())
    row_query = select(Row.id, Row.zone_id, Row.power_budget_w).order_by(Row.id)
    rack_query = select(Rack.id, Rack.row_id, Rack.power_budget_w).order_by(Rack.id)
    if within_rows is not None:
        row_query = row_query.where(any_of(session, Row.id, sorted(within_rows)))
        rack_query = rack_query.where(any_of(session, Rack.row_id, sorted(within_rows)))
    return zones, (await session.execute(row_query)).all(), (await session.execute(rack_query)).all()


def _topology_docs(zone_ids: Iterable[str], row_rows: Iterable[Any], rack_rows: Iterable[Any],
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Zones, rows and racks (`_topology_rows`) as interchange documents."""
    zones = [{"id": zid} for zid in zone_ids]

    rows = []
    for rid, zone_id, budget in row_rows:
        row: dict[str, Any] = {"id": rid, "zone": zone_id}
        _put(row, "power_budget_w", budget)
        rows.append(row)

    racks = []
    for kid, row_id, budget in rack_rows:
        rack: dict[str, Any] = {"id": kid, "row": row_id}
        _put(rack, "power_budget_w", budget)
        racks.append(rack)
    return zones, rows, racks


async def load_spec_doc(session: AsyncSession, *, within_rows: Collection[str] | None = None,
                        deployment_ids: Collection[int] | None = None) -> dict[str, Any]:
    """The committed problem the plan applier re-checks a plan against (`plans.commit_plan`),
    without placements: every live deployment once per template revision its shards may run,
    named `outgoing_id(TENANT/NAME, revision)` (the spec a shard was placed with). Only the nodes
    of the rows `within_rows` and the deployments `deployment_ids` when given: a re-check of a
    few replicas reads what lies around them, not the cluster."""
    zones, rows, racks, node_rows = await _topology(session, within_rows)
    tenants = await load_tenants(session)
    query = select(*_DEPLOYMENT_COLUMNS).where(
        Deployment.phase.not_in((DeploymentPhase.DELETING, DeploymentPhase.QUARANTINED))).order_by(Deployment.id)
    if deployment_ids is None:
        found = list(await session.execute(query))
    else:
        ids = sorted(deployment_ids)
        found = [d for start in range(0, len(ids), _CHUNK)
                 for d in await session.execute(query.where(any_of(session, Deployment.id, ids[start:start + _CHUNK])))]
    specs = []
    for d in found:
        current = _deployment_doc(d)
        specs.append(dict(current, id=outgoing_id(current["id"], d.template_revision)))
        specs += [dict(copy.deepcopy(spec), id=outgoing_id(current["id"], int(revision)))
                  for revision, spec in sorted((d.revision_specs or {}).items()) if int(revision) != d.template_revision]
    return {"version": PROBLEM_VERSION, "zones": zones, "rows": rows, "racks": racks,
            "nodes": [doc for doc in map(_node_doc, node_rows) if doc is not None], "tenants": tenants,
            "deployments": specs, "placements": []}


@dataclass(frozen=True)
class NodeRead:
    """One node as `load_snapshot` would list it now (for a cache that follows node changes)."""

    id: str
    doc: dict[str, Any] | None  # the interchange node; None: no such row, or beyond today's limits
    exists: bool
    evicted: bool   # down and its work evicted: `solver_view` drops (or places again) outgoing replicas on it
    draining: bool  # its replicas are being replaced (`solver_view`)


async def load_nodes(session: AsyncSession, ids: Collection[str]) -> list[NodeRead]:
    """The nodes `ids` as they are now, in id order (one query per 500)."""
    found: dict[str, Any] = {}
    wanted = sorted(set(ids))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        for n in await session.execute(select(*_NODE_COLUMNS).where(any_of(session, Node.id, chunk))):
            found[n.id] = n
    reads = []
    for node_id in wanted:
        n = found.get(node_id)
        reads.append(NodeRead(node_id, None, False, False, False) if n is None else
                     NodeRead(node_id, _node_doc(n), True, _evicted(n.health, n.evicted_at), bool(n.draining)))
    return reads


async def stored_keys(session: AsyncSession, keys: Collection[str]) -> set[str]:
    """Which of the deployments `keys` (TENANT/NAME) have a row, whatever their phase (one query
    per 500: a cache learns that another controller's commit removed ones being deleted)."""
    wanted = set(keys)
    names = sorted({split_deployment_key(key)[1] for key in wanted})
    found: set[str] = set()
    for start in range(0, len(names), _CHUNK):
        for tenant, name in await session.execute(select(Deployment.tenant_id, Deployment.name).where(
                any_of(session, Deployment.name, names[start:start + _CHUNK]))):
            found.add(deployment_key(tenant, name))
    return found & wanted


async def load_tenants(session: AsyncSession) -> list[dict[str, Any]]:
    """Every tenant as `load_snapshot` lists them (for a cache that follows contract changes)."""
    return [_tenant_doc(t) for t in await _tenant_rows(session)]


async def _tenant_rows(session: AsyncSession) -> Sequence[SqlRow[Any]]:
    """Every tenant's row (`_TENANT_COLUMNS`), in id order."""
    return (await session.execute(select(*_TENANT_COLUMNS).order_by(Tenant.id))).all()


@dataclass(frozen=True)
class DeploymentRead:
    """One stored deployment as `load_snapshot` would list it now, for a cache that follows
    deployments changed outside its own commits (updated, rolled, drained, failed replicas
    released, replaced replicas retired)."""

    key: str  # TENANT/NAME
    id: int | None  # its primary key; None: no schedulable row (deleted, being deleted, quarantined)
    deployments: list[dict[str, Any]] = field(default_factory=list)  # its solver deployments (store/rollout.py)
    placements: list[dict[str, Any]] = field(default_factory=list)
    refs: dict[str, SolverRef] = field(default_factory=dict)
    replica_indices: frozenset[int] = frozenset()
    released: dict[ShardKey, Where] = field(default_factory=dict)  # shards the view leaves out


def _stored_replicas(key: str, rows: Iterable[Any]) -> dict[int, StoredReplica]:
    """Placement rows of one deployment (key TENANT/NAME; in replica, shard order) as its stored replicas."""
    shards: dict[int, tuple[int, list[dict[str, Any]], set[str]]] = {}
    stopped: set[int] = set()  # replicas with a shard that does not run
    for p in rows:
        placement: dict[str, Any] = {"deployment": key, "replica": p.replica, "shard": p.shard, "node": p.node_id,
                                     "accelerator_indices": list(p.accelerator_indices)}
        _put(placement, "accelerator_milli", p.accelerator_milli)
        _, placed, on_nodes = shards.setdefault(p.replica, (p.revision, [], set()))
        placed.append(placement)
        on_nodes.add(p.node_id)
        if not p.running:
            stopped.add(p.replica)
    return {index: StoredReplica(index, revision, tuple(placed), frozenset(on_nodes), index not in stopped)
            for index, (revision, placed, on_nodes) in shards.items()}


def _view(doc: dict[str, Any], template_revision: int, revision_specs: Mapping[str, Any],
          replicas: Mapping[int, StoredReplica], *, evicted: set[str], draining: set[str], surge: int,
          ) -> tuple[Any, dict[ShardKey, Where]]:
    """A stored deployment as the solver sees it (`solver_view`), and the shards the view leaves
    out (an outgoing replica on an evicted node not placed again, replicas beyond the asked count): the
    commit releases them."""
    view = solver_view(doc, template_revision, revision_specs, replicas.values(), evicted=evicted,
                       draining=draining, surge=surge)
    viewed = {index for ref in view.refs.values() for index in ref.replicas.values()}
    released = {(doc["id"], index, p["shard"]): (p["node"], tuple(p["accelerator_indices"]), p.get("accelerator_milli"))
                for index, rep in replicas.items() if index not in viewed for p in rep.placements}
    return view, released


async def load_deployments(session: AsyncSession, keys: Collection[str], *,
                           surge: int = DEFAULT_SURGE) -> list[DeploymentRead]:
    """The deployments `keys` (TENANT/NAME) as `load_snapshot` would list them now, in key
    order (three queries per 500)."""
    wanted = set(keys)
    names = sorted({split_deployment_key(key)[1] for key in wanted})
    found: dict[int, Any] = {}
    for start in range(0, len(names), _CHUNK):
        for d in await session.execute(select(*_DEPLOYMENT_COLUMNS).where(
                any_of(session, Deployment.name, names[start:start + _CHUNK]),
                Deployment.phase.not_in((DeploymentPhase.DELETING, DeploymentPhase.QUARANTINED)))):
            if deployment_key(d.tenant_id, d.name) in wanted:
                found[d.id] = d
    rows: dict[int, list[Any]] = {dep_id: [] for dep_id in found}
    nodes: set[str] = set()
    ids = sorted(found)
    for start in range(0, len(ids), _CHUNK):
        for p in await session.execute(
                select(Placement.deployment_id, Placement.replica, Placement.shard, Placement.node_id,
                       Placement.accelerator_indices, Placement.accelerator_milli, Placement.revision, _RUNNING)
                .where(any_of(session, Placement.deployment_id, ids[start:start + _CHUNK]))
                .order_by(Placement.deployment_id, Placement.replica, Placement.shard)):
            rows[p.deployment_id].append(p)
            nodes.add(p.node_id)
    evicted: set[str] = set()
    draining: set[str] = set()
    oversized: set[str] = set()
    wanted_nodes = sorted(nodes)
    for start in range(0, len(wanted_nodes), _CHUNK):
        for n in await session.execute(select(Node.id, Node.health, Node.evicted_at, Node.draining, Node.accelerators)
                                       .where(any_of(session, Node.id, wanted_nodes[start:start + _CHUNK]))):
            if _evicted(n.health, n.evicted_at):
                evicted.add(n.id)
            if n.draining:
                draining.add(n.id)
            if not 0 <= n.accelerators <= limits.NODE_ACCELERATORS_MAX:
                oversized.add(n.id)
    reads = {key: DeploymentRead(key, None) for key in wanted}
    for dep_id, d in found.items():
        doc = _deployment_doc(d)
        key = doc["id"]
        on_oversized = {(key, p.replica, p.shard): (p.node_id, tuple(p.accelerator_indices), p.accelerator_milli)
                        for p in rows[dep_id] if p.node_id in oversized}
        replicas = _stored_replicas(key, (p for p in rows[dep_id] if p.node_id not in oversized))
        view, released = _view(doc, d.template_revision, d.revision_specs or {}, replicas,
                               evicted=evicted, draining=draining, surge=surge)
        reads[key] = DeploymentRead(key, dep_id, view.deployments, view.placements, view.refs,
                                    frozenset(replicas), {**on_oversized, **released})
    return [reads[key] for key in sorted(wanted)]


# Which row a deployment's submit inserted: its primary key and when, in naive UTC (one primary
# key may be given again once its row is gone, on SQLite). A tuple: one is built for each arrival.
InsertedRow = tuple[int, datetime]


def inserted_row(id_: int, created_at: datetime) -> InsertedRow:
    """`InsertedRow` of a row as read (SQLite hands back naive UTC, PostgreSQL aware) or as written."""
    return id_, created_at if created_at.tzinfo is None else created_at.astimezone(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class Arrivals:
    """Deployments stored after a known one, exactly as `load_snapshot` would add them to its
    problem (they have no placements yet): for a pass that keeps its snapshot and reads only
    what was submitted since (controller/scheduling/cache/arriving.py)."""

    deployments: list[dict[str, Any]]  # interchange documents, in arrival order
    deployment_ids: dict[str, int]
    solver_refs: dict[str, SolverRef]
    last_id: int  # the highest primary key read (the `after_id` given when none was)
    # The schedulable deployments counted by the statement that read these (None: no row came
    # back, or read by key): consistent with them whatever lands meanwhile.
    schedulable: int | None = None
    # Of those read at their first resource version (their spec as the submit that inserted them
    # wrote it: every update bumps the version): key -> the row (`InsertedRow`).
    as_inserted: dict[str, InsertedRow] = field(default_factory=dict)



@functools.cache
def _arrivals_after() -> Select[Any]:
    """The schedulable deployments above the key `after_id` (a bound parameter), and the count of
    all of them (`load_arrivals`), built once: a pass reads it, most passes. Counted in the same
    statement: a count read apart from the rows differs from them whenever a submit or a
    deletion lands in between, which sent the caller looking for keys it missed
    (`schedulable_keys`, every key) though none was."""
    table = Deployment.__table__  # Core: an ORM-enabled statement costs more per execution for the same rows
    return (select(*(table.c[column.key] for column in _ARRIVAL_COLUMNS),
                   schedulable_count().correlate(None).scalar_subquery().label("schedulable"))
            .where(table.c.phase != DeploymentPhase.QUARANTINED, table.c.id > bindparam("after_id"))
            .order_by(table.c.id))


async def load_arrivals(session: AsyncSession, *, after_id: int, surge: int = DEFAULT_SURGE,
                        only: Collection[int] | None = None) -> Arrivals:
    """The schedulable deployments whose primary key is above `after_id` (one query), or those
    of `only` (primary keys, whatever `after_id`: arrivals committed out of order).

    Primary keys are not committed in order under concurrency: the caller compares its count
    with `count_schedulable_deployments` and looks for the ones it missed (`schedulable_keys`)."""
    docs: list[dict[str, Any]] = []
    ids: dict[str, int] = {}
    refs: dict[str, SolverRef] = {}
    last_id = after_id
    schedulable: int | None = None
    as_inserted: dict[str, InsertedRow] = {}
    if only is None:
        rows = await session.execute(_arrivals_after(), {"after_id": after_id})
    else:
        query = select(*_ARRIVAL_COLUMNS).where(Deployment.phase != DeploymentPhase.QUARANTINED,
                                                any_of(session, Deployment.id, sorted(only)))
        rows = await session.execute(query.order_by(Deployment.id))
    for d in rows:
        last_id = max(last_id, d.id)
        if only is None:
            schedulable = d.schedulable
        if d.phase is DeploymentPhase.DELETING:
            continue
        view = solver_view(_deployment_doc(d), d.template_revision, d.revision_specs or {}, (),
                           evicted=set(), draining=set(), surge=surge)
        docs += view.deployments
        refs.update(view.refs)
        key = deployment_key(d.tenant_id, d.name)
        ids[key] = d.id
        if d.resource_version == 1:
            as_inserted[key] = inserted_row(d.id, d.created_at)
    return Arrivals(docs, ids, refs, last_id, schedulable, as_inserted)


async def schedulable_keys(session: AsyncSession, *, up_to_id: int) -> dict[str, int]:
    """Every schedulable deployment (neither being deleted nor quarantined) with a primary key
    up to `up_to_id`: key -> primary key (one narrow query, for the rare count mismatch)."""
    rows = await session.execute(select(Deployment.id, Deployment.tenant_id, Deployment.name).where(
        Deployment.phase.not_in((DeploymentPhase.DELETING, DeploymentPhase.QUARANTINED)), Deployment.id <= up_to_id))
    return {deployment_key(tenant, name): dep_id for dep_id, tenant, name in rows}


# A placement row as the snapshot reads it.
_PLACEMENT_COLUMNS = (
    Placement.deployment_id, Placement.replica, Placement.shard, Placement.node_id,
    Placement.accelerator_indices, Placement.accelerator_milli, Placement.revision,
)
# Whether a placement's shard runs, by the database (a boolean, not the phase's enum to convert
# in Python for every row): which replicas a smaller count keeps (`StoredReplica.running`).
_RUNNING = (Placement.__table__.c.phase == ShardPhase.RUNNING).label("running")


@dataclass(frozen=True)
class SnapshotRows:
    """What one snapshot is made of, as read (`read_snapshot_rows`): plain rows, fetched whole,
    so that `build_snapshot` makes the snapshot from them in a worker thread, session aside."""

    generation: int
    zones: list[str]  # zone ids, in id order
    datacenter_rows: Sequence[SqlRow[Any]]  # (row, zone, power budget), in id order
    racks: Sequence[SqlRow[Any]]  # (rack, row, power budget), in id order
    nodes: Sequence[SqlRow[Any]]  # `_NODE_COLUMNS`, in id order
    tenants: Sequence[SqlRow[Any]]  # `_TENANT_COLUMNS`, in id order
    # `_DEPLOYMENT_COLUMNS` of the deployments not quarantined, in arrival order (primary key).
    deployments: Sequence[SqlRow[Any]]
    placements: Sequence[SqlRow[Any]]  # `_PLACEMENT_COLUMNS` of every placement, by deployment, replica, shard
    # The head-of-line nominations the leader stored (store/nominations.py), oldest first.
    nominations: Sequence[StoredNomination] = ()


async def load_snapshot(session: AsyncSession, *, surge: int = DEFAULT_SURGE) -> Snapshot:
    """Read the whole placement-relevant state in one pass (9 queries, whatever the size);
    `surge`: replicas beyond the asked count a rollout or drain may place (store/rollout.py).

    Deployments being deleted are left out, with their placements (`deleting` names them): the
    plan no longer holds them, so `commit_plan` removes their shards and rows. Placements on down nodes are kept: the solver
    places those shards again itself.

    The rows are read here and the snapshot made from them in a worker thread (`build_snapshot`):
    the event loop keeps turning meanwhile (module docstring).
    """
    return await asyncio.to_thread(build_snapshot, await read_snapshot_rows(session), surge=surge)


def _core(columns: Iterable[Any]) -> Select[Any]:
    """A Core statement of the tables' own columns for these ORM attributes (no ORM result
    processing: the rows are the same, for less of the event loop's CPU)."""
    return select(*(column.class_.__table__.c[column.key] for column in columns))


# The snapshot's three large reads, built once (Core: module docstring).
_SNAPSHOT_NODES = _core(_NODE_COLUMNS).order_by(Node.__table__.c.id)
_SNAPSHOT_DEPLOYMENTS = (_core(_DEPLOYMENT_COLUMNS).where(Deployment.__table__.c.phase != DeploymentPhase.QUARANTINED)
                         .order_by(Deployment.__table__.c.id))
_SNAPSHOT_PLACEMENTS = _core(_PLACEMENT_COLUMNS).add_columns(_RUNNING).order_by(
    Placement.__table__.c.deployment_id, Placement.__table__.c.replica, Placement.__table__.c.shard)


async def read_snapshot_rows(session: AsyncSession) -> SnapshotRows:
    """Every row one snapshot is made of, in one pass (9 queries, whatever the size)."""
    # The generation first: anything changed after this read makes the commit stale (re-checked).
    generation = (await session.execute(select(ClusterState.generation).where(ClusterState.id == 1))).scalar_one()
    zones, datacenter_rows, racks = await _topology_rows(session)
    nodes = (await session.execute(_SNAPSHOT_NODES)).all()
    tenants = await _tenant_rows(session)
    # Arrival order (primary key): what the online mode places first.
    deployments = (await session.execute(_SNAPSHOT_DEPLOYMENTS)).all()
    placements = (await session.execute(_SNAPSHOT_PLACEMENTS)).all()
    nominations = await read_nominations(session)
    return SnapshotRows(generation, zones, datacenter_rows, racks, nodes, tenants, deployments, placements,
                        nominations)


def build_snapshot(read: SnapshotRows, *, surge: int = DEFAULT_SURGE) -> Snapshot:
    """The snapshot made of the rows `read` (`load_snapshot`): pure, it touches no session."""
    zones, rows, racks = _topology_docs(read.zones, read.datacenter_rows, read.racks)

    nodes = []
    oversized_nodes: set[str] = set()
    evicted_nodes: set[str] = set()
    draining_nodes: set[str] = set()
    for n in read.nodes:
        if _evicted(n.health, n.evicted_at):
            evicted_nodes.add(n.id)
        if n.draining:
            draining_nodes.add(n.id)
        node = _node_doc(n)
        if node is None:
            oversized_nodes.add(n.id)
            continue
        nodes.append(node)

    tenants = [_tenant_doc(t) for t in read.tenants]

    current_docs: list[tuple[int, dict[str, Any], int, dict[str, Any]]] = []
    deleting: set[str] = set()
    deployment_ids: dict[str, int] = {}
    keys_by_id: dict[int, str] = {}
    for d in read.deployments:
        key = deployment_key(d.tenant_id, d.name)
        if d.phase is DeploymentPhase.DELETING:
            deleting.add(key)
            continue
        deployment = _deployment_doc(d)
        current_docs.append((d.id, deployment, d.template_revision, d.revision_specs or {}))
        deployment_ids[key] = d.id
        keys_by_id[d.id] = key

    placed_rows: dict[int, list[Any]] = {}
    released: dict[ShardKey, Where] = {}
    for p in read.placements:
        key = keys_by_id.get(p.deployment_id)
        if key is None:  # its deployment is being deleted, or quarantined
            continue
        if p.node_id in oversized_nodes:
            released[(key, p.replica, p.shard)] = (p.node_id, tuple(p.accelerator_indices), p.accelerator_milli)
            continue
        placed_rows.setdefault(p.deployment_id, []).append(p)

    # Each stored deployment as the solver sees it: its current revision, and the replicas a
    # rollout or drain is replacing (store/rollout.py), numbered 0..n-1 per solver deployment.
    deployments: list[dict[str, Any]] = []
    placements: list[dict[str, Any]] = []
    solver_refs: dict[str, SolverRef] = {}
    replica_indices: dict[str, frozenset[int]] = {}
    for dep_id, doc, template_revision, revision_specs in current_docs:
        replicas = _stored_replicas(doc["id"], placed_rows.get(dep_id, ()))
        view, dropped = _view(doc, template_revision, revision_specs, replicas,
                              evicted=evicted_nodes, draining=draining_nodes, surge=surge)
        deployments += view.deployments
        placements += view.placements
        solver_refs.update(view.refs)
        replica_indices[doc["id"]] = frozenset(replicas)
        released.update(dropped)

    problem: dict[str, Any] = {
        "version": PROBLEM_VERSION,
        "zones": zones,
        "rows": rows,
        "racks": racks,
        "nodes": nodes,
        "tenants": tenants,
        "deployments": deployments,
        "placements": placements,
    }
    # Those the state read still has (a node gone, a deployment's revisions renamed: `in_force`).
    nominated = in_force(read.nominations, deployment_ids, {d["id"] for d in deployments}, {n["id"] for n in nodes})
    if nominated:
        problem["nominations"] = problem_nominations(nominated)
    return Snapshot(generation=read.generation, problem=problem, deployment_ids=deployment_ids,
                    solver_refs=solver_refs, replica_indices=replica_indices, released=released,
                    deleting=frozenset(deleting))


async def load_work_on_racks(session: AsyncSession, racks: Collection[str], *,
                             surge: int = DEFAULT_SURGE) -> dict[str, Any]:
    """The placed work that moving the racks `racks` (to another row or zone) may break, as
    `load_snapshot`'s problem lists it, and nothing else: each live deployment with a shard on one
    of their nodes, with all its placements (a replica's locality and spread are judged over all
    its shards, those on racks that stay too), the nodes those are on, and those deployments'
    tenants; no zones, rows or racks (the caller judges the work against the topology it holds).

    For a topology apply's check of a move (usecases/topology.py), which runs again holding the
    cluster generation: with the whole snapshot that check took ~3.5 s at 16,384 nodes and 20,000
    placements (SQLite and PostgreSQL), every commit waiting; ~20 ms with this, a rack moved.
    One query when nothing runs there, else four, each naming the deployments by the racks
    themselves (a subquery), so no list of keys goes back and forth."""
    on_racks = (select(Placement.deployment_id).join(Node, Node.id == Placement.node_id)
                .where(any_of(session, Node.rack_id, sorted(set(racks)))))
    concerned = select(Deployment.id).where(Deployment.id.in_(on_racks),
                                            Deployment.phase.not_in((DeploymentPhase.DELETING,
                                                                     DeploymentPhase.QUARANTINED)))
    # The snapshot's own statements (columns and order), narrowed: the problem is built the same way.
    deployments = (await session.execute(_SNAPSHOT_DEPLOYMENTS.where(Deployment.__table__.c.id.in_(concerned)))).all()
    nodes: Sequence[SqlRow[Any]] = ()
    tenants: Sequence[SqlRow[Any]] = ()
    placements: Sequence[SqlRow[Any]] = ()
    if deployments:
        placed = Placement.__table__.c.deployment_id.in_(concerned)
        placements = (await session.execute(_SNAPSHOT_PLACEMENTS.where(placed))).all()
        nodes = (await session.execute(_SNAPSHOT_NODES.where(
            Node.__table__.c.id.in_(select(Placement.node_id).where(placed))))).all()
        tenants = (await session.execute(select(*_TENANT_COLUMNS).where(
            Tenant.id.in_(select(Deployment.tenant_id).where(Deployment.id.in_(concerned)))).order_by(Tenant.id))).all()
    # The generation is not read: the caller holds it, or judges again once it does.
    rows = SnapshotRows(0, [], [], [], nodes, tenants, deployments, placements)
    return build_snapshot(rows, surge=surge).problem
