"""Queries the controller's use cases need, and the mapping of rows to domain values.

Use cases never build SQL: they call these functions with the session of their unit of work.
Everything returned to callers outside the store is a `controller.domain.values` value, so
the ORM stays behind this module (rows are returned only to the use cases that change them).
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, Text, Update, and_, bindparam, inspect, insert, or_, case, cast, delete, func, literal, literal_column, null, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from controller.store import audit
from controller.store import models as m
from controller.store.metering import shard_milli, stop_intervals, stop_intervals_on_node
from controller.store.inlist import (POSTGRESQL, any_of, any_of_in_order, any_of_named, any_of_named_in_order, dialect_of,
                                     in_order, listed, locked_in_order)
from controller.store.marks import rowcount_unread
from controller.store.changes import (  # noqa: F401  (all but schedulable_count: re-exported)
    bump_cluster_generation_unread, moves_generation_alone, schedulable_count, will_change_nodes_hardware)
from controller.store.partitions import partitions
from controller.store.plans import bump_cluster_generation, will_move_generation  # noqa: F401  (re-exported for use cases)
from controller.domain.changes import ClusterChange
from controller.domain import values as d
from controller.domain.paging import PageBounds
from controller.domain import restarts
from controller.domain.phases import ReplicaCounts, deployment_phase, replica_counts
from scheduler.interchange import shard_spec_from_dict


def _paged(stmt: Select, page: PageBounds | None, *columns: object) -> Select:
    """Keyset paging on `columns` (the statement's sort order): rows after the page's key,
    one more than the page holds (to tell whether another page follows)."""
    if page is None:
        return stmt
    if page.after is not None:
        stmt = stmt.where(tuple_(*columns) > tuple_(*page.after))
    return stmt.limit(page.limit + 1)


# --- cluster generation ----------------------------------------------------------------------
async def read_cluster_generation(session: AsyncSession) -> int:
    value = await session.scalar(select(m.ClusterState.generation).where(m.ClusterState.id == 1))
    return int(value or 0)


async def read_capacity_generation(session: AsyncSession) -> int:
    """Moves (by trigger) when a node is added, removed or changes capacity, rack, row or zone."""
    value = await session.scalar(select(m.CapacityState.generation).where(m.CapacityState.id == 1))
    return int(value or 0)


async def count_schedulable_deployments(session: AsyncSession) -> int:
    """Deployments a snapshot holds (neither being deleted nor quarantined). At one cluster
    generation this only grows, by submissions, which leave the generation alone (a new
    deployment invalidates no plan; it only asks for another pass): how the reconciler sees them."""
    return int(await session.scalar(schedulable_count()) or 0)


def record_event(
    session: AsyncSession, *, actor: str, kind: str, object_kind: str, object_id: str,
    message: str = "", data: dict | None = None,
) -> None:
    session.add(m.Event(actor=actor, kind=kind, object_kind=object_kind, object_id=object_id,
                        message=message, data=data or {}))


@dataclass(frozen=True)
class NewEvent:
    """An event to record (`record_events`)."""

    actor: str
    kind: str
    object_kind: str
    object_id: str
    message: str = ""
    data: dict = field(default_factory=dict)


async def record_events(session: AsyncSession, events: Iterable[NewEvent]) -> None:
    """Several events in one INSERT statement (`record_event` adds an ORM row, which the flush
    writes with a statement of its own on SQLite, to learn its id)."""
    at = m.utcnow()
    rows = [{"at": at, "actor": e.actor, "kind": e.kind, "object_kind": e.object_kind, "object_id": e.object_id,
             "message": e.message, "data": e.data} for e in events]
    if rows:
        await session.execute(insert(m.Event.__table__), rows)


async def list_events(session: AsyncSession, *, object_kind: str = "", object_id: str = "", after_id: int = 0,
                      limit: int = 100) -> list[d.EventView]:
    """The newest `limit` events matching, returned oldest first."""
    query = select(m.Event).where(m.Event.id > after_id)
    if object_kind:
        query = query.where(m.Event.object_kind == object_kind)
    if object_id:
        query = query.where(m.Event.object_id == object_id)
    rows = list(await session.scalars(query.order_by(m.Event.id.desc()).limit(limit)))
    return [d.EventView(id=r.id, at=r.at, actor=r.actor, kind=r.kind, object_kind=r.object_kind,
                        object_id=r.object_id, message=r.message) for r in reversed(rows)]


# --- tenants ---------------------------------------------------------------------------------
async def forget_request_ids(session: AsyncSession, tenant_id: str, *, before: datetime) -> None:
    """Drop a tenant's client request ids whose deployment is gone and that were made before `before`."""
    await session.execute(rowcount_unread(delete(m.ClientRequest).where(
        m.ClientRequest.tenant_id == tenant_id, m.ClientRequest.deployment_id.is_(None),
        m.ClientRequest.created_at < before)).execution_options(synchronize_session=False))


async def get_tenant(session: AsyncSession, tenant_id: str) -> m.Tenant | None:
    return await session.get(m.Tenant, tenant_id)


@dataclass(frozen=True)
class TenantSubmitFacts:
    """What a batch of submits is checked against, per tenant."""

    zones: tuple[str, ...]  # the zones the tenant may run in (none: anywhere)
    deployments: int        # the tenant's deployments




# Joins a tenant's names and request ids into one text column; neither can hold it
# (validation refuses control characters in both).
_JOINED = "\x1f"


@dataclass(frozen=True)
class SubmitBatchReads:
    """What a batch of submits is checked against (`submit_batch_reads`)."""

    tenants: dict[str, TenantSubmitFacts]  # the batch's tenants that exist
    taken: set[tuple[str, str]]            # (tenant, name): of the names asked, the deployments that exist
    used: set[tuple[str, str]]             # (tenant, request id): of the ids asked, those used before
    capacity_generation: int               # 0 when none exists


def tenant_deployments(tenant: Any) -> Any:
    """The deployments of `tenant` (a column or a value) as the database's triggers count them
    (`models.TenantDeploymentCount`, migration 0017): its row plus its deltas not folded yet (a
    scalar subquery; one snapshot with the statement it is in). Counting them scanned the tenant's
    deployments every submit batch."""
    kept = select(m.TenantDeploymentCount.deployments).where(m.TenantDeploymentCount.tenant_id == tenant)
    unfolded = select(func.sum(m.DeploymentCountDelta.deployments)).where(m.DeploymentCountDelta.tenant_id == tenant)
    return func.coalesce(kept.scalar_subquery(), 0) + func.coalesce(unfolded.scalar_subquery(), 0)


def _batch_reads_query(dialect: str) -> Select:
    """`submit_batch_reads`' query for `dialect`, its lists named `tenants`, `names`, `request_ids`."""
    def joined(column: object, where: list[object]) -> object:
        return select(func.aggregate_strings(column, _JOINED)).where(*where).correlate(m.Tenant).scalar_subquery()

    count = tenant_deployments(m.Tenant.id)
    generation = select(m.CapacityState.generation).where(m.CapacityState.id == 1).scalar_subquery()
    names = joined(m.Deployment.name, [m.Deployment.tenant_id == m.Tenant.id,
                                       any_of_named(dialect, m.Deployment.name, "names")])
    request_ids = joined(m.ClientRequest.request_id, [
        m.ClientRequest.tenant_id == m.Tenant.id, any_of_named(dialect, m.ClientRequest.request_id, "request_ids")])
    return (select(m.Tenant.id, m.Tenant.zones, count, generation, names, request_ids)
            .where(any_of_named(dialect, m.Tenant.id, "tenants")))


_BATCH_READS = {dialect: _batch_reads_query(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def submit_batch_reads(session: AsyncSession, keys: Iterable[tuple[str, str, str]]) -> SubmitBatchReads:
    """For a batch of submits (tenant, name, request id or ""), in ONE query: the facts of each
    tenant that exists, which of the names exist in their tenant, which request ids were used
    there, and the capacity generation (0 when none exists): each round trip is a turn of a busy
    event loop."""
    keys = list(keys)
    tenants = sorted({tenant for tenant, _, _ in keys})
    facts: dict[str, TenantSubmitFacts] = {}
    taken: set[tuple[str, str]] = set()
    used: set[tuple[str, str]] = set()
    generation = 0
    if tenants:
        rows = await session.execute(_BATCH_READS[dialect_of(session)], {
            "tenants": tenants, "names": sorted({name for _, name, _ in keys}),
            "request_ids": sorted({rid for _, _, rid in keys if rid})})
        for tenant, zones, deployments, capacity_generation, names, request_ids in rows:
            facts[tenant] = TenantSubmitFacts(tuple(zones or ()), int(deployments))
            taken.update((tenant, name) for name in (names or "").split(_JOINED) if name)
            used.update((tenant, rid) for rid in (request_ids or "").split(_JOINED) if rid)
            generation = int(capacity_generation or 0)
    return SubmitBatchReads(facts, taken, used, generation)


async def tenant_ids(session: AsyncSession) -> list[str]:
    return list(await session.scalars(select(m.Tenant.id).order_by(m.Tenant.id)))


async def list_tenant_rows(session: AsyncSession, page: PageBounds | None = None) -> list[m.Tenant]:
    return list(await session.scalars(_paged(select(m.Tenant).order_by(m.Tenant.id), page, m.Tenant.id)))


async def count_rows(session: AsyncSession, model: type[m.Base]) -> int:
    return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def existing_tenant_ids(session: AsyncSession, ids: Iterable[str]) -> set[str]:
    wanted = set(ids)
    if not wanted:
        return set()
    return set(await session.scalars(select(m.Tenant.id).where(any_of(session, m.Tenant.id, wanted))))


async def count_tenant_deployments(session: AsyncSession, tenant_id: str) -> int:
    return int(await session.scalar(select(tenant_deployments(tenant_id))) or 0)


def tenant_spec(row: m.Tenant) -> d.TenantSpec:
    return d.TenantSpec(
        id=row.id, isolation=row.isolation.value, excludes=tuple(row.excludes or ()),
        zones=tuple(row.zones or ()), reserved_accelerators=row.reserved_accelerators,
        max_accelerators=row.max_accelerators, max_power_w=row.max_power_w,
    )


# --- topology --------------------------------------------------------------------------------
async def existing_ids(session: AsyncSession, model: type, ids: Iterable[str]) -> set[str]:
    wanted = set(ids)
    if not wanted:
        return set()
    return set(await session.scalars(select(model.id).where(any_of(session, model.id, wanted))))


async def list_zones(session: AsyncSession) -> list[m.Zone]:
    return list(await session.scalars(select(m.Zone).order_by(m.Zone.id)))


async def list_rows(session: AsyncSession) -> list[m.Row]:
    return list(await session.scalars(select(m.Row).order_by(m.Row.id)))


async def list_racks(session: AsyncSession) -> list[m.Rack]:
    return list(await session.scalars(select(m.Rack).options(selectinload(m.Rack.row)).order_by(m.Rack.id)))


async def upsert(session: AsyncSession, model: type[m.Base], key: str, **values: object) -> None:
    """Insert the row of `model` whose id is `key` with `values`, or set them on the stored one."""
    row = await session.get(model, key)
    if row is None:
        session.add(model(id=key, **values))
    else:
        for name, value in values.items():
            setattr(row, name, value)


async def get_rack(session: AsyncSession, rack_id: str) -> m.Rack | None:
    return await session.get(m.Rack, rack_id)


# --- nodes -----------------------------------------------------------------------------------
_NODE_LOAD = (selectinload(m.Node.rack).selectinload(m.Rack.row),)


async def get_node(session: AsyncSession, node_id: str) -> m.Node | None:
    return await session.scalar(select(m.Node).options(*_NODE_LOAD).where(m.Node.id == node_id))


async def node_rows_by_id(session: AsyncSession, node_ids: Iterable[str]) -> dict[str, m.Node]:
    """The rows of these nodes (those that exist), in one query and without their racks: what the
    agent paths (Register, hellos) change."""
    ids = sorted(set(node_ids))
    if not ids:
        return {}
    return {row.id: row for row in await session.scalars(select(m.Node).where(any_of(session, m.Node.id, ids)))}


async def list_node_rows(session: AsyncSession, rack: str = "", page: PageBounds | None = None) -> list[m.Node]:
    stmt = select(m.Node).options(*_NODE_LOAD).order_by(m.Node.id)
    if rack:
        stmt = stmt.where(m.Node.rack_id == rack)
    return list(await session.scalars(_paged(stmt, page, m.Node.id)))


async def node_state_counts(session: AsyncSession) -> tuple[dict[str, int], int]:
    """How many nodes are in each operator state (`Node.state`: ready, cordoned, suspect, down)
    and the accelerators of those not down, counted by the database: a cluster summary must
    not load every node (at 16,384 nodes that read was a third of a joining controller's CPU)."""
    counts: dict[str, int] = {}
    accelerators = 0
    rows = await session.execute(select(m.Node.health, m.Node.cordoned, func.count(), func.sum(m.Node.accelerators))
                                 .group_by(m.Node.health, m.Node.cordoned))
    for health, cordoned, nodes, accs in rows:
        state = m.operator_state(health, cordoned)
        counts[state] = counts.get(state, 0) + nodes
        if health is not m.NodeHealth.DOWN:
            accelerators += int(accs or 0)
    return counts, accelerators


async def node_liveness_rows(session: AsyncSession, *, silent_before: datetime | None = None, also: Iterable[str] = (),
                             ) -> list[tuple[str, str, m.NodeHealth, datetime | None, bool]]:
    """(id, zone, health, last heartbeat, evicted) of every node, in one query; with
    `silent_before`, only of those a liveness rule could change: suspect; down and not evicted, or
    evicted but heard from since then (an agent connected again); up but not heard from since; and
    the nodes `also` names."""
    query = (select(m.Node.id, m.Row.zone_id, m.Node.health, m.Node.last_heartbeat_at, m.Node.evicted_at.is_not(None))
             .join(m.Rack, m.Node.rack_id == m.Rack.id).join(m.Row, m.Rack.row_id == m.Row.id))
    if silent_before is not None:
        silent = or_(m.Node.last_heartbeat_at.is_(None), m.Node.last_heartbeat_at < silent_before)
        named = set(also)
        query = query.where(or_(
            m.Node.health == m.NodeHealth.SUSPECT,
            and_(m.Node.health == m.NodeHealth.DOWN, or_(m.Node.evicted_at.is_(None), ~silent)),
            and_(m.Node.health == m.NodeHealth.UP, silent),
            *([any_of(session, m.Node.id, named)] if named else [])))
    rows = await session.execute(query.order_by(m.Node.id))
    return [(node_id, zone, health, last, bool(evicted)) for node_id, zone, health, last, evicted in rows]


async def node_health_by_zone(session: AsyncSession) -> tuple[dict[str, int], dict[str, int]]:
    """Each zone's node count and count of nodes not up, counted by the database."""
    total: dict[str, int] = {}
    unhealthy: dict[str, int] = {}
    for zone, health, count in await session.execute(
            select(m.Row.zone_id, m.Node.health, func.count()).select_from(m.Node)
            .join(m.Rack, m.Node.rack_id == m.Rack.id).join(m.Row, m.Rack.row_id == m.Row.id)
            .group_by(m.Row.zone_id, m.Node.health)):
        total[zone] = total.get(zone, 0) + count
        if health is not m.NodeHealth.UP:
            unhealthy[zone] = unhealthy.get(zone, 0) + count
    return total, unhealthy


async def set_node_health(session: AsyncSession, node_id: str, health: m.NodeHealth, *,
                          evicted_at: datetime | None = None, was: m.NodeHealth | None = None,
                          session_id: str | None = None) -> bool:
    """Set a node's health (and its eviction time); with `was`, only if its health is still that
    (and, for an eviction, its work not evicted yet); with `session_id`, only if that is still the
    node's session. One conditional UPDATE: True if the row changed."""
    values: dict[str, object] = {"health": health}
    if evicted_at is not None:
        values["evicted_at"] = evicted_at
    where = [m.Node.id == node_id]
    if was is not None:
        where.append(m.Node.health == was)
    if session_id is not None:
        where.append(m.Node.session_id == session_id)
    if evicted_at is not None and was is not None:
        where.append(m.Node.evicted_at.is_(None))
    result = await session.execute(update(m.Node).where(*where).values(**values))
    return bool(result.rowcount)


async def count_placements_on_nodes(session: AsyncSession, node_ids: Iterable[str]) -> dict[str, int]:
    ids = set(node_ids)
    if not ids:
        return {}
    rows = await session.execute(
        select(m.Placement.node_id, func.count()).where(any_of(session, m.Placement.node_id, ids))
        .group_by(m.Placement.node_id))
    return {node_id: count for node_id, count in rows}


_NODES = m.Node.__table__
# The report flush's writes: their row counts are never read, so on SQLite inside the flush's
# `deferred_writes` each goes to the database with the statement or commit that follows it.
_WRITE_HEARTBEAT = rowcount_unread(update(_NODES).where(_NODES.c.id == bindparam("node_id"))
                                   .values(last_heartbeat_at=bindparam("at"), power_draw_w=bindparam("power")))


async def write_heartbeats(session: AsyncSession, beats: dict[str, tuple[datetime, float]]) -> None:
    """Last heartbeat time and power draw of many nodes in one executemany (an unknown id updates
    no row). A Core statement: the ORM's bulk update by primary key, after a read of which ids
    exist, cost about three times the CPU per flush (micro-benchmark, SQLite, 30 nodes). In
    ascending id, as a plan commit locks nodes (the lock order: store/changes.py)."""
    if beats:
        await session.execute(_WRITE_HEARTBEAT, [{"node_id": node_id, "at": at, "power": power}
                                                 for node_id, (at, power) in sorted(beats.items())])


async def node_capacities(session: AsyncSession) -> list[tuple[str, str, str, str, str, int, float | None]]:
    """(node, rack, row, zone, accelerator model, accelerators, HBM GiB) of every node, in id order:
    plain columns, for `usecases.capacity`."""
    rows = await session.execute(
        select(m.Node.id, m.Node.rack_id, m.Rack.row_id, m.Row.zone_id, m.Node.accelerator_model,
               m.Node.accelerators, m.Node.hbm_gib)
        .join(m.Rack, m.Node.rack_id == m.Rack.id).join(m.Row, m.Rack.row_id == m.Row.id)
        .order_by(m.Node.id))
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def count_nodes_by_rack(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(m.Node.rack_id, func.count()).group_by(m.Node.rack_id))
    return {rack_id: int(n) for rack_id, n in rows}


def node_info(row: m.Node) -> d.NodeInfo:
    return d.NodeInfo(
        node_id=row.id, rack=row.rack_id, accelerators=row.accelerators, hostname=row.hostname,
        accelerator_model=row.accelerator_model, hbm_gib=row.hbm_gib, cpu_milli=row.cpu_milli,
        memory_mib=row.memory_mib, idle_power_w=row.idle_power_w, labels=dict(row.labels or {}),
        agent_version=row.agent_version,
    )


def node_view(row: m.Node, usage: ClusterUsage, connected: bool) -> d.NodeView:
    return d.NodeView(
        info=node_info(row), row=row.rack.row_id, zone=row.rack.row.zone_id, state=row.state,
        connected=connected, last_heartbeat=row.last_heartbeat_at, power_draw_w=row.power_draw_w,
        accelerators_used=usage.node_milli.get(row.id, 0) / 1000.0,
        shards=usage.node_shards.get(row.id, 0), tenants=tuple(sorted(usage.node_tenants.get(row.id, ()))),
    )


async def set_node_cordoned(session: AsyncSession, node_id: str, cordoned: bool) -> None:
    await session.execute(update(m.Node).where(m.Node.id == node_id).values(cordoned=cordoned))


# --- usage -----------------------------------------------------------------------------------
@dataclass
class ClusterUsage:
    """What placed shards use, summed per tenant, node, rack and row (milli-accelerators, watts)."""

    tenant_milli: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tenant_power_w: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    node_milli: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    node_shards: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    node_tenants: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    node_tenant_milli: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    rack_power_w: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    row_power_w: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def tenant(self, tenant_id: str) -> d.Usage:
        return d.Usage(self.tenant_milli.get(tenant_id, 0) / 1000.0, self.tenant_power_w.get(tenant_id, 0.0))


def placement_milli(dep: m.Deployment, placement: m.Placement) -> int:
    """Accelerator milli-units one placed shard holds."""
    return shard_milli(dep.shard_accelerators, placement.accelerator_milli)


# `placement_milli` in SQL, for sums over many placements (tests/store/test_usage.py holds them equal).
PLACEMENT_MILLI = case(
    (and_(m.Deployment.shard_accelerators == 1, m.Placement.accelerator_milli != 0,
          m.Placement.accelerator_milli < 1000), m.Placement.accelerator_milli),
    else_=1000 * m.Deployment.shard_accelerators,
)


async def rack_power(session: AsyncSession) -> tuple[dict[str, float], dict[str, float]]:
    """Per rack, summed by the database: the power placed on it (the idle power of its nodes that
    are not down, plus every placed shard's power on its nodes, down ones included: still placed)
    and the power its up nodes' agents last reported. Two queries, a row per rack each."""
    used: dict[str, float] = defaultdict(float)
    draw: dict[str, float] = {}
    idle = (select(m.Node.rack_id, func.sum(m.Node.idle_power_w), func.sum(m.Node.power_draw_w))
            .where(m.Node.health != m.NodeHealth.DOWN).group_by(m.Node.rack_id))
    for rack_id, idle_w, draw_w in await session.execute(idle):
        used[rack_id] += float(idle_w or 0.0)
        draw[rack_id] = float(draw_w or 0.0)
    shards = (select(m.Node.rack_id, func.sum(m.Deployment.shard_power_w * PLACEMENT_MILLI / 1000.0))
              .select_from(m.Placement).join(m.Deployment).join(m.Node).group_by(m.Node.rack_id))
    for rack_id, watts in await session.execute(shards):
        used[rack_id] += float(watts or 0.0)
    return dict(used), draw


async def cluster_usage(session: AsyncSession) -> ClusterUsage:
    """Usage of every placed shard, plus the idle power of nodes that are not down.

    Placements are summed by the database per (node, tenant), power per rack (`rack_power`): a
    read returns at most one row per node and tenant on it, however many shards are placed.
    """
    usage = ClusterUsage()
    used, _ = await rack_power(session)
    row_of = {rack_id: row_id for rack_id, row_id in await session.execute(select(m.Rack.id, m.Rack.row_id))}
    for rack_id, watts in used.items():
        usage.rack_power_w[rack_id] += watts
        usage.row_power_w[row_of.get(rack_id, "")] += watts
    placed = (select(m.Placement.node_id, m.Deployment.tenant_id, func.count(), func.sum(PLACEMENT_MILLI),
                     func.sum(m.Deployment.shard_power_w * PLACEMENT_MILLI / 1000.0))
              .join(m.Deployment).group_by(m.Placement.node_id, m.Deployment.tenant_id))
    async for part in partitions(session, placed):
        for node_id, tenant_id, shards, milli, power in part:
            milli, power = int(milli), float(power)
            usage.tenant_milli[tenant_id] += milli
            usage.tenant_power_w[tenant_id] += power
            usage.node_milli[node_id] += milli
            usage.node_shards[node_id] += shards
            usage.node_tenants[node_id].add(tenant_id)
            usage.node_tenant_milli[(node_id, tenant_id)] += milli
    return usage


# --- deployments -----------------------------------------------------------------------------
# Deployments with their placements and the placements' nodes: in three statements (selectin), for
# lists and pages of any size; in one (joined) for one deployment or a few named ones, which the
# hot paths read on the event loop's turns, each statement a round trip (the selectin loads' IN
# lists of ids were also a statement text per size). Joined results need `.unique()`.
_DEPLOYMENT_LOAD = (selectinload(m.Deployment.placements).selectinload(m.Placement.node),)
_DEPLOYMENT_JOINED = (joinedload(m.Deployment.placements).joinedload(m.Placement.node),)


async def get_deployment(session: AsyncSession, tenant: str, name: str) -> m.Deployment | None:
    """The deployment `name` of `tenant` (names are per tenant)."""
    return (await session.scalars(
        select(m.Deployment).options(*_DEPLOYMENT_JOINED)
        .where(m.Deployment.tenant_id == tenant, m.Deployment.name == name)
    )).unique().one_or_none()


# A deployment's columns by attribute name without the ORM: a Core row of its table
# (`deployments_named`), or the columns written for a new one (`new_deployment_view`).
DeploymentColumns = Row[Any] | SimpleNamespace


@dataclass(frozen=True, slots=True)
class PlacedNode:
    """What a view reads of a placement's node."""

    rack_id: str
    draining: bool


@dataclass(frozen=True, slots=True)
class PlacementColumns:
    """A placement's columns `deployment_view` reads, loaded without the ORM (`deployments_named`)."""

    replica: int
    shard: int
    node_id: str
    accelerator_indices: list[int] | None
    accelerator_milli: int | None
    phase: m.ShardPhase
    message: str
    revision: int
    node: PlacedNode | None


@dataclass(frozen=True, slots=True)
class NamedDeployment:
    """A deployment read without the ORM (`deployments_named`): its columns and its placements."""

    row: Row[Any]
    placements: tuple[PlacementColumns, ...]

    def view(self) -> d.DeploymentView:
        return deployment_view(self.row, self.placements)


_DEPLOYMENTS, _PLACEMENTS = m.Deployment.__table__, m.Placement.__table__
_PLACEMENT_READ = ("replica", "shard", "node_id", "accelerator_indices", "accelerator_milli", "phase", "message",
                   "revision")  # with the node's rack and draining flag: `PlacementColumns`, in order


def _named_query(dialect: str, *, lock: bool = False) -> Select:
    """`deployments_named`' query for `dialect`, its list named `names`: each deployment's columns
    (by their names), then, outer joined, those of each placement and its node (labelled apart):
    a row per placement, one for a deployment with none. `lock`: the deployments' rows locked to
    the end of the transaction (PostgreSQL: FOR NO KEY UPDATE OF deployments, which rows that
    refer to them do not wait for; SQLite: as without), in ascending id as a plan commit locks them
    (the lock order: store/changes.py), and on PostgreSQL one more column, whether the row was
    written by a commit the lock waited for (`_WRITTEN_UNDER_LOCK`)."""
    placement = _PLACEMENTS.c
    written = (_WRITTEN_UNDER_LOCK,) if lock and dialect == POSTGRESQL else ()
    query = (select(_DEPLOYMENTS, *(placement[c].label(f"placement_{c}") for c in _PLACEMENT_READ),
                    _NODES.c.rack_id.label("node_rack_id"), _NODES.c.draining.label("node_draining"), *written)
             .select_from(_DEPLOYMENTS.outerjoin(_PLACEMENTS, placement.deployment_id == _DEPLOYMENTS.c.id)
                          .outerjoin(_NODES, _NODES.c.id == placement.node_id))
             .where(any_of_named(dialect, _DEPLOYMENTS.c.name, "names")))
    return query.order_by(_DEPLOYMENTS.c.id).with_for_update(of=_DEPLOYMENTS, key_share=True) if lock else query


# PostgreSQL (READ COMMITTED): a locking read that waited for a commit holding a row hands back
# that row as the commit left it (re-read: EvalPlanQual) but the rows joined to it as the
# statement's snapshot had them: a report flush judged a deployment's phase by shards a plan
# commit had removed, or without those it added. The row's version (xmin) against the one the
# snapshot sees (a subquery, not re-read) tells such a row; its placements are read again.
_AS_READ = _DEPLOYMENTS.alias("as_read")
_WRITTEN_UNDER_LOCK = (literal_column("deployments.xmin::text") != select(literal_column("as_read.xmin::text"))
                       .where(_AS_READ.c.id == _DEPLOYMENTS.c.id).scalar_subquery()).label("written_under_lock")
_NAMED = {dialect: _named_query(dialect) for dialect in ("sqlite", POSTGRESQL)}
_NAMED_LOCKED = {dialect: _named_query(dialect, lock=True) for dialect in ("sqlite", POSTGRESQL)}
_DEPLOYMENT_WIDTH = len(_DEPLOYMENTS.c)
_PLACEMENT_WIDTH = len(_PLACEMENT_READ) + 2  # with the node's rack and draining flag


async def deployments_named(session: AsyncSession, names: Iterable[str], *, lock: bool = False) -> list[NamedDeployment]:
    """The deployments called any of `names`, in every tenant (a batch of by-name calls), with
    their placements: one query of plain columns. As ORM entities (joined) the same read was the
    largest item of a delete batch's CPU after its flush (docs/benchmarks.md, `unary`).
    `lock`: their rows are locked to the end of the transaction (PostgreSQL; SQLite's writer is
    one already), so that what is written from this read is not written over a commit that lands
    in between (that commit is waited for, and read)."""
    found: dict[int, tuple[Row[Any], list[PlacementColumns]]] = {}
    queries = _NAMED_LOCKED if lock else _NAMED
    written: set[str] = set()  # written by a commit the lock waited for (`_WRITTEN_UNDER_LOCK`)
    for row in await session.execute(queries[dialect_of(session)], {"names": sorted(set(names))}):
        entry = found.get(row.id)
        if entry is None:
            entry = found[row.id] = (row, [])
        replica, shard, node_id, indices, milli, phase, message, revision, rack_id, draining = \
            row[_DEPLOYMENT_WIDTH:_DEPLOYMENT_WIDTH + _PLACEMENT_WIDTH]
        if replica is not None:  # a placement (the outer join's NULLs: none)
            entry[1].append(PlacementColumns(replica, shard, node_id, indices, milli, phase, message, revision,
                                             None if rack_id is None else PlacedNode(rack_id, draining)))
        if len(row) > _DEPLOYMENT_WIDTH + _PLACEMENT_WIDTH and row[-1]:
            written.add(row.name)
    named = [NamedDeployment(row, tuple(placed)) for row, placed in found.values()]
    if not written:
        return named
    # Locked now: read again (a statement of its own sees that commit), as committed.
    again = {dep.row.id: dep for dep in await deployments_named(session, written)}
    return [again.get(dep.row.id, dep) for dep in named]


def _deleting_statement(dialect: str) -> Update:
    """`set_deleting`'s UPDATE for `dialect`: the deployments of the ids `ids` DELETING as of `at`.
    A row DELETING already gets NULL, which the column refuses (`changed_since_read`)."""
    table = m.Deployment.__table__
    deleting = m.DeploymentPhase.DELETING
    return rowcount_unread(update(table).where(any_of_named_in_order(dialect, table.c.id, "ids", deletes=False)).values(
        phase=case((table.c.phase == deleting, null()), else_=literal(deleting, table.c.phase.type)),
        updated_at=bindparam("at")))


_DELETING = {dialect: _deleting_statement(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def set_deleting(session: AsyncSession, rows: Sequence[m.Deployment | Row[Any]]) -> datetime:
    """Mark deployments DELETING in ONE UPDATE statement; returns the time written. ORM rows
    among them are updated as written (nothing left for the session to flush: the ORM's flush of
    the same change, its unit of work over every loaded row and placement, was most of a batch of
    deletions' CPU); the views of plain rows read what it wrote with `deleting_view`.

    The caller read them not DELETING; one that another transaction marked since (a lone delete
    racing a batch of the same name) fails the statement, and so the caller's transaction, before
    its event, bump or audit entry is written (`changed_since_read`; on SQLite inside
    `deferred_writes`, at the COMMIT): nothing reads the statement's row count, so a deployment is
    never marked twice without a trip to learn it. One removed since (the UPDATE matches no row)
    is told by the events' INSERT that follows (`record_deleting`)."""
    at = m.utcnow()
    dialect = dialect_of(session)
    ids = [row.id for row in rows]
    await session.execute(_DELETING[dialect], {"ids": listed(dialect, ids), "at": at})
    for row in rows:
        if isinstance(row, m.Deployment):
            set_committed_value(row, "phase", m.DeploymentPhase.DELETING)
            set_committed_value(row, "updated_at", at)
    return at


# `record_deleting`'s INSERT: a `deployment.deleting` event whose object is its key only while the
# row of its id is still the deployment its caller read (the same tenant and name), and NULL, which
# the column refuses, when that row is gone (removed since the read) or is another deployment's (a
# new row under its id: SQLite gave a removed last row's id to the next one until migration 0024).
_DEPLOYMENTS_TABLE = m.Deployment.__table__
_DELETING_EVENT = insert(m.Event.__table__).values(
    kind="deployment.deleting", object_kind="deployment", message="",
    object_id=select(bindparam("key", type_=m.Event.__table__.c.object_id.type)).where(
        _DEPLOYMENTS_TABLE.c.id == bindparam("deployment_id"), _DEPLOYMENTS_TABLE.c.tenant_id == bindparam("tenant"),
        _DEPLOYMENTS_TABLE.c.name == bindparam("name")).scalar_subquery())


async def record_deleting(session: AsyncSession, rows: Sequence[tuple[m.Deployment | Row[Any], str]]) -> None:
    """The `deployment.deleting` events (each by its actor) of the deployments `set_deleting`
    marked, in ONE INSERT statement, after it. `set_deleting`'s UPDATE matches by id and reads no
    row count, so it cannot tell a row removed since its caller read it (marked by another delete
    and removed by the reconciler; a quarantined one released by a submit) from one it marked, nor
    a new row that took the removed one's id from the one read: this INSERT refuses (NOT NULL on
    `events.object_id`) unless every row is there as read, so the transaction fails whole, the
    UPDATE with it (`changed_since_read`). Nothing is read back (`sqlite_driver.deferred_writes`)."""
    at = m.utcnow()
    await session.execute(_DELETING_EVENT, [
        {"at": at, "actor": actor, "data": {}, "key": d.deployment_key(row.tenant_id, row.name),
         "deployment_id": row.id, "tenant": row.tenant_id, "name": row.name} for row, actor in rows])


_NOT_NULL_VIOLATION = "23502"  # PostgreSQL's SQLSTATE
# The NULLs a mark writes when what its caller read changed since: `deployments.phase` (marked
# DELETING since: `set_deleting`), `events.object_id` (its row gone since: `record_deleting`).
_CHANGED_SINCE_READ = ((_DEPLOYMENTS_TABLE.name, _DEPLOYMENTS_TABLE.c.phase.name),
                       (m.Event.__table__.name, m.Event.__table__.c.object_id.name))


def changed_since_read(exc: BaseException) -> bool:
    """`exc` is a mark's refusal of a deployment that changed after its caller read it: marked
    DELETING since (the NULL `set_deleting` wrote into `deployments.phase`) or gone since (the NULL
    `record_deleting` wrote into `events.object_id`), and nothing else (another column's NOT NULL,
    another table's `phase`, a unique violation). PostgreSQL's error names the table and the column
    (asyncpg's, under SQLAlchemy's adaptation); SQLite's names them only in its message."""
    if not isinstance(exc, IntegrityError):
        return False
    if isinstance(exc.orig, sqlite3.IntegrityError):
        return (exc.orig.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_NOTNULL
                and exc.orig.args[:1] in {(f"NOT NULL constraint failed: {table}.{column}",)
                                          for table, column in _CHANGED_SINCE_READ})
    driver = getattr(exc.orig, "orig", None)  # asyncpg's exception (SQLAlchemy's EmulatedDBAPIException.orig)
    return (getattr(driver, "sqlstate", None) == _NOT_NULL_VIOLATION
            and (getattr(driver, "table_name", None), getattr(driver, "column_name", None)) in _CHANGED_SINCE_READ)


def deleting_view(deployment: NamedDeployment, at: datetime) -> d.DeploymentView:
    """The view of a deployment read by `deployments_named` once `set_deleting` marked it `at`:
    what its UPDATE wrote (the phase and the time) over what was read."""
    return replace(deployment.view(), phase=m.DeploymentPhase.DELETING.value, updated_at=at)


async def tenants_with_deployment(session: AsyncSession, name: str, limit: int = 2) -> list[str]:
    """Tenants that have a deployment called `name` (the first `limit`, by tenant id)."""
    return list(await session.scalars(
        select(m.Deployment.tenant_id).where(m.Deployment.name == name).order_by(m.Deployment.tenant_id).limit(limit)
    ))


def _named_as_any(session: AsyncSession, keys: Iterable[str]) -> ColumnElement[bool]:
    """Deployments named as any of `keys` (`TENANT/NAME`): by name alone, which the index serves; a
    superset that the caller narrows to the keys' tenants."""
    return any_of(session, m.Deployment.name, {d.split_deployment_key(k)[1] for k in keys})


async def list_deployment_rows(
    session: AsyncSession, *, tenant: str = "", keys: Iterable[str] | None = None,
    phases: Iterable[m.DeploymentPhase] | None = None, page: PageBounds | None = None, name: str = "",
) -> list[m.Deployment]:
    """Deployments by name (then id), optionally of one tenant, of one name, with given keys
    (`TENANT/NAME`), or in given phases."""
    named = keys is not None or bool(name)  # a few: joined (see `_DEPLOYMENT_JOINED`)
    stmt = (select(m.Deployment).options(*(_DEPLOYMENT_JOINED if named else _DEPLOYMENT_LOAD))
            .order_by(m.Deployment.name, m.Deployment.id))
    if tenant:
        stmt = stmt.where(m.Deployment.tenant_id == tenant)
    if name:
        stmt = stmt.where(m.Deployment.name == name)
    wanted: set[str] | None = None
    if keys is not None:
        wanted = set(keys)
        stmt = stmt.where(_named_as_any(session, wanted))
    if phases is not None:
        stmt = stmt.where(m.Deployment.phase.in_(list(phases)))
    found = await session.scalars(_paged(stmt, page, m.Deployment.name, m.Deployment.id))
    rows = list(found.unique() if named else found)
    if wanted is not None:  # the names matched; the tenants must too
        rows = [r for r in rows if d.deployment_key(r.tenant_id, r.name) in wanted]
    return rows


@dataclass(frozen=True)
class SubmitFacts:
    """What a submit's checks read of the store, in one query."""

    tenant_zones: tuple[str, ...]
    exists: bool               # the tenant has a deployment of that name
    deployments: int           # the tenant's deployments
    capacity_generation: int


def _submit_facts_query() -> Select:
    tenant, name = bindparam("tenant"), bindparam("name")
    exists = select(m.Deployment.id).where(m.Deployment.tenant_id == tenant, m.Deployment.name == name).exists()
    count = tenant_deployments(tenant)
    generation = select(m.CapacityState.generation).where(m.CapacityState.id == 1).scalar_subquery()
    return select(m.Tenant.zones, exists, count, generation).where(m.Tenant.id == tenant)


# Built once: building it per submit was a third of the submit's reads' Python time (py-spy, bench e2e).
_SUBMIT_FACTS = _submit_facts_query()


async def submit_facts(session: AsyncSession, tenant: str, name: str) -> SubmitFacts | None:
    """The facts a submit of `tenant`/`name` is checked against; None when there is no such tenant."""
    row = (await session.execute(_SUBMIT_FACTS, {"tenant": tenant, "name": name})).one_or_none()
    if row is None:
        return None
    zones, found, deployments, capacity_generation = row
    return SubmitFacts(tuple(zones or ()), bool(found), int(deployments), int(capacity_generation or 0))


async def count_deployments_by_phase(session: AsyncSession, tenant: str = "") -> dict[str, int]:
    query = select(m.Deployment.phase, func.count()).group_by(m.Deployment.phase)
    if tenant:
        query = query.where(m.Deployment.tenant_id == tenant)
    rows = await session.execute(query)
    return {phase.value: int(n) for phase, n in rows}


def deployment_spec(row: m.Deployment) -> d.DeploymentSpec:
    spread = None
    if row.spread_domain is not None and row.spread_max_per_domain:
        spread = d.Spread(row.spread_domain.value, row.spread_max_per_domain)
    return d.DeploymentSpec(
        name=row.name, tenant=row.tenant_id, replicas=row.replicas, min_replicas=row.min_replicas,
        shards_per_replica=row.shards_per_replica,
        shard=d.ShardSpec(
            accelerators=row.shard_accelerators, accelerator_milli=row.shard_accelerator_milli,
            hbm_gib=row.shard_hbm_gib, cpu_milli=row.shard_cpu_milli, memory_mib=row.shard_memory_mib,
            power_w=row.shard_power_w, accelerator_models=tuple(row.shard_accelerator_models or ()) or None,
        ),
        locality=row.locality.value, spread=spread, priority=row.priority, preemptible=row.preemptible,
    )


def spec_columns(spec: d.DeploymentSpec) -> dict[str, object]:
    """The deployment columns (by attribute name) a spec sets."""
    return {
        "name": spec.name, "tenant_id": spec.tenant,
        "replicas": spec.replicas, "min_replicas": spec.min_replicas, "shards_per_replica": spec.shards_per_replica,
        "shard_accelerators": spec.shard.accelerators, "shard_accelerator_milli": spec.shard.accelerator_milli,
        "shard_hbm_gib": spec.shard.hbm_gib, "shard_cpu_milli": spec.shard.cpu_milli,
        "shard_memory_mib": spec.shard.memory_mib, "shard_power_w": spec.shard.power_w,
        "shard_accelerator_models": list(spec.shard.accelerator_models or ()),
        "locality": m.Domain(spec.locality),
        "spread_domain": m.Domain(spec.spread.domain) if spec.spread else None,
        "spread_max_per_domain": spec.spread.max_per_domain if spec.spread else None,
        "priority": spec.priority, "preemptible": spec.preemptible,
    }


def new_deployment_columns(spec: d.DeploymentSpec, at: datetime) -> dict[str, object]:
    """A new deployment's columns (by attribute name): the spec's, PENDING, nothing placed, its
    first revision, created `at`."""
    return {**spec_columns(spec), "phase": m.DeploymentPhase.PENDING, "reasons": [], "generation": 0,
            "resource_version": 1, "template_revision": 1, "revision_specs": {}, "failures": 0,
            "created_at": at, "updated_at": at}


def new_deployment_row(spec: d.DeploymentSpec) -> m.Deployment:
    return m.Deployment(**new_deployment_columns(spec, m.utcnow()), placements=[])


def new_deployment_view(columns: dict[str, object]) -> d.DeploymentView:
    """`deployment_view` of the row inserted with `columns` (`new_deployment_columns`), which has
    no placements yet: the row as it reads back (`deployment_spec`: no accelerator models is
    None, a spread needs its maximum), by the one reading of a row there is."""
    return deployment_view(SimpleNamespace(**columns), ())


async def insert_deployments(session: AsyncSession,
                             specs: Iterable[d.DeploymentSpec]) -> list[tuple[int, d.DeploymentView]]:
    """New deployments (as `new_deployment_row`) written in ONE INSERT statement; returns their
    ids and views, in order. No ORM rows: the ORM's flush wrote one statement per row on SQLite (to
    learn each id in order), and building the rows was most of a batch's own CPU; the ids are
    matched by (tenant, name), which is unique."""
    at = m.utcnow()
    specs = list(specs)
    if not specs:
        return []
    table = m.Deployment.__table__
    columns = [new_deployment_columns(spec, at) for spec in specs]
    ids = {(tenant, name): id_ for id_, tenant, name in await session.execute(
        insert(table).returning(table.c.id, table.c.tenant_id, table.c.name), columns)}
    return [(ids[(spec.tenant, spec.name)], new_deployment_view(written)) for spec, written in zip(specs, columns)]


def write_deployment_spec(row: m.Deployment, spec: d.DeploymentSpec) -> None:
    """The spec's fields onto the row (an update in place)."""
    for attribute, value in spec_columns(spec).items():
        setattr(row, attribute, value)


def _revision_doc(row: m.Deployment, revision: int) -> dict | None:
    """The interchange spec of an older revision still running (None: the current one)."""
    return None if revision == row.template_revision else (row.revision_specs or {}).get(str(revision))


def _outgoing(row: m.Deployment, p: m.Placement) -> bool:
    return p.revision != row.template_revision or bool(p.node is not None and p.node.draining)


def _replica_counts(row: m.Deployment | DeploymentColumns,
                    placements: Iterable[m.Placement | PlacementColumns] | None = None) -> ReplicaCounts:
    placements = row.placements if placements is None else list(placements)
    sizes = {p.replica: int(doc["shards_per_replica"]) for p in placements
             if (doc := _revision_doc(row, p.revision)) is not None}
    return replica_counts(row.shards_per_replica, ((p.replica, p.phase) for p in placements), sizes)


async def quarantine_deployment(session: AsyncSession, key: str, reason: str) -> set[str]:
    """Set a deployment (by key, `TENANT/NAME`) aside: phase QUARANTINED with the reason, its
    shards released. Returns the nodes whose assignment sets changed."""
    row = await get_deployment(session, *d.split_deployment_key(key))
    if row is None or row.phase in (m.DeploymentPhase.DELETING, m.DeploymentPhase.QUARANTINED):
        return set()
    await will_move_generation(session)  # before its rows (PostgreSQL's lock order: store/changes.py)
    await _lock_placements(session, m.Placement.deployment_id == row.id)
    nodes = {p.node_id for p in row.placements}
    row.placements.clear()
    row.phase = m.DeploymentPhase.QUARANTINED
    row.reasons = [{"code": "QUARANTINED", "message": reason, "scope": ""}]
    row.generation = row.generation + 1
    await bump_node_assignment_generations(session, nodes)
    await bump_cluster_generation(session, ClusterChange.deployment(key))
    record_event(session, actor="controller", kind="deployment.quarantined", object_kind="deployment",
                 object_id=key, message=reason)
    await audit.append(session, [audit.AuditRecord(
        actor="controller", action="deployment.quarantined", role="controller", tenant=row.tenant_id,
        object_kind="deployment", object_id=key, detail={"reason": reason, "released_on_nodes": sorted(nodes)})])
    return nodes


async def release_quarantined(session: AsyncSession, row: m.Deployment) -> None:
    """Delete a quarantined deployment's row, and the shards it may still hold, for a submit of its
    name (a fresh start: the caller inserts the new row after this). Logged as a change of the
    deployment (`ClusterChange.deployment`): the isolation watchdog's view reads its key again and
    forgets the old row and its shards; a reconciler's cache finds an arrival not read yet."""
    await will_move_generation(session)  # before its rows (PostgreSQL's lock order: store/changes.py)
    nodes = {p.node_id for p in row.placements}
    await session.delete(row)
    await session.flush()
    await bump_node_assignment_generations(session, nodes)
    await bump_cluster_generation(session, ClusterChange.deployment(d.deployment_key(row.tenant_id, row.name)))


def implied_phase(row: m.Deployment | DeploymentColumns,
                  placements: Sequence[m.Placement | PlacementColumns] | None = None) -> m.DeploymentPhase:
    """The phase its stored placements (or `placements`, for a row read without the ORM) imply
    (domain/phases' rule; DELETING and FAILED are sticky)."""
    if row.phase is m.DeploymentPhase.QUARANTINED:
        return row.phase  # sticky until it is submitted again or deleted
    return m.DeploymentPhase(deployment_phase(
        row.replicas, _replica_counts(row, placements), deleting=row.phase is m.DeploymentPhase.DELETING,
        failed=row.phase is m.DeploymentPhase.FAILED, failing=bool(restarts.failure_reasons(row.reasons or ())),
        min_replicas=row.min_replicas))


def clear_failures(row: m.Deployment) -> None:
    """A fresh start for a deployment whose shards failed (its spec changed): failures in a row
    forgotten, and a FAILED deployment placed again (domain/restarts.py)."""
    row.failures, row.last_failure_at, row.restart_after = 0, None, None
    if row.phase is m.DeploymentPhase.FAILED:
        row.phase = m.DeploymentPhase.PENDING
        row.phase = implied_phase(row)


_NOTHING_PLACED = replica_counts(1, ())


def deployment_view(row: m.Deployment | DeploymentColumns,
                    placements: Sequence[m.Placement | PlacementColumns] | None = None) -> d.DeploymentView:
    """What callers read of a deployment: of a loaded ORM row with its placements (and their
    nodes), or of a row's columns with the placements given (`deployments_named`,
    `new_deployment_view`): one reading of a row for both."""
    placed = row.placements if placements is None else placements
    counts = updated = _NOTHING_PLACED  # nothing placed (a new or pending deployment): nothing to count
    shard_views: tuple[d.ShardPlacementView, ...] = ()
    outgoing_replicas = 0
    if placed:
        counts = _replica_counts(row, placed)
        shard_views = tuple(
            d.ShardPlacementView(
                replica=p.replica, shard=p.shard, node=p.node_id, rack=p.node.rack_id if p.node else "",
                accelerator_indices=tuple(p.accelerator_indices or ()),
                accelerator_milli=placement_milli(row, p) if placement_milli(row, p) < 1000 else 0,
                phase=p.phase.value, message=p.message or "", revision=p.revision, outgoing=_outgoing(row, p),
            )
            for p in sorted(placed, key=lambda p: (p.replica, p.shard))
        )
        current = [p for p in placed if not _outgoing(row, p)]
        outgoing_replicas = len({p.replica for p in placed if _outgoing(row, p)})
        updated = counts if len(current) == len(placed) else _replica_counts(row, current)  # none outgoing: the same
    return d.DeploymentView(
        spec=deployment_spec(row), phase=row.phase.value, generation=row.generation,
        placed_replicas=counts.placed, running_replicas=counts.running, placements=shard_views,
        reasons=tuple(d.ReasonView(r.get("code", ""), r.get("message", ""), r.get("scope") or "")
                      for r in row.reasons or ()),
        created_at=row.created_at, updated_at=row.updated_at,
        resource_version=row.resource_version, revision=row.template_revision,
        updated_replicas=updated.running, outgoing_replicas=outgoing_replicas,
    )


# --- placements ------------------------------------------------------------------------------
async def placements_of_deployments(session: AsyncSession, keys: Iterable[str]) -> list[tuple[m.Placement, str]]:
    """Every placement of the deployments with these keys (`TENANT/NAME`), with its deployment's key."""
    wanted = set(keys)
    rows = await session.execute(
        select(m.Placement, m.Deployment.tenant_id, m.Deployment.name).join(m.Deployment)
        .where(_named_as_any(session, wanted))
    )
    return [(placement, key) for placement, tenant, name in rows
            if (key := d.deployment_key(tenant, name)) in wanted]


@dataclass(frozen=True, slots=True)
class ShardState:
    """One placement as an agent's report is judged against (plain columns, no row loaded), or as a
    report says it is now (`write_reported_shards`)."""

    key: str  # its deployment's, TENANT/NAME
    replica: int
    shard: int
    node_id: str
    generation: int
    phase: m.ShardPhase
    message: str
    placement_id: int  # the row's id


async def shard_states(session: AsyncSession, keys: Iterable[str]) -> list[ShardState]:
    """Every placement of the deployments with these keys (`TENANT/NAME`), as `ShardState`s: one
    statement of plain columns, for the agents' report flush to find which reports change anything
    before it loads those deployments whole."""
    wanted = set(keys)
    rows = await session.execute(
        select(m.Deployment.tenant_id, m.Deployment.name, m.Placement.replica, m.Placement.shard,
               m.Placement.node_id, m.Placement.generation, m.Placement.phase, m.Placement.message,
               m.Placement.id)
        .select_from(m.Placement).join(m.Deployment)
        .where(_named_as_any(session, wanted)))
    return [ShardState(key, replica, shard, node_id, generation or 0, phase, message or "", placement_id)
            for tenant, name, replica, shard, node_id, generation, phase, message, placement_id in rows
            if (key := d.deployment_key(tenant, name)) in wanted]


# The agents' report flush, without the ORM: the placements reports changed and the deployments
# whose phase or reasons followed, each kind in one executemany by id.
_REPORTED_SHARD = rowcount_unread(
    update(_PLACEMENTS)
    .where(_PLACEMENTS.c.id == bindparam("placement"), _PLACEMENTS.c.node_id == bindparam("at_node"),
           _PLACEMENTS.c.generation <= bindparam("report_generation"))
    .values(phase=bindparam("new_phase"), message=bindparam("new_message"), updated_at=bindparam("at")))
_REPORTED_DEPLOYMENT = rowcount_unread(
    update(_DEPLOYMENTS)
    .where(_DEPLOYMENTS.c.id == bindparam("deployment"), _DEPLOYMENTS.c.phase == bindparam("was_phase"))
    .values(phase=bindparam("new_phase"), reasons=bindparam("new_reasons"), updated_at=bindparam("at")))


async def write_reported_shards(session: AsyncSession, shards: Sequence[ShardState], at: datetime) -> None:
    """These placements (by id) as reports say they are now: their phase and message, updated
    `at`, in one executemany in ascending id (as a plan commit locks them: the lock order,
    store/changes.py); each only while it is still on the node that reported it (`node_id`) and of
    the generation the report answers (`generation`) or an older one (the report's test,
    `agents._changes`, as of the write): a placement a plan commit moved since the report was
    judged keeps what that commit wrote, and one it removed (or placed again: a row of its own)
    is not written."""
    if shards:
        await session.execute(_REPORTED_SHARD, [
            {"placement": r.placement_id, "at_node": r.node_id, "report_generation": r.generation,
             "new_phase": r.phase, "new_message": r.message, "at": at}
            for r in sorted(shards, key=lambda r: r.placement_id)])


async def write_deployment_phases(
        session: AsyncSession,
        deployments: Sequence[tuple[int, m.DeploymentPhase, m.DeploymentPhase, list[dict[str, Any]]]],
        at: datetime) -> None:
    """The phase and reasons of these deployments (id, the phase they were read in, the new phase,
    the new reasons), updated `at`, in one executemany; each only while still in the phase it was
    read in: a deletion or a quarantine committed since the read is not undone."""
    if deployments:
        await session.execute(_REPORTED_DEPLOYMENT, [
            {"deployment": dep_id, "was_phase": was, "new_phase": phase, "new_reasons": reasons, "at": at}
            for dep_id, was, phase, reasons in deployments])


def view_as_written(row: Row[Any], placements: Sequence[PlacementColumns], **written: object) -> d.DeploymentView:
    """The view of a deployment read without the ORM (`deployments_named`) with its `placements`
    and the columns `written` (by attribute name) as they are now."""
    return deployment_view(SimpleNamespace(**(row._asdict() | written)) if written else row, placements)


async def bump_node_assignment_generations(session: AsyncSession, node_ids: Iterable[str]) -> None:
    ids = set(node_ids)
    if ids:
        await session.execute(  # in ascending id, as a plan commit and a report flush lock nodes
            update(m.Node).where(any_of_in_order(session, m.Node.id, ids, deletes=False))
            .values(assignment_generation=m.Node.assignment_generation + 1)
        )


async def remove_placements_on_node(session: AsyncSession, node_id: str, *, now: datetime | None = None) -> set[str]:
    """Delete every placement on a node (drain), stopping their usage meters; returns {node_id}
    if its set changed."""
    deployment_ids = set(await session.scalars(
        select(m.Placement.deployment_id).where(m.Placement.node_id == node_id)
    ))
    if not deployment_ids:
        return set()
    # each table's rows in ascending id (the lock order: store/changes.py)
    await session.execute(delete(m.Placement).where(
        in_order(dialect_of(session), m.Placement.node_id == node_id, m.Placement.id, deletes=True)))
    await stop_intervals_on_node(session, node_id, now or m.utcnow())
    await _after_placements_removed(session, deployment_ids, [node_id])
    return {node_id}


async def _after_placements_removed(session: AsyncSession, deployment_ids: Iterable[int], node_ids: Iterable[str]) -> None:
    """The generations of the deployments and the assignment generations of the nodes whose
    placements were deleted, after those (each table's rows in ascending id: the lock order)."""
    await session.execute(
        update(m.Deployment).where(any_of_in_order(session, m.Deployment.id, set(deployment_ids), deletes=False))
        .values(generation=m.Deployment.generation + 1)
    )
    await bump_node_assignment_generations(session, node_ids)


async def _lock_placements(session: AsyncSession, where: ColumnElement[bool]) -> None:
    """PostgreSQL: the placements `where` matches locked in ascending id (`FOR UPDATE`), before the
    ORM deletes them: its flush writes a deployment's row before it deletes the deployment's
    placements (a parent's UPDATE before its children's DELETEs), the other order than a plan
    commit's and a report flush's (the lock order: store/changes.py)."""
    if dialect_of(session) == POSTGRESQL:
        await session.execute(locked_in_order(where, m.Placement.id, deletes=True))


async def release_placements_beyond(session: AsyncSession, accelerators: Mapping[str, int]) -> dict[str, list[list[object]]]:
    """Delete the placements of nodes that registered with fewer accelerators (`accelerators`: how
    many each has now) on the indices they no longer have, stopping their usage meters; returns
    them by node as [TENANT/NAME, replica, shard] (a node that lost none left out).

    In a report flush's table order (PostgreSQL's lock order: store/changes.py): every placement
    of those nodes locked first, in ascending id, then read (one a plan commit moved or removed
    while this waited for it is seen as that commit left it, not released from where it was); the
    released ones deleted (the isolation trigger), then their deployments', then their nodes' rows.
    Node by node, a node's row came before the next node's placements: a flush holding one of
    those and waiting for that node's heartbeat row waited for this, and this for it."""
    nodes = sorted(accelerators)
    if not nodes:
        return {}
    on_nodes = any_of(session, m.Placement.node_id, nodes)
    await _lock_placements(session, on_nodes)
    rows = await session.execute(
        select(m.Placement.id, m.Placement.node_id, m.Placement.deployment_id, m.Placement.replica, m.Placement.shard,
               m.Placement.accelerator_indices, m.Deployment.tenant_id, m.Deployment.name)
        .join(m.Deployment).where(on_nodes)
        .order_by(m.Placement.node_id, m.Deployment.name, m.Placement.replica, m.Placement.shard))
    gone = [row for row in rows if any(i >= accelerators[row.node_id] for i in row.accelerator_indices or ())]
    if not gone:
        return {}
    ids = sorted(row.id for row in gone)  # locked above, in this order
    await session.execute(delete(m.Placement).where(any_of(session, m.Placement.id, ids)))
    await stop_intervals(session, ids, m.utcnow())
    await _after_placements_removed(session, {row.deployment_id for row in gone}, {row.node_id for row in gone})
    released: dict[str, list[list[object]]] = defaultdict(list)
    for row in gone:
        released[row.node_id].append([d.deployment_key(row.tenant_id, row.name), row.replica, row.shard])
    return dict(released)


ASSIGNMENT_READ_CHUNK = 500  # nodes per query of `assignment_sets` (bound on the IN list)
ASSIGNED_SPECS_KEPT = 4096  # distinct (shard spec, shards per replica) pairs `_assigned_spec` keeps


@lru_cache(maxsize=ASSIGNED_SPECS_KEPT, typed=True)
def _assigned_spec(revision: int, older_specs: str | None, accelerators: int, accelerator_milli: int, hbm_gib: float,
                   cpu_milli: int, memory_mib: int, power_w: float, models: str,
                   shards_per_replica: int) -> tuple[d.ShardSpec, int]:
    """(shard spec, shards per replica) of a placement of `revision`: of the deployment's current
    columns (`models`: its accelerator models' JSON text), or of `older_specs` (the JSON text of
    its `revision_specs`, given only when `revision` is not the current one) where it holds that
    revision. Keyed by everything it is built of, not by deployment id and revision: a revision's
    spec is written once, but an id is not (one process may open many databases; SQLite gave a
    deleted last row's id to the next deployment until migration 0024), so a cached value is
    never stale."""
    doc = (json.loads(older_specs) or {}).get(str(revision)) if older_specs is not None else None
    if doc is not None:
        return shard_spec_from_dict(doc["shard"]), doc.get("shards_per_replica", shards_per_replica)
    listed = json.loads(models)
    return d.ShardSpec(accelerators=accelerators, accelerator_milli=accelerator_milli, hbm_gib=hbm_gib,
                       cpu_milli=cpu_milli, memory_mib=memory_mib, power_w=power_w,
                       accelerator_models=tuple(listed or ()) or None), shards_per_replica


@lru_cache(maxsize=ASSIGNED_SPECS_KEPT)
def _indices(text: str) -> tuple[int, ...]:
    """A placement's accelerator indices from their JSON text (a few distinct lists repeat)."""
    return tuple(json.loads(text) or ())


def _assignment_queries(dialect: str) -> tuple[Select, Select]:
    """`assignment_sets`' two queries for `dialect`, their node list named `nodes`: the nodes'
    assignment generations; their placements as plain columns of the tables (no ORM entity, no
    ORM result processing) in a set's order, the JSON columns as text (decoded once per distinct
    value: `_assigned_spec`, `_indices`), a deployment's `revision_specs` only on placements of an
    older revision."""
    p, dep, node = _PLACEMENTS.c, _DEPLOYMENTS.c, _NODES.c
    generations = select(node.id, node.assignment_generation).where(any_of_named(dialect, node.id, "nodes"))
    placements = (
        select(p.node_id, dep.name, dep.tenant_id, p.replica, p.shard, cast(p.accelerator_indices, Text),
               p.accelerator_milli, p.generation, dep.generation, p.revision,
               case((p.revision != dep.template_revision, cast(dep.revision_specs, Text)), else_=None),
               dep.shard_accelerators, dep.shard_accelerator_milli, dep.shard_hbm_gib, dep.shard_cpu_milli,
               dep.shard_memory_mib, dep.shard_power_w, cast(dep.shard_accelerator_models, Text),
               dep.shards_per_replica)
        .select_from(_PLACEMENTS.join(_DEPLOYMENTS, p.deployment_id == dep.id))
        .where(any_of_named(dialect, p.node_id, "nodes"))
        .order_by(p.node_id, dep.name, dep.tenant_id, p.replica, p.shard))
    return generations, placements


_ASSIGNMENT_QUERIES = {dialect: _assignment_queries(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def assignment_sets(session: AsyncSession, node_ids: Iterable[str]) -> dict[str, d.AssignmentSet]:
    """The complete AssignmentSet of each of these nodes that exists, in two queries per
    `ASSIGNMENT_READ_CHUNK` nodes (their assignment generations; their placements with their
    deployments' columns). A node's assignments are in (deployment name, tenant, replica, shard)
    order; the shard specs are built once per distinct spec in the process (`_assigned_spec`)."""
    ids = sorted(set(node_ids))
    sets: dict[str, d.AssignmentSet] = {}
    generations_query, placements_query = _ASSIGNMENT_QUERIES[dialect_of(session)]
    for start in range(0, len(ids), ASSIGNMENT_READ_CHUNK):
        chunk = {"nodes": ids[start:start + ASSIGNMENT_READ_CHUNK]}
        generations = {node_id: generation for node_id, generation in await session.execute(generations_query, chunk)}
        assignments: dict[str, list[d.Assignment]] = defaultdict(list)
        for (node_id, name, tenant, replica, shard, indices, placed_milli, generation, dep_generation, revision,
             older, accelerators, *spec_columns) in await session.execute(placements_query, chunk):
            spec, shards_per_replica = _assigned_spec(revision if older is not None else 0, older, accelerators,
                                                      *spec_columns)
            milli = shard_milli(accelerators, placed_milli)
            assignments[node_id].append(d.Assignment(
                deployment=name, tenant=tenant, replica=replica, shard=shard, shards_per_replica=shards_per_replica,
                accelerator_indices=_indices(indices), accelerator_milli=milli if milli < 1000 else 0, spec=spec,
                generation=generation or dep_generation,
            ))
        for node_id, node_generation in generations.items():
            sets[node_id] = d.AssignmentSet(node_id=node_id, generation=node_generation,
                                            assignments=tuple(assignments.get(node_id, ())))
    return sets
