"""Nodes: reads for listings and liveness, health and cordon writes, heartbeats, capacities, views."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, and_, bindparam, null, or_, func, select, update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload
from sqlalchemy.orm.attributes import flag_modified, set_committed_value

from controller.store import models as m
from controller.store.inlist import any_of
from controller.store.marks import rowcount_unread
from controller.domain import values as d
from controller.domain.paging import PageBounds
from controller.store.repositories.common import _paged

if TYPE_CHECKING:  # usage's free_on_ready_nodes reads stored_faults: no import cycle at run time
    from controller.store.repositories.usage import ClusterUsage


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


def clear_eviction(row: m.Node) -> None:
    """The node's work no longer evicted (its agent is back), written whatever was read: an
    eviction committed after the row was read (the node lifecycle's own transaction) kept its
    time where the flush of a column read as NULL wrote nothing, and the node was up and evicted
    at once: its next outage counted as evicted at the down grace, and it was never evicted again."""
    row.evicted_at = None
    flag_modified(row, "evicted_at")


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


_RACKS, _ROWS = m.Rack.__table__, m.Row.__table__
# The tables' own columns (a Core statement: no ORM result processing, which was ~14 ms of the
# event loop's CPU at 16,384 nodes against ~5 ms: docs/benchmarks.md, `capthread`).
_NODE_CAPACITIES = (
    select(_NODES.c.id, _NODES.c.rack_id, _RACKS.c.row_id, _ROWS.c.zone_id, _NODES.c.accelerator_model,
           _NODES.c.accelerators, _NODES.c.hbm_gib, _NODES.c.idle_power_w, _RACKS.c.power_budget_w,
           _ROWS.c.power_budget_w)
    .select_from(_NODES.join(_RACKS, _NODES.c.rack_id == _RACKS.c.id).join(_ROWS, _RACKS.c.row_id == _ROWS.c.id))
    .order_by(_NODES.c.id))


async def node_capacities(session: AsyncSession) -> Sequence[Row[tuple[Any, ...]]]:
    """(node, rack, row, zone, accelerator model, accelerators, HBM GiB, idle power W, rack budget W,
    row budget W) of every node, in id order: plain columns, for `usecases.capacity.NodeCapacity`."""
    return (await session.execute(_NODE_CAPACITIES)).all()


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
        cordoned=bool(row.cordoned), draining=bool(row.draining),
        evicted=row.health is m.NodeHealth.DOWN and row.evicted_at is not None,
        failed_accelerators=stored_faults(row.failed_accelerators, row.accelerators),
    )


async def set_node_cordoned(session: AsyncSession, node_id: str, cordoned: bool) -> None:
    await session.execute(update(m.Node).where(m.Node.id == node_id).values(cordoned=cordoned))


async def move_node_flags(session: AsyncSession, row: m.Node, cordoned: bool, draining: bool) -> bool:
    """Set the node's cordoned and draining flags, both, from those `row` holds as read (a compare
    and set: PostgreSQL judges it on the row a concurrent writer committed, SQLite under its
    writer); False when another writer changed them since, and nothing is written. `row` holds
    what was written."""
    result = await session.execute(update(m.Node).where(
        m.Node.id == row.id, m.Node.cordoned == row.cordoned, m.Node.draining == row.draining)
        .values(cordoned=cordoned, draining=draining).execution_options(synchronize_session=False))
    if not result.rowcount:
        return False
    set_committed_value(row, "cordoned", cordoned)
    set_committed_value(row, "draining", draining)
    return True


async def reread_node_flags(session: AsyncSession, row: m.Node) -> bool:
    """`row`'s cordoned and draining flags read again (after `move_node_flags` found them changed);
    False when the node was deleted since."""
    try:
        await session.refresh(row, ["cordoned", "draining"])
    except InvalidRequestError:  # ObjectDeletedError: its row is gone
        return False
    return True


def set_failed_accelerators(row: m.Node, faults: Sequence[d.AcceleratorFault]) -> None:
    """The node's failed accelerators as `stored_faults` reads them back: SQL NULL for none (not
    JSON null: `failed_accelerators` reads the nodes with some by IS NOT NULL)."""
    row.failed_accelerators = [{"index": f.index, "reason": f.reason} for f in faults] or null()


def stored_faults(value: list[dict[str, Any]] | None,
                  accelerators: int | None = None) -> tuple[d.AcceleratorFault, ...]:
    """A node's `failed_accelerators` column as faults, by index (NULL: none); with `accelerators`
    (the node's count), only those it still has: one registered since with fewer lost the others."""
    faults = (d.AcceleratorFault(int(f["index"]), str(f.get("reason", ""))) for f in value or ())
    return tuple(f for f in faults if accelerators is None or f.index < accelerators)


async def failed_accelerators(session: AsyncSession) -> dict[str, tuple[d.AcceleratorFault, ...]]:
    """The nodes with failed accelerators (the column not NULL: a few), and those accelerators."""
    rows = await session.execute(select(m.Node.id, m.Node.failed_accelerators)
                                 .where(m.Node.failed_accelerators.is_not(None)))
    return {node_id: faults for node_id, value in rows if (faults := stored_faults(value))}
