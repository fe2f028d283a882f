"""Usage metering: who used how many accelerator-seconds and how much energy, where.

Every placed shard has one open `UsageInterval` while its placement row exists. The writers of
placements call `start_intervals` / `stop_intervals` in the same transaction that inserts,
moves or deletes the placement rows, so the meter and the placements cannot disagree and a
controller restart loses nothing (an open interval simply counts up to the time it is read).

What an interval charges, per second:
- accelerators: the milli-accelerators the shard holds / 1000 (a quarter of one: 0.25);
- power: the shard's load power (`power_w` per whole accelerator, a fraction draws
  `power_w x milli / 1000`) plus its share of the node's idle power (`idle_power_w x milli /
  (accelerators x 1000)`): the idle power of the accelerators nobody holds is charged to no one.
Sums over a time window are computed by the database (`usage_by`), overlaps clipped to it.

Usage to date (the `maia_usage_*` counters, the console's totals) reads no history: database
triggers keep the closed intervals' sums per (tenant, accelerator model, zone) in `closed_usage`
as the intervals close (migration 0028), and `usage_to_date` adds the open intervals' accrual.
A scrape summed every interval since the epoch: 5 s at 3 million of them on SQLite, and nothing
deletes them (docs/benchmarks.md, `usagetotals`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, and_, bindparam, case, func, insert, literal, or_, select, union_all, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import UnaryExpression
from sqlalchemy.sql.operators import custom_op

from controller.store import models as m
from controller.store.inlist import POSTGRESQL, any_of, any_of_named, dialect_of, listed
from controller.store.marks import rowcount_unread

J_PER_KWH = 3.6e6
_CHUNK = 500


def epoch_s(at: datetime) -> float:
    """Seconds since the epoch (naive datetimes are UTC, as SQLite hands them back)."""
    return m.as_utc(at).timestamp()


def shard_milli(shard_accelerators: int, accelerator_milli: int | None) -> int:
    """Milli-accelerators one placed shard holds: a fraction of one accelerator, or whole ones."""
    if shard_accelerators == 1 and accelerator_milli and accelerator_milli < 1000:
        return accelerator_milli
    return 1000 * shard_accelerators


@dataclass(frozen=True, slots=True)
class StartedShard:
    """A placement row just written (inserted, or moved to a node), in the caller's transaction;
    its interval finds it by (deployment, replica, shard)."""

    deployment_id: int
    replica: int
    shard: int
    node_id: str
    accelerator_milli: int | None
    # The whole accelerators it holds (its accelerator indices): an older revision's shard, moved
    # or placed again during a rollout, holds what its revision asked, not the current spec.
    accelerators: int
    # Its revision's power a whole accelerator, when that revision is not its deployment's current
    # one (an older revision's shard during a rollout draws what its spec says); None: the
    # deployment's (`DeploymentMeter.shard_power_w`).
    power_w: float | None = None


@dataclass(frozen=True, slots=True)
class DeploymentMeter:
    """What an interval needs of the deployment a shard belongs to."""

    name: str
    tenant_id: str
    shard_power_w: float | None


@dataclass(frozen=True, slots=True)
class NodeMeter:
    """What an interval needs of the node a shard starts on."""

    accelerators: int
    accelerator_model: str
    idle_power_w: float | None
    zone_id: str


def node_meters(problem: Mapping[str, Any], node_ids: Collection[str]) -> dict[str, NodeMeter]:
    """The `node_ids` an interchange problem document holds (with their racks and rows), as the
    meter needs them: a writer that has the document (a plan commit's re-check) saves the query."""
    row_of_rack = {r["id"]: r["row"] for r in problem.get("racks", ())}
    zone_of_row = {r["id"]: r["zone"] for r in problem.get("rows", ())}
    meters: dict[str, NodeMeter] = {}
    for n in problem.get("nodes", ()):
        zone = zone_of_row.get(row_of_rack.get(n["rack"], ""))
        if n["id"] in node_ids and zone is not None:
            meters[n["id"]] = NodeMeter(n["accelerators"], n.get("accelerator_model") or "", n.get("idle_power_w"), zone)
    return meters


# An interval names its placement's id, read by the placement's key in the statement itself: the
# placement rows a plan commit inserts need not return their ids (on SQLite the INSERTs of both
# then ride with the commit's next trip: `marks.deferred_writes`).
_PLACEMENTS = m.Placement.__table__
_START_INTERVAL = insert(m.UsageInterval.__table__).values(placement_id=select(_PLACEMENTS.c.id).where(
    _PLACEMENTS.c.deployment_id == bindparam("s_deployment_id"), _PLACEMENTS.c.replica == bindparam("s_replica"),
    _PLACEMENTS.c.shard == bindparam("s_shard")).scalar_subquery())


async def start_intervals(
    session: AsyncSession, started: Sequence[StartedShard], at: datetime, *,
    deployments: Mapping[int, DeploymentMeter] | None = None, nodes: Mapping[str, NodeMeter] | None = None,
) -> None:
    """Open one interval per started shard (in the caller's transaction). `deployments` (by id)
    and `nodes` the caller already read (in this transaction) are not read again; the rest is."""
    if not started:
        return
    deps = dict(deployments or {})
    missing_deps = {s.deployment_id for s in started} - deps.keys()
    if missing_deps:
        deps.update((row.id, DeploymentMeter(row.name, row.tenant_id, row.shard_power_w))
                    for row in await session.execute(
            select(m.Deployment.id, m.Deployment.name, m.Deployment.tenant_id,
                   m.Deployment.shard_power_w).where(any_of(session, m.Deployment.id, missing_deps))))
    where = dict(nodes or {})
    missing_nodes = {s.node_id for s in started} - where.keys()
    if missing_nodes:
        where.update((row.id, NodeMeter(row.accelerators, row.accelerator_model or "", row.idle_power_w, row.zone_id))
                     for row in await session.execute(
            select(m.Node.id, m.Node.accelerator_model, m.Node.accelerators, m.Node.idle_power_w, m.Row.zone_id)
            .join(m.Rack, m.Node.rack_id == m.Rack.id).join(m.Row, m.Rack.row_id == m.Row.id)
            .where(any_of(session, m.Node.id, missing_nodes))))
    start = epoch_s(at)
    rows: list[dict[str, Any]] = []
    for s in started:
        dep, node = deps[s.deployment_id], where[s.node_id]
        milli = shard_milli(s.accelerators, s.accelerator_milli)
        idle_share = (node.idle_power_w or 0.0) * milli / (node.accelerators * 1000) if node.accelerators else 0.0
        rows.append({
            "s_deployment_id": s.deployment_id, "s_replica": s.replica, "s_shard": s.shard,
            "tenant_id": dep.tenant_id, "deployment": dep.name,
            "replica": s.replica, "shard": s.shard, "node_id": s.node_id, "zone_id": node.zone_id,
            "accelerator_model": node.accelerator_model, "accelerator_milli": milli,
            "load_power_w": (s.power_w if s.power_w is not None else dep.shard_power_w or 0.0) * milli / 1000.0,
            "idle_share_w": idle_share,
            "started_s": start, "ended_s": None,
        })
    await session.execute(_START_INTERVAL, rows)


def _least(a: ColumnElement[float], b: ColumnElement[float]) -> ColumnElement[float]:
    return case((a < b, a), else_=b)


def _greatest(a: ColumnElement[float], b: ColumnElement[float]) -> ColumnElement[float]:
    return case((a > b, a), else_=b)


def _ended_at(ended_s: Any) -> ColumnElement[float]:
    """An interval's end: `ended_s`, never before its start. Intervals are stamped by the clock of
    the controller that opens or closes them; one opened by a leader whose clock ran ahead and
    closed by the next would otherwise end before it began: negative accelerator-seconds and
    energy, summed into the totals (`closed_usage`) whose counters must never go back. It ends
    where it began instead, counting nothing (docs/operations.md: the controllers' clocks)."""
    return _greatest(m.UsageInterval.__table__.c.started_s, ended_s)


def _stop_statement(dialect: str) -> Any:
    """`stop_intervals`' UPDATE for `dialect` (Core, built once: per call, building it and its
    cache key cost more than running it), its list of placement ids named `ids`."""
    intervals = m.UsageInterval.__table__.c
    return rowcount_unread(update(m.UsageInterval.__table__)
                           .where(any_of_named(dialect, intervals.placement_id, "ids"), intervals.ended_s.is_(None))
                           .values(ended_s=_ended_at(bindparam("ended_s", type_=Float))))


_STOP = {dialect: _stop_statement(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def stop_intervals(session: AsyncSession, placement_ids: Iterable[int], at: datetime) -> None:
    """Close the open intervals of these placements (removed, or moved away)."""
    ids = sorted(set(placement_ids))
    dialect = dialect_of(session)
    for start in range(0, len(ids), _CHUNK):
        await session.execute(_STOP[dialect], {"ids": listed(dialect, ids[start:start + _CHUNK]),
                                               "ended_s": epoch_s(at)})


async def stop_intervals_on_node(session: AsyncSession, node_id: str, at: datetime) -> None:
    await session.execute(
        update(m.UsageInterval)
        .where(m.UsageInterval.node_id == node_id, m.UsageInterval.ended_s.is_(None))
        .values(ended_s=_ended_at(literal(epoch_s(at), Float))).execution_options(synchronize_session=False)
    )


# --- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Usage summed over a window for one group (the group's fields that were asked for)."""

    tenant: str
    deployment: str
    accelerator_model: str
    zone: str
    accelerator_seconds: float
    energy_j: float

    @property
    def accelerator_hours(self) -> float:
        return self.accelerator_seconds / 3600.0

    @property
    def energy_kwh(self) -> float:
        return self.energy_j / J_PER_KWH


_GROUPS = {
    "tenant": m.UsageInterval.tenant_id,
    "deployment": m.UsageInterval.deployment,
    "accelerator_model": m.UsageInterval.accelerator_model,
    "zone": m.UsageInterval.zone_id,
}


async def usage_by(
    session: AsyncSession, group: Sequence[str], *, now: datetime, tenant: str = "",
    since: datetime | None = None, until: datetime | None = None,
) -> list[UsageTotal]:
    """Usage in [since, until) (until at most `now`; open intervals count up to `now`), summed
    by the database per `group` (names from: tenant, deployment, accelerator_model, zone)."""
    iv = m.UsageInterval
    end_s = min(epoch_s(until), epoch_s(now)) if until is not None else epoch_s(now)
    start_s = epoch_s(since) if since is not None else 0.0
    lo = _greatest(iv.started_s, literal(start_s))
    hi = _least(func.coalesce(iv.ended_s, literal(end_s)), literal(end_s))
    seconds = hi - lo
    columns = [_GROUPS[name] for name in group]
    stmt = (
        select(*columns, func.sum(seconds * iv.accelerator_milli / 1000.0),
               func.sum(seconds * (iv.load_power_w + iv.idle_share_w)))
        .where(and_(iv.started_s < end_s, _ends_after(start_s, open_counted=end_s > start_s)))
        .group_by(*_group_keys(dialect_of(session), columns)).order_by(*columns)
    )
    if tenant:
        stmt = stmt.where(iv.tenant_id == tenant)
    totals = []
    for row in await session.execute(stmt):
        keys = dict(zip(group, row[:len(group)]))
        totals.append(UsageTotal(
            tenant=keys.get("tenant", ""), deployment=keys.get("deployment", ""),
            accelerator_model=keys.get("accelerator_model", ""), zone=keys.get("zone", ""),
            accelerator_seconds=float(row[-2] or 0.0), energy_j=float(row[-1] or 0.0),
        ))
    return totals


def _ends_after(start_s: float, *, open_counted: bool) -> ColumnElement[bool]:
    """Intervals that end after `start_s`, the open ones with them when `open_counted` (the
    window's end is after its start): `coalesce(ended_s, end) > start` in a form the ended_s
    index serves (a range and IS NULL), so a recent window reads its own intervals, not all
    (PostgreSQL: 256 ms -> 1.8 ms for a day of 3 million intervals, docs/benchmarks.md)."""
    ended = m.UsageInterval.ended_s
    return or_(ended > start_s, ended.is_(None)) if open_counted else ended > start_s


def _group_keys(dialect: str, columns: Sequence[Any]) -> list[Any]:
    """The GROUP BY of `columns`; on SQLite each behind a unary + (its documented way to keep a
    term from an index): else its planner reads the whole (tenant_id, started_s) index for the
    grouping's order rather than a window's intervals by ended_s (3 s -> 12 ms for a day of 3
    million intervals)."""
    if dialect == POSTGRESQL:
        return list(columns)
    return [UnaryExpression(column.expression, operator=custom_op("+"), type_=column.type) for column in columns]


# What `usage_to_date` can group by (the closed sums' key).
_TO_DATE_GROUPS = ("tenant", "accelerator_model", "zone")


async def customer_usage_to_date(session: AsyncSession, tenant: str, *, now: datetime, born: datetime | None,
                                 before: tuple[float, float] | None = None) -> list[UsageTotal]:
    """`usage_to_date` of one tenant, less what its id's customers before `born` (its creation)
    used: a tenant id deleted and created again is a new customer. `before`: the id's usage to
    date (accelerator-seconds, joules) stored at its creation (migration 0030), which pruning old
    intervals does not change; without it (a tenant created before 0030), the intervals started
    before `born` (read by the tenant's started_s index: none, and no cost, for an id never
    reused), of which a prune deletes some, leaving their usage charged to the new customer."""
    totals = await usage_to_date(session, ("tenant",), now=now, tenant=tenant)
    if born is None or not totals:
        return totals
    if before is None:
        earlier = await usage_by(session, ("tenant",), now=now, tenant=tenant, until=born)
        if not earlier:
            return totals
        before = earlier[0].accelerator_seconds, earlier[0].energy_j
    return [replace(t, accelerator_seconds=max(0.0, t.accelerator_seconds - before[0]),
                    energy_j=max(0.0, t.energy_j - before[1])) for t in totals]


async def usage_to_date(session: AsyncSession, group: Sequence[str], *, now: datetime,
                        tenant: str = "") -> list[UsageTotal]:
    """Usage up to `now`, summed per `group` (names from: tenant, accelerator_model, zone): the
    closed intervals' sums the triggers keep (`closed_usage`, and on PostgreSQL its deltas not
    folded yet) and the open intervals' accrual, in one statement (one snapshot: an interval
    closing meanwhile is counted once, open or closed). Its cost does not grow with history:
    a row per (tenant, model, zone) and one per open interval (read by the ended_s index). It
    equals `usage_by` over all time but for a closed interval that ends after `now` (another
    controller's clock ahead): counted whole here. It can still read less than a read before it:
    an interval open then (counted to that read's `now`) may since have been closed at an earlier
    time, stamped before its transaction committed; `/metrics` shows the most each counter read
    (`observability.metrics`), a counter that went back being read by Prometheus as a reset."""
    if not set(group) <= set(_TO_DATE_GROUPS):
        raise ValueError(f"usage to date groups by {', '.join(_TO_DATE_GROUPS)}, not {', '.join(group)}")
    iv, closed, deltas = m.UsageInterval, m.ClosedUsage, m.ClosedUsageDelta
    now_s = epoch_s(now)
    accrued = literal(now_s) - iv.started_s
    parts = [
        select(closed.tenant_id, closed.accelerator_model, closed.zone_id, closed.accelerator_seconds,
               closed.energy_j),
        select(deltas.tenant_id, deltas.accelerator_model, deltas.zone_id, deltas.accelerator_seconds,
               deltas.energy_j),
        select(iv.tenant_id, iv.accelerator_model, iv.zone_id, accrued * iv.accelerator_milli / 1000.0,
               accrued * (iv.load_power_w + iv.idle_share_w))
        .where(iv.ended_s.is_(None), iv.started_s < now_s),
    ]
    if tenant:
        parts = [part.where(table.tenant_id == tenant) for part, table in zip(parts, (closed, deltas, iv))]
    summed = union_all(*parts).subquery("usage_parts")
    keys = {"tenant": summed.c.tenant_id, "accelerator_model": summed.c.accelerator_model, "zone": summed.c.zone_id}
    columns = [keys[name] for name in group]
    stmt = (select(*columns, func.sum(summed.c.accelerator_seconds), func.sum(summed.c.energy_j))
            .group_by(*columns).order_by(*columns))
    totals = []
    for row in await session.execute(stmt):
        named = dict(zip(group, row[:len(group)]))
        totals.append(UsageTotal(
            tenant=named.get("tenant", ""), deployment="", accelerator_model=named.get("accelerator_model", ""),
            zone=named.get("zone", ""), accelerator_seconds=float(row[-2] or 0.0), energy_j=float(row[-1] or 0.0),
        ))
    return totals
