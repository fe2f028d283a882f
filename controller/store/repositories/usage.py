"""What the cluster's placements use: accelerators and milli-units by node and tenant, power by rack."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, Row, and_, case, func, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from controller.store import models as m
from controller.store.inlist import any_of
from controller.store.metering import shard_milli
from controller.store.partitions import partitions
from controller.store.repositories.nodes import stored_faults
from controller.domain import values as d


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
    """Accelerator milli-units one placed shard holds: by its deployment's shard, or for a shard
    of an older revision (a rollout's outgoing replica) by its own accelerator indices."""
    if placement.revision != dep.template_revision:
        return shard_milli(len(placement.accelerator_indices or ()), placement.accelerator_milli)
    return shard_milli(dep.shard_accelerators, placement.accelerator_milli)


def revision_power_w(dep: Any, revision: int) -> float | None:
    """The power a whole accelerator of `revision`'s shard draws when that is an older revision of
    `dep` whose spec is kept (`revision_specs`, interchange form); None otherwise: the current
    spec's (`dep.shard_power_w`) stands. What `SHARD_POWER_W` reads in SQL."""
    if revision == dep.template_revision:
        return None
    shard = ((dep.revision_specs or {}).get(str(revision)) or {}).get("shard") or {}
    power = shard.get("power_w")
    return None if power is None else float(power)


def placement_power_w(dep: m.Deployment, placement: m.Placement) -> float:
    """The watts one placed shard draws: its revision's power a whole accelerator (`revision_power_w`,
    else its deployment's) by the milli-units it holds (`placement_milli`)."""
    power = revision_power_w(dep, placement.revision)
    return (dep.shard_power_w or 0.0 if power is None else power) * placement_milli(dep, placement) / 1000.0


def _milli(accelerators: Any, milli: Any = m.Placement.accelerator_milli) -> Any:
    """`metering.shard_milli` in SQL, of a shard of `accelerators` whole accelerators, or of
    `milli` of one (a placement's, by default)."""
    return case((and_(accelerators == 1, milli != 0, milli < 1000), milli), else_=1000 * accelerators)


# `placement_milli` in SQL, for sums over many placements (tests/store/test_usage.py holds them
# equal). An older revision's shard counted at the current spec's size misjudged a tenant's caps
# and reservation during a rollout (found by exploratory testing): its indices are read for it alone.
PLACEMENT_MILLI = case(
    (m.Placement.revision != m.Deployment.template_revision,
     _milli(func.json_array_length(m.Placement.accelerator_indices))),
    else_=_milli(m.Deployment.shard_accelerators),
)


class _RevisionPowerW(FunctionElement[float]):
    """The `power_w` of an older revision's shard spec, read from its deployment's
    `revision_specs` (interchange form, keyed by the revision as text) for the placement's
    revision: NULL when that revision's spec is not kept."""

    type = Float()
    inherit_cache = True


@compiles(_RevisionPowerW, "sqlite")
def _revision_power_w_sqlite(element: _RevisionPowerW, compiler: Any, **kw: Any) -> str:
    specs, revision = (compiler.process(c, **kw) for c in element.clauses)
    return f"json_extract({specs}, '$.\"' || {revision} || '\".shard.power_w')"


@compiles(_RevisionPowerW, "postgresql")
def _revision_power_w_postgresql(element: _RevisionPowerW, compiler: Any, **kw: Any) -> str:
    specs, revision = (compiler.process(c, **kw) for c in element.clauses)
    return f"CAST((({specs}) -> CAST({revision} AS TEXT) -> 'shard' ->> 'power_w') AS DOUBLE PRECISION)"


# The watts a whole accelerator of a placed shard draws: its deployment's shard power, or for an
# older revision's shard (a rollout in flight) that revision's (the current spec's when that
# revision's is not kept).
SHARD_POWER_W = case(
    (m.Placement.revision != m.Deployment.template_revision,
     func.coalesce(_RevisionPowerW(m.Deployment.revision_specs, m.Placement.revision), m.Deployment.shard_power_w)),
    else_=m.Deployment.shard_power_w,
)
# The watts one placed shard draws (its revision's shard power, by the share it holds), in SQL. An
# older revision's shard counted at the current spec's power misjudged a tenant's power and the
# racks' during a rollout that changed it.
_PLACED_POWER_W = SHARD_POWER_W * PLACEMENT_MILLI / 1000.0
# The accelerator milli-units of every placed shard, summed by the database (one row).
_PLACED_MILLI = select(func.sum(PLACEMENT_MILLI)).select_from(m.Placement).join(m.Deployment)
# Every placed shard summed by the database per tenant: (tenant, milli, watts), a row a tenant.
_PLACED_BY_TENANT = (
    select(m.Deployment.tenant_id, func.sum(PLACEMENT_MILLI).label("milli"),
           func.sum(_PLACED_POWER_W).label("watts"))
    .select_from(m.Placement).join(m.Deployment).group_by(m.Deployment.tenant_id))


async def rack_power(session: AsyncSession, racks: Collection[str] | None = None,
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Per rack, summed by the database: the power placed on it, as the solver counts it against
    the budget (the idle power of its nodes but those down with their work evicted, plus every
    placed shard's power on its nodes, down ones included: still placed) and the power its nodes
    not down last reported. Two queries, a row per rack each. A node down, its work not evicted
    yet, was left out: the gauge showed room the scheduler refused to use (`snapshot.node_state`).
    `racks`: those racks' alone, their nodes' and their placements' rows (by the indexes on the
    rack and the node); None, every rack's."""
    used: dict[str, float] = defaultdict(float)
    draw: dict[str, float] = {}
    not_down = m.Node.health != m.NodeHealth.DOWN
    idle = (select(m.Node.rack_id, func.sum(m.Node.idle_power_w),
                   func.sum(case((not_down, m.Node.power_draw_w), else_=0.0)))
            .where(or_(not_down, m.Node.evicted_at.is_(None))).group_by(m.Node.rack_id))
    shards = (select(m.Node.rack_id, func.sum(_PLACED_POWER_W))
              .select_from(m.Placement).join(m.Deployment).join(m.Node).group_by(m.Node.rack_id))
    if racks is not None:
        on_racks = any_of(session, m.Node.rack_id, sorted(set(racks)))
        idle, shards = idle.where(on_racks), shards.where(on_racks)
    for rack_id, idle_w, draw_w in await session.execute(idle):
        used[rack_id] += float(idle_w or 0.0)
        draw[rack_id] = float(draw_w or 0.0)
    for rack_id, watts in await session.execute(shards):
        used[rack_id] += float(watts or 0.0)
    return dict(used), draw


async def tenant_usage(session: AsyncSession, tenant_ids: Iterable[str]) -> dict[str, d.Usage]:
    """What these tenants' placed shards use (accelerators, watts), summed by the database per
    tenant: a row a tenant. A tenant's view (`get tenant`, a page of `get tenants`, a contract's
    update) read `cluster_usage`, a row per (node, tenant) of the whole cluster, ~30 ms of the
    event loop at 4,096 nodes and 10,000 placements (docs/benchmarks.md, `nodeusage`)."""
    ids = sorted(set(tenant_ids))
    if not ids:
        return {}
    summed = _PLACED_BY_TENANT.where(any_of(session, m.Deployment.tenant_id, ids))
    return {tenant: d.Usage(int(milli) / 1000.0, float(power))
            for tenant, milli, power in await session.execute(summed)}


# A tenant's reservation, when it has one (a null or 0 reserves nothing).
_RESERVES = m.Tenant.reserved_accelerators > 0


async def reserved_usage(session: AsyncSession) -> dict[str, tuple[float, float]]:
    """Per tenant with a reservation, by id: (accelerators reserved, accelerators its placed shards
    hold), in one statement, a row a reserving tenant; what an update's reservation check compares
    (it read `cluster_usage` and every tenant's row)."""
    held = _PLACED_BY_TENANT.join(m.Tenant).where(_RESERVES).subquery()
    rows = await session.execute(select(m.Tenant.id, m.Tenant.reserved_accelerators, held.c.milli)
                                 .outerjoin(held, held.c.tenant_id == m.Tenant.id).where(_RESERVES)
                                 .order_by(m.Tenant.id))
    return {tenant: (float(reserved), int(milli or 0) / 1000.0) for tenant, reserved, milli in rows}


# The milli-units one shard of a deployment's current spec holds (`metering.shard_milli`), in SQL.
_SPEC_SHARD_MILLI = _milli(m.Deployment.shard_accelerators, m.Deployment.shard_accelerator_milli)
# The phases whose unplaced replicas wait for no capacity: a deletion, and a deployment set aside
# until its owner resubmits (quarantined) or updates it (failed). Neither admission's waiting
# asks nor the reservation-short gauge count them.
WAITS_FOR_NO_CAPACITY = (m.DeploymentPhase.DELETING, m.DeploymentPhase.QUARANTINED, m.DeploymentPhase.FAILED)
_UNPREEMPTIBLE = and_(m.Deployment.preemptible.is_(False), m.Deployment.phase.not_in(WAITS_FOR_NO_CAPACITY))


def _waiting_milli(*by: Any, where: Any = true()) -> Any:
    """The accelerator milli-units the non-preemptible deployments (`where` says which) ask and do
    not hold yet (each deployment's asked shards less what its placed ones hold, never below 0),
    summed by the database per `by` (columns of the deployment) as `milli`."""
    placed = (select(m.Placement.deployment_id, func.sum(PLACEMENT_MILLI).label("milli"))
              .join(m.Deployment).where(_UNPREEMPTIBLE, where).group_by(m.Placement.deployment_id).subquery())
    asked = m.Deployment.replicas * m.Deployment.shards_per_replica * _SPEC_SHARD_MILLI
    held = func.coalesce(placed.c.milli, 0)
    short = case((asked > held, asked - held), else_=0)
    return (select(*by, func.sum(short).label("milli")).outerjoin(placed, placed.c.deployment_id == m.Deployment.id)
            .where(_UNPREEMPTIBLE, where).group_by(*by))


async def waiting_unpreemptible(session: AsyncSession) -> dict[str, float]:
    """Per tenant with any, the accelerators its non-preemptible deployments ask and do not hold
    yet (`_waiting_milli`), in one statement: accepted work that takes free capacity once placed
    (the reservation check at admission judged each ask against free capacity as if nothing else
    waited: two asks of 4 went where one of 8 was refused). A capped tenant's may be more than
    its caps let it take (`cap_room`)."""
    rows = await session.execute(_waiting_milli(m.Deployment.tenant_id))
    return {tenant: int(milli) / 1000.0 for tenant, milli in rows if milli}


@dataclass
class CapRoom:
    """What a capped tenant's caps leave beyond what its placed shards use, never below 0
    (`accelerators` of its `max_accelerators`, watts of its `max_power_w`; None: no such cap),
    and with a power cap its waiting non-preemptible asks by the watts an accelerator of theirs
    draws (accelerators by `shard_power_w`): how many the watts left hold depends on those."""

    accelerators: float | None
    power_w: float | None
    waiting_by_power_w: dict[float, float] = field(default_factory=dict)


async def cap_room(session: AsyncSession) -> dict[str, CapRoom]:
    """Per tenant with a `max_accelerators` or a `max_power_w`, what its caps leave (`CapRoom`),
    in one statement (a row a capped tenant, or a row per watts an accelerator its waiting asks
    draw when it has a power cap): its waiting asks take no more once placed; the rest waits for
    its own work to end, not for free capacity."""
    capped = or_(m.Tenant.max_accelerators.is_not(None), m.Tenant.max_power_w.is_not(None))
    held = _PLACED_BY_TENANT.join(m.Tenant).where(capped).subquery()
    power_capped = select(m.Tenant.id).where(m.Tenant.max_power_w.is_not(None))
    waiting = _waiting_milli(m.Deployment.tenant_id, m.Deployment.shard_power_w,
                             where=m.Deployment.tenant_id.in_(power_capped)).subquery()
    rows = await session.execute(
        select(m.Tenant.id, m.Tenant.max_accelerators, m.Tenant.max_power_w, held.c.milli, held.c.watts,
               waiting.c.shard_power_w, waiting.c.milli)
        .outerjoin(held, held.c.tenant_id == m.Tenant.id).outerjoin(waiting, waiting.c.tenant_id == m.Tenant.id)
        .where(capped))
    rooms: dict[str, CapRoom] = {}
    for tenant, max_accelerators, max_power_w, milli, watts, power_w, waiting_milli in rows:
        room = rooms.get(tenant)
        if room is None:
            room = rooms[tenant] = CapRoom(
                None if max_accelerators is None else max(0.0, float(max_accelerators) - int(milli or 0) / 1000.0),
                None if max_power_w is None else max(0.0, float(max_power_w) - float(watts or 0.0)))
        if waiting_milli:
            room.waiting_by_power_w[float(power_w)] = int(waiting_milli) / 1000.0
    return rooms


# A node operators see as ready (`Node.state == "ready"`: `models.operator_state`), in SQL.
_READY = and_(m.Node.health == m.NodeHealth.UP, m.Node.cordoned.is_(False))


async def free_on_ready_nodes(session: AsyncSession) -> float:
    """The accelerators of the ready nodes less their failed ones and what every shard placed on
    them holds (milli/1000), summed by the database in one statement, and the few nodes with
    failed accelerators read as rows: what an update's reservation check calls free (it loaded
    every node as a row and `cluster_usage`'s row per (node, tenant) of the cluster). A failed
    accelerator holds no shard (`usecases/faults.py` releases them) and takes none, so it is not
    free. The sums are integers, divided once: the float nearest the exact figure (a sum of
    per-node floats was off by ~1e-10 at 4,096 nodes, enough to print 6694.405 as 6694.41 rather
    than 6694.4)."""
    nodes = select(func.sum(m.Node.accelerators)).where(_READY).scalar_subquery()
    placed = _PLACED_MILLI.join(m.Node).where(_READY).scalar_subquery()
    accelerators, milli = (await session.execute(select(nodes, placed))).one()
    failing = await session.execute(select(m.Node.failed_accelerators, m.Node.accelerators)
                                    .where(_READY, m.Node.failed_accelerators.is_not(None)))
    failed = sum(len(stored_faults(value, count)) for value, count in failing)
    return (1000 * (int(accelerators or 0) - failed) - int(milli or 0)) / 1000.0


# Every placed shard summed by the database per (node, tenant): a row per node and tenant on it.
_PLACED_BY_NODE_AND_TENANT = (
    select(m.Placement.node_id, m.Deployment.tenant_id, func.count(), func.sum(PLACEMENT_MILLI),
           func.sum(_PLACED_POWER_W))
    .join(m.Deployment).group_by(m.Placement.node_id, m.Deployment.tenant_id))


def _add_placed(usage: ClusterUsage, rows: Iterable[Row[Any]]) -> None:
    """`_PLACED_BY_NODE_AND_TENANT`'s rows added to `usage`."""
    for node_id, tenant_id, shards, milli, power in rows:
        milli, power = int(milli), float(power)
        usage.tenant_milli[tenant_id] += milli
        usage.tenant_power_w[tenant_id] += power
        usage.node_milli[node_id] += milli
        usage.node_shards[node_id] += shards
        usage.node_tenants[node_id].add(tenant_id)
        usage.node_tenant_milli[(node_id, tenant_id)] += milli


async def cluster_usage(session: AsyncSession) -> ClusterUsage:
    """Usage of every placed shard, plus the idle power of nodes that are not down.

    Placements are summed by the database per (node, tenant), power per rack (`rack_power`): a
    read returns at most one row per node and tenant on it, however many shards are placed.
    """
    usage = await power_usage(session)
    async for part in partitions(session, _PLACED_BY_NODE_AND_TENANT):
        _add_placed(usage, part)
    return usage


async def power_usage(session: AsyncSession, racks: Collection[str] | None = None) -> ClusterUsage:
    """The power placed per rack and per row (`rack_power_w`, `row_power_w`; the rest empty): what
    the topology view and the cluster summary show, without `cluster_usage`'s row per (node,
    tenant) of the whole cluster. `racks`: those racks' alone (`rack_power`; a topology apply's
    checks, usecases/topology.py), and a row's is then the sum over those of its racks: all of
    its power only when every one of them is among them."""
    usage = ClusterUsage()
    used, _ = await rack_power(session, racks)
    rows = select(m.Rack.id, m.Rack.row_id)
    if racks is not None:
        rows = rows.where(any_of(session, m.Rack.id, sorted(set(racks))))
    row_of = {rack_id: row_id for rack_id, row_id in await session.execute(rows)}
    for rack_id, watts in used.items():
        usage.rack_power_w[rack_id] += watts
        usage.row_power_w[row_of.get(rack_id, "")] += watts
    return usage


async def placed_milli(session: AsyncSession) -> int:
    """Accelerator milli-units every placed shard holds, summed by the database."""
    return int(await session.scalar(_PLACED_MILLI) or 0)


async def node_usage(session: AsyncSession, node_ids: Iterable[str]) -> ClusterUsage:
    """What placed shards use on these nodes only (per node, and per tenant on them): a node's
    view costs its own placements, not the cluster's (`cluster_usage` at 4,096 nodes and 10,000
    placements was ~33 ms of the event loop's CPU for `maiactl get node`, a cordon, or each page
    of `get nodes`: docs/benchmarks.md, `nodeusage`). No rack or row power."""
    usage = ClusterUsage()
    ids = sorted(set(node_ids))
    if ids:
        _add_placed(usage, await session.execute(
            _PLACED_BY_NODE_AND_TENANT.where(any_of(session, m.Placement.node_id, ids))))
    return usage
